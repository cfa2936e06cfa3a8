"""The `fastprompt` command: the typer app, its error handling, and the registration of every sub-command.

Commands live one per module in this package (`cli/<name>.py`), parse arguments and call the library; no logic here.
"""

from __future__ import annotations

import errno
import functools
import importlib
import importlib.util
import sys

import typer

from fastprompt.atomic import FULL_DISK
from fastprompt.errors import FastPromptError, brief

COMMAND_MODULES = ("env", "cache", "train", "report", "demo", "testbed", "audit", "gradcam")


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
                    typer.secho(f"Error: {_one_line(error)}", err=True, fg=typer.colors.RED)
                    raise typer.Exit(2) from None
                except OSError as error:  # a full disk where no write names its file (writes that do: atomic.py)
                    if error.errno == errno.ENAMETOOLONG:  # any path given, before any check could name it
                        typer.secho(f"Error: The path {brief(error.filename)} is too long for the file system; use a "
                                    f"shorter one.", err=True, fg=typer.colors.RED)  # fmt: skip
                        raise typer.Exit(2) from None
                    if error.errno not in FULL_DISK:
                        raise
                    where = f" while writing {error.filename}" if error.filename else ""
                    typer.secho(f"Error: {error.strerror}{where}; free space and rerun the same command.", err=True,
                                fg=typer.colors.RED)  # fmt: skip
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


_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode() for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def _one_line(error: FastPromptError) -> str:
    """The message on one line even where it quotes a path with a newline in it (such names are legal): every
    character that `str.splitlines` breaks at is printed escaped."""
    return str(error).translate(_LINE_BREAKS)


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
        print(f"Error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
