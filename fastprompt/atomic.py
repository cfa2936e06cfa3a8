"""Atomic writes shared by the cache and the sweep: temporary names, stale temporaries, a full disk in one sentence.

A file is written to `.<name>.<pid>.tmp` beside it, synced, then renamed over it, so a reader (or a rerun after a
kill) sees the old file or the new one, never half of one. The write passes the fault points `<point>:write`,
`<point>:rename` and `<point>:done` (fastprompt/faults.py). A process killed between creating and renaming its
temporary file leaves it behind; the next run in that folder removes it (`remove_stale_temporaries`), and a write
that fails removes its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fastprompt.errors import FastPromptError
from fastprompt.faults import fault_point

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_TEMPORARY = re.compile(r"^\.(.+)\.(\d+)\.tmp$")


class DiskFullError(FastPromptError):
    """A write failed for want of space (or quota); the message names the file and the folder."""


def temporary_path(path: Path) -> Path:
    """The temporary name of `path` for this process: hidden, beside it (same file system), with our pid."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes(path: Path, payload: bytes, point: str) -> None:
    """Write `payload` to `path` atomically: temporary file, fsync, rename."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as stream:
            fault_point(f"{point}:write")
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        fault_point(f"{point}:rename")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fault_point(f"{point}:done")


def write_json(path: Path, content, point: str, indent: int | None = 1) -> None:
    write_bytes(path, json.dumps(content, indent=indent).encode(), point)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in flight when it cleans up: any of its names is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(*folders: Path, names: frozenset[str] | None = None) -> list[Path]:
    """Delete our temporary files (`.<name>.<pid>.tmp`, `<name>` in `names` if given) in `folders` whose process is
    gone; returns them."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for candidate in Path(folder).iterdir():
            match = _TEMPORARY.match(candidate.name)
            if not match or (names is not None and match.group(1) not in names):
                continue
            if candidate.is_file() and not _alive(int(match.group(2))):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def append_line(path: Path, line: str, point: str) -> None:
    """Append one line to `path` and fsync; a failed write (a full disk) truncates back, leaving no torn line.

    Fault points `<point>:append` (before the write) and `<point>:done` (after the fsync).
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        try:
            fault_point(f"{point}:append")
            remaining = memoryview(line.encode())
            while remaining:
                remaining = remaining[os.write(descriptor, remaining) :]
            os.fsync(descriptor)
        except BaseException:
            os.ftruncate(descriptor, size)
            raise
    finally:
        os.close(descriptor)
    fault_point(f"{point}:done")


@contextlib.contextmanager
def full_disk_reported(what: str, folder: Path, kept: str) -> Iterator[None]:
    """Turn a full disk while writing `what` in `folder` into one sentence naming both and what to do."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        raise DiskFullError(
            f"{os.strerror(error.errno)} while writing {what} in {folder}; free space and rerun the same command: "
            f"{kept}."
        ) from error
