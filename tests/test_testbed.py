"""The offline testbed: a deterministic world, the CoOp-layout writer, the shipped checkpoints, a short pretraining,
and the realism of world v2 (docs/testbed.md), measured on training and validation images only."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex

import numpy as np
import pytest
import torch

from fastprompt import load_clip
from fastprompt.testbed import (
    TESTBED_DATASETS,
    build_testbed,
    generate_split,
    load_split,
    load_testbed_clip,
    shipped_checkpoint,
    shipped_record,
    write_dataset,
)
from fastprompt.testbed.captions import FILL_WORDS, captions_for
from fastprompt.testbed.pretrain import (
    PretrainConfig,
    load_initial_weights,
    pretrain,
    random_resized_crops,
    save_checkpoint,
)
from fastprompt.testbed.properties import measure_properties
from fastprompt.testbed.world import SHAPES, TEXTURES, WORLD_V1, WORLD_V2, WORLDS, render, sample_scenes
from fastprompt.testbed.zeroshot import zero_shot_accuracy

FILL_VOCABULARY = {word for words in FILL_WORDS.values() for word in words}


def _world(seed: int, n: int = 24, world=WORLD_V1):
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, world=world)
    return render(scenes, rng, outline_fraction=world.outline_fraction), captions_for(scenes, rng)


@pytest.mark.parametrize("world", ["v1", "v2"])
def test_world_is_deterministic_in_its_seed(world):
    images, captions = _world(7, world=WORLDS[world])
    images_again, captions_again = _world(7, world=WORLDS[world])
    other_images, other_captions = _world(8, world=WORLDS[world])
    assert images.shape == (24, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, images_again) and captions == captions_again
    assert not np.array_equal(images, other_images) and captions != other_captions
    assert all(any(shape in caption for shape in SHAPES) for caption in captions)


def test_v2_draws_after_v1_so_v1_is_unchanged():
    v1 = sample_scenes(np.random.default_rng(3), 500)
    also_v1 = sample_scenes(np.random.default_rng(3), 500, world=WORLD_V1)
    v2 = sample_scenes(np.random.default_rng(3), 500, world=WORLD_V2)
    assert v1.hollow is None and also_v1.hollow is None and 0.3 < v2.hollow.mean() < 0.7
    for name in ("shape", "colour", "texture", "background", "size"):  # drawn before anything v2 changes
        assert np.array_equal(getattr(v1, name), getattr(v2, name))
    assert np.array_equal(v1.radius, also_v1.radius) and np.array_equal(v1.centre, also_v1.centre)
    low, high = WORLD_V2.size_radii[0][0], WORLD_V2.size_radii[-1][1]
    assert v2.radius.min() >= low and v2.radius.max() < high and v1.radius.min() < low  # v2's shapes are larger
    v1_captions = captions_for(v1, np.random.default_rng(0))
    v2_captions = captions_for(v2, np.random.default_rng(0))
    assert not any(word in caption.split() for caption in v1_captions for word in FILL_VOCABULARY)
    mentioned = sum(any(word in caption.split() for word in FILL_VOCABULARY) for caption in v2_captions)
    assert 0 < mentioned < 0.25 * len(v2_captions)  # the fill is named, but rarely


def test_a_hollow_shape_is_its_outline_with_the_background_inside():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(rng, 2 * len(SHAPES), shape=np.tile(np.arange(len(SHAPES)), 2), texture=0, background=0,
                           world=WORLD_V2, hollow=np.repeat([False, True], len(SHAPES)))  # fmt: skip
    scenes.radius[:], scenes.centre[:], scenes.rotation[:] = 26.0, 32.0, 0.0
    images = render(scenes, rng, outline_fraction=WORLD_V2.outline_fraction).astype(np.int16)
    masks = np.abs(images - images[:, :1, :1]).sum(-1) > 60
    solid, hollow = masks[: len(SHAPES)], masks[len(SHAPES) :]
    assert (hollow.sum(axis=(1, 2)) > 100).all()  # the outline is there
    assert (hollow.sum(axis=(1, 2)) < 0.8 * solid.sum(axis=(1, 2))).all()
    assert (solid[:, 30:34, 30:34].all(axis=(1, 2))).all() and not hollow[:, 30:34, 30:34].any()
    assert not (hollow & ~solid).any()  # the outline lies within the solid shape


def test_random_resized_crops_keep_a_whole_image_and_mirror_it():
    images, _ = _world(1, n=4)
    rng = np.random.default_rng(0)
    whole = random_resized_crops(images, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=0.0)
    mirrored = random_resized_crops(images, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=1.0)
    assert np.array_equal(whole, images) and np.array_equal(mirrored, images[:, :, ::-1])
    crops = random_resized_crops(images, rng)
    assert crops.shape == images.shape and crops.dtype == np.uint8 and not np.array_equal(crops, images)


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


@pytest.mark.parametrize("name", ["TestbedShapesShift", "TestbedFineShapesShift"])
def test_shift_task_has_a_class_background_in_training_only(name):
    task = TESTBED_DATASETS[name]
    train_images, train_labels = generate_split(task, "train", 4)
    test_images, _ = generate_split(task, "test", 4)
    corner = lambda images: images[:, :4, :4].reshape(len(images), -1).mean(axis=1)  # noqa: E731
    same_class = [np.ptp(corner(train_images[train_labels == label])) for label in range(len(task.classnames))]
    assert np.median(same_class) < np.ptp(corner(test_images))
    assert len(set(task.train_backgrounds.values())) == len(task.classnames)


def test_shipped_checkpoints_load_and_record_their_rebuild():
    v1, v2 = shipped_record("v1"), shipped_record("v2")
    assert shipped_checkpoint() == shipped_checkpoint("v2")
    assert shipped_checkpoint("v2").stat().st_size < 7 * 10**6  # the bound (decimal megabytes)
    for record, world in ((v1, "v1"), (v2, "v2")):
        assert {"command", "data_version", "config", "zero_shot_accuracy"} <= set(record)
        # v1's record predates the `world` field: a config without it is v1's
        assert record["data_version"] == WORLDS[world].version and record["config"].get("world", "v1") == world
        assert record["config"]["threads"] == 1 and "--threads 1" in record["command"]
    # v2 continues from the shipped v1 file, recorded by its digest
    assert v2["config"]["init"] == "v1" and "--init v1" in v2["command"]
    assert v2["init"]["sha256"] == hashlib.sha256(shipped_checkpoint("v1").read_bytes()).hexdigest()
    assert load_testbed_clip().name == v2["model"]


def test_shipped_v1_checkpoint_classifies_shapes():
    clip = load_testbed_clip("v1")
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


def test_the_same_weights_are_saved_as_the_same_bytes(tmp_path):
    # safetensors writes its metadata in a hash map's order, which changes from one save to the next
    model = torch.nn.Linear(3, 2)
    record = {"model": "fastprompt-tiny", "data_version": WORLD_V2.version}
    files = {save_checkpoint(model, tmp_path / f"{i}.safetensors", record).read_bytes() for i in range(12)}
    assert len(files) == 1
    header = next(iter(files))[8:200]
    assert b'"__metadata__":{"model":"fastprompt-tiny","data_version":"shapes-world-v2"}' in header
    assert json.loads((tmp_path / "0.json").read_text())["data_version"] == WORLD_V2.version


def test_v2_pretraining_continues_from_its_initial_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import load_file

    logging.getLogger().setLevel(logging.ERROR)
    model = open_clip.create_model("fastprompt-tiny", pretrained=None)
    record = load_initial_weights(model, "v1")
    shipped = load_file(str(shipped_checkpoint("v1")))
    assert all(torch.equal(tensor, shipped[name].float()) for name, tensor in model.state_dict().items())
    assert record["sha256"] == hashlib.sha256(shipped_checkpoint("v1").read_bytes()).hexdigest()
    config = PretrainConfig(world="v2", init="v1", crop_probability=0.5, steps=2, batch_size=16, pool_size=32,
                            warmup_steps=1, eval_every=0, eval_per_class=2)  # fmt: skip
    result = pretrain(config, out=None, report=lambda line: None)
    assert result["data_version"] == WORLD_V2.version and result["init"] == record
    assert set(result["zero_shot_accuracy"]) == {"TestbedFineShapes", "TestbedFineShapesShift"}
    moved = result["model_object"].state_dict()
    assert any(not torch.equal(moved[name], tensor) for name, tensor in model.state_dict().items())


def test_cli_builds_the_testbed(tmp_path):
    from fastprompt.cli.app import load_commands
    from typer.testing import CliRunner

    sizes = ["--train-per-class", "1", "--val-per-class", "1", "--test-per-class", "1"]
    result = CliRunner().invoke(load_commands(), ["testbed", "build", "--out", str(tmp_path), *sizes])
    assert result.exit_code == 0, result.output
    for name, task in TESTBED_DATASETS.items():  # v2's tasks by default; v1's on request
        assert (tmp_path / task.dataset_dir / task.split_file).is_file() == (task.world == "v2"), name
    result = CliRunner().invoke(load_commands(), ["testbed", "zeroshot", "--data-root", str(tmp_path)])
    assert result.exit_code == 0 and "TestbedFineShapes:" in result.output, result.output
    v1 = ["--task", "TestbedShapes"]
    result = CliRunner().invoke(load_commands(), ["testbed", "build", "--out", str(tmp_path), *sizes, *v1])
    assert result.exit_code == 0 and (tmp_path / "testbed_shapes").is_dir(), result.output
    result = CliRunner().invoke(load_commands(), ["testbed", "zeroshot", "--checkpoint", "v1", "--data-root",
                                                  str(tmp_path), *v1])  # fmt: skip
    assert result.exit_code == 0 and "TestbedShapes:" in result.output, result.output


def test_cli_measures_the_properties(tmp_path):
    from fastprompt.cli.app import load_commands
    from typer.testing import CliRunner

    sizes = ["--train-per-class", "2", "--val-per-class", "2", "--test-per-class", "1", "--task", "TestbedFineShapes"]
    result = CliRunner().invoke(load_commands(), ["testbed", "build", "--out", str(tmp_path), *sizes])
    assert result.exit_code == 0, result.output
    arguments = ["--data-root", str(tmp_path), "--task", "TestbedFineShapes", "--shots", "1", "--views", "2"]
    result = CliRunner().invoke(load_commands(), ["testbed", "properties", *arguments])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.split("TestbedFineShapes: ", 1)[1])
    assert figures["views"] == 2 and 0.0 <= figures["zero_shot_train"] <= 100.0 and figures["shots"] == 1


@pytest.fixture(scope="module")
def written_testbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    build_testbed(root)  # world v2's tasks at their default sizes: the training and validation splits are read
    return root


def test_v2_has_the_paper_setting_properties_on_training_and_validation_images(written_testbed):
    """The issue's bounds: zero-shot 45-70% from the captions' vagueness (the right shape nearly always, the fill
    not), crops keep the object (views >= 0.9 of whole images), and 16 shots carry what the captions miss."""
    clip = load_testbed_clip()
    figures = measure_properties(clip, written_testbed, "TestbedFineShapes", views=4)
    assert 45.0 <= figures["zero_shot_train"] <= 70.0 and 45.0 <= figures["zero_shot_val"] <= 70.0
    assert figures["zero_shot_train_val_coarse"] >= 90.0  # the errors are the fill's, which the captions rarely name
    assert figures["views_ratio"] >= 0.9
    assert figures["linear_probe_held_out"] > figures["zero_shot_held_out"]
    assert figures["cue_held_out"] < 2 * figures["chance"]  # no background cue without a shift


def test_the_shift_task_keeps_its_cue_in_training_images_only(written_testbed):
    figures = measure_properties(load_testbed_clip(), written_testbed, "TestbedFineShapesShift", views=1, seeds=(1,))
    assert figures["cue_held_out"] > 3 * figures["chance"]  # the background alone predicts the class on train/val
    assert figures["cue_test_distribution"] < 2 * figures["chance"]  # and not on images drawn like the test split


@pytest.mark.slow
@pytest.mark.parametrize("world", ["v2", "v1"])
def test_shipped_checkpoint_is_rebuilt_byte_identically_by_its_command(world, tmp_path):
    """The documented command, run again, gives the same bytes (one thread: v2 in minutes, v1 in over half an hour;
    v2's command starts from the shipped v1 file)."""
    from fastprompt.cli.app import load_commands
    from typer.testing import CliRunner

    record = shipped_record(world)
    arguments = shlex.split(record["command"])[2:]  # after "fastprompt testbed"
    out = tmp_path / record["file"]
    arguments[arguments.index("--out") + 1] = str(out)
    result = CliRunner().invoke(load_commands(), ["testbed", *arguments, "--eval-every", "0"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == shipped_checkpoint(world).read_bytes()
