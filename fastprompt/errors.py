"""User-facing errors: one sentence saying what is wrong and what to do. The CLI prints them without a traceback."""

from __future__ import annotations


class FastPromptError(Exception):
    """An error caused by the user's input (a path, a name, a shape), with a message that says how to fix it."""


class ConfigError(FastPromptError, ValueError):
    """A configuration value that cannot be used."""


def brief(value: object, limit: int = 80) -> str:
    """`value` as a message quotes it: its repr (one line: newlines and control characters escaped), cut to `limit`.

    A message names the bad value so the user can find it, but a file can hold a value of any size or depth.
    """
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a list nested too deep, an integer too long to print
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[: limit - 6]}...{text[-3:]}"


def one_line(text: str, limit: int = 200) -> str:
    """Another library's error text on one line (whitespace runs become one space), cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
