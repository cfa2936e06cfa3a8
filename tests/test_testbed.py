"""The offline testbed: a deterministic world, the CoOp-layout writer, the shipped checkpoint, a short pretraining."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from fastprompt import load_clip
from fastprompt.testbed import (
    TESTBED_DATASETS,
    generate_split,
    load_split,
    load_testbed_clip,
    shipped_checkpoint,
    shipped_record,
    write_dataset,
)
from fastprompt.testbed.captions import captions_for
from fastprompt.testbed.pretrain import PretrainConfig, pretrain
from fastprompt.testbed.world import SHAPES, TEXTURES, render, sample_scenes
from fastprompt.testbed.zeroshot import zero_shot_accuracy


def _world(seed: int, n: int = 24):
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n)
    return render(scenes, rng), captions_for(scenes, rng)


def test_world_is_deterministic_in_its_seed():
    images, captions = _world(7)
    images_again, captions_again = _world(7)
    other_images, other_captions = _world(8)
    assert images.shape == (24, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, images_again) and captions == captions_again
    assert not np.array_equal(images, other_images) and captions != other_captions
    assert all(any(shape in caption for shape in SHAPES) for caption in captions)


def test_every_shape_and_texture_draws_something_distinct():
    rng = np.random.default_rng(0)
    n = len(SHAPES)
    scenes = sample_scenes(rng, n, shape=np.arange(n), texture=0, background=0)
    scenes.radius[:] = 20.0
    scenes.centre[:] = 32.0
    scenes.rotation[:] = 0.0
    images = render(scenes, rng).astype(np.int16)
    masks = np.abs(images - images[:, :1, :1]).sum(-1) > 60  # shape pixels differ from the plain background
    areas = masks.sum(axis=(1, 2))
    assert (areas > 150).all()
    assert len({mask.tobytes() for mask in masks}) == n
    textured = render(sample_scenes(rng, len(TEXTURES), shape=0, texture=np.arange(len(TEXTURES))), rng)
    spread = textured[:, :8, :8].reshape(len(TEXTURES), -1).std(axis=1)
    assert spread[0] < spread[1:].min()  # plain background is flat, every texture varies


def test_writer_produces_the_coop_layout(tmp_path):
    task = TESTBED_DATASETS["TestbedShapesShift"]
    per_class = {"train": 2, "val": 1, "test": 2}
    folder = write_dataset(task, tmp_path, per_class)
    assert folder == tmp_path / task.dataset_dir
    split = json.loads((folder / f"split_zhou_{task.name}.json").read_text())
    assert set(split) == {"train", "val", "test"}
    k = len(task.classnames)
    assert [len(split[name]) for name in ("train", "val", "test")] == [2 * k, k, 2 * k]
    for rows in split.values():
        for relative, label, classname in rows:
            assert not relative.startswith("/") and (folder / "images" / relative).is_file()
            assert task.classnames[label] == classname
    images, labels = load_split(tmp_path, task, "test")
    expected_images, expected_labels = generate_split(task, "test", 2)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    modified = (folder / task.split_file).stat().st_mtime_ns
    write_dataset(task, tmp_path, per_class)  # same settings: reused, not rewritten
    assert (folder / task.split_file).stat().st_mtime_ns == modified


def test_shift_task_has_a_class_background_in_training_only():
    task = TESTBED_DATASETS["TestbedShapesShift"]
    train_images, train_labels = generate_split(task, "train", 4)
    test_images, _ = generate_split(task, "test", 4)
    corner = lambda images: images[:, :4, :4].reshape(len(images), -1).mean(axis=1)  # noqa: E731
    same_class = [np.ptp(corner(train_images[train_labels == label])) for label in range(len(task.classnames))]
    assert np.median(same_class) < np.ptp(corner(test_images))
    assert len(set(task.train_backgrounds.values())) == len(task.classnames)


def test_shipped_checkpoint_loads_and_classifies_shapes():
    record = shipped_record()
    assert shipped_checkpoint().stat().st_size < 8 * 2**20
    assert {"command", "data_version", "config", "zero_shot_accuracy"} <= set(record)
    clip = load_testbed_clip()
    assert clip.name == record["model"]
    task = TESTBED_DATASETS["TestbedShapes"]
    images, labels = generate_split(task, "test", 13, seed=99)  # 104 images, 8 classes: chance is 12.5%
    accuracy = zero_shot_accuracy(clip.model, clip.tokenizer, images, labels, task.classnames, [task.coop_template])
    assert accuracy >= 60.0


def test_short_pretraining_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that a fresh model has no pretrained weights
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = PretrainConfig(
        model="fastprompt-tiny", steps=12, batch_size=32, pool_size=96, warmup_steps=2, eval_every=4, eval_per_class=2
    )
    out = tmp_path / "tiny.safetensors"
    record = pretrain(config, out=out, command="test", report=lambda line: None)
    # each evaluation records the mean loss so far: a lower mean after 12 steps than after 4 means the loss fell
    running_means = [row["loss"] for row in record["evaluations"]]
    assert record["steps_done"] == 12 and [row["step"] for row in record["evaluations"]] == [4, 8, 12]
    assert running_means[-1] < running_means[0]
    clip = load_clip("fastprompt-tiny", pretrained=str(out))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["data_version"] == record["data_version"] and saved["file"] == out.name
    assert not any(parameter.requires_grad for parameter in clip.model.parameters())


def test_cli_builds_the_testbed(tmp_path):
    from fastprompt.cli.app import load_commands
    from typer.testing import CliRunner

    sizes = ["--train-per-class", "1", "--val-per-class", "1", "--test-per-class", "1"]
    result = CliRunner().invoke(load_commands(), ["testbed", "build", "--out", str(tmp_path), *sizes])
    assert result.exit_code == 0, result.output
    for task in TESTBED_DATASETS.values():
        assert (tmp_path / task.dataset_dir / task.split_file).is_file()
    result = CliRunner().invoke(load_commands(), ["testbed", "zeroshot", "--data-root", str(tmp_path)])
    assert result.exit_code == 0 and "TestbedShapes:" in result.output, result.output
