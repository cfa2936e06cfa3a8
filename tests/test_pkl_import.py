"""The reference's few-shot pickles load through a restricted unpickler that never executes foreign globals."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import pytest
from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.data.fewshot import sample_fewshot
from fastprompt.data.pkl_import import fewshot_pkl_path, import_fewshot_pkl, load_restricted, rebase_key
from fastprompt.data.registry import get_dataset_spec, load_dataset, register_dataset
from fastprompt.errors import FastPromptError

TOOLKIT_MODULE = "dassl.data.datasets.base_dataset"


def make_toolkit_datum_class():
    """A stand-in with the toolkit's module path, name and attribute layout."""

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath = impath
            self._label = label
            self._domain = domain
            self._classname = classname

    Datum.__module__ = TOOLKIT_MODULE
    Datum.__qualname__ = "Datum"
    return Datum


def write_toolkit_pickle(path, monkeypatch, protocol):
    datum = make_toolkit_datum_class()
    for depth, name in enumerate(("dassl", "dassl.data", "dassl.data.datasets", TOOLKIT_MODULE)):
        module = types.ModuleType(name)
        if depth == 3:
            module.Datum = datum
        monkeypatch.setitem(sys.modules, name, module)
    prefix = "/home/someone/DATA/oxford_pets/images"
    content = {
        "train": [datum(f"{prefix}/abyssinian_{i}.jpg", 0, 0, "abyssinian") for i in range(2)]
        + [datum(f"{prefix}/pug_1.jpg", 1, 0, "pug")],
        "val": [datum(f"{prefix}/pug_7.jpg", 1, 0, "pug")],
    }
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    for name in ("dassl", "dassl.data", "dassl.data.datasets", TOOLKIT_MODULE):
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_toolkit_pickle_loads_and_rebases_paths(tmp_path, monkeypatch, protocol):
    path = tmp_path / "shot_2-seed_1.pkl"
    write_toolkit_pickle(path, monkeypatch, protocol)
    assert TOOLKIT_MODULE not in sys.modules
    image_root = tmp_path / "mine" / "oxford_pets" / "images"
    train, val = import_fewshot_pkl(path, get_dataset_spec("OxfordPets"), image_root)
    assert [item.key for item in train] == ["abyssinian_0.jpg", "abyssinian_1.jpg", "pug_1.jpg"]
    assert [item.label for item in train] == [0, 0, 1]
    assert [item.classname for item in val] == ["pug"]
    assert val[0].path == image_root / "pug_7.jpg"
    assert TOOLKIT_MODULE not in sys.modules


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ImportsAModule:
    def __reduce__(self):
        return pickle.loads, (b"",)


def test_pickle_with_foreign_global_is_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "shot_1-seed_1.pkl"
    path.write_bytes(pickle.dumps({"train": [RunsACommand(marker)], "val": []}))
    assert b"system" in path.read_bytes()
    with pytest.raises(FastPromptError, match="system.*not allowed"):
        load_restricted(path)
    assert not marker.exists()

    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps([ImportsAModule()]).replace(b"pickle", b"fpevil"))
    with pytest.raises(FastPromptError, match="not allowed"):
        load_restricted(other)
    assert "fpevil" not in sys.modules


@pytest.mark.parametrize(
    ("impath", "dataset_dir", "image_dir", "key"),
    [
        ("/d/oxford_pets/images/a/b.jpg", "oxford_pets", "images", "a/b.jpg"),
        ("/images/x/oxford_pets/images/b.jpg", "oxford_pets", "images", "b.jpg"),
        ("/d/stanford_cars/cars_train/00001.jpg", "stanford_cars", "", "cars_train/00001.jpg"),
        ("C:\\data\\dtd\\images\\banded\\b_1.jpg", "dtd", "images", "banded/b_1.jpg"),
        ("/elsewhere/images/c/d.jpg", "imagenet", "images", "c/d.jpg"),
    ],
)
def test_rebase_keeps_the_part_after_the_image_folder(impath, dataset_dir, image_dir, key):
    assert rebase_key(impath, dataset_dir, image_dir) == key


def test_rebase_without_image_folder_is_one_sentence():
    with pytest.raises(FastPromptError, match="does not contain the image folder"):
        rebase_key("/a/b/c.jpg", "oxford_pets", "images")


def test_imported_subsets_equal_sampled_ones_and_cli_names_missing_files(tmp_path, monkeypatch):
    rows = {
        split: [[f"c{label}/{split}{i}.jpg", label, f"c{label}"] for label in range(3) for i in range(6)]
        for split in ("train", "val", "test")
    }
    (tmp_path / "pkl_toy" / "images").mkdir(parents=True)
    (tmp_path / "pkl_toy" / "split_zhou_PklToy.json").write_text(json.dumps(rows))
    spec = register_dataset("PklToy", "pkl_toy", "images", replace=True)
    dataset = load_dataset("PklToy", tmp_path)
    train, val = sample_fewshot(dataset.train, dataset.val, 4, 2)

    datum = make_toolkit_datum_class()
    old_root = "/old/machine/data/pkl_toy/images"
    content = {part: [datum(f"{old_root}/{i.key}", i.label, 0, i.classname) for i in items]
               for part, items in (("train", train), ("val", val))}  # fmt: skip
    path = fewshot_pkl_path(spec, tmp_path, 4, 2)
    path.parent.mkdir()
    for depth, name in enumerate(("dassl", "dassl.data", "dassl.data.datasets", TOOLKIT_MODULE)):
        module = types.ModuleType(name)
        if depth == 3:
            module.Datum = datum
        monkeypatch.setitem(sys.modules, name, module)
    path.write_bytes(pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL))
    imported_train, imported_val = import_fewshot_pkl(path, spec, dataset.image_root)
    assert imported_train == train and imported_val == val

    args = ["cache", "PklToy", "--root", str(tmp_path), "--fewshot-pkl", "--shots", "4", "--seeds", "1,2"]
    result = CliRunner().invoke(load_commands(), [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Expected the few-shot file" in result.output
    assert "shot_4-seed_1.pkl" in result.output.replace("\n", "")
