"""`fastprompt report`: tables (markdown and CSV) and figures of a sweep folder (docs/report.md, docs/FORMATS.md).

Modules, imported one way: `paper` (the paper's reference numbers) and `core` (reading a sweep, table rows, cells,
statistics, markdown) know nothing of the rest; `sections` (the paper's tables and figures, the leaderboard) and
`plots` (the PNG figures) import the core; `build` composes them into `build_report`. This package's top level
loads `core` and `paper` only: `build_report` and `ReportResult` are imported from `build` when first asked for, so
that importing the core or the plots never imports the builder.
"""

from __future__ import annotations

from fastprompt.report.core import (
    INDEX,
    Cell,
    Variant,
    fewshot_cells,
    harmonic_mean,
    load_log,
    load_predictions,
    load_records,
    variant_of,
)
from fastprompt.report.paper import PAPER_AVERAGE, PAPER_DATASETS, PAPER_SHOTS, PAPER_ZERO_SHOT

_BUILD = ("build_report", "ReportResult")


def __getattr__(name: str):
    if name in _BUILD:
        from fastprompt.report import build

        return getattr(build, name)
    raise AttributeError(f"module 'fastprompt.report' has no attribute {name!r}")


__all__ = [
    "INDEX",
    "PAPER_AVERAGE",
    "PAPER_DATASETS",
    "PAPER_SHOTS",
    "PAPER_ZERO_SHOT",
    "Cell",
    "ReportResult",
    "Variant",
    "build_report",
    "fewshot_cells",
    "harmonic_mean",
    "load_log",
    "load_predictions",
    "load_records",
    "variant_of",
]
