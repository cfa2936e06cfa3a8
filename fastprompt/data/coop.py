"""Readers for the CoOp folder layout: a dataset folder with its image folder and a `split_zhou_<Name>.json` split
file (PROTOCOL.md section 5), and FGVCAircraft's variant files.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from fastprompt.data.items import Dataset, FolderGuard, Item, classnames_from_items, path_text, read_text
from fastprompt.errors import FastPromptError, brief, one_line

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
    text = read_text(path, "split file")
    try:
        content = json.loads(text)
    except (ValueError, RecursionError) as error:  # also a 5000-digit number, a list nested 100000 deep
        raise FastPromptError(f"Could not read the split file '{path}' as JSON ({one_line(error)}).") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(split), list) for split in SPLITS):
        raise FastPromptError(f"The split file '{path}' must hold the lists 'train', 'val' and 'test'.")
    splits: dict[str, list[Item]] = {}
    guard = FolderGuard(image_root, f"the split file '{path}'")
    for split in SPLITS:
        items = []
        for entry in content[split]:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and type(entry[1]) is int  # not a bool, not a float
                and isinstance(entry[2], str)
            ):
                raise FastPromptError(
                    f"Entry {brief(entry)} of '{split}' in '{path}' is not [relative_path, label, classname]."
                )
            key = normalise_key(path_text(entry[0], f"'{split}' in '{path}'"))
            items.append(Item(key=key, path=guard.path(key), label=entry[1], classname=entry[2]))
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
    raw_names = [line.strip() for line in read_text(variants_path, "class list").splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(raw_names)}
    if len(label_of) != len(raw_names) or not raw_names:
        repeated = next((name for name in raw_names if raw_names.count(name) > 1), None)
        problem = f"lists {brief(repeated)} twice" if raw_names else "lists no variant"
        raise FastPromptError(f"The class list '{variants_path}' {problem}; list each variant once, one per line.")
    splits: dict[str, list[Item]] = {}
    for split in SPLITS:
        split_path = folder / f"images_variant_{split}.txt"
        if not split_path.is_file():
            raise FastPromptError(f"Expected the split file '{split_path}'; check --root.")
        items = []
        guard = FolderGuard(images, f"'{split_path}'")
        for line in read_text(split_path, "split file").splitlines():
            parts = line.strip().split(" ")
            if len(parts) < 2:
                continue
            variant = " ".join(parts[1:])
            if variant not in label_of:
                raise FastPromptError(f"Variant {brief(variant)} of '{split_path}' is not listed in '{variants_path}'.")
            key = path_text(f"{parts[0]}.jpg", f"'{split_path}'")
            items.append(Item(key=key, path=guard.path(key), label=label_of[variant], classname=variant))
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
