"""Figures of a sweep folder for `fastprompt report` (matplotlib, Agg): accuracy against shots (the paper's Figure 4),
test accuracy against epoch (from `--eval-every`), the same with and without augmentation (Figure 1 c, d) and the
G_d-G_g angle against epoch (Figure 6). Imports the report's core only, never the report builder."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from fastprompt.report.core import (
    Cell,
    Variant,
    angle_degrees,
    fewshot_cells,
    finite,
    group_by,
    is_standard,
    is_zero_shot,
    load_log,
    variant_of,
)
from fastprompt.report.paper import PAPER_SHOTS

ZERO_SHOT_COLORS = ("black", "grey", "dimgrey")


def _filename(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)


def epoch_means(sweep_dir: Path, records: list[dict], key: str, transform=None) -> dict[int, float]:
    """epoch -> mean over runs (seeds) of `key` from log.jsonl."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for record in records:
        for row in load_log(sweep_dir, record):
            if finite(row.get(key)):
                value = float(row[key])
                by_epoch[row["epoch"]].append(transform(value) if transform else value)
    return {epoch: statistics.fmean(values) for epoch, values in sorted(by_epoch.items())}


def _logged(sweep_dir: Path, records: list[dict], key: str, row=variant_of) -> dict[int, dict[Variant, list[dict]]]:
    """shots -> variant -> runs whose log.jsonl has `key`."""
    found: dict[int, dict[Variant, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if any(finite(line.get(key)) for line in load_log(sweep_dir, record)):
            found[record["shots"]][row(record)].append(record)
    return found


def _zero_shot_lines(ax, records: list[dict]) -> None:
    """Zero-shot methods as dashed horizontal lines (their accuracy does not depend on shots or epochs)."""
    zero = {v: c for v, c in fewshot_cells([r for r in records if is_zero_shot(r["method"])]).items()}
    for color, variant in zip(ZERO_SHOT_COLORS * len(zero), sorted(zero), strict=False):
        values = next(iter(zero[variant].values()), {})
        if values:
            mean = Cell(list(values.values())).mean
            ax.axhline(mean, linestyle="--", color=color, label=f"{variant.label} ({mean:.1f})")


def draw_plots(sweep_dir: Path, out_dir: Path, records: list[dict]) -> list[Path]:
    """Draw every figure the few-shot runs `records` have data for into `out_dir`; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    paths: list[Path] = []

    def save(fig, name: str) -> None:
        path = Path(out_dir) / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    for dataset, runs in sorted(group_by(records, lambda r: r["dataset"]).items()):
        standard = [r for r in runs if is_standard(r)]
        name = _filename(dataset)
        if standard:
            # Figure 4: accuracy against shots.
            cells = fewshot_cells(standard)
            trained = {v: c for v, c in cells.items() if not is_zero_shot(v.method)}
            shots = sorted({s for c in trained.values() for s in c})
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant in sorted(trained):
                xs = [s for s in shots if trained[variant].get(s)]
                stats = [Cell(list(trained[variant][s].values())) for s in xs]
                ax.errorbar(
                    xs, [c.mean for c in stats], yerr=[c.std for c in stats], marker="o", capsize=3, label=variant.label
                )
            _zero_shot_lines(ax, standard)
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
            save(fig, f"accuracy_vs_shots_{name}.png")

        # Test accuracy per epoch, at the largest shot count with logged test accuracy.
        logged = _logged(sweep_dir, standard, "test_accuracy")
        if logged:
            top = max(logged)
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant in sorted(logged[top]):
                curve = epoch_means(sweep_dir, logged[top][variant], "test_accuracy")
                ax.plot(list(curve), list(curve.values()), marker=".", label=variant.label)
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("Test accuracy (%)")
            ax.set_title(f"{dataset}: test accuracy vs epoch\n({top} shots, mean over seeds)", fontsize=11)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, f"accuracy_vs_epoch_{name}.png")

        # Figure 1 (c, d): the same curves for augmented runs and for runs on the centre view only.
        centre = [r for r in runs if r.get("augment") is False and not r.get("teacher")]
        logged_centre = _logged(sweep_dir, centre, "test_accuracy")
        if logged_centre:
            top = max(logged_centre)
            methods = {v.method for v in logged_centre[top]}
            augmented = _logged(sweep_dir, [r for r in standard if r["method"] in methods], "test_accuracy")
            fig, panels = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
            for ax, group, title in (
                (panels[0], augmented.get(top, {}), "(c) with augmentation"),
                (panels[1], logged_centre[top], "(d) centre view only"),
            ):
                for variant in sorted(group):
                    curve = epoch_means(sweep_dir, group[variant], "test_accuracy")
                    ax.plot(list(curve), list(curve.values()), marker=".", label=variant.label)
                _zero_shot_lines(ax, standard)
                ax.set_title(f"{dataset}, {top} shots: {title}", fontsize=10)
                ax.set_xlabel("Epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(True, alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
            panels[0].set_ylabel("Test accuracy (%)")
            save(fig, f"augmentation_vs_epoch_{name}.png")

        # Figure 6: angle between G_d and G_g, and the fraction of conflicting steps.
        logged = _logged(sweep_dir, standard, "cos_mean")
        if logged:
            top = max(logged)
            fig, (upper, lower) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
            for variant in sorted(logged[top]):
                group = logged[top][variant]
                angle = epoch_means(sweep_dir, group, "cos_mean", angle_degrees)
                upper.plot(list(angle), list(angle.values()), marker=".", label=variant.label)
                conflict = epoch_means(sweep_dir, group, "conflict_fraction")
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
            save(fig, f"angle_vs_epoch_{name}.png")
    return paths
