"""End to end: a generated dataset in the CoOp layout -> `fastprompt cache` with the tiny model -> FeatureCache."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from fastprompt.cli.app import load_commands
from numerics import assert_close
from PIL import Image
from typer.testing import CliRunner

from fastprompt.cache import extract
from fastprompt.cache.extract import SkippedImagesWarning, build_cache
from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.plan import CacheOptions, fewshot_subsets
from fastprompt.cache.shards import file_sha256
from fastprompt.clip import load_clip
from fastprompt.data.registry import load_dataset, register_dataset
from fastprompt.data.transforms import ViewTransform, load_rgb
from fastprompt.errors import FastPromptError

DATASET = "CacheToy"
OPTIONS = CacheOptions(shots=(1, 2), seeds=(1, 2), views=3, dtype="fp32", shard_size="4")
CLI_OPTIONS = ["--shots", "1,2", "--seeds", "1,2", "--views", "3", "--dtype", "fp32", "--shard-size", "4"]
CLI_COMMON = ["--model", "fastprompt-tiny", "--pretrained", "none", "--num-workers", "0", "--no-progress"]


def write_coop_dataset(root, classes=3, per_split=(("train", 5), ("val", 2), ("test", 2)), seed=0):
    """Small random images in the CoOp layout: <root>/cache_toy/images/<class>/<file>, split_zhou_CacheToy.json."""
    rng = np.random.default_rng(seed)
    images = root / "cache_toy" / "images"
    rows = {split: [] for split, _ in per_split}
    for split, count in per_split:
        for label in range(classes):
            for index in range(count):
                key = f"class_{label}/{split}_{index}.{'png' if index % 2 else 'jpg'}"
                (images / key).parent.mkdir(parents=True, exist_ok=True)
                height, width = rng.integers(20, 48, size=2)
                Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / key)
                rows[split].append([key, label, f"class_{label}"])
    (root / "cache_toy" / "split_zhou_CacheToy.json").write_text(json.dumps(rows))
    register_dataset(DATASET, "cache_toy", "images", replace=True)
    return images


def tiny_clip(seed=0):
    torch.manual_seed(seed)  # the CLI's "--pretrained none" seeds 0 too: the same random weights
    return load_clip("fastprompt-tiny")


def build(dataset, clip, out, **kwargs):
    kwargs = {"num_workers": 0, "progress": False, **kwargs}
    return build_cache(dataset, clip, out, OPTIONS, **kwargs)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The data root, the corrupt image's key, the model, and a cache built once by the library."""
    root = tmp_path_factory.mktemp("data")
    images = write_coop_dataset(root)
    dataset = load_dataset(DATASET, root)
    corrupt_key = fewshot_subsets(dataset, (2,), (1,))["2-1"][0][1].key
    (images / corrupt_key).write_bytes(b"this is not an image")
    clip = tiny_clip()
    out = tmp_path_factory.mktemp("caches") / "reference"
    with pytest.warns(SkippedImagesWarning, match="1 image"):
        build(dataset, clip, out)
    return {"root": root, "images": images, "corrupt": corrupt_key, "clip": clip, "out": out, "dataset": dataset}


def shard_checksums(out):
    return [(shard["name"], shard["sha256"]) for shard in json.loads((out / "manifest.json").read_text())["shards"]]


def assert_same_contents(first: FeatureCache, second: FeatureCache):
    for split in ("train", "val", "test"):
        assert torch.equal(first.split(split).features, second.split(split).features)
        assert torch.equal(first.split(split).labels, second.split(split).labels)
        assert first.split(split).keys == second.split(split).keys
    assert first.manifest["fewshot"] == second.manifest["fewshot"]


def test_cache_writes_shards_and_manifest(toy):
    manifest = json.loads((toy["out"] / "manifest.json").read_text())
    for key in ("format_version", "created", "fastprompt_version", "model", "transforms", "views", "feature_dim",
                "dtype", "dataset", "classnames", "templates", "splits", "fewshot", "shards", "skipped"):  # fmt: skip
        assert key in manifest
    assert manifest["dataset"] == DATASET and manifest["classnames"] == ["class 0", "class 1", "class 2"]
    assert manifest["templates"] == {"prograd": "a photo of a {}.", "coop": "a photo of a {}."}
    assert manifest["skipped"][0]["path"] == toy["corrupt"] and len(manifest["skipped"]) == 1
    assert str(toy["root"]) not in json.dumps(manifest["skipped"])
    assert all(toy["corrupt"] not in subset["train"] for subset in manifest["fewshot"].values())
    assert manifest["format_version"] == 2
    assert manifest["splits"]["test"] == {"count": 6, "views": 1, "center": False}
    assert manifest["splits"]["train"]["views"] == 3 and manifest["splits"]["train"]["center"] is True
    assert manifest["dtype"] == "float32"
    assert sorted(manifest["fewshot"]) == ["1-1", "1-2", "2-1", "2-2"]

    import webdataset

    for shard in manifest["shards"]:
        samples = list(webdataset.WebDataset(str(toy["out"] / shard["name"]), shardshuffle=False).decode())
        assert len(samples) == shard["count"]
        assert samples[0]["npy"].shape == (manifest["splits"][shard["split"]]["views"], manifest["feature_dim"])
        if shard["split"] == "train":  # the centre view, beside the augmented views
            assert all(sample["center.npy"].shape == (manifest["feature_dim"],) for sample in samples)
        else:
            assert all("center.npy" not in sample for sample in samples)
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "tf", str(toy["out"] / "test-00000.tar")], capture_output=True, text=True)
        assert "test/00000000.npy" in listing.stdout


