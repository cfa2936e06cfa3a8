"""Readers for ImageNet (class folders plus `classnames.txt`) and its four evaluation variants (PROTOCOL.md section 5).

The reference lists each class folder in the file system's order, which differs between machines; fastprompt sorts
the file names so that its few-shot subsets are reproducible. To reuse the paper's exact ImageNet subsets, import the
reference's `split_fewshot/*.pkl` files (`fastprompt.data.pkl_import`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fastprompt.data.coop import dataset_folder, image_folder
from fastprompt.data.items import Dataset, FolderGuard, Item, read_text
from fastprompt.errors import FastPromptError

if TYPE_CHECKING:
    from fastprompt.data.registry import DatasetSpec

IMAGENET_DIR = "imagenet"


def read_classnames_file(spec: DatasetSpec, root: Path) -> dict[str, str]:
    """The "wnid name" lines of `classnames.txt`, from the dataset's folder or else from `<root>/imagenet/`.

    Returns:
        {wnid: class name}, in the file's order.
    """
    candidates = [Path(root) / spec.dataset_dir / "classnames.txt", Path(root) / IMAGENET_DIR / "classnames.txt"]
    for path in candidates:
        if path.is_file():
            names = {}
            for line in read_text(path, "class list").splitlines():
                parts = line.strip().split(" ")
                if parts and parts[0]:
                    names[parts[0]] = " ".join(parts[1:])
            if not names:
                raise FastPromptError(f"The class list '{path}' lists no class; write one 'wnid class name' per line.")
            return names
    raise FastPromptError(
        f"Expected ImageNet's class list '{candidates[0]}' (lines 'wnid class name'); {spec.name} needs it "
        f"(or '{candidates[1]}')."
    )


def _sorted_entries(folder: Path, directories: bool) -> list[str]:
    if not folder.is_dir():
        raise FastPromptError(f"Expected the image folder '{folder}'; check --root, docs/data.md shows the layout.")
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and e.is_dir() == directories]
    return sorted(names)


def _class_folder_items(split_root: Path, folders: list[str], labels: list[int], names: list[str], image_root: Path):
    items = []
    guard = FolderGuard(image_root, f"the image folder '{image_root}'")
    for folder, label, classname in zip(folders, labels, names, strict=True):
        class_dir = split_root / folder
        for filename in _sorted_entries(class_dir, directories=False):
            key = (class_dir / filename).relative_to(image_root).as_posix()
            items.append(Item(key=key, path=guard.path(key), label=label, classname=classname))
    return items


def _classname(names: dict[str, str], folder: str, spec: DatasetSpec) -> str:
    if folder not in names:
        raise FastPromptError(f"Class folder '{folder}' of {spec.name} is not listed in ImageNet's classnames.txt.")
    return names[folder]


def read_imagenet(spec: DatasetSpec, root: Path) -> Dataset:
    """ImageNet: `images/train/<wnid>/` for training, `images/val/<wnid>/` as the test split (no validation split).

    Labels are the positions of the sorted class folders of `images/train`.
    """
    names = read_classnames_file(spec, root)
    images = image_folder(spec, root)
    folders = _sorted_entries(images / "train", directories=True)
    classnames = [_classname(names, folder, spec) for folder in folders]
    labels = list(range(len(folders)))
    train = _class_folder_items(images / "train", folders, labels, classnames, images)
    test = _class_folder_items(images / "val", folders, labels, classnames, images)
    return Dataset(spec.name, classnames, train, [], test, dict(spec.templates), images, fewshot_val=spec.fewshot_val)


def read_imagenet_v2(spec: DatasetSpec, root: Path) -> Dataset:
    """ImageNetV2 (matched frequency): folders `0`..`999` named by label, in classnames.txt's order; 1000-way."""
    dataset_folder(spec, root)
    names = read_classnames_file(spec, root)
    images = image_folder(spec, root)
    classnames = list(names.values())
    labels = list(range(len(classnames)))
    test = _class_folder_items(images, [str(label) for label in labels], labels, classnames, images)
    return Dataset(spec.name, classnames, [], [], test, dict(spec.templates), images, fewshot_val=False)


def read_imagenet_wnid_folders(spec: DatasetSpec, root: Path) -> Dataset:
    """ImageNet-Sketch, -A and -R: one folder per wnid; labels over the sorted folder names.

    Sketch has all 1000 classes (1000-way); A and R have 200, labelled 0..199 (200-way), as in the reference.
    """
    dataset_folder(spec, root)
    names = read_classnames_file(spec, root)
    images = image_folder(spec, root)
    folders = _sorted_entries(images, directories=True)
    classnames = [_classname(names, folder, spec) for folder in folders]
    labels = list(range(len(folders)))
    test = _class_folder_items(images, folders, labels, classnames, images)
    return Dataset(spec.name, classnames, [], [], test, dict(spec.templates), images, fewshot_val=False)
