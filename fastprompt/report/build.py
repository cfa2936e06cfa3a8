"""`build_report`: reads a sweep folder, runs every section of the paper's layout, writes report.md, report.csv and
the figures. The only module of the report that knows all of its parts."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from fastprompt.errors import FastPromptError
from fastprompt.report.core import CSV_FIELDS, Document, load_records
from fastprompt.report.sections import SECTIONS, Context


@dataclass
class ReportResult:
    markdown: str
    csv_path: Path | None
    plot_paths: list[Path] = field(default_factory=list)
    markdown_path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # names of the sections the sweep has no runs for


def build_report(sweep_dir, out_dir=None, plots: bool = True, timings: bool = True) -> ReportResult:
    """Read a sweep folder; write report.md, report.csv and (unless `plots` is False) PNG figures into `out_dir`.

    Args:
        sweep_dir: the sweep folder (`fastprompt train --out`).
        out_dir: where the report goes (default: <sweep_dir>/report).
        plots: draw the figures.
        timings: add the leaderboard's training time per run (wall-clock: a rerun of the same sweep differs there;
            False gives a report that depends on the results only).

    Raises:
        FastPromptError: an unusable sweep folder, or a report folder that cannot be made.
    """
    sweep_dir = Path(sweep_dir)
    done, failed = load_records(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FastPromptError(f"Cannot create the report folder {out_dir} ({error.strerror}).") from None

    context = Context(sweep_dir, done, Document(), timings)
    skipped = [section for section in SECTIONS if not section.build(context)]
    header = f"# Report: {sweep_dir.resolve().name}\n\n{len(done)} finished run(s)"
    header += f", {len(failed)} failed (see their result.json for the reason)." if failed else "."
    header += " Cells: mean ± population std over seeds (n = seeds when fewer than 3); accuracies in %."
    if skipped:
        header += "\n\nNot in this sweep: " + "; ".join(f"{s.name}: needs {s.needs}" for s in skipped) + "."
    markdown = "\n\n".join([header, *context.doc.sections]) + "\n"

    markdown_path = out_dir / "report.md"
    markdown_path.write_text(markdown)
    csv_path = out_dir / "report.csv"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(context.doc.csv_rows)
    plot_paths = []
    if plots and context.fewshot:
        from fastprompt.report.plots import draw_plots

        plot_paths = draw_plots(sweep_dir, out_dir, context.fewshot)
    return ReportResult(markdown, csv_path, plot_paths, markdown_path, [s.name for s in skipped])
