"""What a cache holds, decided before any image is read: the items of each split, the few-shot subsets, the shards.

The plan is a pure function of the dataset, the few-shot subsets and the options, never of the number of processes:
shards are fixed runs of consecutive items of one split, so 1 process and N processes write the same shards, and an
interrupted run can resume shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from fastprompt.data.fewshot import sample_fewshot
from fastprompt.data.items import Dataset, Item
from fastprompt.errors import FastPromptError, brief

SPLIT_ORDER = ("test", "val", "train")
DTYPES = {"fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}
TAR_OVERHEAD_BYTES = 3 * 1024  # three tar headers and their padding per sample


@dataclass(frozen=True)
class CacheOptions:
    """What to extract and how to store it.

    Attributes:
        shots: few-shot sizes K whose subsets go into the cache (empty: none).
        seeds: seeds of the few-shot subsets.
        views: V, augmented views per training image (each training image also gets its centre view, apart).
        full_train: store the whole training (and validation) split instead of the few-shot union.
        dtype: stored feature dtype, "float16" or "float32".
        shard_size: samples per shard ("1000") or a byte bound ("64MB", "512KB", "1GB").
        augmentation_seed: mixed into every view's generator.
        exif_transpose: decode images upright by their EXIF orientation (off: as the reference, which ignores it).
    """

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    views: int = 16
    full_train: bool = False
    dtype: str = "float16"
    shard_size: str = "1000"
    augmentation_seed: int = 0
    exif_transpose: bool = False

    def __post_init__(self) -> None:
        if self.views < 1:
            raise FastPromptError(f"--views must be at least 1, got {self.views}.")
        if self.dtype not in DTYPES:
            raise FastPromptError(f"Unknown --dtype {brief(self.dtype)}; use fp16 or fp32.")
        object.__setattr__(self, "dtype", DTYPES[self.dtype])
        parse_shard_size(self.shard_size)


@dataclass(frozen=True)
class ShardPlan:
    """One shard: items [start, stop) of `split`."""

    name: str
    split: str
    start: int
    stop: int


@dataclass
class CachePlan:
    """The items of each split, their number of views, the few-shot key lists and the shards.

    `views[split]` counts the views stored in a sample's `.npy` (V augmented views for train, the one test view for
    val and test); `center[split]` says whether a sample also stores its centre view (the test transform) apart, which
    the training images do so that the linear probe and un-augmented training have one plain feature per image.
    """

    splits: dict[str, list[Item]]
    views: dict[str, int]
    center: dict[str, bool]
    fewshot: dict[str, dict[str, list[str]]]
    shards: list[ShardPlan] = field(default_factory=list)

    def encoded_views(self, split: str) -> int:
        """Image-tower passes per image of `split`: its stored views plus the centre view where it has one."""
        return self.views[split] + int(self.center[split])

    def shard_items(self, shard: ShardPlan) -> list[Item]:
        return self.splits[shard.split][shard.start : shard.stop]

    def digest(self) -> dict[str, str]:
        """sha256 per split over (key, label) of its items: identifies the data in the progress record."""
        digests = {}
        for split, items in self.splits.items():
            content = json.dumps([[item.key, item.label] for item in items]).encode()
            digests[split] = hashlib.sha256(content).hexdigest()
        return digests


def parse_shard_size(value: str | int) -> tuple[str, int]:
    """("samples", n) for "1000", ("bytes", n) for "64MB" / "512KB" / "1GB".

    Raises:
        FastPromptError: anything else.
    """
    text = str(value).strip().upper().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(KB|MB|GB|K|M|G)?", text)
    if not match or float(match.group(1)) <= 0:
        raise FastPromptError(f"--shard-size {brief(value)} is neither a number of samples (1000) nor a size (64MB).")
    if match.group(2) is None:
        return "samples", int(float(match.group(1)))
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)[0]]
    return "bytes", int(float(match.group(1)) * unit)


def samples_per_shard(shard_size: str, views: int, feature_dim: int, itemsize: int) -> int:
    """How many samples (images) a shard of one split holds."""
    kind, amount = parse_shard_size(shard_size)
    if kind == "samples":
        return max(1, amount)
    return max(1, amount // (views * feature_dim * itemsize + TAR_OVERHEAD_BYTES))


def fewshot_subsets(dataset: Dataset, shots: tuple[int, ...], seeds: tuple[int, ...]) -> dict[str, tuple]:
    """Draw every (shots, seed) subset as the reference does: {"K-S": (train items, val items)}."""
    if not dataset.train:
        return {}
    return {
        f"{k}-{seed}": sample_fewshot(dataset.train, dataset.val, k, seed, sample_val=dataset.fewshot_val)
        for k in shots
        for seed in seeds
    }


def _union(subsets: list[list[Item]]) -> list[Item]:
    seen: dict[str, Item] = {}
    for subset in subsets:
        for item in subset:
            seen.setdefault(item.key, item)
    return list(seen.values())


def make_plan(
    dataset: Dataset,
    subsets: dict[str, tuple[list[Item], list[Item]]],
    options: CacheOptions,
    feature_dim: int,
) -> CachePlan:
    """Decide the cache's contents.

    Args:
        dataset: the dataset read from disk.
        subsets: {"K-S": (train items, val items)} from `fewshot_subsets` or the pkl importer.
        options: the cache options.
        feature_dim: D, the image tower's output width (for byte-bounded shards).

    Returns:
        train = union of the few-shot training subsets (or the full split), V augmented views and the centre view
        each; val = union of the few-shot validation subsets (or the full split), 1 view; test = the whole test split,
        1 view (the val and test views are the test transform, the same as the training images' centre view).
    """
    if options.full_train:
        train, val = list(dataset.train), list(dataset.val)
    else:
        train = _union([pair[0] for pair in subsets.values()])
        val = _union([pair[1] for pair in subsets.values()])
    plan = CachePlan(
        splits={"test": list(dataset.test), "val": val, "train": train},
        views={"test": 1, "val": 1, "train": options.views},
        center={"test": False, "val": False, "train": True},
        fewshot={
            name: {"train": [item.key for item in pair[0]], "val": [item.key for item in pair[1]]}
            for name, pair in subsets.items()
        },
    )
    itemsize = 2 if options.dtype == "float16" else 4
    for split in SPLIT_ORDER:
        count = len(plan.splits[split])
        step = samples_per_shard(options.shard_size, plan.encoded_views(split), feature_dim, itemsize)
        for index, start in enumerate(range(0, count, step)):
            plan.shards.append(ShardPlan(f"{split}-{index:05d}.tar", split, start, min(start + step, count)))
    return plan
