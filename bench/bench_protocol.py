"""The paper's whole RN50 few-shot protocol: fastprompt's time against the released code's, per dataset and in total.

The work: 11 datasets x shots 1/2/4/8/16 x seeds 1-3 x CoOp, ProGrad and ProGrad++ (45 prompt runs per dataset) plus
the baselines (zero-shot CLIP, CLIP++, the linear probe: 45 more runs), on the protocol's epochs (50 / 100 / 200 by
shots, ImageNet 50) and batch 32. Class names: open_clip's ImageNet list and the shared clip_prompts.json (Caltech101
without "background" and "centered face", CoOp's 100 classes). Features: synthetic, of the real few-shot sizes (shots x
classes training images, 2 views), the real validation sizes (min(shots, 4) per class) and the real test-split sizes of
CoOp's split files. RN50 with random weights and QuickGELU (the cost does not depend on the weights).

Parts, all in one process (timings interleaved where they are compared):

1. grid: `LockstepEngine.step` of CoOp groups (one cotangent) and ProGrad groups (two) at `--grid-classes` x
   `--grid-contexts`; a least-squares fit per method of seconds per group-step t = a + b x P x T, where T is the
   token rows of one run on the shared-prefix path (prefix + padded class suffixes, from the encoder's own plan).
2. reference: the released code's step (bench_train_step.ReferenceStep: RN50 image tower on 32 images per pass, 77-token
   student text tower over the K prompts with grad; ProGrad: two image passes, two backward passes, projection; CoOp:
   one and one) at `--reference-classes`, and one image-tower pass. FLOP model: t = n_img x t_img + passes x K x 77 x
   tau, t_img measured, tau fitted per method at the largest K; its error at the other K is reported.
3. end to end (`--e2e`): `run_sweep` over every run of those datasets (prompt runs and baselines) on a synthetic
   in-memory cache, epochs multiplied by `--epoch-scale` (1 = the whole protocol). Every engine step is timed, and the
   grid's model predicts the same steps: the model's error on measured sweeps. The rest of the wall time (teacher
   weights, baselines, evaluation, files) is the overhead, fitted as o0 + o1 x K over the e2e datasets. With
   `--e2e-dir` the e2e runs first and may take several pieces (processes); the grid and reference are measured by the
   piece that completes it.
4. projection: every dataset at the protocol's full epochs: the lock-step groups as `_sweep` forms them (CoOp alone,
   ProGrad with ProGrad++), a group stepping until its longest run ends with P its runs still active; fastprompt =
   sum of the model's step times + overhead; released code = sum over runs of steps x its per-step time at K.

Rows go to bench/results/protocol.csv (kinds: grid, reference, e2e, e2e_step, projection, total); `--plot` draws
protocol.png (cost against classes) from the CSV's latest rows.

Usage (times measured on a loaded 2-core machine, 1 thread):
    python bench/bench_protocol.py --e2e EuroSAT DescribableTextures --epoch-scale 0.01      # 13 minutes
    python bench/bench_protocol.py --repeats 2 --e2e EuroSAT --epoch-scale 0.1 --e2e-baselines  # 12 minutes
    python bench/bench_protocol.py --e2e EuroSAT --epoch-scale 1 --e2e-baselines --e2e-dir bench/.protocol_e2e
    # a whole dataset longer than one sitting, in pieces: each piece stops cleanly at a checkpoint after 2 hours;
    # rerun the same command until the rows are written (the pieces' wall times are summed; bench/results/README.md)
    python bench/bench_protocol.py --e2e OxfordPets --epoch-scale 1 --e2e-baselines --e2e-dir bench/.protocol_e2e \
        --e2e-hours 2
    python bench/bench_protocol.py --plot
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_train_step import IMAGE_GFLOPS, TOKEN_GFLOPS, ReferenceStep, shared_prefix_tokens
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, interleaved, load_classnames, median

from fastprompt.cache.loader import FewShotSubset, SplitFeatures
from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.templates import prograd_template, template_prefix
from fastprompt.train.config import RunConfig, Schedule, default_epochs, expand_sweep, iterations_per_epoch, resolve
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.train.memory import keep_freed_memory
from fastprompt.train.sweep import SweepOptions, run_sweep
from fastprompt.zeroshot import zero_shot_weights

# Test-split sizes of CoOp's split files (its DATASETS.md); ImageNet's test split is the 50,000 validation images.
TEST_SIZES = {
    "ImageNet": 50000, "Caltech101": 2465, "OxfordPets": 3669, "StanfordCars": 8041, "OxfordFlowers": 2463,
    "Food101": 30300, "FGVCAircraft": 3333, "SUN397": 19850, "DescribableTextures": 1692, "EuroSAT": 8100,
    "UCF101": 3783,
}  # fmt: skip
DATASETS = list(TEST_SIZES)
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
PROMPT_METHODS = ("coop", "prograd", "prograd_ensemble")
BASELINES = ("zeroshot", "zeroshot_ensemble", "linear_probe")
CALTECH_DROPPED = ("background", "centered face")  # CoOp ignores BACKGROUND_Google and Faces_easy
EMBED_DIM = 1024  # RN50's image-feature width
FIELDS = [
    "kind", "dataset", "method", "K", "P", "tokens_per_run", "runs", "steps", "epoch_scale", "measured_s",
    "model_s", "model_error_pct", "fastprompt_s", "reference_s", "ratio", "overhead_s", "repeats", "times_s", "note",
]  # fmt: skip


def classnames(dataset: str, prompts: Path) -> list[str]:
    names = load_classnames(prompts, dataset)
    if dataset == "Caltech101":
        names = [name for name in names if name not in CALTECH_DROPPED]
    return names


def protocol_configs(dataset: str, methods, epoch_scale: float = 1.0) -> list[RunConfig]:
    """Every run of `methods` on `dataset`: shots 1/2/4/8/16 x seeds 1-3, epochs scaled (at least 1)."""
    configs = []
    for shots in SHOTS:
        epochs = max(1, round(default_epochs(shots, dataset) * epoch_scale))
        fixed = {"dataset": dataset, "shots": shots, "epochs": epochs}
        configs += expand_sweep({"method": list(methods), "seed": list(SEEDS)}, fixed)
    return configs


def run_steps(config: RunConfig, classes: int) -> int:
    return iterations_per_epoch(config.shots * classes, config.batch_size) * config.epochs


# ------------------------------------------------------------------------------------------------ synthetic cache
class SyntheticCache:
    """A FeatureCache stand-in of a dataset's real sizes: shots x K training images per subset (the 16-shot subset
    holds the others, as in CoOp's sampling only in size), min(shots, 4) x K validation images, the real test split."""

    def __init__(
        self, dataset: str, names: list[str], views: int = 2, dim: int = EMBED_DIM, model: str = "RN50"
    ) -> None:
        k = len(names)
        generator = torch.Generator().manual_seed(0)
        self.path, self.dataset, self.classnames = Path("synthetic"), dataset, list(names)
        self.manifest = {"model": {"name": model}, "views": views, "templates": {}, "dataset": dataset}

        def split(n: int, views: int) -> SplitFeatures:
            features = torch.randn(n, views, dim, generator=generator)
            labels = torch.arange(n) % k
            return SplitFeatures(
                features=features, labels=labels, keys=[f"i{i}" for i in range(n)], center=features[:, 0].clone()
            )

        self._splits = {"train": split(16 * k, views), "val": split(4 * k, 1), "test": split(TEST_SIZES[dataset], 1)}

    def split(self, name: str) -> SplitFeatures:
        return self._splits[name]

    def center_features(self, name: str, purpose: str = "this") -> torch.Tensor:
        return self._splits[name].center

    def fewshot(self, shots: int, seed: int) -> FewShotSubset:
        k = len(self.classnames)
        train = torch.arange(shots * k)
        val = torch.arange(min(shots, 4) * k)
        return FewShotSubset(shots, seed, train, val, [f"i{i}" for i in train.tolist()], [f"i{i}" for i in val])


