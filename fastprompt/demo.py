"""`fastprompt demo`: the whole job offline, on the testbed: data, cache, one batched sweep, report.

Everything lands in one user folder (default `~/.cache/fastprompt/demo`, or `$FASTPROMPT_HOME/demo`): the written
testbed tasks (`data/`), their feature caches (`caches/`) and the sweep (`sweeps/`). Caches and sweep folders are
keyed by the settings, so a second demo with the same settings reuses everything (finished runs are skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastprompt.errors import FastPromptError

DEMO_METHODS = ("zeroshot", "zeroshot_ensemble", "linear_probe", "coop", "prograd", "kd")


def default_home() -> Path:
    """The user folder the demo writes to: $FASTPROMPT_HOME/demo or ~/.cache/fastprompt/demo."""
    base = os.environ.get("FASTPROMPT_HOME") or Path.home() / ".cache" / "fastprompt"
    return Path(base) / "demo"


@dataclass
class DemoOptions:
    """What the demo runs. The defaults are the full demo; `quick()` is the reduced one the tests run."""

    out: Path = field(default_factory=default_home)
    tasks: tuple[str, ...] | None = None  # testbed task names (None: all)
    methods: tuple[str, ...] = DEMO_METHODS
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    epochs: int | None = None  # None: PROTOCOL.md's 50 / 100 / 200 by shots
    eval_every: int = 10  # test accuracy every 10 epochs, for the accuracy-vs-epoch figure
    views: int = 4
    per_class: dict[str, int] | None = None  # testbed images per class per split (None: the testbed's defaults)
    checkpoint: Path | None = None  # None: the shipped testbed checkpoint
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


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> DemoResult:
    """Build (or reuse) the testbed data and caches, train one sweep per task, and report.

    Raises:
        FastPromptError: an unknown task, or a testbed checkpoint that cannot be loaded.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _run_demo(options, echo)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(options: DemoOptions, echo: Callable[[str], None]) -> DemoResult:
    from fastprompt.cache.extract import build_cache
    from fastprompt.cache.loader import FeatureCache
    from fastprompt.cache.plan import CacheOptions
    from fastprompt.data.registry import load_dataset
    from fastprompt.report import build_report
    from fastprompt.testbed import TESTBED_DATASETS, build_testbed, load_testbed_clip
    from fastprompt.train.config import expand_sweep
    from fastprompt.train.sweep import SweepOptions, run_sweep

    tasks = list(options.tasks or TESTBED_DATASETS)
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
    zero_shot = {}
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
        scores = [r["accuracy"] for r in records if r["method"] == "zeroshot" and r["dataset"] == task]
        if scores:
            zero_shot[task] = sum(scores) / len(scores)
    for task, score in zero_shot.items():
        echo(f"Zero-shot accuracy of the testbed model on {task} (test split): {score:.1f}%")
    report = build_report(sweep_dir, plots=options.plots)
    return DemoResult(report.markdown, zero_shot, sweep_dir, list(report.plot_paths))
