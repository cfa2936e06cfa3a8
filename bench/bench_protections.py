"""What the reliability protections cost a sweep: the same small sweep with them on and off, interleaved.

"Protections" (docs/reliability.md): the sweep folder's lock (fastprompt/locks.py), the fault-point hooks at every
write (fastprompt/faults.py, unarmed as in normal use), atomic writes with fsync (temporary file, fsync, rename; the
results.jsonl line appended with fsync), the clean-up of stale temporary files, checkpoints at the default interval
(10 minutes), and the per-step divergence checks of the engine (finiteness of every run's losses, gradients and updated
context, the undoing of a non-finite update). Off, the benchmark monkeypatches them away in this process only: a no-op
lock, no-op fault points, plain writes without temporary file or fsync, no clean-up, no checkpoint, and finiteness
checks that answer "finite" without looking. The engine's masking (`torch.where` on the per-run flags) stays in both.

Four figures per variant: `overhead_pct`, the end-to-end median against "off"; `paired_overhead_pct`, the median over
rounds of the ratio to that round's "off" sweep (the rounds rotate the order of the variants); on a shared CPU the noise
of both can exceed the effect; `cpu_overhead_pct`, the same with the process's CPU time, which other jobs disturb far
less (but which misses time spent waiting for the disk, e.g. in fsync); and `accounted_pct`, the wall-clock seconds
spent inside the protections (each wrapped in a timer) less those inside their plain replacements, over the "off"
median: their cost measured without the noise of everything else. A third variant, checkpointing after every step,
bounds the checkpoint's cost from above and gives the cost of one checkpoint of all runs, from which its share at the
default interval follows.

The sweep: ProGrad runs (seeds 1..P) on OxfordPets' 37 classes with the RN50 text tower (random weights), on synthetic
cached features (16 images per class, 2 views), batch 32. Each variant runs `--repeats` times, round-robin after one
untimed warm-up sweep, in a rotating order; a row per variant is appended with the median, every sample and the overhead
against "off". The variants must end with the same prompts (checked), or no row is written.

Usage:
    python bench/bench_protections.py                      # about 8 minutes on 1 CPU thread
    python bench/bench_protections.py --repeats 5 --epochs 12 --workdir /data/scratch   # sweeps written there
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, load_classnames, median
from safetensors.torch import load_file

from fastprompt.clip import load_clip
from fastprompt.train.config import expand_sweep, iterations_per_epoch
from fastprompt.train.sweep import SweepOptions, run_sweep

FIELDS = ["variant", "model", "classes", "runs", "steps", "checkpoints", "median_s", "repeats", "overhead_pct",
          "paired_overhead_pct", "cpu_s", "cpu_overhead_pct", "accounted_s", "accounted_pct", "times_s",
          "note"]  # fmt: skip
DEFAULT_CHECKPOINT_MINUTES = SweepOptions().checkpoint_minutes


class SyntheticCache:
    """An in-memory FeatureCache (split, fewshot, manifest, classnames): random unit features, `views` views."""

    class _Split:
        def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
            self.features, self.labels = features, labels
            self.keys = [f"image{i}" for i in range(len(labels))]
            self.center = features[:, 0]

    class _Subset:
        def __init__(self, train_index: torch.Tensor, keys: list[str]) -> None:
            self.train_index, self.train_keys = train_index, [keys[i] for i in train_index.tolist()]
            self.val_index, self.val_keys = torch.zeros(0, dtype=torch.long), []

    def __init__(self, classnames: list[str], dim: int, per_class: int = 16, views: int = 2) -> None:
        generator = torch.Generator().manual_seed(0)
        k = len(classnames)
        self.path, self.dataset, self.classnames = Path("memory"), "OxfordPets", list(classnames)
        self.manifest = {"model": {"name": "RN50"}, "views": views, "templates": {}}
        train_labels = torch.arange(k * per_class) % k
        self._splits = {
            "train": self._Split(torch.randn(k * per_class, views, dim, generator=generator), train_labels),
            "val": self._Split(torch.randn(0, 1, dim), torch.zeros(0, dtype=torch.long)),
            "test": self._Split(torch.randn(k * 10, 1, dim, generator=generator), torch.arange(k * 10) % k),
        }

    def split(self, name: str):
        return self._splits[name]

    def fewshot(self, shots: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        labels = self._splits["train"].labels
        members = [(labels == c).nonzero()[:, 0] for c in range(len(self.classnames))]
        chosen = torch.cat([m[torch.randperm(len(m), generator=generator)[:shots]] for m in members])
        return self._Subset(chosen, self._splits["train"].keys)


# ------------------------------------------------------------------------------------------------ the switch
class Accounting:
    """Seconds spent inside the protections (or inside their plain replacements) during one sweep, per protection.

    A protection called inside another (the writes of a checkpoint, the fault points of a write) counts once, for the
    outer one.
    """

    def __init__(self) -> None:
        self.buckets: dict[str, float] = {}
        self._depth = 0

    @property
    def seconds(self) -> float:
        return sum(self.buckets.values())

    def timed(self, function, name: str):
        def wrapper(*args, **kwargs):
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                self.buckets[name] = self.buckets.get(name, 0.0) + time.perf_counter() - start

        return wrapper


def _plain_write_bytes(path, payload, point=None) -> None:
    Path(path).write_bytes(payload)


def _plain_append_line(path, line, point=None) -> None:
    with open(path, "a") as stream:
        stream.write(line)


class _NoLock:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def _always_finite(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)


def protections(on: bool, accounting: Accounting) -> contextlib.ExitStack:
    """On: every protection wrapped in a timer. Off: replaced by a no-op (the plain writes that replace the atomic
    ones are timed). Patched wherever a fastprompt module holds them (found by identity, so new users are found)."""
    from fastprompt import atomic, faults, locks
    from fastprompt.train import engine, sweep

    timed = accounting.timed
    originals = [locks.FolderLock, faults.fault_point, atomic.write_bytes, atomic.append_line,
                 atomic.remove_stale_temporaries, engine.finite_rows, engine._all_true, sweep._checkpoint]  # fmt: skip
    names = ["lock", "fault points", "writes", "writes", "clean-up", "finiteness checks", "finiteness checks",
             "checkpoints"]  # fmt: skip
    if on:

        class TimedLock(locks.FolderLock):
            acquire = timed(locks.FolderLock.acquire, "lock")
            release = timed(locks.FolderLock.release, "lock")

        pairs = zip(originals[1:], names[1:], strict=True)
        replacements = [TimedLock, *(timed(function, name) for function, name in pairs)]
    else:
        replacements = [_NoLock, lambda name: None, timed(_plain_write_bytes, "writes"),
                        timed(_plain_append_line, "writes"), lambda *folders, **kwargs: [], _always_finite,
                        lambda flags: True, lambda engine, writer: None]  # fmt: skip
    by_identity = {id(original): replacement for original, replacement in zip(originals, replacements, strict=True)}
    stack = contextlib.ExitStack()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastprompt") or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if id(value) in by_identity:
                stack.enter_context(mock.patch.object(module, attribute, by_identity[id(value)]))
    return stack


# ----------------------------------------------------------------------------------------------------- the sweep
class Variant:
    def __init__(self, name: str, protected: bool, checkpoint_minutes: float) -> None:
        self.name, self.protected, self.checkpoint_minutes = name, protected, checkpoint_minutes
        self.times: list[float] = []
        self.cpu: list[float] = []  # the process's CPU seconds (all its threads) over the same region
        self.accounted: list[float] = []
        self.buckets: list[dict[str, float]] = []
        self.prompts: dict[str, torch.Tensor] = {}
        self.checkpoints = 0


def run_variant(variant: Variant, cache, clip, configs, workdir: Path) -> None:
    """One timed sweep in a fresh folder (made before, removed after the timed region)."""
    from fastprompt.train import results

    folder = Path(tempfile.mkdtemp(prefix=f"{variant.name}-", dir=workdir))
    options = SweepOptions(progress=False, checkpoint_minutes=variant.checkpoint_minutes)
    accounting = Accounting()
    counted = results.ResultWriter.save_checkpoint
    checkpoints = 0

    def counting(writer, run_id, state):
        nonlocal checkpoints
        checkpoints += 1
        return counted(writer, run_id, state)

    with protections(variant.protected, accounting), mock.patch.object(results.ResultWriter, "save_checkpoint",
                                                                       counting):  # fmt: skip
        start, cpu_start = time.perf_counter(), time.process_time()
        records = run_sweep(cache, clip, configs, folder, options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if any(record["status"] != "done" for record in records):
        raise SystemExit(f"{variant.name}: a run did not finish: {records}")
    variant.prompts = {r["run_id"]: load_file(folder / r["run_id"] / "prompt.safetensors")["ctx"] for r in records}
    variant.checkpoints = checkpoints
    variant.times.append(seconds)
    variant.cpu.append(cpu_seconds)
    variant.accounted.append(accounting.seconds)
    variant.buckets.append(dict(accounting.buckets))
    shutil.rmtree(folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps per variant (default 3)")
    parser.add_argument("--runs", type=int, default=4, help="ProGrad runs in the sweep (default 4)")
    parser.add_argument("--shots", type=int, default=4, help="shots per class (default 4: 148 images, 4 steps/epoch)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3: 12 steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see results/README.md)")
    parser.add_argument("--no-every-step", action="store_true", help="skip the checkpoint-every-step variant")
    parser.add_argument("--workdir", type=Path, default=None, help="where the sweeps are written (default: temp)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="clip_prompts.json with class names")
    parser.add_argument("--out", type=Path, default=RESULTS / "protections.csv", help="CSV to append rows to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    begun = time.perf_counter()
    clip = load_clip("RN50")
    classnames = load_classnames(args.prompts, "OxfordPets")
    dim = int(clip.model.text_projection.shape[1])
    cache = SyntheticCache(classnames, dim)
    fixed = {"dataset": "OxfordPets", "epochs": args.epochs, "shots": args.shots, "batch_size": 32}
    configs = expand_sweep({"method": ["prograd"], "seed": list(range(1, args.runs + 1))}, fixed)
    steps = args.epochs * iterations_per_epoch(len(classnames) * args.shots, 32)
    variants = [
        Variant("off", protected=False, checkpoint_minutes=math.inf),
        Variant("on", protected=True, checkpoint_minutes=DEFAULT_CHECKPOINT_MINUTES),
    ]
    if not args.no_every_step:
        variants.append(Variant("on_checkpoint_every_step", protected=True, checkpoint_minutes=0.0))
    workdir = Path(tempfile.mkdtemp(prefix="bench-protections-", dir=args.workdir))
    try:
        names = ", ".join(variant.name for variant in variants)
        print(f"{args.runs} ProGrad runs x {steps} steps, RN50 text tower, {len(classnames)} classes; one warm-up "
              f"sweep, then {args.repeats} rounds of {names}...", flush=True)  # fmt: skip
        warm_up = Variant("warm-up", protected=True, checkpoint_minutes=DEFAULT_CHECKPOINT_MINUTES)
        run_variant(warm_up, cache, clip, configs, workdir)
        print(f"  warm-up: {warm_up.times[0]:.2f} s", flush=True)
        for round_index in range(args.repeats):
            for position in range(len(variants)):  # each round starts with the next variant: no fixed order
                run_variant(variants[(round_index + position) % len(variants)], cache, clip, configs, workdir)
            print(f"  round {round_index + 1}: " + ", ".join(f"{v.name} {v.times[-1]:.2f} s" for v in variants),
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for variant in variants[1:]:
        for run_id, prompt in variants[0].prompts.items():
            if not torch.equal(prompt, variant.prompts[run_id]):
                raise SystemExit(f"{variant.name} trained {run_id} differently from off: no row written.")

    baseline = median(variants[0].times)
    plain = median(variants[0].accounted)  # the plain writes that replace the atomic ones
    hooks = "present" if importlib.util.find_spec("fastprompt.faults") else "absent (not measured)"
    notes = {
        "off": "no lock, no fault points, plain writes (no temporary file, no fsync), no clean-up, no checkpoint, "
        "no finiteness checks; accounted_s: the plain writes",
        "on": f"all protections, checkpoints every {DEFAULT_CHECKPOINT_MINUTES:g} min (the default) and one as runs "
        f"end; fault-point hooks {hooks}; accounted_s: time inside the protections",
        "on_checkpoint_every_step": "all protections, a checkpoint of every run after every step (upper bound)",
    }
    rows = []
    for variant in variants:
        accounted = median(variant.accounted)
        paired = median([mine / theirs - 1.0 for mine, theirs in zip(variant.times, variants[0].times, strict=True)])
        rows.append({
            "variant": variant.name, "model": "RN50 (random weights)", "classes": len(classnames), "runs": args.runs,
            "steps": steps, "checkpoints": variant.checkpoints, "median_s": f"{median(variant.times):.4g}",
            "repeats": len(variant.times), "overhead_pct": f"{100.0 * (median(variant.times) / baseline - 1.0):+.2f}",
            "paired_overhead_pct": f"{100.0 * paired:+.2f}", "cpu_s": f"{median(variant.cpu):.4g}",
            "cpu_overhead_pct": f"{100.0 * (median(variant.cpu) / median(variants[0].cpu) - 1.0):+.2f}",
            "accounted_s": f"{accounted:.4g}", "accounted_pct": f"{100.0 * (accounted - plain) / baseline:+.3f}",
            "times_s": " ".join(f"{t:.3g}" for t in variant.times), "note": notes[variant.name],
        })  # fmt: skip
    print()
    print(format_table(rows, ["variant", "checkpoints", "median_s", "overhead_pct", "paired_overhead_pct", "cpu_s",
                              "cpu_overhead_pct", "accounted_s", "accounted_pct", "times_s"]))  # fmt: skip
    if len(variants) == 3 and variants[2].checkpoints > variants[1].checkpoints:
        extra = (variants[2].checkpoints - variants[1].checkpoints) / args.runs  # checkpoints of all runs
        per_checkpoint = (median(variants[2].accounted) - median(variants[1].accounted)) / extra
        share = 100.0 * per_checkpoint / (DEFAULT_CHECKPOINT_MINUTES * 60.0)
        rows[2]["note"] += (
            f"; one checkpoint of all {args.runs} runs takes {1e3 * per_checkpoint:.1f} ms, {share:.4f}% of the time "
            f"at the default interval"
        )
        print(f"\nOne checkpoint of all runs: {1e3 * per_checkpoint:.1f} ms; at the default interval of "
              f"{DEFAULT_CHECKPOINT_MINUTES:g} minutes that is {share:.4f}% of a sweep's time.")  # fmt: skip
    names = sorted({name for variant in variants[1:2] for buckets in variant.buckets for name in buckets})
    breakdown = ", ".join(
        f"{name} {1e3 * median([buckets.get(name, 0.0) for buckets in variants[1].buckets]):.1f} ms" for name in names
    )
    rows[1]["note"] += f"; inside the protections (median per sweep): {breakdown}"
    print(f"\nInside the protections, median per sweep with them on: {breakdown}; the plain writes that replace the "
          f"atomic ones when off: {1e3 * plain:.1f} ms.")  # fmt: skip
    spread = 100.0 * (max(variants[0].times) - min(variants[0].times)) / baseline
    print(f"Protections on: {rows[1]['overhead_pct']}% end to end, {rows[1]['paired_overhead_pct']}% as the median of "
          f"the rounds' ratios (the 'off' sweeps alone spread over {spread:.1f}%), {rows[1]['cpu_overhead_pct']}% in "
          f"CPU time; {rows[1]['accounted_pct']}% accounted (time inside the protections less the plain "
          f"writes).")  # fmt: skip
    append_rows(args.out, rows, FIELDS)
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - begun:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
