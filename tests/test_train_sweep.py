"""Sweeps: batched runs equal runs alone, the schedule, failure handling, resume after SIGKILL, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cache import Split as _Split
from fake_cache import Subset as _Subset
from fastprompt.cli.app import load_commands
from fastprompt.kernels.prograd_update import prograd_update, prograd_update_ref
from numerics import assert_close
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastprompt.clip import load_clip
from fastprompt.errors import ConfigError
from fastprompt.train.config import (
    RunConfig,
    expand_sweep,
    iterations_per_epoch,
    learning_rate,
    load_sweep_file,
    resolve,
)
from fastprompt.train.engine import RunState
from fastprompt.train.sweep import SweepOptions, run_sweep

NAMES = ["abyssinian", "bengal", "boxer", "pug", "samoyed"]


class FakeCache:
    """An in-memory stand-in for FeatureCache with the same interface (random features, 2 views)."""

    def __init__(self, seed: int = 0, per_class: int = 10, views: int = 2) -> None:
        generator = torch.Generator().manual_seed(seed)
        k = len(NAMES)
        n = k * per_class
        self.path = Path("memory")
        self.dataset = "OxfordPets"
        self.classnames = list(NAMES)
        self.manifest = {"model": {"name": "fastprompt-tiny"}, "views": views, "templates": {}}
        labels = torch.arange(n) % k
        self._splits = {
            "train": _Split(torch.randn(n, views, 64, generator=generator), labels, [f"t{i}" for i in range(n)]),
            "val": _Split(torch.randn(k, 1, 64, generator=generator), torch.arange(k), [f"v{i}" for i in range(k)]),
            "test": _Split(
                torch.randn(30, 1, 64, generator=generator), torch.arange(30) % k, [f"x{i}" for i in range(30)]
            ),
        }

    def split(self, name):
        return self._splits[name]

    def fewshot(self, shots, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = self._splits["train"].labels
        members = [(labels == c).nonzero()[:, 0] for c in range(len(NAMES))]
        chosen = torch.cat([m[torch.randperm(len(m), generator=generator)[:shots]] for m in members])
        return _Subset(chosen, torch.arange(len(NAMES)), [f"t{i}" for i in chosen.tolist()], [])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


def _contexts(folder: Path, records: list[dict]) -> dict[str, torch.Tensor]:
    return {r["run_id"]: load_file(folder / r["run_id"] / "prompt.safetensors")["ctx"] for r in records}


def test_batched_runs_equal_runs_alone(tiny, tmp_path):
    cache = FakeCache()
    # shots 2 -> 10 images (one batch of 10), shots 8 -> 40 images (one batch of 32, 8 dropped): different step counts
    configs = expand_sweep({"method": ["coop", "prograd"], "seed": [1, 2, 3], "shots": [2, 8]},
                           {"dataset": "OxfordPets", "epochs": 3, "eval_every": 1})  # fmt: skip
    assert len(configs) == 12
    options = SweepOptions(progress=False, update_fn=prograd_update_ref)
    together = run_sweep(cache, tiny, configs, tmp_path / "together", options)
    assert len(together) == 12 and all(r["status"] == "done" for r in together)
    batched = _contexts(tmp_path / "together", together)
    for config in configs:
        alone = run_sweep(cache, tiny, [config], tmp_path / "alone" / config.run_id, options)
        assert_close(batched[config.run_id], _contexts(tmp_path / "alone" / config.run_id, alone)[config.run_id],
                     what=config.run_id)  # fmt: skip
        joint = json.loads((tmp_path / "together" / config.run_id / "result.json").read_text())["metrics"]
        single = json.loads((tmp_path / "alone" / config.run_id / config.run_id / "result.json").read_text())
        assert joint["accuracy"] == single["metrics"]["accuracy"]
        log = [
            json.loads(line) for line in (tmp_path / "together" / config.run_id / "log.jsonl").read_text().splitlines()
        ]
        assert [r["epoch"] for r in log] == [1, 2, 3] and all("test_accuracy" in r for r in log)
        if config.method == "prograd":
            assert all(0.0 <= r["conflict_fraction"] <= 1.0 and -1 <= r["cos_mean"] <= 1 for r in log)


def test_fused_kernel_in_the_trainer_equals_reference(tiny, tmp_path):
    cache = FakeCache(seed=1)
    configs = expand_sweep(
        {"method": ["prograd"], "seed": [1, 2], "shots": [2]}, {"dataset": "OxfordPets", "epochs": 4}
    )
    fused = run_sweep(cache, tiny, configs, tmp_path / "fused", SweepOptions(progress=False, update_fn=prograd_update))
    ref = run_sweep(cache, tiny, configs, tmp_path / "ref", SweepOptions(progress=False, update_fn=prograd_update_ref))
    for run_id, ctx in _contexts(tmp_path / "fused", fused).items():
        expected = _contexts(tmp_path / "ref", ref)[run_id]
        assert ((ctx - expected).norm() / expected.norm()) <= 1e-6


def test_class_chunks_are_exact(tiny, tmp_path):
    cache = FakeCache(seed=2)
    configs = expand_sweep(
        {"method": ["prograd", "coop"], "seed": [1]}, {"dataset": "OxfordPets", "epochs": 3, "shots": 2}
    )
    whole = run_sweep(cache, tiny, configs, tmp_path / "whole", SweepOptions(progress=False))
    chunked = run_sweep(cache, tiny, configs, tmp_path / "chunked", SweepOptions(progress=False, class_chunk=2))
    for run_id, ctx in _contexts(tmp_path / "whole", whole).items():
        assert_close(_contexts(tmp_path / "chunked", chunked)[run_id], ctx, what=f"chunked {run_id}")


def test_auto_class_chunk_is_exact(tiny, tmp_path, monkeypatch):
    """`class_chunk="auto"` with a faked free-memory figure that fits 2 of the 5 classes per chunk trains exactly as
    all classes at once (ProGrad: two cotangents)."""
    from fastprompt.train import memory

    cache = FakeCache(seed=2)
    configs = expand_sweep({"method": ["prograd"], "seed": [1]}, {"dataset": "OxfordPets", "epochs": 3, "shots": 2})
    chosen = []

    def auto(encoder, runs, cotangents=2, batch_size=32, free_bytes=None):
        need = memory.step_memory(encoder, runs, 2, cotangents, batch_size).total
        free = int(memory.safety(encoder.device) * need) + 1
        monkeypatch.setattr(memory, "free_memory", lambda device: free)
        chosen.append(original(encoder, runs, cotangents, batch_size))
        return chosen[-1]

    original = memory.auto_class_chunk
    monkeypatch.setattr(memory, "auto_class_chunk", auto)
    whole = run_sweep(cache, tiny, configs, tmp_path / "whole", SweepOptions(progress=False))
    automatic = run_sweep(cache, tiny, configs, tmp_path / "auto", SweepOptions(progress=False, class_chunk="auto"))
    assert chosen == [2], "auto should pick the faked figure's chunk of 2 classes"
    for run_id, ctx in _contexts(tmp_path / "whole", whole).items():
        assert_close(_contexts(tmp_path / "auto", automatic)[run_id], ctx, what=f"auto-chunked {run_id}")


def test_diverging_run_fails_and_others_go_on(tiny, tmp_path):
    cache = FakeCache(seed=3)
    configs = expand_sweep({"method": ["coop"], "seed": [1, 2], "shots": [2]}, {"dataset": "OxfordPets", "epochs": 2})
    bad = RunConfig(**{**configs[0].__dict__, "lr": 1e38, "warmup_lr": 1e38, "seed": 1})
    records = run_sweep(cache, tiny, [resolve(bad), configs[1]], tmp_path, SweepOptions(progress=False))
    status = {r["run_id"]: r["status"] for r in records}
    assert status[bad.run_id] == "failed" and status[configs[1].run_id] == "done"
    reason = json.loads((tmp_path / bad.run_id / "result.json").read_text())["reason"]
    assert "NaN" in reason or "inf" in reason


@pytest.mark.parametrize("epochs", [50, 100, 200])
def test_learning_rate_schedule(epochs):
    assert learning_rate(0, epochs, 0.002, 1e-5) == 1e-5
    for epoch in range(1, epochs):
        assert math.isclose(learning_rate(epoch, epochs, 0.002, 1e-5),
                            0.001 * (1 + math.cos(math.pi * (epoch - 1) / epochs)), rel_tol=1e-12)  # fmt: skip
    assert learning_rate(1, epochs, 0.002, 1e-5) == 0.002


def test_iterations_drop_last_and_small_sets():
    assert iterations_per_epoch(64, 32) == 2
    assert iterations_per_epoch(95, 32) == 2  # the last partial batch is dropped
    assert iterations_per_epoch(32, 32) == 1
    assert iterations_per_epoch(20, 32) == 1  # one batch of all 20 images
    assert iterations_per_epoch(1, 32) == 1


def test_defaults_follow_protocol():
    assert resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=1)).epochs == 50
    assert resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=4)).epochs == 100
    assert resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=16)).epochs == 200
    assert resolve(RunConfig(method="prograd", dataset="ImageNet", shots=16)).epochs == 50
    assert resolve(RunConfig(method="prograd", dataset="EuroSAT", shots=8)).lam == 0.8
    assert resolve(RunConfig(method="prograd", dataset="EuroSAT", shots=8, lambda_policy="paper")).lam == 1.0
    assert resolve(RunConfig(method="prograd", dataset="EuroSAT", shots=16, lambda_policy="paper")).lam == 0.8
    assert resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=16)).lam == 1.0
    assert resolve(RunConfig(method="coop", dataset="OxfordPets")).init == "random"
    assert resolve(RunConfig(method="prograd", dataset="OxfordPets")).init == "template"
    with pytest.raises(ConfigError, match="Unknown method 'cop'"):
        resolve(RunConfig(method="cop"))


def test_sweep_file_rejects_unknown_keys(tmp_path):
    good = tmp_path / "sweep.toml"
    good.write_text('[sweep]\nmethod = ["coop", "prograd"]\nlambda = [1.0, 0.8]\n[fixed]\nepochs = 5\n')
    axes, fixed = load_sweep_file(good)
    runs = expand_sweep(axes, {**fixed, "dataset": "OxfordPets"})
    assert sorted(r.method for r in runs) == ["coop", "prograd", "prograd"]  # CoOp is not repeated per lambda
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  methd: [coop]\n")
    with pytest.raises(ConfigError, match="Unknown sweep key 'methd'"):
        load_sweep_file(bad)


# ---------------------------------------------------------------------------------------------- the command line
def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2), ("test", 3)):
        for name in ("cat", "dog", "fish"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _image_folder(root / "own")
    args = ["cache", "imagefolder", "--root", str(root / "own"), "--out", str(root / "cache"), "--model",
            "fastprompt-tiny", "--pretrained", "none", "--shots", "1,4", "--seeds", "1,2", "--views", "2",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    return root / "cache"


def test_cli_train_prints_runs_and_table(cli_cache, tmp_path):
    runner = CliRunner()
    args = ["train", "--cache", str(cli_cache), "--out", str(tmp_path / "sweep"), "--methods",
            "zeroshot,linear_probe,coop,prograd,kd", "--epochs", "2", "--no-progress"]  # fmt: skip
    dry = runner.invoke(load_commands(), [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "20 run(s) on own" in dry.output and "prograd-own-4shot-seed2-lam1" in dry.output
    assert not (tmp_path / "sweep").exists()
    result = runner.invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    assert "| own | fewshot | prograd |" in result.output and "(n=2)" in result.output
    lines = (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 20 and len({json.loads(line)["run_id"] for line in lines}) == 20
    again = runner.invoke(load_commands(), args)  # everything finished: nothing is redone or duplicated
    assert again.exit_code == 0 and len((tmp_path / "sweep" / "results.jsonl").read_text().splitlines()) == 20


def test_cli_bad_input_is_one_sentence(cli_cache, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(load_commands(), ["train", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
    method = runner.invoke(load_commands(), ["train", "--cache", str(cli_cache), "--out", str(tmp_path),
                                             "--methods", "cop"])  # fmt: skip
    assert method.exit_code == 2 and "Unknown method 'cop'" in method.output
    args = ["train", "--cache", str(cli_cache), "--out", str(tmp_path / "s"), "--methods", "coop", "--shots", "16"]
    shots = runner.invoke(load_commands(), args)
    assert shots.exit_code == 2 and "holds no 16-shot subset" in shots.output


def test_sigkill_and_restart_equals_uninterrupted(cli_cache, tmp_path):
    args = [sys.executable, "-m", "fastprompt.cli", "train", "--cache", str(cli_cache), "--methods", "coop,prograd",
            "--shots", "4", "--epochs", "60", "--checkpoint-minutes", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run([*args, "--out", str(tmp_path / "straight")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(out.glob("*/checkpoint.pt")), "the sweep was killed before its first checkpoint"
    resumed = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    first = [json.loads(line) for line in (tmp_path / "straight" / "results.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run_id"] for r in first) == sorted(r["run_id"] for r in second)  # none lost, none twice
    assert len(second) == len({r["run_id"] for r in second}) == 4
    expected = _contexts(tmp_path / "straight", first)
    for run_id, ctx in _contexts(out, second).items():
        assert_close(ctx, expected[run_id], what=f"resumed {run_id}")
    assert {r["run_id"]: r["accuracy"] for r in first} == {r["run_id"]: r["accuracy"] for r in second}


def test_resume_does_only_the_remaining_steps(tiny, tmp_path, monkeypatch):
    """A sweep stopped mid-epoch (after a fixed number of engine steps, not after a time) and started again does only
    each run's remaining steps, and ends where the uninterrupted sweep ends. Training is deterministic, so a restart
    that ignored the checkpoint would end at the same contexts: the step counts are what shows the resume."""
    cache = FakeCache(seed=5, per_class=14)
    fixed = {"dataset": "OxfordPets", "epochs": 4}
    # One lock-step group: 70 images (2 steps per epoch, 8 in all) and 10 images (1 step per epoch, 4 in all).
    configs = [*expand_sweep({"method": ["prograd"], "shots": [14]}, fixed),
               *expand_sweep({"method": ["kd"], "shots": [2]}, fixed)]  # fmt: skip
    total = {configs[0].run_id: 8, configs[1].run_id: 4}
    drawn: Counter[str] = Counter()
    stepped: list[int] = []  # runs stepped per update call
    next_batch = RunState.next_batch

    def counting_next_batch(self, num_views):
        drawn[self.config.run_id] += 1
        return next_batch(self, num_views)

    def counting_update(param, momentum_buf, g_d, g_g, offsets, *rest):
        stepped.append(offsets.numel() - 1)
        return prograd_update(param, momentum_buf, g_d, g_g, offsets, *rest)

    monkeypatch.setattr(RunState, "next_batch", counting_next_batch)
    options = SweepOptions(progress=False, update_fn=counting_update, checkpoint_minutes=1e9)
    straight = run_sweep(cache, tiny, configs, tmp_path / "straight", options)
    assert dict(drawn) == total and sum(stepped) == sum(total.values())
    drawn.clear()
    stepped.clear()
    out = tmp_path / "stopped"
    stop = dataclasses.replace(options, stop_after_steps=3)  # the 70-image run is in the middle of epoch 1
    assert run_sweep(cache, tiny, configs, out, stop) == []
    assert all((out / run_id / "checkpoint.pt").exists() for run_id in total)
    assert dict(drawn) == {run_id: 3 for run_id in total} and sum(stepped) == 6
    drawn.clear()
    stepped.clear()
    resumed = run_sweep(cache, tiny, configs, out, options)
    assert dict(drawn) == {run_id: steps - 3 for run_id, steps in total.items()}, "the restart redid finished steps"
    assert sum(stepped) == sum(total.values()) - 6
    assert not list(out.glob("*/checkpoint.pt"))
    expected = _contexts(tmp_path / "straight", straight)
    for run_id, ctx in _contexts(out, resumed).items():
        assert_close(ctx, expected[run_id], what=f"resumed {run_id}")
        logs = [(folder / run_id / "log.jsonl").read_text().splitlines() for folder in (tmp_path / "straight", out)]
        first, second = ([json.loads(line) for line in log] for log in logs)
        assert [(r["epoch"], r["lr"]) for r in first] == [(r["epoch"], r["lr"]) for r in second]
        assert [r["loss"] for r in second] == pytest.approx([r["loss"] for r in first], rel=1e-5)
    assert {r["run_id"]: r["accuracy"] for r in straight} == {r["run_id"]: r["accuracy"] for r in resumed}


def test_transfer_targets_score_the_trained_context(tiny, tmp_path):
    source = FakeCache(seed=4)
    same = FakeCache(seed=4)
    same.dataset = "PetsCopy"  # the same test split under another name: transfer accuracy = in-domain accuracy
    shuffled = FakeCache(seed=4)
    shuffled.dataset = "PetsShuffled"  # class order permuted, labels permuted with it: the same accuracy again
    order = [3, 0, 4, 1, 2]
    shuffled.classnames = [NAMES[i] for i in order]
    test = shuffled.split("test")
    test.labels = torch.tensor([order.index(int(label)) for label in test.labels])
    templates = {"coop": "a photo of a {}, a type of pet.", "prograd": "a type of pet, a photo of a {}."}
    for target in (same, shuffled):  # zero-shot rows and ProGrad's layout use each target's templates: the source's
        target.manifest = {**target.manifest, "templates": templates}
    configs = expand_sweep({"method": ["zeroshot", "coop", "prograd"], "seed": [1]},
                           {"dataset": "OxfordPets", "epochs": 2, "shots": 2})  # fmt: skip
    records = run_sweep(source, tiny, configs, tmp_path, SweepOptions(progress=False, targets=[same, shuffled]))
    for record in records:
        assert record["targets"]["PetsCopy"] == pytest.approx(record["accuracy"])
        assert record["targets"]["PetsShuffled"] == pytest.approx(record["accuracy"])
    from fastprompt.report import build_report

    markdown = build_report(tmp_path, plots=False).markdown
    table = markdown[markdown.index("## Transfer from OxfordPets") :]
    assert "| Method | Shots | OxfordPets (source) | PetsCopy | PetsShuffled |" in table
    coop = next(r for r in records if r["method"] == "coop")
    assert f"| CoOp | 2 | {coop['accuracy']:.2f} ± 0.00 (n=1) | {coop['accuracy']:.2f} ± 0.00 (n=1) |" in table
