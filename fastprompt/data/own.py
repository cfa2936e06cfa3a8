"""Readers for a user's own data: an image-folder tree (class = folder name) or a CSV/JSONL manifest."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from fastprompt.data.coop import SPLITS, normalise_key
from fastprompt.data.items import Dataset, FolderGuard, Item, classnames_from_items, path_text, read_text
from fastprompt.errors import FastPromptError, brief, one_line
from fastprompt.templates import DEFAULT_TEMPLATE

DEFAULT_TEMPLATES = {"prograd": DEFAULT_TEMPLATE, "coop": DEFAULT_TEMPLATE}


def _visible(folder: Path, directories: bool) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir() == directories)


def read_image_folder(root: Path, name: str | None = None, templates: dict[str, str] | None = None) -> Dataset:
    """Read `<root>/{train,val,test}/<class name>/<image>`; labels follow the sorted class folder names.

    Missing splits are empty (a folder with only `test/` makes an evaluation-only dataset). Keys are relative to
    `root` ("train/cat/001.jpg").

    Raises:
        FastPromptError: the root is missing or holds none of train/, val/, test/.
    """
    root = Path(root).expanduser()
    present = [split for split in SPLITS if (root / split).is_dir()]
    if not present:
        raise FastPromptError(
            f"Expected the folders '{root / 'train'}', '{root / 'val'}' and/or '{root / 'test'}' with one subfolder "
            f"per class; check --root."
        )
    classnames = sorted({folder for split in present for folder in _visible(root / split, directories=True)})
    label_of = {classname: label for label, classname in enumerate(classnames)}
    splits: dict[str, list[Item]] = {split: [] for split in SPLITS}
    guard = FolderGuard(root, f"the image folder '{root}'")
    for split in present:
        for classname in _visible(root / split, directories=True):
            class_dir = root / split / classname
            for filename in _visible(class_dir, directories=False):
                key = f"{split}/{classname}/{filename}"
                splits[split].append(Item(key, guard.path(key), label_of[classname], classname))
    return Dataset(
        name=name or root.name,
        classnames=classnames,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        templates=dict(templates or DEFAULT_TEMPLATES),
        image_root=root,
    )


def _manifest_rows(path: Path) -> list[dict]:
    text = read_text(path, "manifest")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as error:  # also a 5000-digit number, a list nested too deep
                detail = error.msg if isinstance(error, json.JSONDecodeError) else one_line(error)
                raise FastPromptError(f"Line {number} of '{path}' is not JSON ({detail}).") from None
            if not isinstance(row, dict):
                raise FastPromptError(
                    f"Line {number} of '{path}' is not a JSON object; write one object per line, like "
                    f'{{"path": "a.jpg", "label": 0, "split": "train"}}.'
                )
            rows.append(row)
        return rows
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as error:  # e.g. a field over the csv module's size limit
        raise FastPromptError(f"Could not read '{path}' as CSV ({one_line(error)}).") from None


def _label(value: object) -> int | None:
    """An integer label from JSON (an int, or a float such as 3.0) or from a CSV cell (text); None otherwise."""
    if type(value) is int:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def read_manifest(
    path: Path,
    root: Path | None = None,
    classnames_file: Path | None = None,
    name: str | None = None,
    templates: dict[str, str] | None = None,
) -> Dataset:
    """Read a CSV (with a header) or JSONL manifest with the fields path, label, split and optionally classname.

    Args:
        path: the manifest file (.csv, or .jsonl with one JSON object per line).
        root: the folder relative paths start from (default: the manifest's folder).
        classnames_file: one class name per line, in label order; needed when the manifest has no classname field.
        name: the dataset's name in the cache (default: the manifest's file name without suffix).
        templates: {"prograd", "coop"} templates (default "a photo of a {}.").

    Raises:
        FastPromptError: missing file or fields, a label that is not an integer, an unknown split, or no class names.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FastPromptError(f"Expected the manifest file '{path}' (CSV or JSONL with path,label,split columns).")
    base = Path(root).expanduser() if root else path.parent
    splits: dict[str, list[Item]] = {split: [] for split in SPLITS}
    names = _read_classnames(classnames_file) if classnames_file else None
    for number, row in enumerate(_manifest_rows(path), start=1):
        missing = [field for field in ("path", "label", "split") if field not in row]
        if missing:
            raise FastPromptError(f"Record {number} of '{path}' lacks the field(s) {', '.join(missing)}.")
        split = row["split"].strip() if isinstance(row["split"], str) else row["split"]
        if not isinstance(split, str) or split not in splits:
            raise FastPromptError(f"Record {number} of '{path}' has split {brief(split)}; use train, val or test.")
        label = _label(row["label"])
        if label is None:
            raise FastPromptError(f"Record {number} of '{path}' has label {brief(row['label'])}; labels are integers.")
        if names is not None and not 0 <= label < len(names):
            raise FastPromptError(
                f"Record {number} of '{path}' has label {label}; the class-names file has {len(names)}."
            )
        classname = names[label] if names is not None else row.get("classname")
        if not isinstance(classname, str) or not classname.strip():
            raise FastPromptError(
                f"Record {number} of '{path}' has no classname; add a classname field or pass a class-names file "
                f"(one name per line)."
            )
        key = normalise_key(path_text(row["path"], f"record {number} of '{path}'"))
        if key == ".":
            raise FastPromptError(f"Record {number} of '{path}' has the path {brief(row['path'])}, not a file's path.")
        image_path = Path(key) if Path(key).is_absolute() else base / key
        splits[split].append(Item(key=key, path=image_path, label=label, classname=classname))
    classnames = names or classnames_from_items(splits["train"], splits["val"], splits["test"], source=str(path))
    return Dataset(
        name=name or path.stem,
        classnames=classnames,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        templates=dict(templates or DEFAULT_TEMPLATES),
        image_root=base,
    )


def _read_classnames(path: Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FastPromptError(f"Expected the class-names file '{path}' (one class name per line, in label order).")
    return [line.strip() for line in read_text(path, "class-names file").splitlines() if line.strip()]
