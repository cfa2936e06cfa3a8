"""Sweeps across torchrun ranks: every run trained once, results equal to one process, disagreement refused, a dead
rank's sweep finished by a rerun (fastprompt/train/distributed.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cache import Split, Subset
from fastprompt.cli.app import load_commands
from numerics import assert_close
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastprompt.cache.ranks import Ranks
from fastprompt.errors import FastPromptError
from fastprompt.locks import taking_turns
from fastprompt.train import distributed, results
from fastprompt.train.config import expand_sweep
from fastprompt.train.distributed import assign, plan_units, run_cost, split_runs
from fastprompt.train.sweep import SweepOptions, run_sweep

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# Rank 1 of the launched command can be given other arguments (FASTPROMPT_TEST_RANK1_ARGS: "--old=--new" pairs) or a
# fault point to die at (FASTPROMPT_TEST_RANK1_KILL_AT): what a misconfigured or crashing node does.
LAUNCHER = """
import os
import sys

if os.environ.get("RANK") == "1":
    for pair in filter(None, os.environ.get("FASTPROMPT_TEST_RANK1_ARGS", "").split(";")):
        old, new = pair.split("=", 1)
        sys.argv = [new if arg == old else arg for arg in sys.argv]
    if os.environ.get("FASTPROMPT_TEST_RANK1_KILL_AT"):
        from fastprompt import faults

        faults.arm(kill_at=os.environ["FASTPROMPT_TEST_RANK1_KILL_AT"])
from fastprompt.cli.app import main

