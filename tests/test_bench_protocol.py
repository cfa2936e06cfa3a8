"""bench/bench_protocol.py measures a whole dataset end to end in pieces (`--e2e-dir`, `--e2e-hours`): a piece stopped
at its deadline and the rerun that completes it train every run once, with the same engine steps and results as one
uninterrupted measurement, and the wall times of the pieces add up; a piece killed before it wrote its line is
folded in from its last heartbeat."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.clip import load_clip

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benches import `common` as they do when run by path

import bench_protocol  # noqa: E402

NAMES = ["annual crop land", "forest", "river"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


@pytest.fixture
def small_protocol(monkeypatch):
    """The protocol's 45 prompt runs of EuroSAT at 4% of the epochs, on 3 classes of 64-wide synthetic features."""
    monkeypatch.setitem(bench_protocol.TEST_SIZES, "EuroSAT", 12)


def _args(folder: Path, hours: float | None = None) -> argparse.Namespace:
    return argparse.Namespace(epoch_scale=0.04, e2e_baselines=False, e2e_dir=folder, e2e_hours=hours,
                              checkpoint_minutes=10.0, progress=False, threads=1, device="cpu")  # fmt: skip


def _contexts(folder: Path) -> dict[str, torch.Tensor]:
    sweep = folder / "EuroSAT-scale0.04" / "sweep"
    records = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    return {r["run_id"]: load_file(sweep / r["run_id"] / "prompt.safetensors")["ctx"] for r in records}


def test_pieces_add_up_to_one_measurement(tiny, small_protocol, tmp_path):
    whole = bench_protocol.measure_e2e(tiny, "EuroSAT", NAMES, _args(tmp_path / "whole"))
    assert whole is not None and whole["pieces"] == 1 and len(whole["configs"]) == 45

    first = bench_protocol.measure_e2e(tiny, "EuroSAT", NAMES, _args(tmp_path / "pieces", hours=1e-9))
    assert first is None  # the deadline passed at the first step: the piece stopped at a checkpoint
    pieces = bench_protocol.Ledger(tmp_path / "pieces" / "EuroSAT-scale0.04").pieces()
    assert len(pieces) == 1 and len(pieces[0]["steps"]) == 1
    done = bench_protocol.measure_e2e(tiny, "EuroSAT", NAMES, _args(tmp_path / "pieces"))
    assert done is not None and done["pieces"] == 2 and done["killed"] == 0

    # No step is lost or done twice: the same group-steps, with the same runs active, as one piece.
    assert [(f, p) for f, p, _ in done["steps"]] == [(f, p) for f, p, _ in whole["steps"]]
    pieces = bench_protocol.Ledger(tmp_path / "pieces" / "EuroSAT-scale0.04").pieces()
    assert done["wall"] == pytest.approx(sum(p["wall"] for p in pieces)) and done["wall"] > pieces[-1]["wall"]
    assert done["measured_steps"] == pytest.approx(sum(s for p in pieces for _, _, s in p["steps"]))
    whole_contexts, piece_contexts = _contexts(tmp_path / "whole"), _contexts(tmp_path / "pieces")
    assert sorted(whole_contexts) == sorted(piece_contexts) and len(whole_contexts) == 45  # every run once
    for run_id, context in whole_contexts.items():
        assert torch.equal(piece_contexts[run_id], context), run_id


def test_a_killed_piece_is_folded_in_from_its_heartbeat(tmp_path):
    ledger = bench_protocol.Ledger(tmp_path)
    ledger.append({"kind": "piece", "threads": 1, "wall": 5.0, "baseline_wall": 0.0, "steps": [["coop", 3, 1.0]]})
    ledger.beat({"kind": "piece", "threads": 1, "wall": 7.0, "baseline_wall": 0.0, "steps": [["coop", 3, 2.0]]})
    # the process dies here: running.json stays, no line was appended
    later = bench_protocol.Ledger(tmp_path)
    later.recover()
    assert [(p["kind"], p["wall"]) for p in later.pieces()] == [("piece", 5.0), ("killed", 7.0)]
    assert not (tmp_path / "running.json").exists()
    later.recover()  # nothing more to fold in
    assert len(later.pieces()) == 2


def test_the_whole_script_on_a_tiny_model(small_protocol, tmp_path, keep_threads):
    """bench/gpu_check.sh's protocol part runs this script on CUDA; here on the CPU, so it cannot rot."""
    out = tmp_path / "protocol.csv"
    args = ["--model", "fastprompt-tiny", "--e2e", "EuroSAT", "--epoch-scale", "0.02", "--repeats", "1",
            "--reference-repeats", "1", "--grid-contexts", "1", "2", "--out", str(out)]  # fmt: skip
    assert bench_protocol.main(args) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("grid") == 8 and kinds.count("e2e") == 1 and kinds.count("projection") == 11
    assert kinds[-1] == "total" and float(rows[-1]["ratio"]) > 0
    (e2e,) = [r for r in rows if r["kind"] == "e2e"]
    assert e2e["dataset"] == "EuroSAT" and int(e2e["runs"]) == 45 and float(e2e["measured_s"]) > 0
    shapes = [r for r in rows if r["kind"] == "e2e_step"]  # the sweep's steps by family and active runs
    assert {r["method"] for r in shapes} == {"coop", "prograd"} and all(float(r["model_s"]) > 0 for r in shapes)
    assert sum(int(r["steps"]) for r in shapes) == int(e2e["note"].split(" engine steps")[0].split()[-1])
    assert bench_protocol.parse_args(["--device", "cuda"]).device == "cuda"


@pytest.fixture
def keep_threads():
    """The bench sets torch's thread count; this test process keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
