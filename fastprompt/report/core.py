"""The report's core: reading a sweep folder, table rows (variants), cells over seeds, averages, markdown output.

Sections (`fastprompt.report.sections`) and figures (`fastprompt.report.plots`) import this module; it imports
neither. Methods are known from their declarations (`fastprompt.methods.METHODS`): display name, row order, swept knob
and kind. A method a newer version wrote that this one does not declare still gets a row, under its own name, after
the declared ones.

Cells are the mean and the population standard deviation over seeds ("mean ± std", with "(n=k)" when fewer than 3
seeds). Zero-shot methods do not depend on the shot count: their runs are pooled per seed and the value is repeated
in every column. Averages over datasets are taken per seed (over the seeds every dataset has), then mean ± std over
those seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastprompt.errors import FastPromptError
from fastprompt.methods import METHODS, Method

INDEX = "results.jsonl"
PREDICTIONS = "predictions.npz"
UNKNOWN_RANK = 1_000_000  # after every declared method's `order`
KNOB_SYMBOLS = {"lambda": "λ", "alpha": "α"}
CSV_FIELDS = ["setting", "dataset", "method", "shots", "metric", "mean", "std", "n", "source"]


# ---------------------------------------------------------------------------------------------------- methods


def declared(name: str) -> Method | None:
    """The declaration of method `name`, or None for a name this version does not know."""
    return METHODS.get(name)


def display(name: str) -> str:
    method = declared(name)
    return method.display if method is not None else name


def is_zero_shot(name: str) -> bool:
    method = declared(name)
    return method is not None and method.kind == "zeroshot"


def knob_of(name: str) -> str | None:
    method = declared(name)
    return method.knob if method is not None else None


def in_paper(name: str, item: str) -> bool:
    """Whether method `name` appears in the paper's table or figure `item` ("Table 5")."""
    method = declared(name)
    return method is not None and item in method.paper


def baseline_of(name: str) -> str | None:
    """The method that a projecting method projects: the same trainer without a teacher.

    "<head>+prograd" names its head; otherwise the one declared method of the same kind and trainable tensors that
    plain SGD trains without a teacher, a text distance or a fixed prompt (ProGrad: CoOp).
    """
    method = declared(name)
    if method is None or not method.projects:
        return None
    head, _, _ = name.partition("+")
    if head != name:
        return head if head in METHODS else None
    candidates = [
        other.name
        for other in METHODS.values()
        if other.kind == method.kind
        and other.trainable == method.trainable
        and other.update == "sgd"
        and other.teacher is None
        and not other.text_distance
        and other.prompt_prefix is None
    ]
    return candidates[0] if len(candidates) == 1 else None


# ---------------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A table row: a method, its swept knob (lambda, alpha) where rows tell it apart, and a tag ("centre view")."""

    rank: int
    method: str
    knob: float | None = None
    tag: str = ""

    def __lt__(self, other: Variant) -> bool:
        return self._key() < other._key()

    def _key(self) -> tuple:
        return (self.rank, self.method, self.knob is not None, self.knob or 0.0, self.tag)

    @property
    def label(self) -> str:
        details = []
        if self.knob is not None:
            details.append(f"{KNOB_SYMBOLS.get(knob_of(self.method) or '', '?')}={self.knob:g}")
        if self.tag:
            details.append(self.tag)
        name = display(self.method)
        return f"{name} ({', '.join(details)})" if details else name


def variant_of(record: dict, merge_lambda: frozenset = frozenset(), show_knob: bool = False, tag: str = "") -> Variant:
    """The row of a run. KD-like methods (knob alpha) always show alpha; lambda methods show lambda when it is not
    1 (or always with `show_knob`), unless they are in `merge_lambda` (one row whatever their lambda)."""
    method = record["method"]
    declaration = declared(method)
    rank = declaration.order if declaration is not None else UNKNOWN_RANK
    knob = None
    kind = knob_of(method)
    if kind == "alpha":
        knob = float(record.get("alpha") if record.get("alpha") is not None else 1.0)
    elif kind == "lambda" and method not in merge_lambda:
        value = record.get("lambda")
        if show_knob or value not in (None, 1.0):
            knob = float(value if value is not None else 1.0)
    return Variant(rank, method, knob, tag)


