"""The `fastprompt` command: typer app that registers every sub-command."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fastprompt",
    help="Fast, exact prompt tuning of CLIP (CoOp, ProGrad and relatives) on cached image features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    from fastprompt.cli import commands  # noqa: F401  (registers the commands on `app`)

    app()
