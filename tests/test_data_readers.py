"""Dataset readers: CoOp split files, FGVCAircraft, ImageNet and its variants, image folders, manifests, errors."""

from __future__ import annotations

import json

import pytest

from fastprompt.data.registry import get_dataset_spec, load_dataset, register_dataset, supported_datasets
from fastprompt.errors import FastPromptError

PAPER_DATASETS = [
    "OxfordPets", "Caltech101", "OxfordFlowers", "Food101", "StanfordCars", "SUN397", "EuroSAT", "UCF101",
    "DescribableTextures", "FGVCAircraft", "ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR",
]  # fmt: skip


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_all_paper_datasets_are_registered_with_their_templates():
    for name in PAPER_DATASETS:
        assert name in supported_datasets()
    pets = get_dataset_spec("OxfordPets")
    assert pets.templates == {"prograd": "a type of pet, a photo of a {}.", "coop": "a photo of a {}, a type of pet."}
    assert get_dataset_spec("DescribableTextures").dataset_dir == "dtd"
    assert get_dataset_spec("StanfordCars").image_dir == ""


def test_coop_split_file_reader(tmp_path):
    rows = {
        "train": [["b/1.jpg", 1, "big_cat"], ["a/1.jpg", 0, "dog"]],
        "val": [["a/2.jpg", 0, "dog"]],
        "test": [["b/3.jpg", 1, "big_cat"]],
    }
    (tmp_path / "oxford_pets").mkdir()
    (tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(rows))
    dataset = load_dataset("OxfordPets", tmp_path)
    assert dataset.classnames == ["dog", "big cat"]
    assert [item.key for item in dataset.train] == ["b/1.jpg", "a/1.jpg"]
    assert dataset.test[0].path == tmp_path / "oxford_pets" / "images" / "b" / "3.jpg"
    assert dataset.templates["prograd"].startswith("a type of pet")


def test_register_dataset_defaults_and_conflicts(tmp_path):
    spec = register_dataset("MyToy", "my_toy", "pics", templates={"coop": "a {}."}, replace=True)
    assert spec.split_file == "split_zhou_MyToy.json"
    assert spec.templates == {"prograd": "a photo of a {}.", "coop": "a {}."}
    with pytest.raises(FastPromptError, match="already registered"):
        register_dataset("MyToy", "my_toy")
    with pytest.raises(FastPromptError, match="reserved"):
        register_dataset("imagefolder", "x")


def test_fgvc_aircraft_reader(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    folder.mkdir()
    (folder / "variants.txt").write_text("707-320\nA300B4\nDC-10\n")
    (folder / "images_variant_train.txt").write_text("0034309 707-320\n0034958 DC-10\n")
    (folder / "images_variant_val.txt").write_text("0037511 A300B4\n")
    (folder / "images_variant_test.txt").write_text("1514522 DC-10\n")
    dataset = load_dataset("FGVCAircraft", tmp_path)
    assert dataset.classnames == ["707-320", "A300B4", "DC-10"]
    assert [(item.key, item.label) for item in dataset.train] == [("0034309.jpg", 0), ("0034958.jpg", 2)]
    assert dataset.test[0].path == folder / "images" / "1514522.jpg"


def test_imagenet_and_variants(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish fish\nn03 great white shark\n")
    for split in ("train", "val"):
        for wnid in ("n01", "n02", "n03"):
            for i in range(2):
                touch(tmp_path / "imagenet" / "images" / split / wnid / f"{wnid}_{i}.JPEG")
    imagenet = load_dataset("ImageNet", tmp_path)
    assert imagenet.classnames == ["tench", "goldfish fish", "great white shark"]
    assert imagenet.train[0].key == "train/n01/n01_0.JPEG" and len(imagenet.test) == 6 and imagenet.val == []
    assert not imagenet.fewshot_val

    touch(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n03" / "x.jpg")
    touch(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n02" / "y.jpg")
    touch(tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt")
    adversarial = load_dataset("ImageNetA", tmp_path)
    assert adversarial.classnames == ["goldfish fish", "great white shark"]
    assert [(item.key, item.label) for item in adversarial.test] == [("n02/y.jpg", 0), ("n03/x.jpg", 1)]

    for label in range(3):
        touch(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg")
    v2 = load_dataset("ImageNetV2", tmp_path)
    assert [item.label for item in v2.test] == [0, 1, 2] and v2.train == []


def test_image_folder_and_manifests(tmp_path):
    for split, cls, name in (("train", "cat", "1.png"), ("train", "dog", "2.png"), ("test", "cat", "3.png")):
        touch(tmp_path / "own" / split / cls / name)
    own = load_dataset("imagefolder", tmp_path / "own")
    assert own.name == "own" and own.classnames == ["cat", "dog"]
    assert [(item.key, item.label) for item in own.train] == [("train/cat/1.png", 0), ("train/dog/2.png", 1)]

    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,classname,split\nimgs/a.jpg,1,sea_lion,train\nimgs/b.jpg,0,otter,test\n")
    listed = load_dataset("manifest", None, manifest=csv_path)
    assert listed.classnames == ["otter", "sea lion"] and listed.train[0].path == tmp_path / "imgs" / "a.jpg"

    jsonl_path = tmp_path / "list.jsonl"
    names = tmp_path / "names.txt"
    names.write_text("otter\nsea lion\n")
    jsonl_path.write_text(
        '{"path": "a.jpg", "label": 1, "split": "train"}\n{"path": "b.jpg", "label": 0, "split": "val"}\n'
    )
    listed = load_dataset("manifest", tmp_path / "base", manifest=jsonl_path, classnames_file=names, dataset_name="Z")
    assert listed.name == "Z" and listed.val[0].path == tmp_path / "base" / "b.jpg"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda root: load_dataset("OxfordPet", root), "Unknown dataset 'OxfordPet'. Did you mean OxfordPets"),
        (lambda root: load_dataset("OxfordPets", root / "nowhere"), "does not exist"),
        (lambda root: load_dataset("Food101", root), "Expected Food101 at '.*food-101'"),
        (lambda root: load_dataset("EuroSAT", root), "Expected the split file '.*split_zhou_EuroSAT.json'"),
        (lambda root: load_dataset("imagefolder", root / "eurosat"), "Expected the folders"),
        (lambda root: load_dataset("manifest", root, manifest=root / "bad.csv"), "split 'training'"),
    ],
)
def test_bad_input_is_one_sentence(tmp_path, call, message):
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "bad.csv").write_text("path,label,classname,split\na.jpg,0,x,training\n")
    with pytest.raises(FastPromptError, match=message):
        call(tmp_path)