def is_standard(record: dict) -> bool:
    """A run of the paper's main protocol: augmented views and the template teacher (Figures 1 and 7 vary these)."""
    return record.get("augment", True) is not False and not record.get("teacher")


# ---------------------------------------------------------------------------------------------------- reading


def load_records(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(done runs with an accuracy, failed runs) of a sweep folder; one-sentence errors for unusable input.

    Raises:
        FastPromptError: no such folder, no results.jsonl, or no finished run in it.
    """
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
    done = [r for r in records.values() if r.get("status") == "done" and finite(r.get("accuracy")) and r.get("dataset")]
    failed = [r for r in records.values() if r.get("status") == "failed"]
    if not done:
        raise FastPromptError(f"{index} lists no finished runs with an accuracy; wait for the sweep or check its runs.")
    return done, failed


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_folder(sweep_dir: Path, record: dict) -> Path:
    return Path(sweep_dir) / (record.get("path") or record["run_id"])


def load_log(sweep_dir: Path, record: dict) -> list[dict]:
    """The run's log.jsonl rows that carry an integer epoch ([] without the file)."""
    path = run_folder(sweep_dir, record) / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
            rows.append(row)
    return rows


def load_predictions(sweep_dir: Path, record: dict) -> dict | None:
    """The run's predictions.npz as {name: int64 array}, or None when the file is missing or unreadable."""
    import numpy as np

    path = run_folder(sweep_dir, record) / PREDICTIONS
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name].astype(np.int64) for name in arrays.files}
    except (OSError, ValueError):
        return None


def group_by(records: Iterable[dict], key: Callable[[dict], object]) -> dict:
    groups: dict = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return groups


# ---------------------------------------------------------------------------------------------------- statistics


@dataclass
class Cell:
    """Values over seeds (or runs) of one table cell."""

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


def per_seed(records: list[dict], key: str = "accuracy") -> dict[int, float]:
    """Value per seed (runs of one seed, e.g. a zero-shot method at several shot counts, are averaged)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for record in records:
        if finite(record.get(key)):
            by_seed[record.get("seed")].append(float(record[key]))
    return {seed: statistics.fmean(values) for seed, values in by_seed.items()}


def harmonic_mean(base: float, new: float) -> float:
    """H = 2BN / (B + N) (0 when both are 0). Tables apply it to seed-mean B and N, as CoCoOp's and ProGrad's do."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def angle_degrees(cosine: float) -> float:
    """The angle (degrees) of a cosine, clamped into [-1, 1] against rounding."""
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def average_seeds(per_dataset: list[dict[int, float]]) -> dict[int, float]:
    """Per seed, the mean over datasets, for the seeds every dataset has."""
    seeds = set.intersection(*(set(d) for d in per_dataset)) if per_dataset else set()
    return {seed: statistics.fmean(d[seed] for d in per_dataset) for seed in sorted(seeds, key=str)}


Cells = dict[Variant, dict[int, dict[int, float]]]  # variant -> shots -> seed -> value


