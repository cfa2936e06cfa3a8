"""Sweep overheads: time per step through `fastprompt train`'s loop (`run_sweep`) against `LockstepEngine.step` alone.

A group of P ProGrad runs (seeds 1..P) of OxfordPets on a synthetic in-memory cache (random features, the real class
names), with the RN50 text tower (random weights, QuickGELU). Two variants, run interleaved (round-robin), for each
shot count:

- sweep: `run_sweep` end to end (folder lock, views, teacher weights, encoder, every step, the epoch ends with their
  host reads, the checkpoint at the default interval and the one written before the runs end, the final evaluation,
  the result files), progress bar on as in `fastprompt train`. Inside it, `LockstepEngine.step` and `_finish` are
  wrapped to time them: the rest of the time after the first step is the loop's own per-step work (epoch ends,
  logging, checkpoints, host reads), reported as `loop_overhead_pct`.
- engine: the same number of `LockstepEngine.step` calls on an engine built the same way (same subsets, schedules,
  teacher, initial contexts), set up outside the timing.

1 shot on 37 classes is 37 images, one batch per epoch: every step ends an epoch. 16 shots is 592 images, 18 steps per
epoch. `--steps-1shot` epochs of 1 shot and `--epochs-16shot` epochs of 16 shots are timed (fewer than the protocol's
50 and 200 epochs: the fixed costs, setup and finish, are reported apart and amortised over the protocol's step count
in `projected_overhead_pct`).

Columns: `shots`, `P`, `K`, `steps` (engine steps per variant), `sweep_s` and `engine_s` (medians over the repeats),
`ms_per_step_sweep` and `ms_per_step_engine`, `end_to_end_overhead_pct` = (sweep - engine) / engine, with the fixed
costs of this short sweep; `setup_s` (run_sweep's start to the first step), `finish_s` (the runs' final evaluation and
writes), `loop_other_ms_per_step` (the loop's time outside the steps and `_finish`, per step), `loop_overhead_pct` =
that over the in-sweep step time; `projected_overhead_pct` = (loop_other x steps + setup + finish) / (step x steps)
at the protocol's step count (`protocol_steps`); `times_*` every sample.

Usage:
    python bench/bench_sweep_overhead.py                       # about 6 minutes on 2 CPU cores, 1 thread
    python bench/bench_sweep_overhead.py --classes 10 --repeats 3 --out /tmp/sweep_overhead.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import DEFAULT_PROMPTS, RESULTS, append_rows, format_table, load_classnames, median

import fastprompt.train.sweep as sweep_module
from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.train.config import RunConfig, Schedule, default_epochs, resolve
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.train.sweep import DatasetView, SweepOptions, _initial_context, _templates, run_sweep
from fastprompt.zeroshot import zero_shot_weights

FIELDS = [
    "shots", "P", "K", "steps", "repeats", "sweep_s", "engine_s", "ms_per_step_sweep", "ms_per_step_engine",
    "end_to_end_overhead_pct", "setup_s", "finish_s", "loop_other_ms_per_step", "loop_overhead_pct",
    "protocol_steps", "projected_overhead_pct", "times_sweep_s", "times_engine_s", "note",
]  # fmt: skip


@dataclass
class _Split:
    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str] = field(default_factory=list)


@dataclass
class _Subset:
    train_index: torch.Tensor
    val_index: torch.Tensor
    train_keys: list[str]
    val_keys: list[str]


class SyntheticCache:
    """An in-memory stand-in for FeatureCache (the interface run_sweep uses): random features of the model's width."""

    def __init__(self, classnames: list[str], dim: int, per_class: int = 20, test: int = 3669, views: int = 1) -> None:
        generator = torch.Generator().manual_seed(0)
        k = len(classnames)
        n = k * per_class
        self.path = Path("memory")
        self.dataset = "OxfordPets"
        self.classnames = list(classnames)
        self.manifest = {"model": {"name": "RN50"}, "views": views, "templates": {}}
        labels = torch.arange(n) % k
        self._splits = {
            "train": _Split(torch.randn(n, views, dim, generator=generator), labels, [f"t{i}" for i in range(n)]),
            "val": _Split(torch.randn(k, 1, dim, generator=generator), torch.arange(k), [f"v{i}" for i in range(k)]),
            "test": _Split(
                torch.randn(test, 1, dim, generator=generator), torch.arange(test) % k, [f"x{i}" for i in range(test)]
            ),
        }

    def split(self, name):
        return self._splits[name]

    def fewshot(self, shots, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = self._splits["train"].labels
        members = [(labels == c).nonzero()[:, 0] for c in range(len(self.classnames))]
        chosen = torch.cat([m[torch.randperm(len(m), generator=generator)[:shots]] for m in members])
        return _Subset(chosen, torch.arange(len(self.classnames)), [f"t{i}" for i in chosen.tolist()], [])


class Probe:
    """Wraps LockstepEngine.step and sweep._finish while a sweep runs, to time them inside it."""

    def __init__(self) -> None:
        self.step_s = 0.0
        self.finish_s = 0.0
        self.first_step: float | None = None
        self.steps = 0

    def __enter__(self) -> Probe:
        self._step, self._finish = LockstepEngine.step, sweep_module._finish
        probe = self

        def step(engine):
            start = time.perf_counter()
            if probe.first_step is None:
                probe.first_step = start
            try:
                return probe._step(engine)
            finally:
                probe.step_s += time.perf_counter() - start
                probe.steps += 1

        def finish(*args, **kwargs):
            start = time.perf_counter()
            try:
                return probe._finish(*args, **kwargs)
            finally:
                probe.finish_s += time.perf_counter() - start

        LockstepEngine.step, sweep_module._finish = step, finish
        return self

    def __exit__(self, *exc) -> None:
        LockstepEngine.step, sweep_module._finish = self._step, self._finish


def configs_for(shots: int, p: int, epochs: int) -> list[RunConfig]:
    return [resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=shots, seed=s, epochs=epochs))
            for s in range(1, p + 1)]  # fmt: skip


