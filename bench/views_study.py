"""How many cached views are enough? CoOp and ProGrad trained from V cached views per image, and online (docs/views.md).

The released code draws a fresh RandomResizedCrop of every training image at every epoch (200 crops per image at 16
shots); fastprompt's cached trainer draws each epoch's view from V stored ones. On the testbed (world v2, the shipped
checkpoint), this trains the same runs (methods x seeds, one shot count) from caches with V = 1, 4, 16, 64 views and
with online augmentation (`fastprompt.train.online`: the image tower in the loop, a fresh crop per image and epoch),
and writes one CSV row per run (`bench/results/views.csv`) and a plot of test accuracy against V
(`bench/results/views.png`, drawn from the CSV by `--plot-only` too).

    python bench/views_study.py                        # the full study: 2 tasks, V = 1,4,16,64 + online, 3 seeds
    python bench/views_study.py --tasks TestbedFineShapes --epochs 50 --seeds 1   # a reduced one
    python bench/views_study.py --plot-only            # redraw the plot from the CSV

Every row records the reduction it ran with (tasks, epochs, shots), so rows of reduced and full studies never mix
unnoticed. Timings on a shared CPU are noisy; the accuracies are not timing-dependent.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["task", "views", "method", "shots", "seed", "epochs", "accuracy", "zero_shot", "train_seconds", "note"]
ONLINE = "online"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="TestbedFineShapes,TestbedFineShapesShift")
    parser.add_argument("--views", default="1,4,16,64", help="cached view counts V")
    parser.add_argument("--no-online", action="store_true", help="skip the online-augmentation runs")
    parser.add_argument("--methods", default="coop,prograd")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=None, help="default: the protocol's (200 at 8 and 16 shots)")
    parser.add_argument("--work", type=Path, default=None, help="folder for data, caches and sweeps (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "views.csv")
    parser.add_argument("--plot", type=Path, default=RESULTS / "views.png")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", default=None, help="testbed checkpoint (default: the shipped v2 one)")
    return parser.parse_args(argv)


def _integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run_study(args: argparse.Namespace, work: Path) -> list[dict]:
    """Train every (task, V or online, method, seed) run; returns the CSV rows."""
    from fastprompt.cache.extract import build_cache
    from fastprompt.cache.loader import FeatureCache
    from fastprompt.cache.plan import CacheOptions
    from fastprompt.data.registry import load_dataset
    from fastprompt.testbed import build_testbed, load_testbed_clip
    from fastprompt.train.config import expand_sweep
    from fastprompt.train.online import train_online
    from fastprompt.train.sweep import SweepOptions, run_sweep

    tasks = [t for t in args.tasks.split(",") if t]
    seeds = _integers(args.seeds)
    methods = [m for m in args.methods.split(",") if m]
    clip = load_testbed_clip(args.checkpoint)
    build_testbed(work / "data", tasks)
    note = f"tasks={'+'.join(tasks)}; epochs={args.epochs or 'protocol'}; seeds={args.seeds}"
    rows = []
    settings: list[int | str] = _integers(args.views) + ([] if args.no_online else [ONLINE])
    for task in tasks:
        dataset = load_dataset(task, work / "data")
        for setting in settings:
            views = 1 if setting == ONLINE else int(setting)
            cache_dir = work / "caches" / f"{task}-v{views}"
            options = CacheOptions(shots=(args.shots,), seeds=tuple(seeds), views=views, dtype="fp32")
            build_cache(dataset, clip, cache_dir, options, num_workers=0, progress=False)
            cache = FeatureCache(cache_dir)
            axes = {"method": ["zeroshot", *methods], "shots": [args.shots], "seed": seeds}
            configs = expand_sweep(axes, {"dataset": task, "epochs": args.epochs, "eval_every": 0})
            sweep_dir = work / "sweeps" / f"{task}-{setting}"
            started = time.monotonic()
            if setting == ONLINE:
                zero = run_sweep(cache, clip, [c for c in configs if c.method == "zeroshot"], sweep_dir / "zs",
                                 SweepOptions(progress=False))  # fmt: skip
                records = train_online(cache, dataset, clip, [c for c in configs if c.method != "zeroshot"],
                                       sweep_dir)  # fmt: skip
            else:
                records = run_sweep(cache, clip, configs, sweep_dir, SweepOptions(progress=False))
                zero = [r for r in records if r["method"] == "zeroshot"]
            elapsed = time.monotonic() - started
            zero_shot = zero[0]["accuracy"]
            for record in records:
                if record["method"] == "zeroshot":
                    continue
                rows.append(
                    {
                        "task": task,
                        "views": setting,
                        "method": record["method"],
                        "shots": record["shots"],
                        "seed": record["seed"],
                        "epochs": args.epochs or "protocol",
                        "accuracy": round(record["accuracy"], 3),
                        "zero_shot": round(zero_shot, 3),
                        "train_seconds": round(elapsed, 1),
                        "note": note,
                    }
                )
            print(f"{task} V={setting}: {len(records)} runs in {elapsed:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(task, method, views) -> (mean, population std, runs) of accuracy."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"], str(row["views"]))].append(float(row["accuracy"]))
    out = {}
    for key, values in groups.items():
        mean = sum(values) / len(values)
        out[key] = (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), len(values))
    return out


def read_rows(path: Path, note: str | None = None) -> list[dict]:
    """The CSV's rows of one study: those with `note`, or with the note of the last row written."""
    import csv

    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return rows
    note = note or rows[-1]["note"]
    return [row for row in rows if row["note"] == note]


