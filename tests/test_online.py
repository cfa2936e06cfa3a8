"""Online augmentation (fastprompt/train/online.py): a fresh crop per image and epoch, through the cached trainer."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close
from safetensors.torch import load_file

from fastprompt.errors import FastPromptError
from fastprompt.train.config import expand_sweep
from fastprompt.train.online import EpochCrops, OnlineOptions, train_online
from fastprompt.train.sweep import SweepOptions, run_sweep

TASK = "TestbedFineShapes"


def _setup(root, views: int, shots=(1, 2)):
    from fastprompt.cache.extract import build_cache
    from fastprompt.cache.loader import FeatureCache
    from fastprompt.cache.plan import CacheOptions
    from fastprompt.data.registry import load_dataset
    from fastprompt.testbed import build_testbed, load_testbed_clip

    clip = load_testbed_clip("v1")  # any CLIP does; the shipped v1 is independent of the current default
    build_testbed(root / "data", [TASK], {"train": 3, "val": 2, "test": 3})
    dataset = load_dataset(TASK, root / "data")
    cache_dir = root / f"cache-{views}"
    options = CacheOptions(shots=shots, seeds=(1,), views=views, dtype="fp32")
    build_cache(dataset, clip, cache_dir, options, num_workers=0, progress=False)
    return clip, dataset, FeatureCache(cache_dir)


def test_epoch_crops_are_the_cache_views_in_order_and_fresh_each_epoch(tmp_path):
    clip, dataset, cache = _setup(tmp_path, views=2)
    crops = EpochCrops(cache, dataset, clip, OnlineOptions())
    train = cache.split("train")
    rows = torch.arange(train.labels.numel())
    for epoch in range(2):  # epoch e's crop is the cache's view e, made by the same transform from the same key
        online = crops.features(rows, epoch, rows.numel())[:, 0]
        assert_close(online, torch.nn.functional.normalize(train.features[:, epoch].float(), dim=-1))
    first, second = (crops.features(rows, e, rows.numel()) for e in (0, 1))
    assert (first - second).abs().amax(dim=-1).gt(1e-3).all()  # every image gets a new crop
    part = crops.features(rows[:2], 0, rows.numel())
    assert part[2:].abs().max() == 0
    assert_close(part[:2], first[:2])


def test_one_epoch_online_equals_the_cached_run_with_one_view(tmp_path):
    clip, dataset, cache = _setup(tmp_path, views=1)
    axes = {"method": ["coop", "prograd"], "shots": [1, 2], "seed": [1]}
    configs = expand_sweep(axes, {"dataset": TASK, "epochs": 1, "eval_every": 1, "batch_size": 4})
    cached = {
        r["run_id"]: r for r in run_sweep(cache, clip, configs, tmp_path / "cached", SweepOptions(progress=False))
    }
    online = {r["run_id"]: r for r in train_online(cache, dataset, clip, configs, tmp_path / "online")}
    assert set(online) == set(cached) == {c.run_id for c in configs}
    for run_id, record in online.items():
        assert record["status"] == "done"
        assert record["accuracy"] == pytest.approx(cached[run_id]["accuracy"])
        ctx_online = load_file(str(tmp_path / "online" / run_id / "prompt.safetensors"))["ctx"]
        ctx_cached = load_file(str(tmp_path / "cached" / run_id / "prompt.safetensors"))["ctx"]
        assert_close(ctx_online, ctx_cached)
    again = train_online(cache, dataset, clip, configs, tmp_path / "online")  # finished runs are skipped
    assert len(again) == len(configs)


def test_online_refuses_methods_it_cannot_train(tmp_path):
    clip, dataset, cache = _setup(tmp_path, views=1, shots=(1,))
    configs = expand_sweep({"method": ["linear_probe"], "shots": [1], "seed": [1]}, {"dataset": TASK})
    with pytest.raises(FastPromptError, match="Online augmentation trains coop, prograd, kd"):
        train_online(cache, dataset, clip, configs, tmp_path / "out")


def test_train_command_runs_online_augmentation(tmp_path):
    from fastprompt.cli.app import app, load_commands
    from typer.testing import CliRunner

    clip, dataset, cache = _setup(tmp_path, views=1, shots=(1,))
    load_commands()
    runner = CliRunner()
    common = ["train", "--cache", str(cache.path), "--methods", "coop", "--shots", "1", "--seeds", "1", "--epochs",
              "1", "--no-progress", "--online-augment"]  # fmt: skip
    refused = runner.invoke(app, [*common, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--data" in refused.output
    done = runner.invoke(app, [*common, "--out", str(tmp_path / "cli"), "--data", str(tmp_path / "data")])
    assert done.exit_code == 0, done.output
    [config] = expand_sweep({"method": ["coop"], "shots": [1], "seed": [1]}, {"dataset": TASK, "epochs": 1})
    [alone] = train_online(cache, dataset, clip, [config], tmp_path / "library")
    assert (tmp_path / "cli" / alone["run_id"] / "result.json").is_file()