# --------------------------------------------------------------------------------------------------- the step model
@dataclass
class StepModel:
    """Seconds per group-step t = a + b x P x T (T: token rows of one run), per method family."""

    coefficients: dict  # family -> (a, b)

    def predict(self, family: str, p: int, tokens: int) -> float:
        a, b = self.coefficients[family]
        return a + b * p * tokens

    @staticmethod
    def fit(points: dict[str, list[tuple[int, int, float]]]) -> StepModel:
        coefficients = {}
        for family, rows in points.items():
            design = torch.tensor([[1.0, p * tokens] for p, tokens, _ in rows], dtype=torch.float64)
            target = torch.tensor([[seconds] for _, _, seconds in rows], dtype=torch.float64)
            solution = torch.linalg.lstsq(design, target).solution[:, 0]
            coefficients[family] = (float(solution[0]), float(solution[1]))
        return StepModel(coefficients)


def feature_dim(clip) -> int:
    """The width of the model's image and text features."""
    with torch.no_grad():
        return int(clip.model.encode_text(clip.tokenizer(["a"]).to(clip.device)).shape[-1])


def synchronised(calls: dict, device: str) -> dict:
    """On CUDA a call's time is until its work is done on the device."""
    if device == "cpu":
        return calls
    return {name: (lambda fn=fn: (fn(), torch.cuda.synchronize())) for name, fn in calls.items()}


