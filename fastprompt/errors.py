"""User-facing errors: one sentence saying what is wrong and what to do. The CLI prints them without a traceback."""

from __future__ import annotations


class FastPromptError(Exception):
    """An error caused by the user's input (a path, a name, a shape), with a message that says how to fix it."""


class ConfigError(FastPromptError, ValueError):
    """A configuration value that cannot be used."""
