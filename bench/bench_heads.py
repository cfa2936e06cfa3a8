"""Wall-clock time of every cached-feature head on an RN50-size few-shot problem (CPU, medians).

The problem: 100 classes, 1024-d features (RN50's embedding width), 16 shots with V = 16 cached views per training
image, a few-shot validation split of 4 images per class and 2,500 test images. The features are synthetic (class
centres plus Gaussian noise; the zero-shot classifier is a noisy copy of the centres): a head's time does not depend on
what the numbers mean, and its accuracy here only shows that it learned something. Each head runs with its declared
defaults (``HEADS[name].defaults``; epochs by RunConfig's rule where a head declares none: 200 at 16 shots) on the
dataset name OxfordPets (Tip-Adapter's search grid and initial alpha/beta for it).

Each head is called once with one epoch as a warm-up (imports, allocator), then the heads run interleaved
(round-robin), ``--repeats`` times each, so that they share the machine's load; a row per head with the median.
Goals: CLAP and Tip-Adapter-F under 10 s; Tip-Adapter and GDA read the test features once (one matrix product against
the zero-shot classifier and their own classifier together) after their search on the validation split.

Usage:
    python bench/bench_heads.py                           # all heads, 3 repeats, 1 thread (about 15 minutes)
    python bench/bench_heads.py --methods clap tip_adapter_f --repeats 1 --out heads_try.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, append_rows, format_table, interleaved, median

from fastprompt.heads import HEADS, HeadTask
from fastprompt.train.config import RunConfig, iterations_per_epoch, resolve

FIELDS = [
    "method", "classes", "dim", "views", "shots", "val", "test", "epochs", "steps", "median_s", "repeats", "times_s",
    "accuracy", "goal_s", "meets_goal", "note",
]  # fmt: skip
GOALS = {"clap": 10.0, "clap+prograd": 10.0, "tip_adapter_f": 10.0, "tip_adapter_f+prograd": 10.0}
NOTE = "synthetic features; machine shared with other jobs (loaded): compare medians within one run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(HEADS), choices=list(HEADS), help="heads to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per head (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see results/README.md)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--val-per-class", type=int, default=4)
    parser.add_argument("--test", type=int, default=2500, help="test images (spread evenly over the classes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "heads_cpu.csv")
    return parser.parse_args(argv)


def make_problem(args: argparse.Namespace) -> dict:
    """The tensors of a HeadTask (everything but config and generator), built once before any timing."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=gen)
    noise = 4.0  # about 60 % zero-shot accuracy: neither trivial nor hopeless

    def draw(labels: torch.Tensor, *shape: int) -> torch.Tensor:
        extra = (1,) * len(shape)
        return centres[labels].view(labels.numel(), *extra, args.dim) + noise * torch.randn(
            labels.numel(), *shape, args.dim, generator=gen
        )

    train_labels = torch.arange(args.classes).repeat_interleave(args.shots)
    val_labels = torch.arange(args.classes).repeat_interleave(args.val_per_class)
    test_labels = torch.arange(args.test) % args.classes
    train_views = draw(train_labels, args.views)
    return {
        "train_views": train_views,
        "train_center": train_views[:, 0].clone(),
        "train_labels": train_labels,
        "val_features": draw(val_labels),
        "val_labels": val_labels,
        "test_features": draw(test_labels),
        "test_labels": test_labels,
        "text_weights": F.normalize(centres + noise * torch.randn(centres.shape, generator=gen), dim=-1),
        "logit_scale": 100.0,
    }


def config_for(method: str, shots: int) -> RunConfig:
    """A resolved run config with the head's declared defaults (the sweep's job once the heads are wired in)."""
    base = resolve(RunConfig(method="coop", dataset="OxfordPets", shots=shots, seed=1))
    return dataclasses.replace(base, method=method, **HEADS[method].defaults_for("OxfordPets"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = make_problem(args)
    configs = {method: config_for(method, args.shots) for method in args.methods}
    results = {}

    def runner(method: str, config: RunConfig):
        def run():
            task = HeadTask(**problem, config=config, generator=torch.Generator().manual_seed(config.seed))
            results[method] = HEADS[method].fit(task)

        return run

    for method in args.methods:  # warm-up: one epoch each
        runner(method, dataclasses.replace(configs[method], epochs=1))()
    times = interleaved({m: runner(m, configs[m]) for m in args.methods}, args.repeats, warmup=0)

    n = args.classes * args.shots
    rows = []
    for method in args.methods:
        config, spec = configs[method], HEADS[method]
        if not spec.trained:
            steps = 0
        elif method.startswith("clap") or method.startswith("tip_adapter_f"):
            per_epoch = iterations_per_epoch(n, config.batch_size) if method.startswith("clap") else -(-n // 256)
            steps = config.epochs * per_epoch
        else:
            steps = config.epochs * iterations_per_epoch(n, config.batch_size)
        seconds = median(times[method])
        goal = GOALS.get(method)
        rows.append(
            {
                "method": method,
                "classes": args.classes,
                "dim": args.dim,
                "views": args.views,
                "shots": args.shots,
                "val": args.classes * args.val_per_class,
                "test": args.test,
                "epochs": config.epochs if spec.trained else 0,
                "steps": steps,
                "median_s": f"{seconds:.3g}",
                "repeats": len(times[method]),
                "times_s": " ".join(f"{t:.3g}" for t in times[method]),
                "accuracy": f"{results[method].accuracy:.2f}",
                "goal_s": goal if goal is not None else "",
                "meets_goal": ("yes" if seconds < goal else "no") if goal is not None else "",
                "note": NOTE,
            }
        )
    print(format_table(rows, ["method", "epochs", "steps", "median_s", "times_s", "accuracy", "goal_s", "meets_goal"]))
    append_rows(args.out, rows, FIELDS)
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