def family(method: str) -> str:
    return "coop" if method == "coop" else "prograd"


def encoder_for(clip, names: list[str], dataset: str, method: str) -> PromptEncoder:
    prefix = None if method == "coop" else template_prefix(prograd_template(dataset))
    return PromptEncoder(clip, names, n_ctx=16, prompt_prefix=prefix)


def tokens_per_run(clip, names, dataset, method, cache: dict) -> int:
    key = (dataset, family(method))
    if key not in cache:
        cache[key] = shared_prefix_tokens(encoder_for(clip, names, dataset, method))
    return cache[key]


def grid_engine(clip, names, dataset, method, p, teacher) -> LockstepEngine:
    """P runs of `method` on 16-shot synthetic features of K = len(names) classes, ready to step."""
    k = len(names)
    encoder = encoder_for(clip, names, dataset, method)
    features = torch.randn(16 * k, 2, teacher.shape[1], generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16 * k) % k
    runs = []
    for seed in range(1, p + 1):
        config = resolve(RunConfig(method=method, dataset=dataset, shots=16, seed=seed))
        schedule = Schedule(len(labels), config.batch_size, config.epochs, config.lr, config.warmup_lr)
        runs.append(
            RunState(
                config,
                torch.arange(len(labels)),
                labels,
                schedule,
                torch.Generator().manual_seed(seed),
                teacher="zs" if config.uses_teacher else None,
            )
        )
    kind = "random" if method == "coop" else "template"
    contexts = torch.stack([encoder.initial_context(kind, torch.Generator().manual_seed(s)) for s in range(p)])
    return LockstepEngine(encoder, features, runs, contexts, {"zs": teacher}, clip.logit_scale)


def measure_grid(clip, args, tokens_cache) -> tuple[StepModel, list[dict]]:
    datasets = {k: next(d for d in DATASETS if len(classnames(d, args.prompts)) == k) for k in args.grid_classes}
    steps, shapes = {}, {}
    for k, dataset in datasets.items():
        names = classnames(dataset, args.prompts)
        teacher = zero_shot_weights(clip, names, prograd_template(dataset))
        for method in ("coop", "prograd"):
            for p in args.grid_contexts:
                name = f"{method} K={k} P={p}"
                steps[name] = grid_engine(clip, names, dataset, method, p, teacher).step
                shapes[name] = (method, dataset, k, p, tokens_per_run(clip, names, dataset, method, tokens_cache))
    print(f"grid: {len(steps)} engines, {args.repeats} rounds after one warm-up...", flush=True)
    times = interleaved(synchronised(steps, args.device), args.repeats, warmup=1)
    points: dict[str, list] = {"coop": [], "prograd": []}
    for name, (method, _, _k, p, tokens) in shapes.items():
        points[method].append((p, tokens, median(times[name])))
    model = StepModel.fit(points)
    rows = []
    for name, (method, dataset, k, p, tokens) in shapes.items():
        measured = median(times[name])
        predicted = model.predict(method, p, tokens)
        rows.append(
            {
                "kind": "grid",
                "dataset": dataset,
                "method": method,
                "K": k,
                "P": p,
                "tokens_per_run": tokens,
                "measured_s": f"{measured:.4g}",
                "model_s": f"{predicted:.4g}",
                "model_error_pct": f"{100 * (predicted - measured) / measured:+.1f}",
                "repeats": len(times[name]),
                "times_s": " ".join(f"{t:.3g}" for t in times[name]),
                "note": "seconds per group-step; model a + b P T fitted on these points: a, b = "
                + ", ".join(f"{v:.4g}" for v in model.coefficients[method]),
            }
        )
    return model, rows


