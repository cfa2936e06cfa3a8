"""`fastprompt demo` end to end at a reduced size: testbed data -> cache -> batched sweep -> report."""

from __future__ import annotations

import json

import pytest
from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.demo import DEMO_METHODS, DemoOptions, read_results, run_demo

testbed = pytest.importorskip("fastprompt.testbed")


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
    options = DemoOptions.quick(tmp_path, tasks=("TestbedFineShapesShift",), seeds=(1,), progress=False)
    lines = []
    result = run_demo(options, echo=lines.append)
    records = [json.loads(line) for line in (result.sweep_dir / "results.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in records}) == sorted(DEMO_METHODS)
    assert all(r["status"] == "done" for r in records) and len(records) == len(DEMO_METHODS) * 2
    assert "## Few-shot: TestbedFineShapesShift" in result.markdown and "| ProGrad |" in result.markdown
    assert any("Zero-shot accuracy of the testbed model on TestbedFineShapesShift" in line for line in lines)
    assert 0.0 <= result.zero_shot["TestbedFineShapesShift"] <= 100.0
    names = {p.name for p in result.plot_paths}
    assert names >= {"accuracy_vs_shots_TestbedFineShapesShift.png", "accuracy_vs_epoch_TestbedFineShapesShift.png"}
    assert result.sentences == read_results(records) and len(result.sentences) == 3
    again = run_demo(options, echo=lambda line: None)  # warm: data, cache and runs are reused
    assert again.markdown == result.markdown and again.sentences == result.sentences


def _records(table: dict[str, dict[int, list[float]]], dataset: str = "TaskA") -> list[dict]:
    """Result records of a made-up sweep: method -> shots -> accuracy per seed."""
    return [
        {"method": method, "dataset": dataset, "setting": "fewshot", "shots": shots, "seed": seed + 1,
         "accuracy": accuracy, "status": "done"}
        for method, by_shots in table.items()
        for shots, scores in by_shots.items()
        for seed, accuracy in enumerate(scores)
    ]  # fmt: skip


def test_the_sentences_read_the_table():
    table = {
        "zeroshot": {1: [60.0, 60.0], 16: [60.0, 60.0]},
        "coop": {1: [50.0, 54.0], 16: [80.0, 84.0]},  # below zero-shot at 1 shot only
        "prograd": {1: [62.0, 64.0], 16: [79.0, 79.0]},  # best at 1 shot, behind CoOp at 16
    }
    first, second, third = read_results(_records(table))
    assert first.startswith("ProGrad is best at 1 shot (63.0%) and CoOp is best at 16 shots (82.0%)")
    assert "60.0% for zero-shot CLIP" in first
    assert second == "CoOp falls below zero-shot CLIP on TaskA at 1 shot."
    assert third.startswith("ProGrad is above CoOp at 1 of 2 shot counts") and "+11.0 points at 1 shot" in third
    assert "-3.0 at 16 shots" in third
    table["coop"][1] = [61.0, 61.0]
    assert read_results(_records(table))[1] == "CoOp is above zero-shot CLIP at every shot count on every task."


def test_the_sentences_name_the_shift_task_and_skip_what_did_not_run():
    table = {"zeroshot": {1: [50.0], 4: [50.0]}, "coop": {1: [40.0], 4: [45.0]}, "prograd": {1: [52.0], 4: [51.0]}}
    records = _records(table, "TaskA") + _records(table, "TaskAShift")
    sentences = read_results(records)
    assert "averaged over the 2 tasks" in sentences[0]
    assert "on TaskA at 1 and 4 shots; on TaskAShift at 1 and 4 shots" in sentences[1]
    assert "on TaskAShift at 4 shots ProGrad reads 51.0%, CoOp 45.0% and zero-shot CLIP 50.0%" in sentences[2]
    only_zero_shot = read_results(_records({"zeroshot": {1: [50.0]}}))
    assert only_zero_shot == ["Zero-shot CLIP is best at 1 shot (50.0%) on the task, against 50.0% for zero-shot CLIP."]
    failed = [dict(r, status="failed") for r in records]
    assert read_results(failed) == []


def test_demo_command_help_and_quick_run(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(load_commands(), ["demo", "--help"])
    assert help_text.exit_code == 0 and "fastprompt demo --quick" in help_text.output
    result = runner.invoke(
        load_commands(), ["demo", "--quick", "--out", str(tmp_path), "--seeds", "1", "--shots", "1", "--no-plots",
                          "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Zero-shot accuracy of the testbed model on TestbedFineShapes (test split)" in result.output
    assert "## Few-shot: Average over datasets (2)" in result.output
    assert "Reading the table:" in result.output and "Demo time:" in result.output


def test_demo_bad_shots_is_one_sentence(tmp_path):
    result = CliRunner().invoke(load_commands(), ["demo", "--out", str(tmp_path), "--shots", "1,x"])
    assert result.exit_code == 2 and "--shots takes comma-separated integers" in result.output
    assert "Traceback" not in result.output