def markdown(rows: list[dict]) -> str:
    """A table: one row per (task, method), one column per V and online: mean +- std over seeds."""
    stats = summarise(rows)
    settings = sorted({str(r["views"]) for r in rows}, key=lambda v: (v == ONLINE, int(v) if v != ONLINE else 0))
    lines = ["| task | method | zero-shot | " + " | ".join(f"V = {v}" if v != ONLINE else "online" for v in settings)
             + " |", "|---" * (3 + len(settings)) + "|"]  # fmt: skip
    zero = {r["task"]: float(r["zero_shot"]) for r in rows}
    for task, method in sorted({(r["task"], r["method"]) for r in rows}):
        cells = []
        for setting in settings:
            if (task, method, setting) in stats:
                mean, std, n = stats[(task, method, setting)]
                cells.append(f"{mean:.1f} ± {std:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {task} | {method} | {zero[task]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy (mean +- std over seeds) against V on a log axis, online as a point at the right, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows)
    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    cached = sorted({int(r["views"]) for r in rows if r["views"] != ONLINE})
    online_x = (cached[-1] * 4) if cached else 1
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for method in methods:
            xs = [v for v in cached if (task, method, str(v)) in stats]
            means = [stats[(task, method, str(v))][0] for v in xs]
            stds = [stats[(task, method, str(v))][1] for v in xs]
            line = axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"{method} (cached V views)")
            if (task, method, ONLINE) in stats:
                mean, std, _ = stats[(task, method, ONLINE)]
                axis.errorbar([online_x], [mean], yerr=[std], marker="s", capsize=3, color=line[0].get_color(),
                              linestyle="none", label=f"{method} (online, a fresh crop per epoch)")  # fmt: skip
                axis.axhline(mean, color=line[0].get_color(), linestyle=":", linewidth=0.8)
        zero = [float(r["zero_shot"]) for r in rows if r["task"] == task]
        if zero:
            axis.axhline(zero[0], color="gray", linestyle="--", linewidth=1, label="zero-shot CLIP")
        axis.set_xscale("log", base=2)
        axis.set_xticks([*cached, online_x], [*map(str, cached), "online"])
        axis.set_xlabel("cached views per training image (V)")
        axis.set_ylabel("test accuracy (%), mean ± std over seeds")
        axis.set_title(task)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.plot_only:
        import torch

        torch.set_num_threads(args.threads)
        if args.work is not None:
            rows = run_study(args, args.work)
        else:
            with tempfile.TemporaryDirectory() as work:
                rows = run_study(args, Path(work))
        append_rows(args.out, rows, FIELDS)
    else:
        rows = read_rows(args.out)
    print(markdown(rows))
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
