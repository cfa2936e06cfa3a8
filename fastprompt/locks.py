"""One writer per folder: an advisory lock that `build_cache` and `run_sweep` hold while they write a folder.

The lock is `flock(LOCK_EX | LOCK_NB)` on the file `.fastprompt.lock` inside the folder. The kernel drops an flock
lock when the last descriptor of its open file goes away, so a process that dies in any way (SIGKILL, OOM killer,
power-off of a local disk) never leaves the folder locked: the next run takes the lock and resumes. The file's content
(pid, host, command, start time) only names the holder in the refusal; it is not the lock. A clean exit removes the
file; one left by a killed process is reused. A second process is refused at once with one sentence
(`FolderInUseError`, never a wait).

Details that keep it honest:

- Forked children (DataLoader workers) would inherit the descriptor and keep the lock alive after their parent was
  killed; they close their copy right after the fork (closing, never unlocking, so the parent keeps its lock).
- The file is removed while still locked, and a process that locked a file which is no longer the one at the path
  tries again, so removing it on release never lets two processes in.
- Within one process the lock is re-entrant for the thread that holds it (a command may take it before calling the
  library); another thread is refused like another process.
- Where the file system cannot lock (some NFS mounts with `nolock`, some FUSE or Lustre mounts without `flock`), the
  work goes on unlocked with a `LockUnavailableWarning`. A folder that cannot be written at all is not locked (nothing
  will be written there). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from fastprompt.errors import FastPromptError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_FILE = ".fastprompt.lock"
# errno values by which a file system says it cannot lock (NFS without a lock manager, FUSE, Lustre without -o flock)
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


class FolderInUseError(FastPromptError):
    """Another process (or thread) is writing the folder; the message names it and says what to do."""


class LockUnavailableWarning(UserWarning):
    """The folder's file system cannot lock: two writers at once would not be stopped there."""


_held: dict[str, list] = {}  # real path -> [descriptor, owning thread id, depth], for this process
_held_guard = threading.Lock()


def _forget_after_fork() -> None:
    """In a forked child: close the inherited descriptors (without unlocking) so a killed parent frees its folders."""
    global _held_guard
    for descriptor, _, _ in _held.values():
        try:
            os.close(descriptor)
        except OSError:
            pass
    _held.clear()
    _held_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def holder_of(folder: Path | str) -> dict | None:
    """What the lock file of `folder` says about its holder (pid, host, command, since), or None."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text()[:4096])
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process"
    where = f"pid {holder['pid']}"
    if holder.get("host"):
        where += f" on {holder['host']}"
    if holder.get("since"):
        where += f", since {holder['since']}"
    return f"{holder.get('command') or 'another process'} ({where})"


class FolderLock:
    """The write lock of one folder; `acquire` creates the folder, `release` is safe to call when not held.

    Args:
        folder: the folder to lock (created if missing).
        command: who we are, shown to a process that is refused ("fastprompt train").
        remedy: what a refused user can do besides waiting ("pass another --out").
    """

    def __init__(self, folder: Path | str, command: str, remedy: str = "use another folder") -> None:
        self.folder = Path(folder)
        self.command = command
        self.remedy = remedy
        self._key: str | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> None:
        """Take the lock, or raise FolderInUseError at once if another process or thread holds it.

        Raises:
            FolderInUseError: the folder is being written by someone else.
            FastPromptError: the path exists and is not a folder.
        """
        if self._key is not None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise FastPromptError(f"'{self.folder}' exists and is not a folder; pass a folder.") from None
        except OSError as error:
            if error.errno in READ_ONLY:
                return  # nothing can be written there: the work that follows says so where it tries
            raise
        key = os.path.realpath(self.folder)
        with _held_guard:
            if key in _held:
                if _held[key][1] != threading.get_ident():
                    raise FolderInUseError(self._refusal("another thread of this process"))
                _held[key][2] += 1
                self._key = key
                return
            descriptor = self._lock_file()
            if descriptor is None:
                return
            _held[key] = [descriptor, threading.get_ident(), 1]
            self._key = key
        self._write_holder(descriptor)

    def release(self) -> None:
        """Let go (the last release of a re-entrant hold removes the file and unlocks)."""
        if self._key is None:
            return
        with _held_guard:
            entry = _held.get(self._key)
            self._key, key = None, self._key
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] > 0:
                return
            del _held[key]
            descriptor = entry[0]
        for tidy in (lambda: os.ftruncate(descriptor, 0), (Path(key) / LOCK_FILE).unlink):
            try:
                tidy()  # the file is removed while still locked: see the module docstring
            except OSError:
                pass  # read-only to us, or the folder was removed meanwhile: closing still unlocks
        os.close(descriptor)  # closing the last descriptor drops the flock lock

    # ------------------------------------------------------------------------------------------------ internals
    def _refusal(self, holder: str) -> str:
        return f"The folder '{self.folder}' is in use by {holder}; wait for it to finish or stop it, or {self.remedy}."

    def _lock_file(self) -> int | None:
        """An open, flock-locked descriptor of the folder's lock file (None: this file system cannot lock)."""
        path = self.folder / LOCK_FILE
        if fcntl is None:
            self._unlocked("this platform has no flock")
            return None
        while True:
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as error:
                if error.errno not in READ_ONLY:
                    raise
                try:  # another user's lock file in a folder we share: flock needs no write access
                    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None  # the folder cannot be written by us at all
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(descriptor)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FolderInUseError(self._refusal(_describe(holder_of(self.folder)))) from None
                if error.errno in UNSUPPORTED:
                    self._unlocked(os.strerror(error.errno))
                    return None
                raise
            try:
                same = os.path.samestat(os.fstat(descriptor), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                return descriptor
            os.close(descriptor)  # the holder we waited on removed this file on release: lock the current one

    def _write_holder(self, descriptor: int) -> None:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[:8],
        }
        payload = json.dumps(holder).encode()
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, payload, 0)
            os.fsync(descriptor)  # so that a process on another NFS client can name us
        except OSError:
            pass  # the name of the holder is a courtesy; the lock itself is held

    def _unlocked(self, why: str) -> None:
        warnings.warn(
            f"'{self.folder}' cannot be locked ({why}), so a second process writing it at the same time would not be "
            f"stopped; make sure only one writes it.",
            LockUnavailableWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def taking_turns(path: Path | str) -> Iterator[None]:
    """Hold a blocking `flock(LOCK_EX)` on the file `path` (created if missing) for the block.

    Processes that write one file together (the torchrun ranks of a sweep appending to its results.jsonl, on one
    machine or on several that share the file system) wrap each write in this, so writes never interleave and a
    reader inside it never sees half a line. Unlike `FolderLock` it waits (a turn lasts one short write) and the file
    stays. Where the file system cannot lock, the block runs unlocked with a `LockUnavailableWarning`.
    """
    path = Path(path)
    descriptor = None
    if fcntl is not None:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            if error.errno not in READ_ONLY:
                raise  # a folder we may not write: the write inside the block says so
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError as error:
                os.close(descriptor)
                descriptor = None
                if error.errno not in UNSUPPORTED:
                    raise
                warnings.warn(
                    f"'{path}' cannot be locked ({os.strerror(error.errno)}), so writers in several processes may "
                    f"interleave; run one writer at a time there.",
                    LockUnavailableWarning,
                    stacklevel=3,
                )
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # closing drops the flock lock
