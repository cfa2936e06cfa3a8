"""What fastprompt reads from elsewhere (issue #13 items 4 and 6): every kind of image file a dataset may hold, cache
folders whose manifest or shards were made or altered by hand, and links in dataset folders. Each input is either
read correctly (converted to the documented RGB) or refused/skipped with one sentence; nothing crashes mid-cache,
no label is silently wrong, and nothing outside the folders named is read.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from fastprompt.cli.app import load_commands
from image_kinds import IMAGE_KINDS, write_kind
from numerics import assert_close, relative_error
from PIL import Image, ImageFile, ImageOps
from typer.testing import CliRunner

from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.shards import file_sha256
from fastprompt.clip import load_clip
from fastprompt.data.registry import load_dataset, register_dataset
from fastprompt.data.transforms import ViewTransform, load_rgb
from fastprompt.errors import FastPromptError

CLASSES = ("ant", "bee", "cow")
VIEWS = 2
CLI_COMMON = ["--model", "fastprompt-tiny", "--pretrained", "none", "--no-progress", "--dtype", "fp32"]


def tiny_clip():
    torch.manual_seed(0)  # the CLI's "--pretrained none" seeds 0 too: the same random weights
    return load_clip("fastprompt-tiny")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """An image folder holding every kind of `IMAGE_KINDS` in train/ and test/, cached once through the CLI."""
    base = tmp_path_factory.mktemp("kinds")
    root, rng, expected = base / "photos", np.random.default_rng(0), {}
    for split in ("train", "test"):
        for index, kind in enumerate(IMAGE_KINDS):
            classname = CLASSES[index % len(CLASSES)]
            _, pixels = write_kind(kind, root / split / classname, rng)
            expected[f"{split}/{classname}/{kind.filename}"] = (kind, pixels)
    out = base / "cache"
    args = ["cache", "imagefolder", "--root", str(root), "--out", str(out), "--full-train", "--shots", "1",
            "--seeds", "1", "--views", str(VIEWS), "--num-workers", "1", *CLI_COMMON]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    return {"root": root, "out": out, "expected": expected, "result": result, "clip": tiny_clip()}


# ----- item 4: every kind of image -----


def test_every_image_kind_is_converted_or_skipped_with_its_reason_and_the_cli_says_how_many(kinds):
    result = kinds["result"]
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    manifest = json.loads((kinds["out"] / "manifest.json").read_text())
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    must_skip = {key: kind for key, (kind, pixels) in kinds["expected"].items() if pixels is None}
    assert set(skipped) == set(must_skip)
    for key, kind in must_skip.items():
        assert re.search(kind.reason, skipped[key]), (key, skipped[key])
        assert str(kinds["root"]) not in skipped[key]  # reasons name the key, never this machine's path
    count_lines = [line for line in result.output.splitlines() if re.search(rf"\b{len(must_skip)} skipped\.$", line)]
    assert len(count_lines) == 1, result.output
    assert f"{len(must_skip)} image(s) could not be read and were skipped" in result.output
    assert all(key not in subset["train"] for subset in manifest["fewshot"].values() for key in must_skip)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the reference raises on truncated files: the flag stays unset


def test_kept_images_have_their_class_folder_label_and_nothing_else_is_kept(kinds):
    cache = FeatureCache(kinds["out"])
    assert cache.classnames == list(CLASSES)
    for split in ("train", "test"):
        kept = sorted(
            key for key, (_, pixels) in kinds["expected"].items() if key.startswith(split) and pixels is not None
        )
        data = cache.split(split)
        assert sorted(data.keys) == kept
        for key, label in zip(data.keys, data.labels.tolist(), strict=True):
            assert cache.classnames[label] == key.split("/")[1], key


def test_converted_images_are_encoded_from_the_documented_rgb_pixels(kinds):
    cache, clip = FeatureCache(kinds["out"]), kinds["clip"]
    transform = ViewTransform.from_preprocess_cfg(clip.preprocess_cfg)
    for split in ("train", "test"):
        data = cache.split(split)
        for index, key in enumerate(data.keys):
            kind, pixels = kinds["expected"][key]
            image = Image.fromarray(pixels, "RGB")
            test_view = clip.encode_image(transform.test_view(image).unsqueeze(0))[0]
            assert_close(data.center[index], test_view, what=f"centre view of {key}")
            if split == "train":
                views = clip.encode_image(transform.train_views(image, key, VIEWS))
                assert_close(data.features[index], views, what=f"augmented views of {key}")
            if kind.name == "gray16":  # PIL's own conversion clips every value above 255 to white
                with Image.open(kinds["root"] / key) as source:
                    clipped = transform.test_view(source.convert("RGB")).unsqueeze(0)
                assert relative_error(data.center[index], clip.encode_image(clipped)[0]) > 1e-2
            if kind.name == "exif_rotated":  # the stored pixels, as the reference reads them, not the turned image
                assert pixels.shape == (24, 40, 3)
                with Image.open(kinds["root"] / key) as source:
                    upright = transform.test_view(ImageOps.exif_transpose(source).convert("RGB")).unsqueeze(0)
                assert relative_error(data.center[index], clip.encode_image(upright)[0]) > 1e-2


def test_pixel_limit_is_fastprompts_own_whatever_pil_is_set_to(kinds, monkeypatch):
    bomb = next(kinds["root"] / key for key, (kind, _) in kinds["expected"].items() if kind.name == "bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a process that switched PIL's check off
    with pytest.raises(Image.DecompressionBombError, match="exceeds fastprompt's limit of 178956970 pixels"):
        load_rgb(bomb)


def test_exif_orientation_switch(tmp_path):
    path, stored = write_kind(next(kind for kind in IMAGE_KINDS if kind.name == "exif_rotated"), tmp_path,
                              np.random.default_rng(1))  # fmt: skip
    assert np.array_equal(np.asarray(load_rgb(path)), stored)
    upright = np.asarray(load_rgb(path, exif_transpose=True))
    with Image.open(path) as source:
        assert np.array_equal(upright, np.asarray(ImageOps.exif_transpose(source).convert("RGB")))
    assert upright.shape == (40, 24, 3)
    plain = ViewTransform(size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    turned = ViewTransform(size=64, mean=(0.5,) * 3, std=(0.5,) * 3, exif_transpose=True)
    assert "exif_transpose" not in json.dumps(plain.describe())  # caches made before the switch keep their record
    assert turned.describe()["test"]["exif_transpose"] is True  # a cache made with it is never mixed with one without


# ----- item 6: cache folders from elsewhere -----


def resign(out, name):
    """Record a rewritten shard's size and checksum in the manifest, so only the checks on content can catch it."""
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(bytes=(out / name).stat().st_size, sha256=file_sha256(out / name))
    (out / "manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(out, name, edit):
    """Rewrite the shard `name` with `edit([(TarInfo, payload or None), ...])` and re-sign it."""
    path = out / name
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, payload in edit(members):
            tar.addfile(info, None if payload is None else io.BytesIO(payload))
    resign(out, name)


def member(name, payload=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(payload)
    return info, (payload if kind == tarfile.REGTYPE else None)


def renamed(members, old, new):
    """The members with every name that starts with `old` starting with `new` instead (a whole sample moves)."""
    moved = []
    for info, payload in members:
        if info.name.startswith(old):
            info = member(new + info.name.removeprefix(old), payload)[0]
        moved.append((info, payload))
    return moved


SHARD_CASES = {
    "absolute name": (lambda m: renamed(m, "train/00000000.", "/tmp/00000000."), "'/tmp/00000000.npy' is not named"),
    "climbing name": (lambda m: renamed(m, "train/00000000.", "../00000000."), "'../00000000.npy' is not named"),
    "symbolic link": (
        lambda m: [*m, member("train/00000099.npy", kind=tarfile.SYMTYPE, linkname="/etc/passwd")],
        "is a symbolic link to '/etc/passwd'",
    ),
    "hard link": (
        lambda m: [*m, member("train/00000099.npy", kind=tarfile.LNKTYPE, linkname="train/00000000.npy")],
        "is a hard link to 'train/00000000.npy'",
    ),
    "directory": (lambda m: [member("train", kind=tarfile.DIRTYPE), *m], "'train' is a directory"),
    "other split": (lambda m: renamed(m, "train/00000000.", "test/00000000."), "is not named as a train sample"),
    "twice": (lambda m: [*m, m[-1]], "appears twice"),
    "label out of range": (
        lambda m: [(info, b"7") if info.name.endswith("00000000.cls") else (info, p) for info, p in m],
        "holds the label 7, not one of its 3 classes",
    ),
    "pickled features": (
        lambda m: [
            (member(i.name, _pickled_npy())[0], _pickled_npy()) if i.name.endswith("0.npy") else (i, p) for i, p in m
        ],
        "does not parse",
    ),
}


def _pickled_npy():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("case", SHARD_CASES)
def test_a_malformed_shard_is_refused_naming_it(kinds, tmp_path, case):
    out = tmp_path / "cache"
    shutil.copytree(kinds["out"], out)
    edit, message = SHARD_CASES[case]
    rewrite_shard(out, "train-00000.tar", edit)
    with pytest.raises(FastPromptError, match=re.escape(message)) as refused:
        FeatureCache(out)
    assert "train-00000.tar" in str(refused.value) and "rebuild the cache" in str(refused.value)


def test_a_rewritten_but_well_formed_shard_still_loads(kinds, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(kinds["out"], out)
    rewrite_shard(out, "train-00000.tar", lambda members: members)  # the helper itself changes nothing that matters
    assert torch.equal(FeatureCache(out).split("train").features, FeatureCache(kinds["out"]).split("train").features)


def _edit_split_count(manifest, both):
    manifest["splits"]["test"]["count"] += 1
    if both:
        next(entry for entry in manifest["shards"] if entry["split"] == "test")["count"] += 1


MANIFEST_CASES = {
    "feature_dim": (
        lambda m, out: m.update(feature_dim=m["feature_dim"] + 1),
        "features of shape (2, 64) (float32), not (2, 65)",
    ),
    "views": (lambda m, out: m["splits"]["train"].update(views=3), "features of shape (2, 64) (float32), not (3, 64)"),
    "dtype": (lambda m, out: m.update(dtype="float16"), "(float32), not (2, 64) (float16)"),
    "split count": (lambda m, out: _edit_split_count(m, both=False), "counts 14 test images but its test shards 13"),
    "shard count": (lambda m, out: _edit_split_count(m, both=True), "holds 13 samples but the manifest"),
    "class list": (lambda m, out: m.update(classnames=m["classnames"][:1]), "not one of its 1 classes"),
    "few-shot key": (
        lambda m, out: m["fewshot"]["1-1"]["train"].append("train/ant/elsewhere.png"),
        "lists 'train/ant/elsewhere.png' in its 1-1 train subset, but no train shard holds",
    ),
    "shard outside by ..": (
        lambda m, out: m["shards"][0].update(name="../outside.tar"),
        "lists the shard '../outside.tar', which is not a plain .tar file name inside the cache folder",
    ),
    "shard outside by absolute path": (
        lambda m, out: m["shards"][0].update(name=str(out.parent / "outside.tar")),
        "which is not a plain .tar file name inside the cache folder",
    ),
    "shard twice": (lambda m, out: m["shards"].append(dict(m["shards"][0])), "twice"),
    "feature_dim not a number": (lambda m, out: m.update(feature_dim="64"), "has feature_dim '64', not a positive"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_manifest_that_disagrees_with_its_shards_is_refused_naming_the_file(kinds, tmp_path, case):
    out = tmp_path / "cache"
    shutil.copytree(kinds["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.copy(out / manifest["shards"][0]["name"], tmp_path / "outside.tar")  # a valid shard outside the folder
    edit, message = MANIFEST_CASES[case]
    edit(manifest, out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastPromptError, match=re.escape(message)) as refused:
        FeatureCache(out)
    assert str(out) in str(refused.value) and "rebuild the cache with `fastprompt cache`" in str(refused.value)


@pytest.mark.parametrize("text", ["{", "[]", "\xff"])
def test_a_manifest_that_is_not_a_json_object_is_refused(kinds, tmp_path, text):
    out = tmp_path / "cache"
    shutil.copytree(kinds["out"], out)
    (out / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(FastPromptError, match=r"The cache manifest '.*manifest.json' is not (JSON|a JSON object)"):
        FeatureCache(out)


def test_a_shard_file_linking_outside_the_cache_folder_is_refused(kinds, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(kinds["out"], out)
    (out / "train-00000.tar").rename(tmp_path / "elsewhere.tar")
    # the same bytes and checksum: only the rule on links stops it
    (out / "train-00000.tar").symlink_to(tmp_path / "elsewhere.tar")
    with pytest.raises(FastPromptError, match=r"train-00000.tar' is a link to '.*elsewhere.tar', outside the cache"):
        FeatureCache(out)
    (out / "train-00000.tar").unlink()
    (tmp_path / "elsewhere.tar").rename(out / "stored.tar")
    (out / "train-00000.tar").symlink_to("stored.tar")  # a link inside the folder is fine
    assert FeatureCache(out).split("train").features.shape[1] == VIEWS


# ----- item 6: links in dataset folders -----


def small_png(path, shade=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (shade, 30, 200)).save(path)


def test_image_folder_links_leading_outside_its_root_are_refused(tmp_path):
    root, outside = tmp_path / "photos", tmp_path / "elsewhere"
    small_png(root / "train" / "cat" / "a.png")
    small_png(root / "test" / "dog" / "b.png")
    small_png(outside / "secret.png")
    small_png(outside / "cows" / "c.png")
    (root / "train" / "cat" / "alias.png").symlink_to(root / "train" / "cat" / "a.png")  # inside: followed
    (tmp_path / "linked_root").symlink_to(root)  # the folder named may itself be a link
    dataset = load_dataset("imagefolder", tmp_path / "linked_root")
    assert [item.key for item in dataset.train] == ["train/cat/a.png", "train/cat/alias.png"]

    (root / "train" / "cat" / "z.png").symlink_to(outside / "secret.png")
    with pytest.raises(FastPromptError, match=r"'.*train/cat/z.png' is a link to '.*elsewhere/secret.png', outside"):
        load_dataset("imagefolder", root)
    (root / "train" / "cat" / "z.png").unlink()
    (root / "test" / "cow").symlink_to(outside / "cows")  # a linked class folder
    with pytest.raises(FastPromptError, match=r"'.*test/cow' is a link to '.*elsewhere/cows', outside the dataset"):
        load_dataset("imagefolder", root)


def write_coop(root, rows, folder="toy_links"):
    images = root / folder / "images"
    for key, _, _ in rows["train"] + rows["test"]:
        if not key.startswith(("/", "..")):
            small_png(images / key)
    (root / folder / "split_zhou_ToyLinks.json").write_text(json.dumps(rows))
    register_dataset("ToyLinks", folder, "images", replace=True)
    return images


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("../../elsewhere/secret.png", "The path '../../elsewhere/secret.png' in the split file '.*' leads outside"),
        ("{outside}/secret.png", "The path '/.*' in the split file '.*' leads outside the image folder"),
        ("b/link.png", "'.*images/b/link.png' is a link to '.*elsewhere/secret.png', outside the dataset folder"),
    ],
)
def test_coop_layout_paths_and_links_leading_outside_the_image_folder_are_refused(tmp_path, key, message):
    outside = tmp_path / "elsewhere"
    small_png(outside / "secret.png")
    key = key.format(outside=outside)
    rows = {"train": [["a/1.png", 0, "a"], [key, 1, "b"]], "val": [], "test": [["a/2.png", 0, "a"]]}
    data = tmp_path / "data"
    images = write_coop(data, rows)
    if key == "b/link.png":
        (images / key).unlink()
        (images / key).symlink_to(outside / "secret.png")
    with pytest.raises(FastPromptError, match=message):
        load_dataset("ToyLinks", data)


def test_coop_dataset_folder_may_itself_be_a_link(tmp_path):
    rows = {"train": [["a/1.png", 0, "a"], ["b/1.png", 1, "b"]], "val": [], "test": [["a/2.png", 0, "a"]]}
    write_coop(tmp_path / "disk", rows, folder="real_toy")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy_links").symlink_to(tmp_path / "disk" / "real_toy")
    register_dataset("ToyLinks", "toy_links", "images", replace=True)
    dataset = load_dataset("ToyLinks", tmp_path / "data")
    assert [item.key for item in dataset.train] == ["a/1.png", "b/1.png"]


def test_cli_refuses_a_link_leading_outside_in_one_sentence(tmp_path):
    small_png(tmp_path / "photos" / "test" / "cat" / "a.png")
    small_png(tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "photos" / "test" / "cat" / "b.png")
    args = ["cache", "imagefolder", "--root", str(tmp_path / "photos"), "--out", str(tmp_path / "cache"),
            "--shots", "none", "--num-workers", "0", *CLI_COMMON]  # fmt: skip
    result = CliRunner().invoke(load_commands(), args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is a link to" in result.output and "outside the dataset folder" in result.output
    assert not (tmp_path / "cache").exists()  # refused before anything was read or written
