"""Checks that a cache folder from elsewhere is one `fastprompt cache` could have written, before and while reading it.

A shard's checksum proves only that the shard is the one its manifest lists; a manifest made or edited by hand can
list a consistent but malformed cache. `FeatureCache` therefore refuses, with one sentence naming the file: a manifest
that is not JSON or lacks a field of docs/FORMATS.md or has one of the wrong type; a shard name that is not a plain
file name in the cache folder (absolute, with a separator or `..`) or a shard file that is a link leading out of the
folder; a sample whose features do not have the manifest's shape and dtype, whose label is not one of its classes, a
shard holding another number of samples than listed; and a few-shot key that no sample of its split holds. Nothing
outside the cache folder is opened (the weights a manifest names are loaded by the trainer, docs/models.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fastprompt.errors import FastPromptError

SPLITS = ("train", "val", "test")
DTYPES = ("float16", "float32")
REBUILD = "rebuild the cache with `fastprompt cache`"


def _is_count(value: object, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_manifest(path: Path) -> dict:
    """The manifest's JSON object.

    Raises:
        FastPromptError: the file is not UTF-8 JSON holding an object.
    """
    try:
        manifest = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FastPromptError(f"The cache manifest '{path}' is not JSON ({error}); {REBUILD}.") from None
    if not isinstance(manifest, dict):
        raise FastPromptError(f"The cache manifest '{path}' is not a JSON object; {REBUILD}.")
    return manifest


def check_manifest(manifest: dict, path: Path) -> None:
    """Check the fields that reading and training rely on (docs/FORMATS.md), for every readable format.

    Raises:
        FastPromptError: a field is missing or of the wrong type, a shard name is not a plain file name or is listed
            twice, or a split's count is not the sum of its shards' counts.
    """

    def refuse(problem: str) -> FastPromptError:
        return FastPromptError(f"The cache manifest '{path}' {problem}, so fastprompt did not write it so; {REBUILD}.")

    if not _is_count(manifest.get("feature_dim"), 1):
        raise refuse(f"has feature_dim {manifest.get('feature_dim')!r}, not a positive integer")
    if manifest.get("dtype") not in DTYPES:
        raise refuse(f"has dtype {manifest.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    if not _is_count(manifest.get("views"), 1):
        raise refuse(f"has views {manifest.get('views')!r}, not a positive integer")
    classnames = manifest.get("classnames")
    if not (isinstance(classnames, list) and classnames and all(isinstance(name, str) for name in classnames)):
        raise refuse("has no list of class names")
    if not isinstance(manifest.get("dataset"), str):
        raise refuse("has no dataset name")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(split), dict) for split in SPLITS):
        raise refuse("lacks the train, val and test entries of 'splits'")
    for split in SPLITS:
        info = splits[split]
        if not (_is_count(info.get("count")) and _is_count(info.get("views"), 1)):
            raise refuse(f"has split '{split}' without a count and a positive number of views")
        if not isinstance(info.get("center", False), bool):
            raise refuse(f"has split '{split}' with a 'center' that is not true or false")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise refuse("has no list of shards")
    names: set[str] = set()
    totals = dict.fromkeys(SPLITS, 0)
    for entry in shards:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise refuse(f"lists a shard {entry!r} without a name")
        name = entry["name"]
        if not is_plain_shard_name(name):
            raise refuse(f"lists the shard '{name}', which is not a plain .tar file name inside the cache folder")
        if name in names:
            raise refuse(f"lists the shard '{name}' twice")
        names.add(name)
        if entry.get("split") not in SPLITS or not _is_count(entry.get("count")):
            raise refuse(f"lists the shard '{name}' without a split (train, val or test) and a count")
        if not (_is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
            raise refuse(f"lists the shard '{name}' without its size in bytes and sha256")
        totals[entry["split"]] += entry["count"]
    for split in SPLITS:
        if totals[split] != splits[split]["count"]:
            raise refuse(f"counts {splits[split]['count']} {split} images but its {split} shards {totals[split]}")
    fewshot = manifest.get("fewshot")
    if not isinstance(fewshot, dict):
        raise refuse("has no 'fewshot' object")
    for name, subset in fewshot.items():
        parts = name.split("-")
        if not (len(parts) == 2 and all(part.isdigit() for part in parts)):
            raise refuse(f"has the few-shot entry '{name}', not '<shots>-<seed>'")
        if not isinstance(subset, dict) or any(
            not (isinstance(subset.get(part), list) and all(isinstance(key, str) for key in subset[part]))
            for part in ("train", "val")
        ):
            raise refuse(f"has the few-shot entry '{name}' without train and val key lists")


def is_plain_shard_name(name: str) -> bool:
    """A file name with no folder part, not hidden, ending in .tar (as `fastprompt cache` names its shards)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".tar")


def shard_path(cache_dir: Path, name: str) -> Path:
    """The shard `name` of the cache folder, checked to lie in it (a link to elsewhere is refused).

    Raises:
        FastPromptError: the shard file is a link whose target is not in the cache folder.
    """
    path = Path(cache_dir) / name
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(cache_dir):
        raise FastPromptError(
            f"The shard '{path}' is a link to '{real}', outside the cache folder '{cache_dir}'; fastprompt reads only "
            f"the cache folder it is given, so copy the shard into it or {REBUILD}."
        )
    return path


def check_sample(sample: tuple, shard: Path, manifest: dict, split: str, stored_center: bool) -> None:
    """Check one sample of `read_shard` against the manifest: features (views, D) and centre (D,) in its dtype, a label
    among its classes.

    Raises:
        FastPromptError: naming the shard, the sample's key and the disagreement.
    """
    key, label, features, center = sample
    views, dim, dtype = manifest["splits"][split]["views"], manifest["feature_dim"], np.dtype(manifest["dtype"])

    def refuse(problem: str) -> FastPromptError:
        return FastPromptError(
            f"The shard '{shard}' holds {problem} for '{key}', which disagrees with its manifest (the manifest and its "
            f"shards come from different caches, or one was altered): {REBUILD}."
        )

    if features.shape != (views, dim) or features.dtype != dtype:
        raise refuse(f"features of shape {features.shape} ({features.dtype}), not ({views}, {dim}) ({dtype})")
    if center is not None and (center.shape != (dim,) or center.dtype != dtype):
        raise refuse(f"a centre feature of shape {center.shape} ({center.dtype}), not ({dim},) ({dtype})")
    if center is not None and not stored_center:
        raise refuse(f"a centre feature its manifest's {split} split does not list")
    if not 0 <= label < len(manifest["classnames"]):
        raise refuse(f"the label {label}, not one of its {len(manifest['classnames'])} classes")


def check_fewshot_keys(manifest: dict, path: Path, keys: dict[str, set[str]]) -> None:
    """Every key of every few-shot subset is held by a sample of its split.

    Raises:
        FastPromptError: naming the subset and the first key that no sample holds.
    """
    for name, subset in manifest["fewshot"].items():
        for part in ("train", "val"):
            missing = [key for key in subset[part] if key not in keys[part]]
            if missing:
                raise FastPromptError(
                    f"The cache manifest '{path}' lists '{missing[0]}' in its {name} {part} subset, but no {part} "
                    f"shard holds that image; {REBUILD}."
                )