def fewshot_cells(
    records: list[dict],
    merge_lambda: frozenset = frozenset(),
    row: Callable[[dict], Variant] | None = None,
) -> Cells:
    """variant -> shots -> seed -> accuracy, for one dataset. Zero-shot methods: the same pooled values at every
    shot count of the table. `row` maps a run to its row (default: `variant_of` with `merge_lambda`)."""
    row = row or (lambda record: variant_of(record, merge_lambda))
    table_shots = sorted({r["shots"] for r in records if not is_zero_shot(r["method"])})
    groups: dict[Variant, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    pooled: dict[Variant, list[dict]] = defaultdict(list)
    for record in records:
        variant = row(record)
        if is_zero_shot(record["method"]):
            pooled[variant].append(record)
        else:
            groups[variant][record["shots"]].append(record)
    cells = {v: {s: per_seed(rs) for s, rs in by_shot.items()} for v, by_shot in groups.items()}
    for variant, rs in pooled.items():
        values = per_seed(rs)
        shots = table_shots or sorted({r["shots"] for r in rs})
        cells[variant] = {s: values for s in shots}
    return cells


def average_cells(per_dataset: dict[str, Cells], require_all: bool = True) -> tuple[Cells, dict]:
    """The per-seed average over datasets of each variant and shot count.

    Returns:
        (cells, coverage): coverage[(variant, shots)] is the number of datasets averaged. With `require_all`, a cell
        needs every dataset; otherwise it averages the datasets that have it.
    """
    variants = set().union(*(set(c) for c in per_dataset.values())) if per_dataset else set()
    average: Cells = {}
    coverage: dict = {}
    for variant in variants:
        shots = sorted({s for c in per_dataset.values() for s in c.get(variant, {})})
        by_shot = {}
        for s in shots:
            having = [c[variant][s] for c in per_dataset.values() if c.get(variant, {}).get(s)]
            if not having or (require_all and len(having) < len(per_dataset)):
                continue
            seeds = average_seeds(having)
            if seeds:
                by_shot[s] = seeds
                coverage[(variant, s)] = len(having)
        if by_shot:
            average[variant] = by_shot
    return average, coverage


# ---------------------------------------------------------------------------------------------------- output


def shot_header(shots: int) -> str:
    return f"{shots} shot" if shots == 1 else f"{shots} shots"


def markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table; the first `text_columns` columns align left, the numbers right."""
    rule = "|" + "".join("---|" if i < text_columns else "---:|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Document:
    """The report being written: markdown sections in order, and the CSV rows behind their numbers."""

    sections: list[str] = field(default_factory=list)
    csv_rows: list[dict] = field(default_factory=list)

    def add_csv(
        self,
        setting: str,
        dataset: str,
        label: str,
        shots,
        metric: str,
        cell: Cell | None = None,
        paper: float | None = None,
        derived: tuple[float, int] | None = None,
    ) -> None:
        """One CSV row: a cell over seeds, a paper number, or a value derived from cells (value, seeds; no std)."""
        row = {"setting": setting, "dataset": dataset, "method": label, "shots": shots, "metric": metric}
        if cell is not None:
            row |= {"mean": round(cell.mean, 4), "std": round(cell.std, 4), "n": cell.n, "source": "sweep"}
        elif derived is not None:
            row |= {"mean": round(derived[0], 4), "std": "", "n": derived[1], "source": "sweep"}
        else:
            row |= {"mean": paper, "std": "", "n": "", "source": "paper"}
        self.csv_rows.append(row)

    def section(self, title: str, body: str, intro: str = "", notes: Iterable[str] = ()) -> None:
        text = f"## {title}\n\n" + (f"{intro}\n\n" if intro else "") + body
        notes = list(notes)
        if notes:
            text += "\n\n" + "\n".join(notes)
        self.sections.append(text)

    def shots_table(
        self,
        title: str,
        setting: str,
        dataset: str,
        cells: Cells,
        shots: list[int],
        paper_rows: dict[str, dict[int, float]] | None = None,
        notes: Iterable[str] = (),
        intro: str = "",
        marks: Callable[[Variant, int], str] | None = None,
    ) -> None:
        """Rows: variants in order, then the paper's rows; columns: shot counts; cells: accuracy over seeds.
        `marks(variant, shots)` appends a remark to a cell (e.g. how many datasets it averages)."""
        rows = []
        for variant in sorted(cells):
            row = [variant.label]
            for s in shots:
                seeds = cells[variant].get(s)
                if seeds:
                    cell = Cell(list(seeds.values()))
                    row.append(cell.text() + (marks(variant, s) if marks else ""))
                    self.add_csv(setting, dataset, variant.label, s, "accuracy", cell)
                else:
                    row.append("–")
            rows.append(row)
        for label, values in (paper_rows or {}).items():
            rows.append([label] + [f"{values[s]:.2f}" if s in values else "–" for s in shots])
            for s in shots:
                if s in values:
                    self.add_csv(setting, dataset, label, s, "accuracy", paper=values[s])
        header = ["Method"] + [shot_header(s) for s in shots]
        self.section(title, markdown_table(header, rows), intro, notes)
