"""The dataset registry: each dataset's folder layout, reader and templates, and `load_dataset` by name.

The 11 few-shot datasets and the 4 ImageNet variants of the paper are registered here (PROTOCOL.md section 5);
`register_dataset` adds more (the offline testbed registers its generated datasets this way). Two names are not
registered datasets but readers of a user's own data: `imagefolder` and `manifest`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastprompt.data.coop import read_coop_dataset, read_fgvc_aircraft
from fastprompt.data.imagenet import read_imagenet, read_imagenet_v2, read_imagenet_wnid_folders
from fastprompt.data.items import Dataset
from fastprompt.data.own import read_image_folder, read_manifest
from fastprompt.errors import FastPromptError, brief
from fastprompt.templates import coop_template, prograd_template

OWN_DATA = ("imagefolder", "manifest")


@dataclass(frozen=True)
class DatasetSpec:
    """How a dataset lies on disk and how to read it.

    Attributes:
        name: the registered name ("OxfordPets"), also the cache's dataset name.
        dataset_dir: the dataset's folder under the data root ("oxford_pets").
        image_dir: the image folder inside `dataset_dir` that the split file's paths are relative to ("" for the
            dataset folder itself, as for StanfordCars).
        split_file: the split file's name inside `dataset_dir` ("split_zhou_OxfordPets.json").
        templates: {"prograd": ..., "coop": ...}.
        reader: a function (spec, data root) -> Dataset.
        fewshot_val: whether few-shot validation subsets are drawn.
    """

    name: str
    dataset_dir: str
    image_dir: str
    split_file: str
    templates: Mapping[str, str] = field(default_factory=dict)
    reader: Callable[[DatasetSpec, Path], Dataset] = read_coop_dataset
    fewshot_val: bool = True


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    dataset_dir: str,
    image_dir: str = "images",
    split_file: str | None = None,
    templates: Mapping[str, str] | None = None,
    reader: Callable[[DatasetSpec, Path], Dataset] | None = None,
    fewshot_val: bool = True,
    replace: bool = False,
) -> DatasetSpec:
    """Register a dataset so that `load_dataset(name, root)` and `fastprompt cache NAME` can read it.

    Args:
        name: the dataset's name.
        dataset_dir: its folder under the data root.
        image_dir: the folder inside `dataset_dir` that the split file's paths are relative to ("" = `dataset_dir`).
        split_file: the split file inside `dataset_dir` (default `split_zhou_<name>.json`).
        templates: {"prograd": ..., "coop": ...}; missing entries come from `fastprompt.templates` (which falls
            back to "a photo of a {}.").
        reader: (spec, root) -> Dataset; default: the CoOp split-file reader.
        fewshot_val: whether few-shot validation subsets are drawn.
        replace: allow replacing an existing registration.

    Returns:
        The registered spec.

    Raises:
        FastPromptError: the name is taken (and `replace` is False) or reserved for a user's own data.
    """
    if name in OWN_DATA:
        raise FastPromptError(f"'{name}' is reserved for a user's own data; register the dataset under another name.")
    if name in _REGISTRY and not replace:
        raise FastPromptError(f"Dataset '{name}' is already registered; pass replace=True to redefine it.")
    resolved = {"prograd": prograd_template(name), "coop": coop_template(name)}
    resolved.update(templates or {})
    spec = DatasetSpec(
        name=name,
        dataset_dir=dataset_dir,
        image_dir=image_dir,
        split_file=split_file or f"split_zhou_{name}.json",
        templates=resolved,
        reader=reader or read_coop_dataset,
        fewshot_val=fewshot_val,
    )
    _REGISTRY[name] = spec
    return spec


def supported_datasets() -> list[str]:
    """The registered dataset names, then the two readers of a user's own data."""
    return [*_REGISTRY, *OWN_DATA]


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered spec of `name`.

    Raises:
        FastPromptError: unknown name (the message lists the supported ones).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    import fastprompt.testbed  # noqa: F401  (registers the offline testbed's tasks)

    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.6)
    hint = f"Did you mean {close[0]}? " if close else ""
    raise FastPromptError(f"Unknown dataset {brief(name)}. {hint}Supported: {', '.join(supported_datasets())}.")


def load_dataset(
    name: str,
    root: Path | str | None,
    manifest: Path | str | None = None,
    classnames_file: Path | str | None = None,
    dataset_name: str | None = None,
) -> Dataset:
    """Read a dataset by name.

    Args:
        name: a registered name, `imagefolder` (root holds train/ val/ test/ with class folders) or `manifest`.
        root: the data root (registered datasets), the image-folder root, or the base of a manifest's relative paths.
        manifest: the CSV or JSONL manifest (for `manifest`).
        classnames_file: one class name per line in label order (for `manifest`).
        dataset_name: the name recorded in the cache for `imagefolder` and `manifest` (default: the folder or file).

    Returns:
        The dataset's splits, class names and templates.
    """
    if name == "imagefolder":
        if root is None:
            raise FastPromptError("The imagefolder dataset needs --root, the folder that holds train/ val/ test/.")
        return read_image_folder(Path(root), name=dataset_name)
    if name == "manifest":
        if manifest is None:
            raise FastPromptError("The manifest dataset needs --manifest, a CSV or JSONL file with path,label,split.")
        return read_manifest(Path(manifest), Path(root) if root else None, classnames_file, name=dataset_name)
    spec = get_dataset_spec(name)
    if root is None:
        raise FastPromptError(f"{name} needs --root, the folder that holds '{spec.dataset_dir}/'.")
    return spec.reader(spec, Path(root))


def _register_paper_datasets() -> None:
    """The paper's 11 few-shot datasets and 4 ImageNet variants, laid out as CoOp lays them out."""
    for name, dataset_dir, image_dir in (
        ("OxfordPets", "oxford_pets", "images"),
        ("Caltech101", "caltech-101", "101_ObjectCategories"),
        ("OxfordFlowers", "oxford_flowers", "jpg"),
        ("Food101", "food-101", "images"),
        ("StanfordCars", "stanford_cars", ""),
        ("SUN397", "sun397", "SUN397"),
        ("EuroSAT", "eurosat", "2750"),
        ("UCF101", "ucf101", "UCF-101-midframes"),
    ):
        register_dataset(name, dataset_dir, image_dir)
    register_dataset("DescribableTextures", "dtd", "images", split_file="split_zhou_DescribableTextures.json")
    register_dataset(
        "FGVCAircraft", "fgvc_aircraft", "images", split_file="images_variant_train.txt", reader=read_fgvc_aircraft
    )
    register_dataset(
        "ImageNet", "imagenet", "images", split_file="classnames.txt", reader=read_imagenet, fewshot_val=False
    )
    register_dataset(
        "ImageNetV2",
        "imagenetv2",
        "imagenetv2-matched-frequency-format-val",
        split_file="classnames.txt",
        reader=read_imagenet_v2,
        fewshot_val=False,
    )
    for name, dataset_dir, image_dir in (
        ("ImageNetSketch", "imagenet-sketch", "images"),
        ("ImageNetA", "imagenet-adversarial", "imagenet-a"),
        ("ImageNetR", "imagenet-rendition", "imagenet-r"),
    ):
        register_dataset(
            name,
            dataset_dir,
            image_dir,
            split_file="classnames.txt",
            reader=read_imagenet_wnid_folders,
            fewshot_val=False,
        )


_register_paper_datasets()