def build_engine(cache, clip, configs: list[RunConfig]) -> LockstepEngine:
    """The engine `_train_group` builds for these configs (few-shot setting, template prefix), outside any sweep."""
    view = DatasetView(cache, clip, "fewshot")
    prograd_tpl, _ = _templates(cache)
    from fastprompt.templates import template_prefix

    encoder = PromptEncoder(clip, view.base_names, n_ctx=configs[0].n_ctx, prompt_prefix=template_prefix(prograd_tpl))
    teachers = {"single": zero_shot_weights(clip, view.base_names, prograd_tpl)}
    runs, contexts = [], []
    for config in configs:
        rows, labels, _, _ = view.subset(config.shots, config.seed)
        schedule = Schedule(
            rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr, config.warmup_epochs
        )
        runs.append(RunState(config, rows, labels, schedule, torch.Generator().manual_seed(config.seed), "single"))
        contexts.append(_initial_context(encoder, config))
    return LockstepEngine(encoder, view.train.features, runs, torch.stack(contexts), teachers, clip.logit_scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="P, ProGrad runs in the group (default 3)")
    parser.add_argument("--steps-1shot", type=int, default=6, help="1-shot epochs = steps timed (default 6)")
    parser.add_argument("--epochs-16shot", type=int, default=1, help="16-shot epochs (18 steps each; default 1)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 16], help="shot counts (default 1 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--classes", type=int, default=None, help="the first N OxfordPets classes (default all 37)")
    parser.add_argument("--no-progress", action="store_true", help="run the sweep without its progress bar")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="clip_prompts.json with class names")
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_overhead.csv", help="CSV to append rows to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    clip = load_clip("RN50", quick_gelu=True)  # random weights; OpenAI's network (QuickGELU)
    classnames = load_classnames(args.prompts, "OxfordPets")[: args.classes]
    k = len(classnames)
    dim = clip.model.text_projection.shape[1]
    cache = SyntheticCache(classnames, dim)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for shots in args.shots:
            epochs = args.steps_1shot if shots == 1 else args.epochs_16shot
            configs = configs_for(shots, args.runs, epochs)
            n_items = shots * k
            steps = Schedule(n_items, configs[0].batch_size, epochs, configs[0].lr, configs[0].warmup_lr).total_steps
            protocol = Schedule(
                n_items, configs[0].batch_size, default_epochs(shots, "OxfordPets"), configs[0].lr, configs[0].warmup_lr
            ).total_steps
            probes: list[Probe] = []
            engines: list[LockstepEngine] = []
            counter = iter(range(10**6))

            def sweep(configs=configs, probes=probes, counter=counter, shots=shots) -> None:
                options = SweepOptions(progress=not args.no_progress)
                with Probe() as probe:
                    records = run_sweep(cache, clip, configs, Path(scratch) / f"s{shots}_{next(counter)}", options)
                probe.end = time.perf_counter()
                probes.append(probe)
                assert len(records) == len(configs) and all(r["status"] == "done" for r in records), records

            def engine_steps(configs=configs, engines=engines, steps=steps) -> None:
                engine = engines.pop()
                for _ in range(steps):
                    engine.step()
                assert not engine.active

            sweep_times, engine_times = [], []
            print(f"{shots} shot(s): {steps} steps per variant, P = {args.runs}, K = {k}", flush=True)
            for round_index in range(args.repeats + 1):  # round 0: warm-up
                engines.append(build_engine(cache, clip, configs))
                t0 = time.perf_counter()
                sweep()
                t1 = time.perf_counter()
                engine_steps()
                t2 = time.perf_counter()
                if round_index == 0:
                    probes.clear()
                    continue
                sweep_times.append(t1 - t0)
                engine_times.append(t2 - t1)
                probe = probes[-1]
                probe.total = t1 - t0
                probe.setup = probe.first_step - t0
                print(f"  round {round_index}: sweep {t1 - t0:.2f} s, engine {t2 - t1:.2f} s", flush=True)
            sweep_s, engine_s = median(sweep_times), median(engine_times)
            setup_s = median([p.setup for p in probes])
            finish_s = median([p.finish_s for p in probes])
            loop_other = median([(p.end - p.first_step - p.step_s - p.finish_s) / p.steps for p in probes])
            in_step = median([p.step_s / p.steps for p in probes])
            step_engine = engine_s / steps
            projected = (loop_other * protocol + setup_s + finish_s) / (step_engine * protocol)
            rows.append(
                {
                    "shots": shots,
                    "P": args.runs,
                    "K": k,
                    "steps": steps,
                    "repeats": len(sweep_times),
                    "sweep_s": f"{sweep_s:.4g}",
                    "engine_s": f"{engine_s:.4g}",
                    "ms_per_step_sweep": f"{1e3 * sweep_s / steps:.4g}",
                    "ms_per_step_engine": f"{1e3 * step_engine:.4g}",
                    "end_to_end_overhead_pct": f"{100 * (sweep_s - engine_s) / engine_s:.2f}",
                    "setup_s": f"{setup_s:.3g}",
                    "finish_s": f"{finish_s:.3g}",
                    "loop_other_ms_per_step": f"{1e3 * loop_other:.3g}",
                    "loop_overhead_pct": f"{100 * loop_other / in_step:.2f}",
                    "protocol_steps": protocol,
                    "projected_overhead_pct": f"{100 * projected:.2f}",
                    "times_sweep_s": " ".join(f"{t:.3g}" for t in sweep_times),
                    "times_engine_s": " ".join(f"{t:.3g}" for t in engine_times),
                    "note": f"{args.runs} ProGrad runs, {epochs} epoch(s), synthetic cache, "
                    + ("progress off" if args.no_progress else "progress on"),
                }
            )
    columns = ["shots", "steps", "ms_per_step_sweep", "ms_per_step_engine", "end_to_end_overhead_pct", "setup_s",
               "finish_s", "loop_other_ms_per_step", "loop_overhead_pct", "projected_overhead_pct"]  # fmt: skip
    print()
    print(format_table(rows, columns))
    append_rows(args.out, rows, FIELDS)
    print(f"\n{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
