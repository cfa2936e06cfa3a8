"""Under torchrun, 2 processes (gloo, CPU) write the same cache as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fastprompt.cli.app import load_commands
from test_cache import CLI_COMMON, DATASET, write_coop_dataset
from typer.testing import CliRunner

from fastprompt.cache.loader import FeatureCache

LAUNCHER = f"""
from fastprompt.data.registry import register_dataset
from fastprompt.cli.app import main

register_dataset({DATASET!r}, "cache_toy", "images", replace=True)
main()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_write_the_same_cache_as_one(tmp_path):
    write_coop_dataset(tmp_path / "data", classes=3, per_split=(("train", 4), ("val", 2), ("test", 3)), seed=1)
    options = ["--shots", "1,2", "--seeds", "1", "--views", "2", "--shard-size", "2"]
    single = ["cache", DATASET, "--root", str(tmp_path / "data"), "--out", str(tmp_path / "one"), *options, *CLI_COMMON]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): CPU kernels may round differently on other counts
    try:
        result = CliRunner().invoke(load_commands(), single)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output

    launcher = tmp_path / "launch_fastprompt.py"
    launcher.write_text(LAUNCHER)
    two = [arg if arg != str(tmp_path / "one") else str(tmp_path / "two") for arg in single]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command + two, capture_output=True, text=True, timeout=240, env=environment)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    first, second = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    for split in ("train", "val", "test"):
        assert torch.equal(first.split(split).features, second.split(split).features)
        assert torch.equal(first.split(split).labels, second.split(split).labels)
        assert first.split(split).keys == second.split(split).keys
    assert first.manifest["fewshot"] == second.manifest["fewshot"]
    shards = [json.loads((tmp_path / name / "manifest.json").read_text())["shards"] for name in ("one", "two")]
    assert shards[0] == shards[1] and len(shards[0]) >= 4