def test_fewshot_indices_point_at_the_subset(toy):
    cache = FeatureCache(toy["out"])
    subset = cache.fewshot(2, 1)
    train = cache.split("train")
    assert [train.keys[i] for i in subset.train_index.tolist()] == subset.train_keys
    assert [cache.split("val").keys[i] for i in subset.val_index.tolist()] == subset.val_keys
    assert subset.train_keys == cache.manifest["fewshot"]["2-1"]["train"]
    assert train.labels.dtype == torch.int64 and train.features.shape[1:] == (3, cache.feature_dim)
    assert train.center.shape == (len(train.keys), cache.feature_dim)
    with pytest.raises(FastPromptError, match="holds no 16-shot subset for seed 1"):
        cache.fewshot(16, 1)


def test_cached_test_features_equal_the_image_tower_on_test_views(toy):
    cache = FeatureCache(toy["out"])
    clip = toy["clip"]
    for split in ("test", "val"):
        cached = cache.split(split)
        pixels = torch.stack([clip.preprocess_val(Image.open(toy["images"] / key)) for key in cached.keys])
        expected = clip.encode_image(pixels)
        assert_close(cached.features[:, 0], expected, what=f"{split} features")


def test_cached_center_view_equals_the_image_tower_on_test_transformed_training_images(toy):
    cache = FeatureCache(toy["out"])
    clip = toy["clip"]
    train = cache.split("train")
    pixels = torch.stack([clip.preprocess_val(Image.open(toy["images"] / key)) for key in train.keys])
    assert_close(train.center, clip.encode_image(pixels), what="train centre views")
    assert torch.equal(cache.center_features("train"), train.center)
    assert not any(torch.allclose(train.center, train.features[:, view]) for view in range(cache.views))
    for split in ("val", "test"):  # their one view is the test transform: the centre view is that view
        assert torch.equal(cache.split(split).center, cache.split(split).features[:, 0])


