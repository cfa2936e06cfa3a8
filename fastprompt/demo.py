"""`fastprompt demo`: the whole job offline, on the testbed: data, cache, one batched sweep, report.

Everything lands in one user folder (default `~/.cache/fastprompt/demo`, or `$FASTPROMPT_HOME/demo`): the written
testbed tasks (`data/`), their feature caches (`caches/`) and the sweep (`sweeps/`). Caches and sweep folders are
keyed by the settings, so a second demo with the same settings reuses everything (finished runs are skipped).

The demo runs world v2's tasks with the shipped v2 checkpoint (docs/testbed.md) and ends with three sentences that
`read_results` computes from the sweep's results: nothing in them is written in advance.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastprompt.errors import FastPromptError

# The one list of what the demo trains; a method added to `fastprompt train` joins the demo by being added here.
DEMO_METHODS = ("zeroshot", "zeroshot_ensemble", "linear_probe", "coop", "prograd", "kd")
# How the closing sentences name each method (a method missing here is named by its identifier).
METHOD_NAMES = {
    "zeroshot": "zero-shot CLIP",
    "zeroshot_ensemble": "CLIP++",
    "linear_probe": "the linear probe",
    "coop": "CoOp",
    "prograd": "ProGrad",
    "prograd_ensemble": "ProGrad++",
    "kd": "KD",
}


def default_home() -> Path:
    """The user folder the demo writes to: $FASTPROMPT_HOME/demo or ~/.cache/fastprompt/demo."""
    base = os.environ.get("FASTPROMPT_HOME") or Path.home() / ".cache" / "fastprompt"
    return Path(base) / "demo"


@dataclass
class DemoOptions:
    """What the demo runs. The defaults are the full demo; `quick()` is the reduced one the tests run."""

    out: Path = field(default_factory=default_home)
    tasks: tuple[str, ...] | None = None  # testbed task names (None: world v2's, fastprompt.testbed.DEFAULT_TASKS)
    methods: tuple[str, ...] = DEMO_METHODS
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    epochs: int | None = None  # None: PROTOCOL.md's 50 / 100 / 200 by shots
    eval_every: int = 10  # test accuracy every 10 epochs, for the accuracy-vs-epoch figure
    views: int = 16  # docs/views.md: 16 cached views train as well as a fresh crop per epoch; 4 fall short
    per_class: dict[str, int] | None = None  # testbed images per class per split (None: the testbed's defaults)
    checkpoint: Path | None = None  # None: the shipped v2 checkpoint ("v1": the shipped v1 one)
    progress: bool = True
    plots: bool = True
    threads: int | None = 1  # CPU threads: the tiny model's ops are too small to share between threads

    @classmethod
    def quick(cls, out: Path, **overrides) -> DemoOptions:
        """A reduced demo (two shot counts, two seeds, few epochs, small splits): seconds, not minutes."""
        settings = dict(shots=(1, 2), seeds=(1, 2), epochs=4, views=2, eval_every=2,
                        per_class={"train": 4, "val": 2, "test": 12})  # fmt: skip
        return cls(out=Path(out), **{**settings, **overrides})

    def key(self, task: str, weights: str = "") -> str:
        """A short hash of everything that decides a task's cache and sweep (`weights`: the checkpoint's digest, so
        that a new shipped checkpoint gets new caches instead of a refusal to mix; the cache format, so that a demo
        folder from an older fastprompt gets new caches and sweeps instead of a refusal or a stale result)."""
        from fastprompt.cache.records import FORMAT_VERSION

        skip = ("out", "progress", "plots", "tasks", "methods", "threads")
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        data["task"] = task
        data["weights"] = weights
        data["cache_format"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass
class DemoResult:
    markdown: str
    zero_shot: dict[str, float]  # task -> zero-shot accuracy (%) of the testbed model on its test split
    sweep_dir: Path
    plot_paths: list[Path]
    sentences: list[str] = field(default_factory=list)  # `read_results` of the sweep
    seconds: float = 0.0  # wall time of the demo


def mean_accuracies(records: list[dict]) -> dict[tuple[str, str, int], float]:
    """(dataset, method, shots) -> accuracy (%) averaged over seeds, from finished few-shot result records."""
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for record in records:
        if record.get("status") == "done" and record.get("setting", "fewshot") == "fewshot":
            if isinstance(record.get("accuracy"), int | float):
                scores[(record["dataset"], record["method"], int(record["shots"]))].append(float(record["accuracy"]))
    return {key: sum(values) / len(values) for key, values in scores.items()}


def _name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _shots_phrase(shots: list[int]) -> str:
    words = [f"{s}" for s in shots]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"{listed} shot{'s' if len(shots) > 1 or shots[0] != 1 else ''}"


def read_results(records: list[dict]) -> list[str]:
    """Three plain sentences that read the demo's table, computed from its result records.

    1. Which method is best at the fewest and at the most shots (averaged over the tasks), against zero-shot CLIP.
    2. Where CoOp falls below zero-shot CLIP (task and shot counts), or that it never does.
    3. How ProGrad compares with CoOp over the shot counts, and on the shift task (if any) at the most shots.

    A sentence whose methods did not run is left out.

    Args:
        records: the sweep's `results.jsonl` records.

    Returns:
        The sentences (at most three).
    """
    means = mean_accuracies(records)
    if not means:
        return []
    tasks = sorted({dataset for dataset, _, _ in means})
    shots = sorted({s for _, _, s in means})
    methods = sorted({method for _, method, _ in means})

    def average(method: str, shot: int) -> float | None:
        values = [means.get((task, method, shot)) for task in tasks]
        return None if any(v is None for v in values) else sum(values) / len(values)

    over = "on the task" if len(tasks) == 1 else f"averaged over the {len(tasks)} tasks"
    sentences = []
    ends = [shots[0], shots[-1]] if len(shots) > 1 else shots[:1]
    best = []
    for shot in ends:
        scored = [(average(m, shot), m) for m in methods if average(m, shot) is not None]
        if scored:
            score, method = max(scored)
            best.append(f"{_name(method)} is best at {_shots_phrase([shot])} ({score:.1f}%)")
    zero = average("zeroshot", shots[0])
    tail = f", against {zero:.1f}% for zero-shot CLIP" if zero is not None else ""
    if best:
        sentences.append(f"{' and '.join(best)} {over}{tail}.")
    if "coop" in methods and "zeroshot" in methods:
        below = []
        for task in tasks:
            lower = [s for s in shots if means.get((task, "coop", s), 101.0) < means.get((task, "zeroshot", s), -1.0)]
            if lower:
                below.append(f"{task} at {_shots_phrase(lower)}")
        if below:
            sentences.append(f"CoOp falls below zero-shot CLIP on {'; on '.join(below)}.")
        else:
            sentences.append("CoOp is above zero-shot CLIP at every shot count on every task.")
    if "coop" in methods and "prograd" in methods:
        gaps = {
            s: average("prograd", s) - average("coop", s)
            for s in shots
            if average("prograd", s) is not None and average("coop", s) is not None
        }
        ahead = [s for s, gap in gaps.items() if gap > 0]
        comparison = f"ProGrad is above CoOp at {len(ahead)} of {len(gaps)} shot counts {over}"
        if gaps:
            low, high = min(gaps), max(gaps)
            comparison += f" ({gaps[low]:+.1f} points at {_shots_phrase([low])}"
            comparison += f", {gaps[high]:+.1f} at {_shots_phrase([high])})" if high != low else ")"
        clauses = [comparison]
        for task in [task for task in tasks if task.endswith("Shift")]:
            cells = {m: means.get((task, m, shots[-1])) for m in ("coop", "prograd", "zeroshot")}
            if None not in cells.values():
                clauses.append(
                    f"and on {task} at {_shots_phrase([shots[-1]])} ProGrad reads {cells['prograd']:.1f}%, CoOp "
                    f"{cells['coop']:.1f}% and zero-shot CLIP {cells['zeroshot']:.1f}%"
                )
        sentences.append("; ".join(clauses) + ".")
    return [sentence[0].upper() + sentence[1:] for sentence in sentences[:3]]


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> DemoResult:
    """Build (or reuse) the testbed data and caches, train one sweep per task, and report.

    Raises:
        FastPromptError: an unknown task, or a testbed checkpoint that cannot be loaded.
    """
    import torch

    started = time.monotonic()
    previous_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        result = _run_demo(options, echo)
        result.seconds = time.monotonic() - started
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(options: DemoOptions, echo: Callable[[str], None]) -> DemoResult:
    from fastprompt.cache.extract import build_cache
    from fastprompt.cache.loader import FeatureCache
    from fastprompt.cache.plan import CacheOptions
    from fastprompt.data.registry import load_dataset
    from fastprompt.report import build_report
    from fastprompt.testbed import DEFAULT_TASKS, TESTBED_DATASETS, build_testbed, load_testbed_clip
    from fastprompt.train.config import expand_sweep
    from fastprompt.train.sweep import SweepOptions, run_sweep

    tasks = list(options.tasks or DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in TESTBED_DATASETS]
    if unknown:
        raise FastPromptError(f"Unknown testbed task(s) {unknown}; choose from {', '.join(TESTBED_DATASETS)}.")
    out = Path(options.out)
    clip = load_testbed_clip(options.checkpoint)
    echo(f"Testbed model: {clip.name} from {clip.pretrained}")
    weights = hashlib.sha256(Path(clip.pretrained).read_bytes()).hexdigest()
    build_testbed(out / "data", tasks, options.per_class)
    keys = {task: options.key(task, weights) for task in tasks}
    sweep_dir = out / "sweeps" / hashlib.sha256("|".join(keys.values()).encode()).hexdigest()[:8]
    zero_shot, all_records = {}, []
    for task in tasks:
        cache_dir = out / "caches" / f"{TESTBED_DATASETS[task].dataset_dir}-{keys[task]}"
        cache_options = CacheOptions(shots=options.shots, seeds=options.seeds, views=options.views, dtype="fp32")
        dataset = load_dataset(task, out / "data")
        build_cache(dataset, clip, cache_dir, cache_options, num_workers=0, progress=options.progress)
        cache = FeatureCache(cache_dir)
        axes = {"method": list(options.methods), "shots": list(options.shots), "seed": list(options.seeds)}
        fixed = {"dataset": cache.dataset, "epochs": options.epochs, "eval_every": options.eval_every}
        configs = expand_sweep(axes, fixed)
        echo(f"{task}: {len(configs)} runs ({TESTBED_DATASETS[task].description})")
        records = run_sweep(cache, clip, configs, sweep_dir, SweepOptions(progress=options.progress))
        all_records = records
        scores = [r["accuracy"] for r in records if r["method"] == "zeroshot" and r["dataset"] == task]
        if scores:
            zero_shot[task] = sum(scores) / len(scores)
    for task, score in zero_shot.items():
        echo(f"Zero-shot accuracy of the testbed model on {task} (test split): {score:.1f}%")
    report = build_report(sweep_dir, plots=options.plots)
    sentences = read_results([r for r in all_records if r.get("dataset") in tasks])
    return DemoResult(report.markdown, zero_shot, sweep_dir, list(report.plot_paths), sentences)
