"""`fastprompt report`: tables (report.md, report.csv) and figures of a sweep folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

HELP = """Summarise a sweep folder: few-shot tables (methods x shots, mean ± std over seeds), base-to-new tables,
the paper's reference rows when the sweep covers its 11 datasets, and PNG figures (accuracy vs shots, accuracy vs
epoch, gradient angle vs epoch).

Examples:

  fastprompt report sweeps/pets

  fastprompt report sweeps/pets --out reports/pets --no-plots
"""


@app.command("report", help=HELP, no_args_is_help=True)
def report_command(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep folder (the --out of `fastprompt train`).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: SWEEP_DIR/report).")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG figures.")] = True,
) -> None:
    from fastprompt.report import build_report

    result = build_report(sweep_dir, out, plots=plots)
    typer.echo(result.markdown)
    typer.echo(f"Wrote {result.markdown_path} and {result.csv_path}")
    for path in result.plot_paths:
        typer.echo(f"Plot: {path}")
