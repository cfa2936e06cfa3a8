"""`fastprompt report`: tables (markdown and CSV) and figures of a sweep folder (docs/FORMATS.md).

Tables follow the paper's few-shot layout: rows are methods, columns are shot counts, cells are the mean and the
population standard deviation over seeds ("mean ± std", with "(n=k)" when fewer than 3 seeds). Zero-shot methods do
not depend on the shot count: their runs are pooled per seed and the value is repeated in every column. The base2new
setting gets a base / new / H table; H = 2BN / (B + N) is computed from the seed-mean B and N of its row, not averaged
over the runs' own H (PROTOCOL.md section 5, as CoCoOp's and ProGrad's tables do), so its cell has no spread; the
average row's H comes from the averaged B and N. Averages over datasets are taken per seed (over the seeds every
dataset has), then mean ± std over those seeds. When the sweep covers exactly the paper's 11 datasets, PROTOCOL.md
section 7's reference numbers are added as "(paper)" rows.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fastprompt.errors import FastPromptError

INDEX = "results.jsonl"
METHOD_ORDER = ("zeroshot", "zeroshot_ensemble", "linear_probe", "coop", "prograd", "prograd_ensemble", "kd")
DISPLAY = {
    "zeroshot": "Zero-shot CLIP",
    "zeroshot_ensemble": "CLIP++",
    "linear_probe": "Linear probe",
    "coop": "CoOp",
    "prograd": "ProGrad",
    "prograd_ensemble": "ProGrad++",
    "kd": "KD",
}
ZERO_SHOT = ("zeroshot", "zeroshot_ensemble")
LAMBDA_METHODS = ("prograd", "prograd_ensemble")

# PROTOCOL.md section 7 (RN50, mean over 3 seeds).
PAPER_DATASETS = (
    "ImageNet",
    "Caltech101",
    "OxfordPets",
    "StanfordCars",
    "OxfordFlowers",
    "Food101",
    "FGVCAircraft",
    "SUN397",
    "DescribableTextures",
    "EuroSAT",
    "UCF101",
)
PAPER_ZERO_SHOT = dict(
    zip(PAPER_DATASETS, (58.18, 86.29, 85.77, 55.61, 66.14, 77.31, 17.28, 58.52, 42.32, 37.56, 61.46), strict=True)
)
PAPER_SHOTS = (1, 2, 4, 8, 16)
PAPER_AVERAGE = {
    "zeroshot": dict.fromkeys(PAPER_SHOTS, 58.77),
    "zeroshot_ensemble": dict.fromkeys(PAPER_SHOTS, 59.38),
    "linear_probe": dict(zip(PAPER_SHOTS, (37.32, 48.02, 57.27, 64.88, 70.57), strict=True)),
    "coop": dict(zip(PAPER_SHOTS, (59.46, 62.37, 66.79, 70.04, 73.49), strict=True)),
    "prograd": dict(zip(PAPER_SHOTS, (62.61, 64.90, 68.45, 71.41, 74.28), strict=True)),
    "prograd_ensemble": dict(zip(PAPER_SHOTS, (63.06, 65.28, 68.71, 71.80, 75.03), strict=True)),
}


@dataclass
class ReportResult:
    markdown: str
    csv_path: Path | None
    plot_paths: list[Path] = field(default_factory=list)
    markdown_path: Path | None = None


@dataclass(frozen=True)
class Variant:
    """A table row: a method and its swept knob (lambda for ProGrad, alpha for KD)."""

    rank: int
    method: str
    knob: float | None

    def __lt__(self, other: Variant) -> bool:
        return self._key() < other._key()

    def _key(self) -> tuple:
        return (self.rank, self.method, self.knob is not None, self.knob or 0.0)

    @property
    def label(self) -> str:
        name = DISPLAY.get(self.method, self.method)
        if self.knob is None:
            return name
        return f"{name} ({'α' if self.method == 'kd' else 'λ'}={self.knob:g})"


def _variant(record: dict, merge_lambda: frozenset = frozenset()) -> Variant:
    """The row of a run; methods in `merge_lambda` get one row whatever their lambda."""
    method = record["method"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    knob = None
    if method == "kd":
        knob = float(record.get("alpha") if record.get("alpha") is not None else 1.0)
    elif method in LAMBDA_METHODS and method not in merge_lambda and record.get("lambda") not in (None, 1.0):
        knob = float(record["lambda"])
    return Variant(rank, method, knob)


# ---------------------------------------------------------------------------------------------------- reading


def load_records(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(done runs with an accuracy, failed runs) of a sweep folder; one-sentence errors for unusable input."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FastPromptError(f"Sweep folder {sweep_dir} does not exist; pass the --out folder of `fastprompt train`.")
    index = sweep_dir / INDEX
    if not index.is_file():
        raise FastPromptError(f"{sweep_dir} has no {INDEX}; is it a sweep folder written by `fastprompt train`?")
    records: dict[str, dict] = {}
    for line in index.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted sweep
        if isinstance(record, dict) and record.get("run_id") and record.get("method"):
            records[record["run_id"]] = record
    done = [
        r for r in records.values() if r.get("status") == "done" and _finite(r.get("accuracy")) and r.get("dataset")
    ]
    failed = [r for r in records.values() if r.get("status") == "failed"]
    if not done:
        raise FastPromptError(f"{index} lists no finished runs with an accuracy; wait for the sweep or check its runs.")
    return done, failed


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_log(sweep_dir: Path, record: dict) -> list[dict]:
    path = Path(sweep_dir) / (record.get("path") or record["run_id"]) / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- statistics


@dataclass
class Cell:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self) -> str:
        suffix = f" (n={self.n})" if self.n < 3 else ""
        return f"{self.mean:.2f} ± {self.std:.2f}{suffix}"


def _per_seed(records: list[dict], key: str) -> dict[int, float]:
    """Value per seed (runs of one seed, e.g. a zero-shot method at several shot counts, are averaged)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for record in records:
        if _finite(record.get(key)):
            by_seed[record.get("seed")].append(float(record[key]))
    return {seed: statistics.fmean(values) for seed, values in by_seed.items()}


