"""The records every dataset reader produces: an `Item` per image and a `Dataset` holding the three splits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fastprompt.errors import FastPromptError, brief


@dataclass(frozen=True)
class Item:
    """One image of a dataset.

    Attributes:
        key: the image's path relative to the dataset's image folder, with forward slashes (the split files' form);
            it identifies the image in a feature cache.
        path: where the image lies on this machine.
        label: the class index, 0-based.
        classname: the class name as the dataset writes it (underscores kept).
    """

    key: str
    path: Path
    label: int
    classname: str


@dataclass
class Dataset:
    """A dataset read from disk: its splits, class names and prompt templates.

    Attributes:
        name: the registered name ("OxfordPets") or the user's name for their own data.
        classnames: one name per label, in label order, underscores replaced by spaces (PROTOCOL.md section 2).
        train, val, test: the items of each split (val may be empty; evaluation-only datasets have only a test split).
        templates: {"prograd": ..., "coop": ...}.
        image_root: the folder the item keys are relative to.
        fewshot_val: whether few-shot validation subsets are drawn (CoOp draws none for ImageNet).
    """

    name: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    templates: dict[str, str]
    image_root: Path
    fewshot_val: bool = True
    splits: dict[str, list[Item]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.classnames = [clean_classname(name) for name in self.classnames]
        unnamed = [label for label, name in enumerate(self.classnames) if not name]
        if unnamed:  # a prompt without its class name cannot tell the class from the others
            raise FastPromptError(f"Class {unnamed[0]} of {self.name} has an empty name; give every class a name.")
        self.splits = {"train": self.train, "val": self.val, "test": self.test}


def clean_classname(name: str) -> str:
    """The class name as prompts use it: underscores become spaces."""
    return name.replace("_", " ").strip()


def classnames_from_items(*splits: list[Item], source: str) -> list[str]:
    """Class names in label order, as the items write them (`Dataset` replaces underscores).

    Raises:
        FastPromptError: the labels are not 0..n-1 or one label carries two names.
    """
    names: dict[int, str] = {}
    for items in splits:
        for item in items:
            known = names.setdefault(item.label, item.classname)
            if known != item.classname:
                raise FastPromptError(
                    f"Label {item.label} is called both {brief(known)} and {brief(item.classname)} in {source}; "
                    f"each label needs one class name."
                )
    if not names:
        raise FastPromptError(f"{source} lists no images.")
    labels = sorted(names)
    if labels[0] < 0:
        raise FastPromptError(f"{source} has the label {labels[0]}; labels count classes from 0.")
    if labels != list(range(len(labels))):
        first = range(min(labels[-1], len(labels) + 5))  # holds 5 missing labels if any; range(max) may be 10**30
        missing = [label for label in first if label not in names][:5]
        raise FastPromptError(f"The labels of {source} must be 0..{labels[-1]} without gaps; none has label {missing}.")
    return [names[label] for label in labels]


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`, a byte-order mark dropped.

    Raises:
        FastPromptError: the file is not UTF-8 text or cannot be read (the message names `what` and the path).
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise FastPromptError(
            f"The {what} '{path}' is not UTF-8 text (byte {error.start} is not); save it as UTF-8."
        ) from None
    except OSError as error:
        raise FastPromptError(f"Could not read the {what} '{path}' ({error.strerror or error}).") from None


def path_text(value: object, where: str) -> str:
    """A path as a data file lists it: a non-empty string without NUL characters (no file system takes those).

    Raises:
        FastPromptError: anything else (the message quotes the value and says `where` it is).
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise FastPromptError(f"The path {brief(value)} of {where} is not a file path; list image paths as text.")
    return value


def relative_key(path: Path, root: Path) -> str:
    """`path` relative to `root`, with forward slashes."""
    return path.relative_to(root).as_posix()


class FolderGuard:
    """Turns item keys into paths inside one dataset folder, refusing any key or link that leads out of it.

    The rule (docs/data.md, "Links"): the folder itself may be a link or lie under one (it is resolved first: that is
    where the user keeps the data); a key must be a relative path without `..`; and every file and folder inside
    must really lie inside, so a symbolic link is followed only when its target resolves inside the folder's real
    location. Nothing outside the folder is opened. Each distinct folder is resolved once and each file costs one
    `lstat`; a missing file passes here and is skipped by the decoder later, as before.

    Args:
        root: the folder the keys are relative to (a dataset's image folder, an image-folder root).
        source: what lists the keys, for messages ("the split file '...'").
    """

    def __init__(self, root: Path, source: str):
        self.root = Path(root)
        self.source = source
        self.real_root = os.path.realpath(self.root)
        self._inside_folders: set[str] = set()

    def path(self, key: str) -> Path:
        """`root / key`, checked.

        Raises:
            FastPromptError: the key is absolute or climbs with `..`, or a link on its way resolves outside `root`.
        """
        relative = PurePosixPath(key)
        if not relative.parts or relative.is_absolute() or ".." in relative.parts:
            raise FastPromptError(
                f"The path {brief(key)} in {self.source} leads outside the image folder '{self.root}'; list paths "
                f"relative to that folder, without '..'."
            )
        path = self.root / key
        folder = str(path.parent)
        if folder not in self._inside_folders:
            self._check_inside(path.parent)
            self._inside_folders.add(folder)
        if os.path.islink(path):
            self._check_inside(path)
        return path

    def _check_inside(self, path: Path) -> None:
        real = os.path.realpath(path)
        if os.path.commonpath([self.real_root, real]) != self.real_root:
            raise FastPromptError(
                f"'{path}' is a link to '{real}', outside the dataset folder '{self.root}'; fastprompt reads only "
                f"inside the folders it is given, so replace the link by the file or folder itself, or pass the "
                f"folder that holds the data."
            )
