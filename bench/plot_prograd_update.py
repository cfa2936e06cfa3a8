"""Plot bench/results/prograd_update*.csv (written by bench_prograd_update.py) as PNGs beside them.

For each CSV and gradient dtype: time per update against the number of segments (one line per implementation and
segment length), and achieved bandwidth as a fraction of the measured copy bandwidth. Uses the newest run (date) of
each configuration.

Usage:
    python bench/plot_prograd_update.py
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

RESULTS = Path(__file__).resolve().parent / "results"
STYLES = {"fused": "-", "ref": "--", "loop": ":"}


def latest_rows(path: Path) -> list[dict]:
    """The newest row of each (impl, dtype, segments, length) configuration."""
    newest: dict[tuple, dict] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            key = (row["impl"], row["grad_dtype"], int(row["segments"]), int(row["segment_length"]))
            if key not in newest or row["date"] >= newest[key]["date"]:
                newest[key] = row
    return list(newest.values())


def plot(path: Path) -> list[Path]:
    rows = latest_rows(path)
    written = []
    for dtype in sorted({row["grad_dtype"] for row in rows}):
        subset = [row for row in rows if row["grad_dtype"] == dtype]
        fig, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
        lengths = sorted({int(row["segment_length"]) for row in subset})
        colors = {length: f"C{i}" for i, length in enumerate(lengths)}
        for impl in STYLES:
            for length in lengths:
                points = sorted(
                    (int(r["segments"]), float(r["median_ms"]), float(r["fraction_of_copy"]))
                    for r in subset
                    if r["impl"] == impl and int(r["segment_length"]) == length
                )
                if not points:
                    continue
                segments, times, fractions = zip(*points, strict=True)
                label = f"{impl}, L={length}"
                ax_time.plot(segments, times, STYLES[impl], marker="o", color=colors[length], label=label)
                ax_bw.plot(segments, fractions, STYLES[impl], marker="o", color=colors[length], label=label)
        ax_time.set(xscale="log", yscale="log", xlabel="segments", ylabel="median time per update (ms)")
        ax_bw.set(xscale="log", xlabel="segments", ylabel="achieved GB/s / measured copy GB/s")
        for ax in (ax_time, ax_bw):
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=7, ncol=2)
        device = subset[0]["device"]
        fig.suptitle(f"ProGrad update, {dtype} gradients, {device} ({path.name})")
        fig.tight_layout()
        target = path.with_name(f"{path.stem}_{dtype}.png")
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def main() -> int:
    paths = sorted(RESULTS.glob("prograd_update*.csv"))
    if not paths:
        print(f"no prograd_update*.csv under {RESULTS.name}/: run bench/bench_prograd_update.py first")
        return 0
    for path in paths:
        for target in plot(path):
            print(f"wrote {target.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