# ---------------------------------------------------------------------------------------------- the released code
class ReferenceModel:
    """Seconds per step of the released code: n_img x t_img + passes x K x 77 x tau (FLOP-proportional text work),
    tau per method (ProGrad's second backward runs on a retained graph: its passes cost more than CoOp's)."""

    IMAGES = {"coop": 1, "prograd": 2}  # image-tower passes per step (ProGrad: student and teacher)
    PASSES = {"coop": 2, "prograd": 3}  # text-tower passes over K x 77 tokens: forward + backward(s)

    def __init__(self, t_img: float, tau: dict[str, float]) -> None:
        self.t_img, self.tau = t_img, tau

    def predict(self, method: str, k: int) -> float:
        fam = family(method)
        return self.IMAGES[fam] * self.t_img + self.PASSES[fam] * k * 77 * self.tau[fam]


def measure_reference(clip, args) -> tuple[ReferenceModel, list[dict]]:
    calls, shapes = {}, {}
    for k in args.reference_classes:
        dataset = next(d for d in DATASETS if len(classnames(d, args.prompts)) == k)
        names = classnames(dataset, args.prompts)
        teacher = zero_shot_weights(clip, names, prograd_template(dataset))
        for method in ("coop", "prograd"):
            step = ReferenceStep(
                clip,
                names,
                teacher,
                32,
                teacher_text_per_step=False,
                method=method,
                prefix=template_prefix(prograd_template(dataset)),
            )
            calls[f"{method} K={k}"] = step
            shapes[f"{method} K={k}"] = (method, dataset, k)
    image_step = next(iter(calls.values()))
    calls["image_tower_x1"] = image_step.image_features
    print(f"reference: {len(calls)} variants, {args.reference_repeats} rounds after one warm-up...", flush=True)
    times = interleaved(synchronised(calls, args.device), args.reference_repeats, warmup=1)
    t_img = median(times["image_tower_x1"])
    top = max(args.reference_classes)
    tau = {
        fam: (median(times[f"{fam} K={top}"]) - ReferenceModel.IMAGES[fam] * t_img)
        / (ReferenceModel.PASSES[fam] * top * 77)
        for fam in ("coop", "prograd")
    }
    model = ReferenceModel(t_img, tau)
    rows = [
        {
            "kind": "reference",
            "method": "image_tower_x1",
            "measured_s": f"{t_img:.4g}",
            "repeats": len(times["image_tower_x1"]),
            "times_s": " ".join(f"{t:.3g}" for t in times["image_tower_x1"]),
            "note": "one RN50 image-tower forward on 32 images, no grad",
        }
    ]
    for name, (method, dataset, k) in shapes.items():
        measured, predicted = median(times[name]), model.predict(method, k)
        rows.append(
            {
                "kind": "reference",
                "dataset": dataset,
                "method": method,
                "K": k,
                "measured_s": f"{measured:.4g}",
                "model_s": f"{predicted:.4g}",
                "model_error_pct": f"{100 * (predicted - measured) / measured:+.1f}",
                "repeats": len(times[name]),
                "times_s": " ".join(f"{t:.3g}" for t in times[name]),
                "note": f"released code's step; FLOP model fitted on each method at K={top} (tau "
                f"{tau[family(method)]:.4g} s per token-pass, text {TOKEN_GFLOPS / tau[family(method)]:.1f} "
                "GFLOP/s; image "
                f"{32 * IMAGE_GFLOPS / t_img:.1f} GFLOP/s)",
            }
        )
    return model, rows


# ------------------------------------------------------------------------------------------------------ projection
def fastprompt_steps_seconds(configs, k: int, tokens: dict[str, int], model: StepModel, group: int) -> float:
    """The lock-step groups as `_sweep` forms them (CoOp alone; ProGrad with ProGrad++; at most `group` runs), each
    stepping until its longest run ends with P = its runs still active: sum of a + b P T over the group's steps."""
    total = 0.0
    for fam in ("coop", "prograd"):
        members = [run_steps(c, k) for c in configs if c.uses_prompt and family(c.method) == fam]
        for start in range(0, len(members), group):
            chunk = members[start : start + group]
            a, b = model.coefficients[fam]
            total += a * max(chunk, default=0) + b * tokens[fam] * sum(chunk)
    return total


