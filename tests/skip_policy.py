"""A pytest plugin: in CI a skipped test is a failure unless it is a tier skip (no CUDA device, or `slow` without
`--runslow`).

A test that skips because an optional package, a data file or a fixture is missing looks green in a summary line but
checks nothing; CI must not pass on it. Strict mode is on when `FASTPROMPT_STRICT_SKIPS=1` (set by `.ci/run`) or the
`CI` environment variable is set; a developer's plain `pytest` only lists such skips.
"""

from __future__ import annotations

import os

import pytest

ALLOWED_PREFIXES = ("gpu:", "slow:")  # the reasons conftest gives to the two tiers that may skip


def _strict() -> bool:
    flag = os.environ.get("FASTPROMPT_STRICT_SKIPS")
    if flag is not None:
        return flag not in ("", "0", "false", "no")
    return bool(os.environ.get("CI"))


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _unexpected_skips(reporter) -> list[tuple[str, str]]:
    if reporter is None:
        return []
    found = []
    for report in reporter.stats.get("skipped", []):
        reason = _reason(report)
        if not reason.startswith(ALLOWED_PREFIXES):
            found.append((report.nodeid, reason))
    return found


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = _unexpected_skips(terminalreporter)
    if not skips:
        return
    verdict = "fail the run (strict skips)" if _strict() else "would fail CI"
    terminalreporter.section(f"skips that {verdict}")
    for nodeid, reason in skips:
        terminalreporter.line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _strict() and exitstatus == pytest.ExitCode.OK and _unexpected_skips(reporter):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
