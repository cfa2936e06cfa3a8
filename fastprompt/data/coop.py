"""Readers for the CoOp folder layout: a dataset folder with its image folder and a `split_zhou_<Name>.json` split
file (PROTOCOL.md section 5), and FGVCAircraft's variant files.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from fastprompt.data.items import Dataset, Item, classnames_from_items
from fastprompt.errors import FastPromptError

if TYPE_CHECKING:
    from fastprompt.data.registry import DatasetSpec

SPLITS = ("train", "val", "test")


def dataset_folder(spec: DatasetSpec, root: Path) -> Path:
    """The dataset's folder under the data root, checked to exist.

    Raises:
        FastPromptError: the root or the dataset folder is missing (the message names the path expected).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FastPromptError(
            f"Data root '{root}' does not exist; pass with --root the folder that holds '{spec.dataset_dir}/'."
        )
    folder = root / spec.dataset_dir
    if not folder.is_dir():
        raise FastPromptError(
            f"Expected {spec.name} at '{folder}' (the folder '{spec.dataset_dir}' under the data root); check --root, "
            f"docs/data.md shows the layout."
        )
    return folder


def image_folder(spec: DatasetSpec, root: Path) -> Path:
    """The folder that the split file's paths are relative to."""
    folder = dataset_folder(spec, root)
    return folder / spec.image_dir if spec.image_dir not in ("", ".") else folder


def normalise_key(relative_path: str) -> str:
    """A split file's relative path as an item key: forward slashes, no leading "./"."""
    return PurePosixPath(relative_path.replace("\\", "/")).as_posix().removeprefix("./")


def read_split_file(path: Path, image_root: Path) -> dict[str, list[Item]]:
    """Read a `split_zhou_<Name>.json` file: {"train"|"val"|"test": [[relative_path, label, classname], ...]}.

    Raises:
        FastPromptError: the file is missing, is not JSON, or its entries are not [path, label, classname].
    """
    if not path.is_file():
        raise FastPromptError(f"Expected the split file '{path}'; check --root or copy the CoOp split file there.")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FastPromptError(f"Could not read the split file '{path}' as JSON ({error}).") from None
    if not isinstance(content, dict) or not all(split in content for split in SPLITS):
        raise FastPromptError(f"The split file '{path}' must hold the lists 'train', 'val' and 'test'.")
    splits: dict[str, list[Item]] = {}
    for split in SPLITS:
        items = []
        for entry in content[split]:
            if not (isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[1], int)):
                raise FastPromptError(
                    f"Entry {entry!r} of '{split}' in '{path}' is not [relative_path, label, classname]."
                )
            key = normalise_key(str(entry[0]))
            items.append(Item(key=key, path=image_root / key, label=int(entry[1]), classname=str(entry[2])))
        splits[split] = items
    return splits


def read_coop_dataset(spec: DatasetSpec, root: Path) -> Dataset:
    """Read a dataset in the CoOp layout: `<root>/<dataset_dir>/<split_file>` with paths under `<image_dir>`."""
    images = image_folder(spec, root)
    split_path = dataset_folder(spec, root) / spec.split_file
    splits = read_split_file(split_path, images)
    classnames = classnames_from_items(splits["train"], splits["val"], splits["test"], source=str(split_path))
    return Dataset(
        name=spec.name,
        classnames=classnames,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        templates=dict(spec.templates),
        image_root=images,
        fewshot_val=spec.fewshot_val,
    )


def read_fgvc_aircraft(spec: DatasetSpec, root: Path) -> Dataset:
    """FGVCAircraft: class names from `variants.txt`, splits from `images_variant_{train,val,test}.txt`.

    Each split line is "image_id variant name"; the image is `images/<image_id>.jpg` (CoOp's reader).
    """
    folder = dataset_folder(spec, root)
    images = image_folder(spec, root)
    variants_path = folder / "variants.txt"
    if not variants_path.is_file():
        raise FastPromptError(f"Expected the class list '{variants_path}' (one variant per line); check --root.")
    raw_names = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(raw_names)}
    splits: dict[str, list[Item]] = {}
    for split in SPLITS:
        split_path = folder / f"images_variant_{split}.txt"
        if not split_path.is_file():
            raise FastPromptError(f"Expected the split file '{split_path}'; check --root.")
        items = []
        for line in split_path.read_text().splitlines():
            parts = line.strip().split(" ")
            if len(parts) < 2:
                continue
            variant = " ".join(parts[1:])
            if variant not in label_of:
                raise FastPromptError(f"Variant '{variant}' of '{split_path}' is not listed in '{variants_path}'.")
            key = f"{parts[0]}.jpg"
            items.append(Item(key=key, path=images / key, label=label_of[variant], classname=variant))
        splits[split] = items
    return Dataset(
        name=spec.name,
        classnames=[name.replace("_", " ") for name in raw_names],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        templates=dict(spec.templates),
        image_root=images,
        fewshot_val=spec.fewshot_val,
    )
