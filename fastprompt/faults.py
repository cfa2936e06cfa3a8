"""Fault points: a test-only hook that kills the process or fills the disk at a chosen write of cache or train.

Every write of `fastprompt cache` and `fastprompt train` passes named points (`fastprompt.atomic`, docs/reliability.md):
`<file>:write` (temporary file created, its bytes not yet written), `<file>:rename` (temporary file complete and
synced, not yet renamed), `<file>:done` (renamed into place), and `index:append` / `index:done` around the one line a
finished run appends to results.jsonl. The environment arms the hook, read once at import:

    FASTPROMPT_KILL_AT=<at>     the chosen point sends SIGKILL to its own process
    FASTPROMPT_ENOSPC_AT=<at>   the chosen point raises OSError(ENOSPC), as a full disk does
    FASTPROMPT_FAULT_TRACE=<f>  append "<n> <name>" to the file f for every point reached (before acting on it)

`<at>` is n (the n-th point this process reaches, from 1), a name (its first occurrence) or name@k (its k-th).
Unset, a point costs one test of a module global.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from dataclasses import dataclass, field

KILL, ENOSPC, TRACE = "FASTPROMPT_KILL_AT", "FASTPROMPT_ENOSPC_AT", "FASTPROMPT_FAULT_TRACE"


@dataclass
class _Plan:
    kill_at: str | None = None
    enospc_at: str | None = None
    trace: str | None = None
    reached: int = 0
    seen: Counter = field(default_factory=Counter)

    def chosen(self, at: str | None, name: str) -> bool:
        if at is None:
            return False
        if at.isdigit():
            return self.reached == int(at)
        wanted, _, occurrence = at.partition("@")
        return wanted == name and self.seen[name] == int(occurrence or 1)


_plan: _Plan | None = None


def arm(kill_at: str | int | None = None, enospc_at: str | int | None = None, trace: str | None = None) -> None:
    """Arm the hook in this process (tests; the environment does it at import). Counting restarts from zero."""
    global _plan
    kill_at, enospc_at = (None if at is None else str(at) for at in (kill_at, enospc_at))
    _plan = _Plan(kill_at, enospc_at, trace) if (kill_at or enospc_at or trace) else None


def disarm() -> None:
    arm()


def arm_from_environment(environ=os.environ) -> None:
    arm(environ.get(KILL) or None, environ.get(ENOSPC) or None, environ.get(TRACE) or None)


def fault_point(name: str) -> None:
    """A write point of cache or train: does nothing unless a test armed the hook."""
    if _plan is None:
        return
    _plan.reached += 1
    _plan.seen[name] += 1
    if _plan.trace:
        descriptor = os.open(_plan.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, f"{_plan.reached} {name}\n".encode())
        finally:
            os.close(descriptor)
    if _plan.chosen(_plan.kill_at, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _plan.chosen(_plan.enospc_at, name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")


arm_from_environment()