main()
"""


class CostCache:
    """What the split reads of a cache: class names and few-shot subset sizes (shots x classes)."""

    def __init__(self, classes: int) -> None:
        self.classnames = [f"class {i}" for i in range(classes)]

    def fewshot(self, shots: int, seed: int) -> Subset:
        return Subset(torch.arange(shots * len(self.classnames)), torch.arange(0), [], [])


def _protocol_configs(dataset: str = "OxfordPets") -> list:
    axes = {"method": ["zeroshot", "linear_probe", "coop", "prograd", "prograd_ensemble"], "shots": [1, 2, 4, 8, 16],
            "seed": [1, 2, 3]}  # fmt: skip
    return expand_sweep(axes, {"dataset": dataset})


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 200])
def test_split_trains_every_run_once_balanced_and_order_free(world_size):
    cache = CostCache(37)
    configs = _protocol_configs()
    shares = split_runs(configs, cache, world_size, max_group=64)
    trained = [c.run_id for share in shares for c in share]
    assert sorted(trained) == sorted(c.run_id for c in configs)  # each run on exactly one rank
    shuffled = list(configs)
    random.Random(world_size).shuffle(shuffled)
    again = split_runs(shuffled, cache, world_size, max_group=64)
    assert [{c.run_id for c in share} for share in again] == [{c.run_id for c in share} for share in shares]
    costs = {c.run_id: run_cost(c, cache) for c in configs}
    loads = [sum(costs[c.run_id] for c in share) for share in shares]
    units = plan_units(configs, list(costs.values()), world_size, 64)
    biggest = max(sum(costs[configs[i].run_id] for i in unit) for unit in units)
    # LPT's bound: no rank ends more than one unit above the mean; units are cut to at most a fair share (or one run)
    assert max(loads) <= sum(loads) / world_size + biggest + 1e-9
    assert biggest <= max(sum(loads) / world_size, max(costs.values()))
    assert all(len(unit) <= 64 for unit in units)
    if world_size <= len(configs) // 4:
        assert min(loads) > 0  # no rank idles while runs are left


def test_lpt_assigns_the_longest_unit_first():
    assert assign([1.0, 5.0, 2.0, 2.0], 2) == [1, 0, 1, 1]
    assert assign([3.0, 3.0, 3.0], 3) == [0, 1, 2]
    assert assign([], 4) == []


def test_cost_counts_steps_classes_and_passes():
    cache = CostCache(10)
    coop, prograd = expand_sweep({"method": ["coop", "prograd"]}, {"dataset": "EuroSAT", "shots": 16, "epochs": 7})
    assert run_cost(coop, cache) == (160 // 32) * 7 * 10 * 2
    assert run_cost(prograd, cache) == (160 // 32) * 7 * 10 * 3
    (zeroshot,) = expand_sweep({"method": ["zeroshot"]}, {"dataset": "EuroSAT", "shots": 16})
    assert run_cost(zeroshot, cache) == 10


class ManifestCache(CostCache):
    def __init__(self, classes: int, manifest: dict) -> None:
        super().__init__(classes)
        self.manifest = manifest


def _other_ranks(monkeypatch, *theirs):
    """Pretend to be rank 0 of 1 + len(theirs) ranks that sent `theirs` to `gather`."""
    monkeypatch.setattr(distributed, "gather", lambda ranks, value: [value, *theirs])
    return Ranks(0, 1 + len(theirs))


def test_ranks_that_disagree_are_refused_in_one_sentence(monkeypatch):
    cache = ManifestCache(5, {"dataset": "own", "shards": [{"sha256": "ab"}]})
    options = SweepOptions()
    configs = expand_sweep({"method": ["coop"], "seed": [1, 2]}, {"dataset": "own", "shots": 1})
    mine = distributed.fingerprints(cache, configs, options)
    distributed.check_agreement(_other_ranks(monkeypatch, dict(mine), dict(mine)), mine)  # agreement: no error
    fewer = distributed.fingerprints(cache, configs[:1], options)  # a rank started with --seeds 1
    with pytest.raises(FastPromptError, match=r"^The torchrun ranks disagree on the sweep: the runs \(the command's "
                       r"arguments\) of rank\(s\) 2 differ from rank 0's; start every rank with the same command on "
                       r"the same cache\.$"):  # fmt: skip
        distributed.check_agreement(_other_ranks(monkeypatch, dict(mine), fewer), mine)
    rebuilt = ManifestCache(5, {"dataset": "own", "shards": [{"sha256": "cd"}]})  # same runs, another cache's bytes
    theirs = distributed.fingerprints(rebuilt, configs, options)
    assert theirs["runs"] == mine["runs"]
    with pytest.raises(FastPromptError, match=r"the cache of rank\(s\) 1 differ"):
        distributed.check_agreement(_other_ranks(monkeypatch, theirs), mine)
    grouped = distributed.fingerprints(cache, configs, SweepOptions(max_group=4))
    with pytest.raises(FastPromptError, match=r"the options of rank\(s\) 1 differ"):
        distributed.check_agreement(_other_ranks(monkeypatch, grouped), mine)


def test_a_rank_that_does_not_see_rank_0s_folder_is_refused(monkeypatch, tmp_path):
    """Rank 1 with another --out (or a node whose folder is not the shared one) does not find rank 0's lock file."""
    elsewhere = {"pid": 1, "host": "node-0", "command": "fastprompt train", "since": "then"}
    monkeypatch.setattr(distributed, "share_from_main", lambda ranks, value: (None, elsewhere))
    monkeypatch.setattr(distributed, "gather", lambda ranks, value: [True, value])
    lock = distributed.FolderLock(tmp_path / "sweep", "fastprompt train")
    with pytest.raises(FastPromptError, match=r"^Rank\(s\) 1 do not see rank 0's sweep folder .*; pass every rank the "
                       r"same --out on a file system that all nodes share\.$"):  # fmt: skip
        distributed._open_folder(Ranks(1, 2), tmp_path / "sweep", lock)
    assert not lock.held


