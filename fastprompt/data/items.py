"""The records every dataset reader produces: an `Item` per image and a `Dataset` holding the three splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastprompt.errors import FastPromptError


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
                    f"Label {item.label} is called both '{known}' and '{item.classname}' in {source}; "
                    f"each label needs one class name."
                )
    if not names:
        raise FastPromptError(f"{source} lists no images.")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(labels[-1] + 1)) - set(labels))[:5]
        raise FastPromptError(f"The labels of {source} must be 0..{labels[-1]} without gaps; none has label {missing}.")
    return [names[label] for label in labels]


def relative_key(path: Path, root: Path) -> str:
    """`path` relative to `root`, with forward slashes."""
    return path.relative_to(root).as_posix()