def reference_seconds(configs, k: int, model: ReferenceModel) -> float:
    return sum(run_steps(c, k) * model.predict(c.method, k) for c in configs if c.uses_prompt)


# ---------------------------------------------------------------------------------------------------- end to end
class Ledger:
    """The pieces of one e2e measurement kept in a folder (`--e2e-dir`): a measurement of a whole dataset may take
    longer than one sitting, so each piece (one process) appends its wall time and its timed engine steps to
    pieces.jsonl when it stops, and rewrites running.json every `HEARTBEAT_S` while it runs. A piece killed before
    its line was written is folded in from its last heartbeat by the next piece (`kind: killed`). Steps redone after
    a kill (those after the last checkpoint) stay in the wall time: they are what the interruption cost."""

    HEARTBEAT_S = 30.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.pieces_path, self.running_path = folder / "pieces.jsonl", folder / "running.json"
        self.last_beat = 0.0

    def pieces(self) -> list[dict]:
        if not self.pieces_path.exists():
            return []
        return [json.loads(line) for line in self.pieces_path.read_text().splitlines() if line.strip()]

    def recover(self) -> None:
        if self.running_path.exists():
            piece = json.loads(self.running_path.read_text())
            piece["kind"] = "killed"
            self.append(piece)

    def append(self, piece: dict) -> None:
        with open(self.pieces_path, "a") as handle:
            handle.write(json.dumps(piece) + "\n")
        self.running_path.unlink(missing_ok=True)

    def beat(self, piece: dict, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_beat >= self.HEARTBEAT_S:
            temporary = self.running_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(piece))
            temporary.replace(self.running_path)
            self.last_beat = now


def measure_e2e(clip, dataset, names, args) -> dict | None:
    """run_sweep over the prompt runs of `dataset`, every engine step timed (for the grid's model to predict them);
    then run_sweep over its baselines, timed apart (the same work in the released code: zero-shot weights, L-BFGS).

    With `--e2e-dir` the sweep folders are kept and a rerun of the same command resumes them from their checkpoints;
    `--e2e-hours` (or SIGTERM / SIGINT) ends a piece cleanly at a checkpoint. Returns None while the dataset's runs
    are not all done, else the measurement summed over its pieces."""
    import signal
    import tempfile

    cache = SyntheticCache(dataset, names, dim=feature_dim(clip), model=clip.name)
    configs = protocol_configs(dataset, PROMPT_METHODS, args.epoch_scale)
    baselines = protocol_configs(dataset, BASELINES) if args.e2e_baselines else []
    temporary = None
    if args.e2e_dir is None:
        temporary = tempfile.TemporaryDirectory()
        folder = Path(temporary.name)
    else:
        on = "" if args.device == "cpu" else f"-{args.device}"
        folder = args.e2e_dir / f"{dataset}-scale{args.epoch_scale:g}{'-baselines' if baselines else ''}{on}"
    ledger = Ledger(folder)
    ledger.recover()
    options = SweepOptions(device=args.device, progress=args.progress, checkpoint_minutes=args.checkpoint_minutes)
    deadline = time.monotonic() + args.e2e_hours * 3600 if args.e2e_hours else None
    started = time.monotonic()
    piece = {"kind": "piece", "threads": args.threads, "wall": 0.0, "baseline_wall": 0.0, "steps": []}
    original = LockstepEngine.step

    def stop(*_):  # at the next step: the sweep checkpoints the group and returns
        options.stop_after_steps = 0

    def timed_step(engine):
        active = sum(1 for run in engine.runs if not run.done and run.status != "failed")
        begun = time.perf_counter()
        result = original(engine)
        if args.device != "cpu":  # a step's time is until its work is done on the device
            torch.cuda.synchronize()
        piece["steps"].append((family(engine.runs[0].config.method), active, time.perf_counter() - begun))
        piece["wall"] = time.monotonic() - started
        ledger.beat(piece)
        if deadline is not None and time.monotonic() >= deadline:
            stop()
        return result

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    LockstepEngine.step = timed_step
    try:
        records = run_sweep(cache, clip, configs, folder / "sweep", options)
        piece["wall"] = time.monotonic() - started
        complete = len(records) == len(configs) and all(r["status"] == "done" for r in records)
        if complete and baselines:
            begun = time.monotonic()
            records += run_sweep(cache, clip, baselines, folder / "base", SweepOptions(args.device, progress=False))
            piece["baseline_wall"] = time.monotonic() - begun
    finally:
        LockstepEngine.step = original
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ledger.append(piece)
    pieces = ledger.pieces()
    if temporary is not None:
        temporary.cleanup()
    if not complete:
        done = sum(1 for r in records if r["status"] == "done")
        print(f"{dataset}: piece {len(pieces)} stopped after {piece['wall']:.0f} s with {done} of {len(configs)} "
              f"prompt runs done; rerun the same command to go on.", flush=True)  # fmt: skip
        return None
    assert len(records) == len(configs) + len(baselines), "a run is missing"
    assert all(r["status"] == "done" for r in records), "a run did not finish"
    steps = [tuple(step) for p in pieces for step in p["steps"]]
    wall = sum(p["wall"] for p in pieces)
    measured_steps = sum(seconds for _, _, seconds in steps)
    return {
        "configs": configs,
        "wall": wall,
        "pieces": len(pieces),
        "killed": sum(1 for p in pieces if p["kind"] == "killed"),
        "threads": sorted({p["threads"] for p in pieces}),
        "baselines": len(baselines),
        "baseline_wall": sum(p["baseline_wall"] for p in pieces),
        "steps": steps,
        "measured_steps": measured_steps,
        "overhead": wall - measured_steps,
    }