def test_shared_folder_writer_neither_tidies_nor_repairs(tmp_path):
    """While ranks share a sweep folder, a ResultWriter made by one must not remove another rank's temporary file
    (a pid of another node looks dead here) nor index a run whose result.json is written but whose line is still to
    come (it would be indexed twice); rank 0 repairs once, before the ranks start."""
    root = tmp_path / "sweep"
    (root / "run-a").mkdir(parents=True)
    (root / "run-a" / "result.json").write_text(json.dumps({"run_id": "run-a", "status": "done", "config": {}}))
    in_flight = root / "run-b" / ".result.json.999999999.tmp"  # no such pid here
    in_flight.parent.mkdir()
    in_flight.write_text("{")
    with results.shared_sweep_folder(root):
        writer = results.ResultWriter(root)
    assert not writer.finished("run-a") and in_flight.exists() and not (root / "results.jsonl").exists()
    repaired = results.ResultWriter(root)  # rank 0 before the ranks start, or a sweep of one process
    assert repaired.finished("run-a") and not in_flight.exists()
    assert [json.loads(line)["run_id"] for line in (root / "results.jsonl").read_text().splitlines()] == ["run-a"]


def test_index_is_read_and_appended_in_turns(tmp_path):
    """A rank reading results.jsonl waits while another holds its turn (mid-append), so it never reads half a line."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "results.jsonl").write_text(json.dumps({"run_id": "run-a"}) + "\n" + '{"run_id": "ru')
    read: list = []
    with taking_turns(root / results.INDEX_TURNS):
        reader = threading.Thread(target=lambda: read.append(results.read_index(root)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive(), "read_index did not wait for the writer's turn"
        with (root / "results.jsonl").open("a") as index:
            index.write('n-b"}\n')
    reader.join(10)
    assert list(read[0]) == ["run-a", "run-b"]


class SeedCache:
    """An in-memory cache of 3 classes whose few-shot subsets exist for every seed (random features, 2 views)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.path, self.dataset, self.classnames = Path("memory"), "own", ["cat", "dog", "fish"]
        self.manifest = {"model": {"name": "fastprompt-tiny"}, "views": 2, "templates": {}}
        self._splits = {
            "train": Split(
                torch.randn(12, 2, 64, generator=generator), torch.arange(12) % 3, [f"t{i}" for i in range(12)]
            ),
            "val": Split(torch.randn(3, 1, 64, generator=generator), torch.arange(3), ["v0", "v1", "v2"]),
            "test": Split(torch.randn(6, 1, 64, generator=generator), torch.arange(6) % 3, [f"x{i}" for i in range(6)]),
        }

    def split(self, name):
        return self._splits[name]

    def fewshot(self, shots, seed):
        chosen = torch.randperm(12, generator=torch.Generator().manual_seed(seed))[: 3 * shots]
        return Subset(chosen, torch.arange(3), [f"t{i}" for i in chosen.tolist()], [])


def test_cpu_sweep_trains_groups_of_at_most_15_runs(monkeypatch, tmp_path):
    """Runs of one layout on a CPU train in groups of at most 15 (bench/results/train_step.csv: P = 45 in one group
    costs more per run-step than P = 15), below the default max_group of 64."""
    from fastprompt.clip import load_clip
    from fastprompt.train import engine

    sizes = []
    original = engine.LockstepEngine.__init__

    def recording(self, encoder, features, runs, *rest, **options):
        sizes.append(len(runs))
        original(self, encoder, features, runs, *rest, **options)

    monkeypatch.setattr(engine.LockstepEngine, "__init__", recording)
    configs = expand_sweep(
        {"method": ["coop"], "seed": list(range(1, 17))}, {"dataset": "own", "shots": 1, "epochs": 1}
    )
    torch.manual_seed(0)
    records = run_sweep(SeedCache(), load_clip("fastprompt-tiny"), configs, tmp_path, SweepOptions(progress=False))
    assert sizes == [15, 1] and len(records) == 16