def downgrade_to_format_1(source, out):
    """A copy of the cache `source` as format 1 wrote it: no `center.npy` members, no `center` in the manifest."""
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = out / entry["name"]
        with tarfile.open(path) as tar:
            kept = [(info, tar.extractfile(info).read()) for info in tar if not info.name.endswith(".center.npy")]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for info, payload in kept:
                tar.addfile(info, io.BytesIO(payload))
        entry.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    manifest["format_version"] = 1
    for split in manifest["splits"].values():
        del split["center"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_format_1_cache_still_loads_but_has_no_center_view(toy, tmp_path):
    old = FeatureCache(downgrade_to_format_1(toy["out"], tmp_path / "format1"))
    new = FeatureCache(toy["out"])
    assert old.format_version == 1 and old.split("train").center is None
    assert torch.equal(old.split("train").features, new.split("train").features)  # prompt training reads the same
    assert torch.equal(old.split("test").center, new.split("test").center)
    message = r"\(format 1\) holds no centre-crop feature of its training images, which the linear probe needs; rebuild"
    with pytest.raises(FastPromptError, match=message):
        old.center_features("train", "the linear probe")


def test_augmented_views_are_deterministic_distinct_and_cached(toy):
    cache = FeatureCache(toy["out"])
    clip = toy["clip"]
    transform = ViewTransform.from_preprocess_cfg(clip.preprocess_cfg)
    key = cache.split("train").keys[0]
    image = load_rgb(toy["images"] / key)
    views = transform.train_views(image, key, 3)
    assert torch.equal(views, transform.train_views(load_rgb(toy["images"] / key), key, 3))
    for first in range(3):
        for second in range(first + 1, 3):
            assert not torch.allclose(views[first], views[second])
    assert not torch.equal(transform.train_view(image, "other/key.jpg", 0), views[0])
    assert_close(cache.split("train").features[0], clip.encode_image(views), what="train view features")


def test_second_run_does_nothing(toy):
    before = {path.name: path.stat().st_mtime_ns for path in toy["out"].iterdir()}
    summary = build(toy["dataset"], toy["clip"], toy["out"])
    assert summary.nothing_to_do and summary.images == 0
    assert {path.name: path.stat().st_mtime_ns for path in toy["out"].iterdir()} == before


def test_interrupted_run_resumes_to_identical_result(toy, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    write_and_record = extract.write_shard_and_record
    calls = []

    def stop_after_first_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1].name)
        return write_and_record(*args, **kwargs)

    monkeypatch.setattr(extract, "write_shard_and_record", stop_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        build(toy["dataset"], toy["clip"], out)
    assert not (out / "manifest.json").exists() and (out / calls[0]).is_file()
    monkeypatch.setattr(extract, "write_shard_and_record", write_and_record)
    with pytest.warns(SkippedImagesWarning):
        summary = build(toy["dataset"], toy["clip"], out)
    assert summary.shards_reused == 1
    assert shard_checksums(out) == shard_checksums(toy["out"])
    assert_same_contents(FeatureCache(out), FeatureCache(toy["out"]))


def test_another_model_is_refused(toy, tmp_path):
    with pytest.raises(FastPromptError, match="holds a cache made with fastprompt-tiny .*never mixed"):
        build(toy["dataset"], tiny_clip(seed=1), toy["out"])
    checkpoint = tmp_path / "other.pt"
    torch.save(tiny_clip(seed=1).model.state_dict(), checkpoint)
    args = ["cache", DATASET, "--root", str(toy["root"]), "--out", str(toy["out"]), *CLI_OPTIONS, *CLI_COMMON]
    args[args.index("none")] = str(checkpoint)
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 2 and "never mixed" in result.output and "Traceback" not in result.output


def test_cli_rerun_of_complete_cache_does_nothing(toy):
    args = ["cache", DATASET, "--root", str(toy["root"]), "--out", str(toy["out"]), *CLI_OPTIONS, *CLI_COMMON]
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output


def test_corrupted_shard_is_detected_and_rebuilt(toy, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(toy["out"], out)
    shard = out / "train-00001.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(FastPromptError, match="Shard 'train-00001.tar' .* fails its checksum .*rebuild"):
        FeatureCache(out)
    altered = bytearray(original)
    altered[600] ^= 0xFF
    shard.write_bytes(bytes(altered))
    with pytest.raises(FastPromptError, match="train-00001.tar.*fails its checksum"):
        FeatureCache(out)
    shard.unlink()
    with pytest.warns(SkippedImagesWarning):
        summary = build(toy["dataset"], toy["clip"], out)
    assert summary.shards_written == 1
    assert_same_contents(FeatureCache(out), FeatureCache(toy["out"]))


def test_full_train_image_folder_through_the_cli(tmp_path):
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        for name in ("cat", "dog"):
            for index in range(count):
                (tmp_path / "own" / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (30, 20), (index * 40, 90, 200)).save(tmp_path / "own" / split / name / f"{index}.png")
    out = tmp_path / "cache"
    args = ["cache", "imagefolder", "--root", str(tmp_path / "own"), "--out", str(out), "--full-train",
            "--shots", "none", "--views", "2", *CLI_COMMON, "--num-workers", "1"]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 0, result.output
    assert "12 images" in result.output and "images/s" in result.output
    cache = FeatureCache(out)
    assert cache.dataset == "own" and cache.classnames == ["cat", "dog"]
    assert cache.split("train").features.shape == (6, 2, 64) and cache.split("train").features.dtype == torch.float16
    assert cache.split("val").keys == ["val/cat/0.png", "val/dog/0.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cache", "Pets", "--root", "{root}"], "Unknown dataset 'Pets'.*Supported: OxfordPets, Caltech101"),
        (["cache", "EuroSAT", "--root", "{root}"], "Expected the split file '.*split_zhou_EuroSAT.json'"),
        (["cache", "OxfordPets", "--root", "{root}/nowhere"], "Data root '.*nowhere' does not exist"),
        (["cache", DATASET, "--root", "{root}", "--shots", "1,x"], "--shots takes comma-separated integers"),
    ],
)
def test_cli_bad_input_is_one_sentence(tmp_path, args, message):
    (tmp_path / "eurosat").mkdir()
    register_dataset(DATASET, "cache_toy", "images", replace=True)
    args = [arg.format(root=tmp_path) for arg in args] + ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert re.search(message, result.output.replace("\n", " ")), result.output


def test_each_image_is_decoded_once_and_each_view_encoded_once(toy, tmp_path, monkeypatch):
    from fastprompt.cache import decode

    decoded_paths = []

    def counting_load_rgb(path, **options):
        decoded_paths.append(path)
        return load_rgb(path, **options)

    monkeypatch.setattr(decode, "load_rgb", counting_load_rgb)
    with pytest.warns(SkippedImagesWarning):
        summary = build(toy["dataset"], toy["clip"], tmp_path / "counted")
    manifest = json.loads((tmp_path / "counted" / "manifest.json").read_text())
    splits = manifest["splits"]
    assert len(decoded_paths) == len(set(decoded_paths)) == sum(split["count"] for split in splits.values()) + 1
    assert summary.views == sum(split["count"] * (split["views"] + split["center"]) for split in splits.values())
    train_keys = [key for subset in manifest["fewshot"].values() for key in subset["train"]]
    assert len(train_keys) > len(set(train_keys)) == splits["train"]["count"]  # subsets overlap, images stored once


def test_cache_that_does_not_fit_is_refused(toy, monkeypatch):
    from fastprompt.cache import loader

    monkeypatch.setattr(loader, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(FastPromptError, match="needs .* GiB on cpu but only .* GiB are free"):
        FeatureCache(toy["out"])
