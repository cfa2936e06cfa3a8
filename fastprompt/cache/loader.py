"""`FeatureCache`: a cache folder loaded into memory once, on a chosen device (docs/FORMATS.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastprompt.cache.records import FORMAT_VERSION, MANIFEST
from fastprompt.cache.shards import read_shard, verify_shard
from fastprompt.errors import FastPromptError

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class SplitFeatures:
    """One split's cached features.

    Attributes:
        features: (N, V, D) image-tower outputs (not normalised), stored dtype, on the cache's device.
        labels: (N,) int64, on the cache's device.
        keys: N image keys (paths relative to the dataset's image folder).
    """

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


@dataclass(frozen=True)
class FewShotSubset:
    """One (shots, seed) subset: indices into split("train") and split("val") (int64, on the cache's device)."""

    shots: int
    seed: int
    train_index: torch.Tensor
    val_index: torch.Tensor
    train_keys: list[str]
    val_keys: list[str]


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: the driver's figure; CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class FeatureCache:
    """A feature cache loaded into memory.

    Args:
        path: the cache folder (holds manifest.json and the shards).
        device: where the features go ("cpu", "cuda", ...).
        verify: check every shard's sha256 before reading it.

    Raises:
        FastPromptError: no manifest, an unknown format version, a shard missing or failing its checksum, or a cache
            that does not fit in the device's free memory.
    """

    def __init__(self, path: Path | str, device: str | torch.device = "cpu", verify: bool = True):
        self.path = Path(path)
        self.device = torch.device(device)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FastPromptError(
                f"'{self.path}' is not a feature cache (no {MANIFEST}); build one with `fastprompt cache`."
            )
        self.manifest: dict = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise FastPromptError(
                f"'{self.path}' has cache format {self.manifest.get('format_version')}, this fastprompt reads "
                f"{FORMAT_VERSION}; rebuild the cache with `fastprompt cache`."
            )
        self._check_fits()
        self._splits = {name: self._load_split(name, verify) for name in ("train", "val", "test")}
        self._index = {name: first_positions(self._splits[name].keys) for name in ("train", "val")}

    @property
    def classnames(self) -> list[str]:
        return list(self.manifest["classnames"])

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    def split(self, name: str) -> SplitFeatures:
        """The features (N, V, D), labels (N,) and keys of "train", "val" or "test"."""
        if name not in self._splits:
            raise FastPromptError(f"Unknown split '{name}'; a cache has train, val and test.")
        return self._splits[name]

    def fewshot_settings(self) -> list[tuple[int, int]]:
        """The (shots, seed) pairs whose subsets the cache holds."""
        return [tuple(int(part) for part in name.split("-")) for name in self.manifest["fewshot"]]

    def fewshot(self, shots: int, seed: int) -> FewShotSubset:
        """The subset of (shots, seed) as indices into split("train") and split("val").

        Raises:
            FastPromptError: the cache does not hold that subset (the message lists those it holds).
        """
        name = f"{shots}-{seed}"
        if name not in self.manifest["fewshot"]:
            held = ", ".join(f"{k} shots seed {s}" for k, s in self.fewshot_settings()) or "none"
            raise FastPromptError(
                f"The cache '{self.path}' holds no {shots}-shot subset for seed {seed} (it holds: {held}); "
                f"rebuild it with --shots and --seeds that include them."
            )
        subset = self.manifest["fewshot"][name]
        indices = {}
        for part in ("train", "val"):
            positions = [self._index[part].get(key) for key in subset[part]]
            if None in positions:
                raise FastPromptError(f"The cache '{self.path}' lacks images of its {name} subset; rebuild it.")
            indices[part] = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return FewShotSubset(shots, seed, indices["train"], indices["val"], list(subset["train"]), list(subset["val"]))

    def _check_fits(self) -> None:
        itemsize = torch.tensor([], dtype=TORCH_DTYPES[self.manifest["dtype"]]).element_size()
        needed = sum(
            split["count"] * (split["views"] * self.manifest["feature_dim"] * itemsize + 8)
            for split in self.manifest["splits"].values()
        )
        available = available_memory_bytes(self.device)
        if available is not None and needed > available:
            raise FastPromptError(
                f"The cache '{self.path}' needs {needed / 2**30:.2f} GiB on {self.device} but only "
                f"{available / 2**30:.2f} GiB are free; load it on another device or cache fewer shots or views."
            )

    def _load_split(self, name: str, verify: bool) -> SplitFeatures:
        info = self.manifest["splits"][name]
        count, views, dim = info["count"], info["views"], self.manifest["feature_dim"]
        features = np.empty((count, views, dim), dtype=np.dtype(self.manifest["dtype"]))
        labels = np.empty((count,), dtype=np.int64)
        keys: list[str] = []
        for entry in self.manifest["shards"]:
            if entry["split"] != name:
                continue
            shard_path = self.path / entry["name"]
            if verify:
                verify_shard(shard_path, entry, self.path)
            for key, label, sample_features in read_shard(shard_path):
                if len(keys) == count:
                    raise FastPromptError(f"The cache '{self.path}' holds more {name} images than its manifest lists.")
                features[len(keys)] = sample_features
                labels[len(keys)] = label
                keys.append(key)
        if len(keys) != count:
            raise FastPromptError(
                f"The cache '{self.path}' lists {count} {name} images but its shards hold {len(keys)}."
            )
        try:
            return SplitFeatures(
                torch.from_numpy(features).to(self.device), torch.from_numpy(labels).to(self.device), keys
            )
        except torch.OutOfMemoryError:
            raise FastPromptError(
                f"The {name} split of '{self.path}' does not fit on {self.device}; load the cache on another device."
            ) from None


def first_positions(keys: list[str]) -> dict[str, int]:
    """{key: index of its first occurrence}."""
    positions: dict[str, int] = {}
    for index, key in enumerate(keys):
        positions.setdefault(key, index)
    return positions