# ------------------------------------------------------------------------------------------- torchrun, 2 gloo ranks
def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2), ("test", 3)):
        for name in ("cat", "dog", "fish"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    _image_folder(root / "own")
    args = ["cache", "imagefolder", "--root", str(root / "own"), "--out", str(root / "cache"), "--model",
            "fastprompt-tiny", "--pretrained", "none", "--shots", "1,4", "--seeds", "1,2", "--views", "2",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    return root / "cache"


def _train_args(cache: Path, out: Path) -> list[str]:
    return ["train", "--cache", str(cache), "--out", str(out), "--methods", "zeroshot,coop,prograd", "--epochs", "3",
            "--checkpoint-minutes", "0", "--no-progress"]  # fmt: skip


def _torchrun(tmp_path: Path, train_args: list[str], **rank1: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 fastprompt <train_args>`; `rank1` sets FASTPROMPT_TEST_RANK1_<KEY>."""
    launcher = tmp_path / "launch_fastprompt.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    environment.update({f"FASTPROMPT_TEST_RANK1_{key.upper()}": value for key, value in rank1.items()})
    return subprocess.run([*command, *train_args], capture_output=True, text=True, timeout=300, env=environment)


@pytest.fixture(scope="module")
def one_rank(cache_dir, tmp_path_factory):
    """The sweep in one process, at one thread as the ranks run."""
    out = tmp_path_factory.mktemp("one") / "sweep"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(load_commands(), _train_args(cache_dir, out))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _assert_same_sweep(out: Path, expected: Path) -> None:
    """The same run set, each run once in results.jsonl, the same accuracies and (to rounding) the same prompts."""
    lines, reference = _index(out), {r["run_id"]: r for r in _index(expected)}
    assert sorted(r["run_id"] for r in lines) == sorted(reference)
    assert len(lines) == len({r["run_id"] for r in lines}) == 12
    for record in lines:
        assert record["accuracy"] == reference[record["run_id"]]["accuracy"], record["run_id"]
        prompt = out / record["run_id"] / "prompt.safetensors"
        if record["method"] != "zeroshot":
            assert_close(load_file(prompt)["ctx"], load_file(expected / prompt.parent.name / prompt.name)["ctx"],
                         what=record["run_id"])  # fmt: skip
    assert not list(out.glob("*/checkpoint*.pt"))


def test_two_ranks_equal_one_rank(cache_dir, one_rank, tmp_path):
    out = tmp_path / "two"
    run = _torchrun(tmp_path, _train_args(cache_dir, out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    _assert_same_sweep(out, one_rank)
    assert run.stdout.count("| own | fewshot | prograd |") == 1  # rank 0 alone prints the table


@pytest.mark.slow  # one more torchrun (about 30 s here); the refusal's logic is checked in-process above
def test_ranks_that_disagree_are_refused_before_training(cache_dir, tmp_path):
    out = tmp_path / "sweep"
    run = _torchrun(tmp_path, [*_train_args(cache_dir, out), "--seeds", "1,2"], args="1,2=1")
    assert run.returncode != 0
    assert "The torchrun ranks disagree on the sweep: the runs (the command's arguments) of rank(s) 1 differ from " \
           "rank 0's; start every rank with the same command on the same cache." in run.stderr  # fmt: skip
    assert 'File "' not in run.stderr.split("disagree on the sweep")[0].splitlines()[-1]
    assert not out.exists() or not any(path.is_dir() for path in out.iterdir())  # nothing trained


@pytest.mark.slow  # two more torchrun sweeps (about 45 s here)
def test_a_dead_rank_then_the_same_command_finishes_the_sweep(cache_dir, one_rank, tmp_path):
    out = tmp_path / "sweep"
    args = _train_args(cache_dir, out)
    killed = _torchrun(tmp_path, args, kill_at="checkpoint:done@2")
    assert killed.returncode != 0
    assert list(out.glob("*/checkpoint.pt")), "rank 1 died before its first checkpoint"
    rerun = _torchrun(tmp_path, args)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    _assert_same_sweep(out, one_rank)
