"""`fastprompt demo` end to end at a reduced size: testbed data -> cache -> batched sweep -> report."""

from __future__ import annotations

import json

import pytest
from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.demo import DEMO_METHODS, DemoOptions, run_demo

testbed = pytest.importorskip("fastprompt.testbed")


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
    options = DemoOptions.quick(tmp_path, tasks=("TestbedShapesShift",), seeds=(1,), progress=False)
    lines = []
    result = run_demo(options, echo=lines.append)
    records = [json.loads(line) for line in (result.sweep_dir / "results.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in records}) == sorted(DEMO_METHODS)
    assert all(r["status"] == "done" for r in records) and len(records) == len(DEMO_METHODS) * 2
    assert "## Few-shot: TestbedShapesShift" in result.markdown and "| ProGrad |" in result.markdown
    assert any("Zero-shot accuracy of the testbed model on TestbedShapesShift" in line for line in lines)
    assert 0.0 <= result.zero_shot["TestbedShapesShift"] <= 100.0
    names = {p.name for p in result.plot_paths}
    assert names >= {"accuracy_vs_shots_TestbedShapesShift.png", "accuracy_vs_epoch_TestbedShapesShift.png"}
    again = run_demo(options, echo=lambda line: None)  # warm: data, cache and runs are reused
    assert again.markdown == result.markdown


def test_demo_command_help_and_quick_run(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(load_commands(), ["demo", "--help"])
    assert help_text.exit_code == 0 and "fastprompt demo --quick" in help_text.output
    result = runner.invoke(
        load_commands(), ["demo", "--quick", "--out", str(tmp_path), "--seeds", "1", "--shots", "1", "--no-plots",
                          "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Zero-shot accuracy of the testbed model on TestbedShapes (test split)" in result.output
    assert "## Few-shot: Average over datasets (2)" in result.output


def test_demo_bad_shots_is_one_sentence(tmp_path):
    result = CliRunner().invoke(load_commands(), ["demo", "--out", str(tmp_path), "--shots", "1,x"])
    assert result.exit_code == 2 and "--shots takes comma-separated integers" in result.output
    assert "Traceback" not in result.output
