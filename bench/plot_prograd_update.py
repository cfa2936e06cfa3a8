"""Plot bench/results/prograd_update*.csv (written by bench_prograd_update.py) as PNGs beside them.

For each CSV and gradient dtype, one row of panels per device (on the CPU the device names the thread count): time
per update against the number of segments (one line per implementation and segment length; the cases of unequal
segments, whose ``segment_length`` is a label such as "8192+65536+32", in their own colours), the time relative to the
loop (the paper's way), and the achieved bandwidth as a fraction of the measured copy bandwidth. Uses the newest run
(date) of each configuration.

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
STYLES = {"fused": "-", "cpu_fast": "-", "ref": "--", "loop": ":"}
IMPL_MARKERS = {"fused": "o", "cpu_fast": "o", "ref": "s", "loop": "^"}
BASELINE = "loop"


def latest_rows(path: Path) -> list[dict]:
    """The newest row of each (device, impl, dtype, segments, length) configuration."""
    newest: dict[tuple, dict] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            key = (row["device"], row["impl"], row["grad_dtype"], int(row["segments"]), row["segment_length"])
            if key not in newest or row["date"] >= newest[key]["date"]:
                newest[key] = row
    return list(newest.values())


def plot_device(axes, rows: list[dict]) -> None:
    """Time, time relative to the loop, and fraction of copy bandwidth of one device's rows."""
    ax_time, ax_ratio, ax_bw = axes
    baseline = {(int(r["segments"]), r["segment_length"]): float(r["median_ms"]) for r in rows if r["impl"] == BASELINE}
    uniform = sorted({int(r["segment_length"]) for r in rows if r["segment_length"].isdigit()})
    mixes = sorted({r["segment_length"] for r in rows if not r["segment_length"].isdigit()})
    colors = {str(length): f"C{i}" for i, length in enumerate(uniform)}
    colors.update({label: f"C{len(uniform) + i}" for i, label in enumerate(mixes)})
    for impl in STYLES:
        for label in [*map(str, uniform), *mixes]:
            points = sorted(
                (int(r["segments"]), float(r["median_ms"]), float(r["fraction_of_copy"]))
                for r in rows
                if r["impl"] == impl and r["segment_length"] == label
            )
            if not points:
                continue
            segments, times, fractions = zip(*points, strict=True)
            ratios = [t / baseline.get((s, label), float("nan")) for s, t in zip(segments, times, strict=True)]
            kwargs = dict(marker=IMPL_MARKERS[impl], color=colors[label], label=f"{impl}, L={label}")
            ax_time.plot(segments, times, STYLES[impl], **kwargs)
            ax_ratio.plot(segments, ratios, STYLES[impl], **kwargs)
            ax_bw.plot(segments, fractions, STYLES[impl], **kwargs)
    ax_time.set(xscale="log", yscale="log", xlabel="segments", ylabel="median time per update (ms)")
    ax_ratio.set(xscale="log", yscale="log", xlabel="segments", ylabel=f"median time / {BASELINE}'s")
    ax_ratio.axhline(1.0, color="black", linewidth=0.8)
    ax_bw.set(xscale="log", xlabel="segments", ylabel="achieved GB/s / measured copy GB/s")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=6, ncol=2)


def plot(path: Path) -> list[Path]:
    rows = latest_rows(path)
    written = []
    for dtype in sorted({row["grad_dtype"] for row in rows}):
        subset = [row for row in rows if row["grad_dtype"] == dtype]
        devices = sorted({row["device"] for row in subset})
        fig, axes = plt.subplots(len(devices), 3, figsize=(17, 4.8 * len(devices)), squeeze=False)
        for device_axes, device in zip(axes, devices, strict=True):
            plot_device(device_axes, [row for row in subset if row["device"] == device])
            device_axes[0].set_title(device, fontsize=9, loc="left")
        fig.suptitle(f"ProGrad update, {dtype} gradients ({path.name})")
        fig.tight_layout()
        target = path.with_name(f"{path.stem}_{dtype}.png")
        fig.savefig(target, dpi=100)
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
