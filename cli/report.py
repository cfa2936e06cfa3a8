"""`fastprompt report`: tables (report.md, report.csv) and figures of a sweep folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

HELP = """Summarise a sweep folder in the layout of the ProGrad paper: few-shot tables (methods x shots, mean ± std
over seeds; Figure 4 and Table 1), domain generalisation (Table 2), base-to-new (Table 3), cross-dataset transfer
(Table 4), knowledge distillation (Table 5), the cosine classifier (Table 6), lambda (Table 7), augmentation
(Figure 1 c, d), failure cases (Figure 5), gradient angles (Figure 6), a trained teacher (Figure 7), and a leaderboard
with each method's training time per run. A section appears when the sweep has its runs; the report's first lines
say which runs the missing ones need. The paper's reference rows are added where the datasets are the paper's.
PNG figures: accuracy vs shots, accuracy vs epoch (with and without augmentation), gradient angle vs epoch.

Examples:

  fastprompt report sweeps/pets

  fastprompt report sweeps/pets --out reports/pets --no-plots

  fastprompt report sweeps/pets --no-timings   # a report that depends on the results only
"""


@app.command("report", help=HELP, no_args_is_help=True)
def report_command(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep folder (the --out of `fastprompt train`).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: SWEEP_DIR/report).")] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG figures.")] = True,
    timings: Annotated[
        bool, typer.Option("--timings/--no-timings", help="Add the leaderboard's training time per run.")
    ] = True,
) -> None:
    from fastprompt.report import build_report

    result = build_report(sweep_dir, out, plots=plots, timings=timings)
    typer.echo(result.markdown)
    typer.echo(f"Wrote {result.markdown_path} and {result.csv_path}")
    for path in result.plot_paths:
        typer.echo(f"Plot: {path}")
