"""`fastprompt demo`: the whole job offline on the generated testbed (no weights, no data, no network needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

HELP = """Run the whole job offline: write the testbed tasks, cache their features with the shipped tiny CLIP, train
one batched sweep (zero-shot, CLIP++, linear probe, CoOp, ProGrad, KD x shots 1-16 x seeds 1-3), report, and read the
table in three sentences computed from the results.

Everything goes to one folder (default ~/.cache/fastprompt/demo); a second run reuses the data, caches and finished
runs.

Examples:

  fastprompt demo

  fastprompt demo --quick                    # a reduced demo in seconds

  fastprompt demo --shots 1,2,4 --seeds 1,2 --out demo-run
"""


@app.command("demo", help=HELP)
def demo_command(
    out: Annotated[Path | None, typer.Option(help="Folder for data, caches and the sweep.")] = None,
    shots: Annotated[str | None, typer.Option(help="Comma-separated shot counts (default 1,2,4,8,16).")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (default 1,2,3).")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs for every run (default: 50/100/200 by shots).")
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="A reduced demo: 2 shot counts, 2 seeds, 4 epochs, small splits.")
    ] = False,
    plots: Annotated[bool, typer.Option(help="Draw the PNG figures.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads (the tiny model runs fastest on one).")] = 1,
) -> None:
    from fastprompt.cli.cache import _integers

    from fastprompt.demo import DemoOptions, default_home, run_demo

    folder = out or default_home()
    options = DemoOptions.quick(folder) if quick else DemoOptions(out=folder)
    if shots:
        options.shots = _integers(shots, "--shots", minimum=1)
    if seeds:
        options.seeds = _integers(seeds, "--seeds")
    if epochs is not None:
        options.epochs = epochs
    options.plots, options.progress, options.threads = plots, progress, threads
    result = run_demo(options, echo=typer.echo)
    typer.echo("")
    typer.echo(result.markdown)
    for path in result.plot_paths:
        typer.echo(f"Plot: {path}")
    typer.echo(f"Sweep folder: {result.sweep_dir}")
    if result.sentences:
        typer.echo("")
        typer.echo("Reading the table:")
        for sentence in result.sentences:
            typer.echo(f"- {sentence}")
    typer.echo(f"Demo time: {result.seconds:.0f} s.")
