"""The report's sections, in the layout of the ProGrad paper (Zhu et al., ICCV 2023), then the leaderboard.

Each `Section` builds its tables from the runs it needs and says whether it could; `build_report` lists the ones
that could not, with the runs each needs. Methods are told apart by their declarations (`fastprompt.methods`):
"Table 5" rows are the methods whose `paper` names Table 5, ProGrad's unprojected twin is `baseline_of`, and so on.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastprompt.methods import METHODS
from fastprompt.report.core import (
    Cell,
    Document,
    Variant,
    angle_degrees,
    average_cells,
    baseline_of,
    declared,
    display,
    fewshot_cells,
    finite,
    group_by,
    harmonic_mean,
    in_paper,
    is_standard,
    is_zero_shot,
    knob_of,
    load_log,
    load_predictions,
    markdown_table,
    per_seed,
    shot_header,
    variant_of,
)
from fastprompt.report.paper import DOMAIN_SHIFT_TARGETS, PAPER_AVERAGE, PAPER_DATASETS, PAPER_ZERO_SHOT

LAMBDA_METHODS = frozenset(name for name in METHODS if knob_of(name) == "lambda")


@dataclass
class Context:
    """What every section reads: the sweep folder, its finished runs, the document, and whether to show timings."""

    sweep_dir: Path
    done: list[dict]
    doc: Document
    timings: bool = True

    @property
    def fewshot(self) -> list[dict]:
        """Few-shot runs of every kind (augmented or not, template or trained teacher)."""
        return [r for r in self.done if (r.get("setting") or "fewshot") == "fewshot" and r.get("shots") is not None]


@dataclass(frozen=True)
class Section:
    """One part of the report: `build` adds its tables and returns False when the sweep lacks the runs it needs."""

    name: str
    needs: str
    build: Callable[[Context], bool]


def _tagged(item: str) -> list[str]:
    return [name for name in METHODS if in_paper(name, item)]


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "(none declared)"


def _shots(records: list[dict]) -> list[int]:
    trained = sorted({r["shots"] for r in records if not is_zero_shot(r["method"])})
    return trained or sorted({r["shots"] for r in records})


# ---------------------------------------------------------------------------------------------------- few-shot


def lambda_merge(records: list[dict]) -> tuple[frozenset, list[str]]:
    """The lambda methods whose rows merge their lambdas (one lambda per dataset and shot count: the lambda policy),
    and a note per merged method that used another lambda than 1 somewhere."""
    lambdas: dict[tuple, set] = defaultdict(set)
    for record in records:
        if record["method"] in LAMBDA_METHODS:
            lambdas[(record["method"], record["dataset"], record["shots"])].add(record.get("lambda"))
    split = {method for (method, _, _), values in lambdas.items() if len(values) > 1}
    merge = frozenset(LAMBDA_METHODS - split)
    notes = []
    for method in sorted(merge & {m for m, _, _ in lambdas}, key=lambda m: (declared(m).order, m)):
        used = sorted((d, s, next(iter(v))) for (m, d, s), v in lambdas.items() if m == method)
        odd = [f"{d} at {s} shots" for d, s, lam in used if lam not in (None, 1.0)]
        if odd and len(odd) < len(used):
            values = sorted({lam for _, _, lam in used if lam not in (None, 1.0)})
            shown = "/".join(f"{v:g}" for v in values)
            notes.append(f"{display(method)}: λ={shown} on {', '.join(odd)}; λ=1 elsewhere.")
    return merge, notes


def fewshot_section(ctx: Context) -> bool:
    """Figure 4 (one table per dataset) and Table 1 (the average over datasets, with the paper's rows)."""
    records = [r for r in ctx.fewshot if is_standard(r)]
    if not records:
        return False
    by_dataset = group_by(records, lambda r: r["dataset"])
    datasets = sorted(by_dataset)
    paper = set(datasets) == set(PAPER_DATASETS)
    for dataset in datasets:
        cells = fewshot_cells(by_dataset[dataset])
        shots = sorted({s for by_shot in cells.values() for s in by_shot})
        reference = {"Zero-shot CLIP (paper)": dict.fromkeys(shots, PAPER_ZERO_SHOT[dataset])} if paper else {}
        ctx.doc.shots_table(f"Few-shot: {dataset}", "fewshot", dataset, cells, shots, reference)
    if len(datasets) < 2:
        return True
    merge, notes = lambda_merge(records)
    average, _ = average_cells({d: fewshot_cells(by_dataset[d], merge) for d in datasets})
    shots_all = _shots(records)
    reference = {}
    if paper:
        for method, values in PAPER_AVERAGE.items():
            if any(s in values for s in shots_all):
                reference[f"{display(method)} (paper)"] = values
    ctx.doc.shots_table(
        f"Few-shot: Average over datasets ({len(datasets)})",
        "fewshot",
        "Average",
        average,
        shots_all,
        reference,
        notes,
        intro="The paper's Table 1 and Figure 4 (average): per seed, the mean over datasets; then mean ± std.",
    )
    return True


# ---------------------------------------------------------------------------------------------------- base-to-new


def _base2new_table(doc: Document, title: str, dataset: str, groups: dict, intro: str = "") -> None:
    """Base and new cells from their per-seed values; H from the two cells' means (no spread of its own)."""
    rows = []
    for (variant, shots), metrics in sorted(groups.items()):
        row = [variant.label, str(shots)]
        cells = {}
        for key, name in (("base_accuracy", "base"), ("new_accuracy", "new")):
            seeds = metrics.get(key)
            if seeds:
                cells[name] = Cell(list(seeds.values()))
                row.append(cells[name].text())
                doc.add_csv("base2new", dataset, variant.label, shots, name, cells[name])
            else:
                row.append("–")
        if len(cells) == 2:
            harmonic = harmonic_mean(cells["base"].mean, cells["new"].mean)
            n = min(cells["base"].n, cells["new"].n)
            row.append(f"{harmonic:.2f}" + (f" (n={n})" if n < 3 else ""))
            doc.add_csv("base2new", dataset, variant.label, shots, "H", derived=(harmonic, n))
        else:
            row.append("–")
        rows.append(row)
    doc.section(title, markdown_table(["Method", "Shots", "Base", "New", "H"], rows), intro)


def base2new_section(ctx: Context) -> bool:
    """Table 3: base and new accuracy and H = 2BN / (B + N) from the seed-mean B and N (PROTOCOL.md section 5), per
    dataset; the average row's H from the averaged B and N."""
    records = [r for r in ctx.done if r.get("setting") == "base2new" and is_standard(r) and r.get("shots") is not None]
    if not records:
        return False
    by_dataset = group_by(records, lambda r: r["dataset"])
    datasets = sorted(by_dataset)
    keys = ("base_accuracy", "new_accuracy")  # H comes from their seed means, never from the runs' own H
    tables = {}
    for dataset in datasets:
        groups = group_by(by_dataset[dataset], lambda r: (variant_of(r), r["shots"]))
        tables[dataset] = {g: {k: per_seed(rs, k) for k in keys} for g, rs in groups.items()}
        _base2new_table(ctx.doc, f"Base-to-new: {dataset}", dataset, tables[dataset])
    if len(datasets) > 1:
        common = set.intersection(*(set(t) for t in tables.values()))
        average = {}
        for group in common:
            average[group] = {}
            for k in keys:
                if all(tables[d][group][k] for d in datasets):
                    average[group][k] = _average_seed_maps([tables[d][group][k] for d in datasets])
        if average:
            _base2new_table(
                ctx.doc,
                f"Base-to-new: Average over datasets ({len(datasets)})",
                "Average",
                average,
                "The paper's Table 3 (average row): H from the averaged base and new accuracies.",
            )
    return True


def _average_seed_maps(maps: list[dict[int, float]]) -> dict[int, float]:
    seeds = set.intersection(*(set(m) for m in maps))
    return {seed: statistics.fmean(m[seed] for m in maps) for seed in sorted(seeds, key=str)}


# ---------------------------------------------------------------------------------------------------- transfer


def _transfer_table(ctx: Context, source: str, group: list[dict], targets: list[str], title: str, intro: str) -> None:
    """The source accuracy and each target's, per method and shots (cells over the runs: one per seed); with two
    or more targets, each run's mean over the targets."""
    rows = []
    averaged = len(targets) > 1
    for (variant, shots), members in sorted(group_by(group, lambda r: (variant_of(r), r["shots"])).items()):
        row = [variant.label, str(shots)]
        columns = [("accuracy", source)] + [(t, t) for t in targets]
        for key, name in columns:
            values = [(r["accuracy"] if key == "accuracy" else r["targets"].get(key)) for r in members]
            values = [v for v in values if finite(v)]
            if values:
                cell = Cell(values)
                row.append(cell.text())
                ctx.doc.add_csv("transfer", name, variant.label, shots, f"accuracy from {source}", cell)
            else:
                row.append("–")
        if averaged:
            means = [
                statistics.fmean(r["targets"][t] for t in targets)
                for r in members
                if all(finite(r["targets"].get(t)) for t in targets)
            ]
            if means:
                cell = Cell(means)
                row.append(cell.text())
                ctx.doc.add_csv("transfer", "Average (targets)", variant.label, shots, f"accuracy from {source}", cell)
            else:
                row.append("–")
        rows.append(row)
    known = set(PAPER_ZERO_SHOT) | set(DOMAIN_SHIFT_TARGETS)
    if source in PAPER_ZERO_SHOT and all(t in known for t in targets):
        values = [PAPER_ZERO_SHOT.get(name) for name in (source, *targets)]
        rows.append(["Zero-shot CLIP (paper)", "–"] + [f"{v:.2f}" if v is not None else "–" for v in values])
        rows[-1] += ["–"] if averaged else []
        for name, value in zip((source, *targets), values, strict=True):
            if value is not None:
                ctx.doc.add_csv("transfer", name, "Zero-shot CLIP (paper)", "", "accuracy", paper=value)
    header = ["Method", "Shots", f"{source} (source)", *targets] + (["Average (targets)"] if averaged else [])
    ctx.doc.section(title, markdown_table(header, rows), intro)


def _transfer_runs(ctx: Context, domain_shift: bool) -> dict[str, tuple[list[dict], list[str]]]:
    """source -> (runs, targets) of the domain-shift targets (Table 2) or of the other targets (Table 4)."""
    found = {}
    runs = [r for r in ctx.done if isinstance(r.get("targets"), dict) and is_standard(r) and r.get("shots") is not None]
    for source, group in sorted(group_by(runs, lambda r: r["dataset"]).items()):
        targets = sorted({t for r in group for t in r["targets"] if (t in DOMAIN_SHIFT_TARGETS) == domain_shift})
        if targets:
            found[source] = ([r for r in group if any(t in r["targets"] for t in targets)], targets)
    return found


def domain_generalisation_section(ctx: Context) -> bool:
    """Table 2: a context trained on the source (ImageNet) evaluated on ImageNetV2, -Sketch, -A and -R."""
    found = _transfer_runs(ctx, domain_shift=True)
    for source, (group, targets) in found.items():
        intro = "The paper's Table 2: the context trained on the source, evaluated on its domain-shifted variants."
        _transfer_table(ctx, source, group, targets, f"Domain generalisation from {source}", intro)
    return bool(found)


def cross_dataset_section(ctx: Context) -> bool:
    """Table 4: a context trained on the source evaluated on other datasets' class names and images."""
    found = _transfer_runs(ctx, domain_shift=False)
    for source, (group, targets) in found.items():
        intro = "The paper's Table 4 (cross-dataset transfer): the context trained on the source, on other datasets."
        _transfer_table(ctx, source, group, targets, f"Transfer from {source}", intro)
    return bool(found)


# ---------------------------------------------------------------------------------------------------- comparisons


def _comparison(
    ctx: Context, title: str, intro: str, setting: str, records: list[dict], row: Callable[[dict], Variant]
) -> None:
    """A methods x shots table of `records` averaged over their datasets (each cell says how many it averages when
    fewer than all)."""
    by_dataset = group_by(records, lambda r: r["dataset"])
    cells, coverage = average_cells(
        {d: fewshot_cells(rs, row=row) for d, rs in sorted(by_dataset.items())}, require_all=False
    )
    count = len(by_dataset)

    def marks(variant: Variant, shots: int) -> str:
        have = coverage.get((variant, shots), count)
        return f" [{have}/{count} datasets]" if have < count else ""

    names = ", ".join(sorted(by_dataset))
    intro = f"{intro} Mean over {count} dataset(s) ({names}) per seed, then mean ± std over seeds."
    ctx.doc.shots_table(title, setting, "Average", cells, _shots(records), intro=intro, marks=marks)


def _at(records: list[dict], pairs: set) -> list[dict]:
    """The runs at the (dataset, shots) pairs, and the zero-shot runs of those datasets."""
    datasets = {d for d, _ in pairs}
    return [
        r
        for r in records
        if (r["dataset"], r["shots"]) in pairs or (is_zero_shot(r["method"]) and r["dataset"] in datasets)
    ]


def _two_sided_section(ctx: Context, table: str, side, title: str, intro: str, name: str) -> bool:
    """A paper table that compares two kinds of its tagged methods (`side(declaration)` True or False) at the
    (dataset, shots) pairs where both kinds ran; False (nothing written) where there is no such pair."""
    tagged = set(_tagged(table))
    records = [r for r in ctx.fewshot if is_standard(r) and r["method"] in tagged]
    one = {(r["dataset"], r["shots"]) for r in records if side(declared(r["method"]))}
    other = {(r["dataset"], r["shots"]) for r in records if not side(declared(r["method"]))}
    pairs = one & other
    if not pairs:
        return False
    records = _at(records, pairs)
    merge, _ = lambda_merge(records)
    _comparison(ctx, title, intro, name, records, lambda r: variant_of(r, merge))
    return True


def kd_section(ctx: Context) -> bool:
    """Table 5: knowledge distillation (L_ce + alpha L_kl) at each alpha against ProGrad's projection."""
    return _two_sided_section(
        ctx,
        "Table 5",
        lambda declaration: declaration.update == "kd",
        "Table 5: knowledge distillation vs. ProGrad",
        "KD adds alpha times the KL to the zero-shot prediction to the loss; ProGrad projects instead.",
        "table5_kd",
    )


def cosine_section(ctx: Context) -> bool:
    """Table 6: a classifier head without and with ProGrad's projection (the cosine classifier)."""
    return _two_sided_section(
        ctx,
        "Table 6",
        lambda declaration: declaration.projects,
        "Table 6: cosine classifier with and without ProGrad",
        "A cosine classifier on the cached image features, trained alone and with its gradient projected.",
        "table6_cosine",
    )


def lambda_section(ctx: Context) -> bool:
    """Table 7: ProGrad at several λ (λ = 0 keeps G_d as it is; λ = 1 removes all of its conflicting part)."""
    tagged = {name for name in _tagged("Table 7") if knob_of(name) == "lambda"}
    records = [r for r in ctx.fewshot if is_standard(r) and r["method"] in tagged]
    lambdas = defaultdict(set)
    for record in records:
        lambdas[(record["method"], record["dataset"], record["shots"])].add(record.get("lambda"))
    studied = {(m, d, s) for (m, d, s), values in lambdas.items() if len(values) > 1}
    if not studied:
        return False
    records = [r for r in records if (r["method"], r["dataset"], r["shots"]) in studied]
    _comparison(
        ctx,
        "Table 7: the strength λ of the projection",
        "G = G_d - λ (G_d·G_g / |G_g|²) G_g where they conflict: one row per λ.",
        "table7_lambda",
        records,
        lambda r: variant_of(r, show_knob=True),
    )
    return True


def augmentation_section(ctx: Context) -> bool:
    """Figure 1 (c, d): final accuracy of runs trained on augmented views and on the centre view only."""
    runs = [r for r in ctx.fewshot if not r.get("teacher")]
    centre = {(r["dataset"], r["shots"], r["method"]) for r in runs if r.get("augment") is False}
    if not centre:
        return False
    pairs = {(d, s) for d, s, _ in centre}
    methods = {m for _, _, m in centre}
    records = [r for r in _at(runs, pairs) if r["method"] in methods or is_zero_shot(r["method"])]
    merge, _ = lambda_merge([r for r in records if r.get("augment") is not False])

    def row(record: dict) -> Variant:
        if is_zero_shot(record["method"]):
            return variant_of(record, merge)
        return variant_of(record, merge, tag="centre view" if record.get("augment") is False else "augmented")

    _comparison(
        ctx,
        "Figure 1 (c, d): with and without augmentation",
        "Runs trained on random crops and flips (augmented) and on each image's centre view only.",
        "figure1_augmentation",
        records,
        row,
    )
    return True


def teacher_section(ctx: Context) -> bool:
    """Figure 7: ProGrad with a trained prompt as the teacher (an upper bound of the general direction) against the
    hand-written template teacher, and the teachers' own accuracy where their runs are in the sweep."""
    runs = [r for r in ctx.fewshot if r.get("augment", True) is not False and declared(r["method"]) is not None]
    trained = [r for r in runs if r.get("teacher") and declared(r["method"]).projects]
    if not trained:
        return False
    pairs = {(r["dataset"], r["shots"]) for r in trained}
    methods = {r["method"] for r in trained}
    records = [r for r in runs if r["method"] in methods and (r["dataset"], r["shots"]) in pairs]
    by_id = {}
    for record in ctx.done:
        by_id[record["run_id"]] = record
        by_id.setdefault(Path(record.get("path") or record["run_id"]).name, record)
    teachers = []
    for student in trained:
        teacher = by_id.get(Path(str(student["teacher"])).name)
        if teacher is not None:  # shown in the student's column and seed
            teachers.append({**teacher, "shots": student["shots"], "seed": student["seed"], "_teacher": True})
    merge, _ = lambda_merge([r for r in records if not r.get("teacher")])

    def row(record: dict) -> Variant:
        if record.get("_teacher"):
            return variant_of(record, merge, tag="the teachers")
        return variant_of(record, merge, tag="trained teacher" if record.get("teacher") else "template teacher")

    _comparison(
        ctx,
        "Figure 7: a trained prompt as the teacher",
        "ProGrad with its KL target from a trained prompt instead of the hand-written template.",
        "figure7_teacher",
        records + teachers,
        row,
    )
    return True


# ---------------------------------------------------------------------------------------------------- Figure 5


def _zero_shot_run(pool: list[dict], seed, shots) -> dict | None:
    """Zero-shot CLIP's run (the first declared zero-shot method), of the same seed and shots where there is one:
    zero-shot predictions do not depend on either."""
    if not pool:
        return None
    return min(pool, key=lambda r: (declared(r["method"]).order, r["seed"] != seed, r["shots"] != shots, r["run_id"]))


def _masks(student: dict, baseline: dict, zero: dict | None, prefix: str):
    """(student wrong & baseline right, baseline wrong & student right, zero-shot wrong or None), or a reason."""
    labels = student.get(f"{prefix}labels")
    if labels is None or student.get(f"{prefix}predictions") is None or baseline.get(f"{prefix}predictions") is None:
        return f"no {prefix}predictions"
    if baseline.get(f"{prefix}labels") is None or not (baseline[f"{prefix}labels"] == labels).all():
        return "different test labels"
    if not len(student[f"{prefix}predictions"]) == len(baseline[f"{prefix}predictions"]) == len(labels):
        return "different test sizes"
    student_wrong = student[f"{prefix}predictions"] != labels
    baseline_wrong = baseline[f"{prefix}predictions"] != labels
    zero_wrong = None
    if zero is not None and zero.get(f"{prefix}labels") is not None:
        if len(zero[f"{prefix}labels"]) == len(labels) and (zero[f"{prefix}labels"] == labels).all():
            zero_wrong = zero[f"{prefix}predictions"] != labels
    return student_wrong & ~baseline_wrong, baseline_wrong & ~student_wrong, zero_wrong


def _setting(record: dict) -> str:
    return record.get("setting") or "fewshot"


SIDES = {"worse": "method wrong, baseline right", "better": "baseline wrong, method right"}


@dataclass
class _Tally:
    """One pair's failure cases over its seeds: per seed the share (%) of test images on each side, and over all
    seeds the images on each side and how many of them zero-shot CLIP also gets wrong."""

    shares: dict = field(default_factory=lambda: {side: [] for side in SIDES})
    images: dict = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    zero_wrong: dict = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    zero_seeds: int = 0

    def add(self, masks: dict, zero_wrong) -> None:
        for side, mask in masks.items():
            self.shares[side].append(100.0 * mask.mean())
            self.images[side] += int(mask.sum())
            if zero_wrong is not None:
                self.zero_wrong[side] += int((mask & zero_wrong).sum())
        self.zero_seeds += zero_wrong is not None

    @property
    def seeds(self) -> int:
        return len(self.shares["worse"])


def _failure_row(doc: Document, tally: _Tally, dataset: str, pair: str, split: str, shots: int) -> list[str]:
    row = [dataset, pair, split, str(shots), str(tally.seeds)]
    for side, words in SIDES.items():
        cell = Cell(tally.shares[side])
        row.append(cell.text())
        doc.add_csv("failure_cases", dataset, pair, shots, f"{split}: {words} (%)", cell)
        if tally.zero_seeds == tally.seeds and tally.images[side]:
            share = 100.0 * tally.zero_wrong[side] / tally.images[side]
            row.append(f"{share:.1f}% ({tally.zero_wrong[side]}/{tally.images[side]})")
            metric = f"{split}: {words}, zero-shot also wrong (%)"
            doc.add_csv("failure_cases", dataset, pair, shots, metric, derived=(share, tally.images[side]))
        else:
            row.append("–")
    return row


def failure_section(ctx: Context) -> bool:
    """Figure 5: per dataset, split and shots, the share of test images a projecting method gets wrong and its
    unprojected twin right (and the reverse), over seeds matched one to one; and how many of those images zero-shot
    CLIP also gets wrong (counted over all seeds)."""
    runs = [
        r for r in ctx.done if is_standard(r) and r.get("shots") is not None and _setting(r) in ("fewshot", "base2new")
    ]
    loaded: dict[str, dict | None] = {}
    missing: set[str] = set()

    def predictions(record: dict) -> dict | None:
        if record["run_id"] not in loaded:
            loaded[record["run_id"]] = load_predictions(ctx.sweep_dir, record)
            if loaded[record["run_id"]] is None:
                missing.add(record["run_id"])
        return loaded[record["run_id"]]

    zero_runs = group_by((r for r in runs if is_zero_shot(r["method"])), lambda r: (r["dataset"], _setting(r)))
    rows, problems = [], []
    keyed = group_by(runs, lambda r: (r["dataset"], _setting(r), r["shots"], r["method"]))
    for (dataset, setting, shots, method), students in sorted(keyed.items()):
        base = baseline_of(method)
        twins = sorted(keyed.get((dataset, setting, shots, base), []), key=lambda r: r["run_id"], reverse=True)
        baselines = {r["seed"]: r for r in twins}
        zero_pool = zero_runs.get((dataset, setting), [])
        for variant, members in sorted(group_by(students, variant_of).items()) if baselines else ():
            pair = f"{variant.label} vs {display(base)}"
            by_seed = {r["seed"]: r for r in sorted(members, key=lambda r: r["run_id"], reverse=True)}
            for prefix, split in [("", "base"), ("new_", "new")] if setting == "base2new" else [("", "test")]:
                tally = _Tally()
                for seed in sorted(set(by_seed) & set(baselines), key=str):
                    student, baseline = predictions(by_seed[seed]), predictions(baselines[seed])
                    if student is None or baseline is None:
                        continue
                    zero_record = _zero_shot_run(zero_pool, seed, shots)
                    zero = predictions(zero_record) if zero_record is not None else None
                    masks = _masks(student, baseline, zero, prefix)
                    if isinstance(masks, str):
                        problems.append(f"{pair} on {dataset} ({split}, {shots} shots, seed {seed}): {masks}")
                        continue
                    worse, better, zero_wrong = masks
                    tally.add({"worse": worse, "better": better}, zero_wrong)
                if tally.seeds:
                    rows.append(_failure_row(ctx.doc, tally, dataset, pair, split, shots))
    if not rows:
        return False
    header = ["Dataset", "Method vs. baseline", "Test split", "Shots", "Seeds", "Method wrong, baseline right (%)",
              "Zero-shot also wrong", "Baseline wrong, method right (%)", "Zero-shot also wrong"]  # fmt: skip
    notes = []
    if missing:
        notes.append(f"Skipped {len(missing)} run(s) without a readable predictions.npz: {', '.join(sorted(missing))}.")
    if problems:
        notes.append("Pairs left out: " + "; ".join(problems) + ".")
    intro = (
        "The paper's Figure 5: shares of the test images (mean ± std over the seeds both runs have); "
        "zero-shot CLIP's errors among those images, counted over all seeds (images wrong / images)."
    )
    ctx.doc.section("Figure 5: failure cases", markdown_table(header, rows, text_columns=3), intro, notes)
    return True


# ---------------------------------------------------------------------------------------------------- Figure 6


def angle_section(ctx: Context) -> bool:
    """Figure 6: the angle between G_d and G_g (from each epoch's mean cosine) at the first and the last epoch,
    its mean over epochs, and the share of steps where they conflict, per method (ProGrad always logs them; CoOp
    and KD when trained with `angles`)."""
    rows = []
    runs = [r for r in ctx.fewshot if is_standard(r)]
    for (dataset, shots), group in sorted(group_by(runs, lambda r: (r["dataset"], r["shots"])).items()):
        for variant, members in sorted(group_by(group, variant_of).items()):
            first, last, mean, conflict = [], [], [], []
            for record in members:
                logged = [row for row in load_log(ctx.sweep_dir, record) if finite(row.get("cos_mean"))]
                if not logged:
                    continue
                logged.sort(key=lambda row: row["epoch"])
                angles = [angle_degrees(row["cos_mean"]) for row in logged]
                first.append(angles[0])
                last.append(angles[-1])
                mean.append(statistics.fmean(angles))
                fractions = [row["conflict_fraction"] for row in logged if finite(row.get("conflict_fraction"))]
                if fractions:
                    conflict.append(100.0 * statistics.fmean(fractions))
            if not first:
                continue
            row = [dataset, variant.label, str(shots)]
            for metric, values in (("first epoch (°)", first), ("last epoch (°)", last), ("mean (°)", mean),
                                   ("conflicting steps (%)", conflict)):  # fmt: skip
                if values:
                    cell = Cell(values)
                    row.append(cell.text())
                    ctx.doc.add_csv("figure6_angles", dataset, variant.label, shots, f"angle {metric}", cell)
                else:
                    row.append("–")
            rows.append(row)
    if not rows:
        return False
    header = ["Dataset", "Method", "Shots", "Angle, first epoch (°)", "Angle, last epoch (°)",
              "Angle, mean over epochs (°)", "Conflicting steps (%)"]  # fmt: skip
    intro = (
        "The paper's Figure 6: the angle between G_d (cross-entropy) and G_g (KL to the zero-shot prediction), "
        "acos of each epoch's mean cosine; over 90° they conflict. Mean ± std over seeds."
    )
    ctx.doc.section("Figure 6: angle between G_d and G_g", markdown_table(header, rows, text_columns=2), intro)
    return True


# ---------------------------------------------------------------------------------------------------- leaderboard


def leaderboard_section(ctx: Context) -> bool:
    """Every method's accuracy per shot count averaged over the sweep's datasets, best first at the largest shot
    count; then its training time per run on the machine that trained it (train_seconds / group_runs)."""
    records = [r for r in ctx.fewshot if is_standard(r)]
    if not records:
        return False
    by_dataset = group_by(records, lambda r: r["dataset"])
    merge, _ = lambda_merge(records)
    cells, coverage = average_cells(
        {d: fewshot_cells(rs, merge) for d, rs in sorted(by_dataset.items())}, require_all=False
    )
    shots = _shots(records)
    count = len(by_dataset)

    def score(variant: Variant) -> tuple:
        for s in reversed(shots):
            seeds = cells[variant].get(s)
            if seeds and coverage.get((variant, s)) == count:
                return (0, -s, -Cell(list(seeds.values())).mean, variant)
        return (1, 0, 0.0, variant)

    rows = []
    for rank, variant in enumerate(sorted(cells, key=score), start=1):
        row = [variant.label, str(rank)]
        for s in shots:
            seeds = cells[variant].get(s)
            if seeds:
                cell = Cell(list(seeds.values()))
                have = coverage[(variant, s)]
                row.append(cell.text() + (f" [{have}/{count} datasets]" if have < count else ""))
                ctx.doc.add_csv("leaderboard", "Average", variant.label, s, "accuracy", cell)
            else:
                row.append("–")
        rows.append(row)
    body = markdown_table(["Method", "Rank"] + [shot_header(s) for s in shots], rows)
    intro = (
        f"Mean over the sweep's {count} dataset(s) per seed, then mean ± std over seeds; ranked by the largest shot "
        "count every dataset has. [k/N datasets]: a mean over the k datasets the method ran on."
    )
    if ctx.timings:
        body += "\n\n" + _time_table(ctx, records, merge)
    ctx.doc.section("Leaderboard", body, intro)
    return True


def _time_table(ctx: Context, records: list[dict], merge: frozenset) -> str:
    """Training seconds per run (a lock-step group's wall time divided by its runs), per method, machine and shots."""
    times: dict[tuple[Variant, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        seconds, runs = record.get("train_seconds"), record.get("group_runs")
        if not finite(seconds):
            continue
        runs = runs if finite(runs) and runs >= 1 else 1
        machine = str(record.get("machine") or "unknown machine")
        times[(variant_of(record, merge), machine)][record["shots"]].append(seconds / runs)
    if not times:
        return "No run records its training time (train_seconds): older sweeps do not."
    shots = sorted({s for by_shot in times.values() for s in by_shot})
    rows = []
    for (variant, machine), by_shot in sorted(times.items()):
        row = [variant.label, machine]
        for s in shots:
            values = by_shot.get(s)
            if values:
                cell = Cell(values)
                row.append(f"{cell.mean:.2f} ± {cell.std:.2f} (runs={cell.n})")
                ctx.doc.add_csv("leaderboard_time", machine, variant.label, s, "train seconds per run", cell)
            else:
                row.append("–")
        rows.append(row)
    header = ["Method", "Machine"] + [f"{shot_header(s)} (s / run)" for s in shots]
    table = markdown_table(header, rows, text_columns=2)
    return "Training time per run, seconds (mean ± std over runs and datasets):\n\n" + table


# ---------------------------------------------------------------------------------------------------- layout


def _needs_tagged(item: str, what: str) -> str:
    return f"{what} ({_names(_tagged(item))})"


SECTIONS: tuple[Section, ...] = (
    Section("Figure 4 and Table 1 (few-shot)", "few-shot runs (`fastprompt train --setting fewshot`)", fewshot_section),
    Section(
        "Table 2 (domain generalisation)",
        f"runs evaluated on {'/'.join(DOMAIN_SHIFT_TARGETS)} caches (`fastprompt train --eval-caches`)",
        domain_generalisation_section,
    ),
    Section("Table 3 (base-to-new)", "base-to-new runs (`fastprompt train --setting base2new`)", base2new_section),
    Section(
        "Table 4 (cross-dataset transfer)",
        "runs evaluated on other datasets' caches (`fastprompt train --eval-caches`)",
        cross_dataset_section,
    ),
    Section(
        "Table 5 (KD)",
        _needs_tagged("Table 5", "runs of KD (`--alpha 0.25,0.5,1,2,4`) and ProGrad at the same dataset and shots"),
        kd_section,
    ),
    Section(
        "Table 6 (cosine classifier)",
        _needs_tagged("Table 6", "runs with and without the projection at the same dataset and shots"),
        cosine_section,
    ),
    Section(
        "Table 7 (λ)",
        _needs_tagged("Table 7", "runs at two or more λ at one dataset and shot count (`--lambda 0,0.5,1`)"),
        lambda_section,
    ),
    Section(
        "Figure 1 c, d (augmentation)",
        "runs trained on the centre view only (`augment` off) beside augmented ones",
        augmentation_section,
    ),
    Section(
        "Figure 5 (failure cases)",
        "runs of a projecting method and its unprojected twin (ProGrad and CoOp) with the same seeds, "
        "written with predictions.npz",
        failure_section,
    ),
    Section(
        "Figure 6 (angles)",
        "ProGrad runs, or CoOp/KD runs with `angles` on, whose log.jsonl has cos_mean",
        angle_section,
    ),
    Section(
        "Figure 7 (trained teacher)",
        "ProGrad runs with a trained prompt as the teacher (`--teacher RUN_FOLDER`)",
        teacher_section,
    ),
    Section("Leaderboard", "few-shot runs", leaderboard_section),
)
