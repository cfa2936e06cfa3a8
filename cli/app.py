"""The `fastprompt` command: the typer app, its error handling, and the registration of every sub-command.

Commands live one per module in this package (`cli/<name>.py`), parse arguments and call the library; no logic here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys

import typer

from fastprompt.errors import FastPromptError

COMMAND_MODULES = ("env", "cache", "train", "report", "demo", "testbed")


class _App(typer.Typer):
    """A Typer whose commands turn a FastPromptError into one clear sentence on stderr and exit status 2."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(function):
            @functools.wraps(function)
            def guarded(*call_args, **call_kwargs):
                try:
                    return function(*call_args, **call_kwargs)
                except FastPromptError as error:
                    typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
                    raise typer.Exit(2) from None

            register(guarded)
            return function

        return decorator


app = _App(
    name="fastprompt",
    help="Fast, exact prompt tuning of CLIP (CoOp, ProGrad and relatives) on cached image features.\n\n"
    "Typical use: `fastprompt cache` once per dataset, then `fastprompt train` for a sweep, then `fastprompt report`. "
    "`fastprompt demo` runs all of it offline on a generated testbed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Fast, exact prompt tuning of CLIP (CoOp, ProGrad and relatives) on cached image features."""


def load_commands() -> typer.Typer:
    """Import every command module that exists (each registers itself on `app`) and return the app."""
    for name in COMMAND_MODULES:
        module = f"fastprompt.cli.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return app


def main() -> None:
    load_commands()
    try:
        app()
    except FastPromptError as error:  # raised outside a command (e.g. while parsing)
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)