def fewshot_cells(
    records: list[dict], merge_lambda: frozenset = frozenset()
) -> dict[Variant, dict[int, dict[int, float]]]:
    """variant -> shots -> seed -> accuracy, for one dataset. Zero-shot methods: the same pooled values at every
    shot count of the table."""
    table_shots = sorted({r["shots"] for r in records if r["method"] not in ZERO_SHOT})
    groups: dict[Variant, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    pooled: dict[Variant, list[dict]] = defaultdict(list)
    for record in records:
        variant = _variant(record, merge_lambda)
        if record["method"] in ZERO_SHOT:
            pooled[variant].append(record)
        else:
            groups[variant][record["shots"]].append(record)
    cells = {v: {s: _per_seed(rs, "accuracy") for s, rs in by_shot.items()} for v, by_shot in groups.items()}
    for variant, rs in pooled.items():
        values = _per_seed(rs, "accuracy")
        shots = table_shots or sorted({r["shots"] for r in rs})
        cells[variant] = {s: values for s in shots}
    return cells


def harmonic_mean(base: float, new: float) -> float:
    """H = 2BN / (B + N) (0 when both are 0). Tables apply it to seed-mean B and N, as CoCoOp's and ProGrad's do."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def _average(per_dataset: list[dict[int, float]]) -> dict[int, float]:
    """Per seed, the mean over datasets, for the seeds every dataset has."""
    seeds = set.intersection(*(set(d) for d in per_dataset)) if per_dataset else set()
    return {seed: statistics.fmean(d[seed] for d in per_dataset) for seed in sorted(seeds, key=str)}


# ---------------------------------------------------------------------------------------------------- tables


def _shot_header(shots: int) -> str:
    return f"{shots} shot" if shots == 1 else f"{shots} shots"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class _Builder:
    def __init__(self) -> None:
        self.sections: list[str] = []
        self.csv_rows: list[dict] = []

    def add_csv(
        self,
        setting,
        dataset,
        label,
        shots,
        metric,
        cell: Cell | None = None,
        paper: float | None = None,
        derived: tuple[float, int] | None = None,
    ):
        """One CSV row: a cell over seeds, a paper number, or a value derived from cells (value, seeds; no std)."""
        row = {"setting": setting, "dataset": dataset, "method": label, "shots": shots, "metric": metric}
        if cell is not None:
            row |= {"mean": round(cell.mean, 4), "std": round(cell.std, 4), "n": cell.n, "source": "sweep"}
        elif derived is not None:
            row |= {"mean": round(derived[0], 4), "std": "", "n": derived[1], "source": "sweep"}
        else:
            row |= {"mean": paper, "std": "", "n": "", "source": "paper"}
        self.csv_rows.append(row)

    def fewshot_table(self, title, dataset, cells, shots, paper_rows: dict[str, dict[int, float]], notes=()):
        rows = []
        for variant in sorted(cells):
            row = [variant.label]
            for s in shots:
                seeds = cells[variant].get(s)
                if seeds:
                    cell = Cell(list(seeds.values()))
                    row.append(cell.text())
                    self.add_csv("fewshot", dataset, variant.label, s, "accuracy", cell)
                else:
                    row.append("–")
            rows.append(row)
        for label, values in paper_rows.items():
            rows.append([label] + [f"{values[s]:.2f}" if s in values else "–" for s in shots])
            for s in shots:
                if s in values:
                    self.add_csv("fewshot", dataset, label, s, "accuracy", paper=values[s])
        text = f"## {title}\n\n" + _markdown_table(["Method"] + [_shot_header(s) for s in shots], rows)
        if notes:
            text += "\n\n" + "\n".join(notes)
        self.sections.append(text)

    def base2new_table(self, title, dataset, groups: dict[tuple[Variant, int], dict[str, dict[int, float]]]):
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
                    self.add_csv("base2new", dataset, variant.label, shots, name, cells[name])
                else:
                    row.append("–")
            if len(cells) == 2:
                harmonic = harmonic_mean(cells["base"].mean, cells["new"].mean)
                n = min(cells["base"].n, cells["new"].n)
                row.append(f"{harmonic:.2f}" + (f" (n={n})" if n < 3 else ""))
                self.add_csv("base2new", dataset, variant.label, shots, "H", derived=(harmonic, n))
            else:
                row.append("–")
            rows.append(row)
        self.sections.append(f"## {title}\n\n" + _markdown_table(["Method", "Shots", "Base", "New", "H"], rows))


def _fewshot_sections(builder: _Builder, records: list[dict]) -> None:
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_dataset[record["dataset"]].append(record)
    datasets = sorted(by_dataset)
    paper = set(datasets) == set(PAPER_DATASETS)
    shots_all = sorted({r["shots"] for r in records if r["method"] not in ZERO_SHOT}) or sorted(
        {r["shots"] for r in records}
    )
    for dataset in datasets:
        cells = fewshot_cells(by_dataset[dataset])
        shots = sorted({s for by_shot in cells.values() for s in by_shot})
        reference = {"Zero-shot CLIP (paper)": dict.fromkeys(shots, PAPER_ZERO_SHOT[dataset])} if paper else {}
        builder.fewshot_table(f"Few-shot: {dataset}", dataset, cells, shots, reference)
    if len(datasets) < 2:
        return
    # Average over datasets: ProGrad's lambda may differ per dataset (the lambda policy); rows merge the lambdas
    # unless one dataset and shot count has several.
    split = {
        r["method"]
        for d in datasets
        for r in by_dataset[d]
        if r["method"] in LAMBDA_METHODS
        and len({x.get("lambda") for x in by_dataset[d] if x["method"] == r["method"] and x["shots"] == r["shots"]}) > 1
    }
    merge = frozenset(LAMBDA_METHODS) - split
    per_dataset = {d: fewshot_cells(by_dataset[d], merge) for d in datasets}
    notes = []
    for method in sorted(set(LAMBDA_METHODS) - split):
        lambdas = sorted(
            {(r["dataset"], r["shots"], r.get("lambda")) for r in records if r["method"] == method},
        )
        odd = [f"{d} at {s} shots" for d, s, lam in lambdas if lam not in (None, 1.0)]
        if odd and len(odd) < len(lambdas):
            values = sorted({lam for _, _, lam in lambdas if lam not in (None, 1.0)})
            notes.append(
                f"{DISPLAY[method]}: λ={'/'.join(f'{v:g}' for v in values)} on {', '.join(odd)}; λ=1 elsewhere."
            )
    common = set.intersection(*(set(c) for c in per_dataset.values()))
    average: dict[Variant, dict[int, dict[int, float]]] = {}
    for variant in common:
        by_shot = {}
        for s in shots_all:
            if all(per_dataset[d][variant].get(s) for d in datasets):
                seeds = _average([per_dataset[d][variant][s] for d in datasets])
                if seeds:
                    by_shot[s] = seeds
        if by_shot:
            average[variant] = by_shot
    reference = {}
    if paper:
        for method, values in PAPER_AVERAGE.items():
            if any(s in values for s in shots_all):
                reference[f"{DISPLAY[method]} (paper)"] = values
    builder.fewshot_table(
        f"Few-shot: Average over datasets ({len(datasets)})", "Average", average, shots_all, reference, notes
    )


def _base2new_sections(builder: _Builder, records: list[dict]) -> None:
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_dataset[record["dataset"]].append(record)
    datasets = sorted(by_dataset)
    keys = ("base_accuracy", "new_accuracy")  # H comes from their seed means, never from the runs' own H
    tables = {}
    for dataset in datasets:
        groups: dict[tuple[Variant, int], list[dict]] = defaultdict(list)
        for record in by_dataset[dataset]:
            groups[(_variant(record), record["shots"])].append(record)
        tables[dataset] = {g: {k: _per_seed(rs, k) for k in keys} for g, rs in groups.items()}
        builder.base2new_table(f"Base-to-new: {dataset}", dataset, tables[dataset])
    if len(datasets) > 1:
        common = set.intersection(*(set(t) for t in tables.values()))
        average = {}
        for group in common:
            average[group] = {}
            for k in keys:
                if all(tables[d][group][k] for d in datasets):
                    average[group][k] = _average([tables[d][group][k] for d in datasets])
        if average:
            builder.base2new_table(f"Base-to-new: Average over datasets ({len(datasets)})", "Average", average)


def _transfer_sections(builder: _Builder, records: list[dict]) -> None:
    """Domain generalisation / cross-dataset tables: the source accuracy and each target's, per method and shots."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_source[record["dataset"]].append(record)
    for source, group in sorted(by_source.items()):
        targets = sorted({t for r in group for t in r["targets"]})
        rows_by: dict[tuple[Variant, int], list[dict]] = defaultdict(list)
        for record in group:
            rows_by[(_variant(record), record["shots"])].append(record)
        rows = []
        for (variant, shots), members in sorted(rows_by.items()):
            row = [variant.label, str(shots)]
            columns = [("accuracy", source)] + [(t, t) for t in targets]
            for key, name in columns:
                values = [
                    (r["accuracy"] if key == "accuracy" else r["targets"].get(key)) for r in members
                ]  # one value per seed
                values = [v for v in values if _finite(v)]
                if values:
                    cell = Cell(values)
                    row.append(cell.text())
                    builder.add_csv("transfer", name, variant.label, shots, f"accuracy from {source}", cell)
                else:
                    row.append("–")
            rows.append(row)
        header = ["Method", "Shots", f"{source} (source)", *targets]
        builder.sections.append(f"## Transfer from {source}\n\n" + _markdown_table(header, rows))


def build_report(sweep_dir, out_dir=None, plots: bool = True) -> ReportResult:
    """Read a sweep folder; write report.md, report.csv and (unless plots=False) PNG figures into out_dir
    (default: <sweep_dir>/report)."""
    sweep_dir = Path(sweep_dir)
    done, failed = load_records(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FastPromptError(f"Cannot create the report folder {out_dir} ({error.strerror}).") from None

    builder = _Builder()
    fewshot = [r for r in done if (r.get("setting") or "fewshot") == "fewshot" and r.get("shots") is not None]
    base2new = [r for r in done if r.get("setting") == "base2new"]
    if fewshot:
        _fewshot_sections(builder, fewshot)
    if base2new:
        _base2new_sections(builder, base2new)
    transfer = [r for r in done if r.get("targets")]
    if transfer:
        _transfer_sections(builder, transfer)
    header = f"# Report: {sweep_dir.resolve().name}\n\n{len(done)} finished run(s)"
    header += f", {len(failed)} failed (see their result.json for the reason)." if failed else "."
    header += " Cells: mean ± population std over seeds (n = seeds when fewer than 3); accuracies in %."
    markdown = "\n\n".join([header, *builder.sections]) + "\n"

    markdown_path = out_dir / "report.md"
    markdown_path.write_text(markdown)
    csv_path = out_dir / "report.csv"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(
            stream, ["setting", "dataset", "method", "shots", "metric", "mean", "std", "n", "source"]
        )
        writer.writeheader()
        writer.writerows(builder.csv_rows)
    plot_paths = []
    if plots and fewshot:
        from fastprompt.plots import draw_plots

        plot_paths = draw_plots(sweep_dir, out_dir, fewshot)
    return ReportResult(markdown=markdown, csv_path=csv_path, plot_paths=plot_paths, markdown_path=markdown_path)