def step_rows(dataset: str, k: int, steps, model: StepModel, tokens: dict[str, int]) -> list[dict]:
    """Per method family and active runs P: the e2e sweep's engine steps (median) against the grid's model."""
    by_shape: dict[tuple[str, int], list[float]] = {}
    for fam, p, seconds in steps:
        by_shape.setdefault((fam, p), []).append(seconds)
    rows = []
    for (fam, p), times in sorted(by_shape.items()):
        measured, predicted = median(times), model.predict(fam, p, tokens[fam])
        rows.append(
            {
                "kind": "e2e_step",
                "dataset": dataset,
                "method": fam,
                "K": k,
                "P": p,
                "tokens_per_run": tokens[fam],
                "steps": len(times),
                "measured_s": f"{measured:.4g}",
                "model_s": f"{predicted:.4g}",
                "model_error_pct": f"{100 * (predicted - measured) / measured:+.1f}",
                "repeats": len(times),
                "note": f"seconds per group-step inside the e2e sweep (median of its {len(times)} steps with P runs "
                "active) against the grid's model",
            }
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid-classes", nargs="+", type=int, default=[10, 47], help="K of the grid (dataset sizes)")
    parser.add_argument("--grid-contexts", nargs="+", type=int, default=[1, 15], help="P of the grid")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the grid")
    parser.add_argument("--reference-classes", nargs="+", type=int, default=[10, 37], help="K of the reference steps")
    parser.add_argument("--reference-repeats", type=int, default=2, help="timed rounds of the reference steps")
    parser.add_argument("--e2e", nargs="*", default=["EuroSAT"], help="datasets run end to end")
    parser.add_argument("--epoch-scale", type=float, default=0.02, help="epochs x this in the e2e runs (1: whole)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--group", type=int, help="runs per lock-step group (default: a sweep's, 15 on a CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where everything runs (cpu)")
    parser.add_argument("--model", default="RN50", help="open_clip model, random weights (RN50; tests: a tiny one)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="clip_prompts.json with class names")
    parser.add_argument("--out", type=Path, default=RESULTS / "protocol.csv", help="CSV to append rows to")
    parser.add_argument("--progress", action="store_true", help="progress bars of the e2e sweeps")
    parser.add_argument("--e2e-baselines", action="store_true", help="also time the e2e datasets' 45 baseline runs")
    parser.add_argument("--e2e-dir", type=Path, help="keep the e2e sweeps here; a rerun resumes them (long runs)")
    parser.add_argument("--e2e-hours", type=float, help="end this piece of the e2e cleanly after this many hours")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, help="the e2e sweeps' checkpoint interval")
    parser.add_argument("--plot", action="store_true", help="only draw protocol.png from the CSV's latest rows")
    parser.add_argument("--note", default="", help="appended to every row's note (e.g. the machine's load)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        return plot(args.out, args.out.with_suffix(".png"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.device == "cpu":
        keep_freed_memory()  # as `fastprompt train` on a CPU
    if args.group is None:  # as `_sweep` forms groups: at most 15 runs on a CPU, SweepOptions.max_group elsewhere
        args.group = 15 if args.device == "cpu" else SweepOptions().max_group
    started = time.perf_counter()
    clip = load_clip(args.model, device=args.device, quick_gelu=True)  # random weights; OpenAI's network
    names = {dataset: classnames(dataset, args.prompts) for dataset in DATASETS}
    e2e = {}
    for dataset in args.e2e:  # first: a long measurement in pieces needs no grid until its last piece
        print(f"end to end: {dataset} at epoch scale {args.epoch_scale}...", flush=True)
        result = measure_e2e(clip, dataset, names[dataset], args)
        if result is None:
            return 0
        e2e[dataset] = result
    token_cache: dict = {}
    tokens = {
        d: {fam: tokens_per_run(clip, names[d], d, fam, token_cache) for fam in ("coop", "prograd")} for d in DATASETS
    }
    step_model, rows = measure_grid(clip, args, token_cache)
    reference_model, reference_rows = measure_reference(clip, args)
    rows += reference_rows
    for dataset, result in e2e.items():
        result["predicted_steps"] = sum(step_model.predict(f, p, tokens[dataset][f]) for f, p, _ in result["steps"])

    if e2e:  # overhead o0 + o1 K by least squares over the e2e datasets (o1 = 0 with one dataset)
        ks = [len(names[d]) for d in e2e]
        overheads = [result["overhead"] for result in e2e.values()]
        if len(set(ks)) > 1:
            mean_k, mean_o = statistics.fmean(ks), statistics.fmean(overheads)
            slope = sum((k - mean_k) * (o - mean_o) for k, o in zip(ks, overheads, strict=True)) / sum(
                (k - mean_k) ** 2 for k in ks
            )
            overhead = (mean_o - slope * mean_k, slope)
        else:
            overhead = (overheads[0], 0.0)
    else:
        overhead = (0.0, 0.0)
    for dataset, result in e2e.items():
        k = len(names[dataset])
        configs = result["configs"]
        reference = reference_seconds(configs, k, reference_model)
        projected = (
            fastprompt_steps_seconds(configs, k, tokens[dataset], step_model, args.group)
            + overhead[0]
            + overhead[1] * k
        )
        step_error = 100 * (result["predicted_steps"] - result["measured_steps"]) / result["measured_steps"]
        rows.append(
            {
                "kind": "e2e",
                "dataset": dataset,
                "method": "coop+prograd+prograd_ensemble",
                "K": k,
                "runs": len(configs),
                "steps": sum(run_steps(c, k) for c in configs),
                "epoch_scale": args.epoch_scale,
                "measured_s": f"{result['wall']:.4g}",
                "model_s": f"{projected:.4g}",
                "model_error_pct": f"{100 * (projected - result['wall']) / result['wall']:+.1f}",
                "fastprompt_s": f"{result['wall']:.4g}",
                "reference_s": f"{reference:.4g}",
                "ratio": f"{reference / result['wall']:.2f}",
                "overhead_s": f"{result['overhead']:.4g}",
                "note": f"run_sweep of the prompt runs; its {len(result['steps'])} engine steps took "
                f"{result['measured_steps']:.4g} s, the step model says {result['predicted_steps']:.4g} s "
                f"({step_error:+.1f}%); model_s = lock-step simulation + overhead fit; released code: steps x its "
                "per-step model (its set-up and evaluation not counted)"
                + (
                    f"; measured in {result['pieces']} pieces ({result['killed']} killed), resumed from checkpoints, "
                    f"torch threads {result['threads']}"
                    if result["pieces"] > 1
                    else ""
                ),
            }
        )
        rows += step_rows(dataset, k, result["steps"], step_model, tokens[dataset])
        if not result["baselines"]:
            continue
        rows.append(
            {
                "kind": "e2e",
                "dataset": dataset,
                "method": "zeroshot+zeroshot_ensemble+linear_probe",
                "K": k,
                "runs": result["baselines"],
                "measured_s": f"{result['baseline_wall']:.4g}",
                "fastprompt_s": f"{result['baseline_wall']:.4g}",
                "note": "run_sweep of the baselines on synthetic features (the same work in the released code; not "
                "projected: the linear probe's L-BFGS iterations depend on the data)",
            }
        )

    totals = {"runs": 0, "steps": 0, "fastprompt": 0.0, "reference": 0.0}
    for dataset in DATASETS:
        k = len(names[dataset])
        configs = protocol_configs(dataset, PROMPT_METHODS)
        fast = (
            fastprompt_steps_seconds(configs, k, tokens[dataset], step_model, args.group)
            + overhead[0]
            + overhead[1] * k
        )
        reference = reference_seconds(configs, k, reference_model)
        run_count, step_count = len(configs), sum(run_steps(c, k) for c in configs)
        totals["runs"] += run_count
        totals["steps"] += step_count
        totals["fastprompt"] += fast
        totals["reference"] += reference
        rows.append(
            {
                "kind": "projection",
                "dataset": dataset,
                "method": "coop+prograd+prograd_ensemble",
                "K": k,
                "runs": run_count,
                "steps": step_count,
                "epoch_scale": 1,
                "fastprompt_s": f"{fast:.4g}",
                "reference_s": f"{reference:.4g}",
                "ratio": f"{reference / fast:.2f}",
                "overhead_s": f"{overhead[0] + overhead[1] * k:.4g}",
                "tokens_per_run": f"{tokens[dataset]['coop']}/{tokens[dataset]['prograd']}",
                "note": "whole protocol's prompt runs, projected: lock-step simulation of the grid's step model + "
                "the e2e overhead fit; released code: steps x its per-step FLOP model at K. Baselines (45 runs) "
                "not included: the same work on both sides",
            }
        )
    rows.append(
        {
            "kind": "total",
            "dataset": "all 11",
            "runs": totals["runs"],
            "steps": totals["steps"],
            "epoch_scale": 1,
            "fastprompt_s": f"{totals['fastprompt']:.4g}",
            "reference_s": f"{totals['reference']:.4g}",
            "ratio": f"{totals['reference'] / totals['fastprompt']:.2f}",
            "note": "sum of the projection rows",
        }
    )
    for row in rows:
        row["note"] = (row.get("note", "") + ("; " + args.note if args.note else "")).strip("; ")
    columns = [
        "kind",
        "dataset",
        "method",
        "K",
        "P",
        "runs",
        "steps",
        "measured_s",
        "model_s",
        "model_error_pct",
        "fastprompt_s",
        "reference_s",
        "ratio",
    ]
    print()
    print(format_table(rows, columns))
    append_rows(args.out, rows, FIELDS)
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - started:.0f} s.")
    return 0


def plot(csv_path: Path, png_path: Path) -> int:
    """Projected hours per dataset against its class count, fastprompt and the released code (latest rows)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle)]
    latest = max(row["date"] for row in rows if row["kind"] == "projection")
    projection = [r for r in rows if r["kind"] == "projection" and r["date"] == latest]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    ks = [int(r["K"]) for r in projection]
    for key, label, marker in (("reference_s", "released code (FLOP model)", "s"), ("fastprompt_s", "fastprompt", "o")):
        axis.scatter(ks, [float(r[key]) / 3600 for r in projection], label=label, marker=marker)
    whole = {}  # the latest measurement of each dataset run end to end at the protocol's full epochs
    for row in rows:
        if row["kind"] == "e2e" and row["method"] == "coop+prograd+prograd_ensemble" and float(row["epoch_scale"]) == 1:
            whole[row["dataset"]] = row
    if whole:
        axis.scatter([int(r["K"]) for r in whole.values()], [float(r["measured_s"]) / 3600 for r in whole.values()],
                     label="fastprompt, measured end to end", marker="x", s=60, color="black")  # fmt: skip
    for row in projection:
        axis.annotate(
            row["dataset"],
            (int(row["K"]), float(row["fastprompt_s"]) / 3600),
            fontsize=7,
            xytext=(3, -9),
            textcoords="offset points",
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("classes K")
    axis.set_ylabel("hours for the dataset's 45 prompt runs")
    axis.set_title(f"Whole RN50 few-shot protocol, projected ({rows[-1]['device']})", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
