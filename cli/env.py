"""`fastprompt env`: versions and devices, for bug reports and result provenance."""

from __future__ import annotations

import typer
from fastprompt.cli.app import app


@app.command("env", help="Print the versions of fastprompt, torch, triton, open_clip and CUDA, and the devices seen.")
def env_command() -> None:
    from fastprompt.env import environment

    for key, value in environment().items():
        typer.echo(f"{key:>14}: {value}")
