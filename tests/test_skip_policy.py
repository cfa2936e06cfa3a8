"""CI's skip policy (tests/skip_policy.py): a skip other than the gpu/slow tiers fails a strict run."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent

CASES = {
    "missing_package": ("pytest.importorskip('no_such_package_here')", pytest.ExitCode.TESTS_FAILED),
    "missing_file": ("pytest.skip('data file not found')", pytest.ExitCode.TESTS_FAILED),
    "gpu_tier": ("pytest.skip('gpu: needs a CUDA device')", pytest.ExitCode.OK),
    "slow_tier": ("pytest.skip('slow: pass --runslow to run')", pytest.ExitCode.OK),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_strict_run_fails_on_unexpected_skips(pytester, monkeypatch, case, strict):
    body, strict_code = CASES[case]
    pytester.makepyfile(test_sample=f"import pytest\n\ndef test_ok():\n    pass\n\ndef test_skips():\n    {body}\n")
    monkeypatch.setenv("FASTPROMPT_STRICT_SKIPS", "1" if strict else "0")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    result = pytester.runpytest_subprocess("-p", "skip_policy", "-q")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == (strict_code if strict else pytest.ExitCode.OK)
    if strict_code != pytest.ExitCode.OK:
        result.stdout.fnmatch_lines(["*test_skips*"])
