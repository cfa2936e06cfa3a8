"""Figures of a sweep folder for `fastprompt report`: accuracy against shots (the paper's Figure 4), test accuracy
against epoch (Figure 1, from `--eval-every`) and the G_d-G_g angle against epoch (Figure 6)."""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from fastprompt.report import PAPER_SHOTS, ZERO_SHOT, Cell, Variant, _finite, _variant, fewshot_cells, load_log


def _filename(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)


def _epoch_means(sweep_dir: Path, records: list[dict], key: str, transform=None) -> dict[int, float]:
    """epoch -> mean over runs (seeds) of `key` from log.jsonl."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for record in records:
        for row in load_log(sweep_dir, record):
            if _finite(row.get(key)):
                value = float(row[key])
                by_epoch[row["epoch"]].append(transform(value) if transform else value)
    return {epoch: statistics.fmean(values) for epoch, values in sorted(by_epoch.items())}


def _logged(sweep_dir: Path, records: list[dict], key: str) -> dict[int, dict[Variant, list[dict]]]:
    """shots -> variant -> runs whose log.jsonl has `key`."""
    found: dict[int, dict[Variant, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if any(_finite(row.get(key)) for row in load_log(sweep_dir, record)):
            found[record["shots"]][_variant(record)].append(record)
    return found


def draw_plots(sweep_dir: Path, out_dir: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    paths: list[Path] = []
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_dataset[record["dataset"]].append(record)

    def save(fig, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    for dataset in sorted(by_dataset):
        runs = by_dataset[dataset]
        # Figure 4: accuracy against shots.
        cells = fewshot_cells(runs)
        trained = {v: c for v, c in cells.items() if v.method not in ZERO_SHOT}
        shots = sorted({s for c in trained.values() for s in c})
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in sorted(trained):
            xs = [s for s in shots if trained[variant].get(s)]
            stats = [Cell(list(trained[variant][s].values())) for s in xs]
            ax.errorbar(
                xs, [c.mean for c in stats], yerr=[c.std for c in stats], marker="o", capsize=3, label=variant.label
            )
        zero_colors = {"zeroshot": "black", "zeroshot_ensemble": "grey"}
        for variant in sorted(v for v in cells if v.method in ZERO_SHOT):
            values = next(iter(cells[variant].values()), {})
            if values:
                mean = Cell(list(values.values())).mean
                color = zero_colors.get(variant.method, "black")
                ax.axhline(mean, linestyle="--", color=color, label=f"{variant.label} ({mean:.1f})")
        if shots:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(shots) | {s for s in PAPER_SHOTS if shots[0] <= s <= shots[-1]})
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_xlim(shots[0] / 1.3, shots[-1] * 1.3)
        ax.set_xlabel("Labelled training examples per class (shots)")
        ax.set_ylabel("Test accuracy (%)")
        ax.set_title(f"{dataset}: accuracy vs shots\n(mean ± std over seeds)", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.margins(y=0.1)
        ax.legend(fontsize=8, loc="best")
        save(fig, f"accuracy_vs_shots_{_filename(dataset)}.png")

        # Figure 1: test accuracy per epoch, at the largest shot count with logged test accuracy.
        logged = _logged(sweep_dir, runs, "test_accuracy")
        if logged:
            top = max(logged)
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant in sorted(logged[top]):
                curve = _epoch_means(sweep_dir, logged[top][variant], "test_accuracy")
                ax.plot(list(curve), list(curve.values()), marker=".", label=variant.label)
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("Test accuracy (%)")
            ax.set_title(f"{dataset}: test accuracy vs epoch\n({top} shots, mean over seeds)", fontsize=11)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, f"accuracy_vs_epoch_{_filename(dataset)}.png")

        # Figure 6: angle between G_d and G_g, and the fraction of conflicting steps.
        logged = _logged(sweep_dir, runs, "cos_mean")
        if logged:
            top = max(logged)
            fig, (upper, lower) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
            for variant in sorted(logged[top]):
                group = logged[top][variant]
                angle = _epoch_means(
                    sweep_dir, group, "cos_mean", lambda c: math.degrees(math.acos(max(-1.0, min(1.0, c))))
                )
                upper.plot(list(angle), list(angle.values()), marker=".", label=variant.label)
                conflict = _epoch_means(sweep_dir, group, "conflict_fraction")
                if conflict:
                    lower.plot(list(conflict), list(conflict.values()), marker=".", label=variant.label)
            upper.axhline(90, linestyle=":", color="grey", linewidth=1)
            upper.set_ylabel(r"Angle $G_d$ vs $G_g$ (°)")
            upper.set_title(
                f"{dataset}: angle between G_d and G_g vs epoch\n({top} shots, mean over seeds)", fontsize=11
            )
            upper.grid(True, alpha=0.3)
            upper.legend(fontsize=8)
            lower.set_ylabel("Conflicting steps\n(fraction)")
            lower.set_xlabel("Epoch")
            lower.xaxis.set_major_locator(MaxNLocator(integer=True))
            lower.set_ylim(-0.02, 1.02)
            lower.grid(True, alpha=0.3)
            save(fig, f"angle_vs_epoch_{_filename(dataset)}.png")
    return paths


# ---------------------------------------------------------------------------------------------------- entry point
