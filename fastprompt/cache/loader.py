"""`FeatureCache`: a cache folder loaded into memory once, on a chosen device (docs/FORMATS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastprompt.cache.records import FORMAT_VERSION, MANIFEST, READABLE_FORMATS
from fastprompt.cache.shards import read_shard, verify_shard
from fastprompt.cache.validate import check_fewshot_keys, check_manifest, check_sample, read_manifest, shard_path
from fastprompt.errors import FastPromptError

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class SplitFeatures:
    """One split's cached features.

    Attributes:
        features: (N, V, D) image-tower outputs (not normalised), stored dtype, on the cache's device: V augmented
            views per training image, the one test view (V = 1) per validation or test image.
        labels: (N,) int64, on the cache's device.
        keys: N image keys (paths relative to the dataset's image folder).
        center: (N, D) the centre view of each image (the test transform: short side resized, centre crop), same
            dtype and device: stored apart for training images, `features[:, 0]` for val and test. None for the
            training split of a format-1 cache, which did not store it (`FeatureCache.center_features` says so).
    """

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    center: torch.Tensor | None = None


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
        FastPromptError: no manifest, an unknown format version, a shard missing or failing its checksum, a manifest
            or shard that `fastprompt cache` could not have written (fastprompt/cache/validate.py), or a cache that
            does not fit in the device's free memory.
    """

    def __init__(self, path: Path | str, device: str | torch.device = "cpu", verify: bool = True):
        self.path = Path(path)
        self.device = torch.device(device)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FastPromptError(
                f"'{self.path}' is not a feature cache (no {MANIFEST}); build one with `fastprompt cache`."
            )
        self.manifest: dict = read_manifest(manifest_path)
        if self.manifest.get("format_version") not in READABLE_FORMATS:
            readable = " and ".join(str(version) for version in READABLE_FORMATS)
            raise FastPromptError(
                f"'{self.path}' has cache format {self.manifest.get('format_version')}, this fastprompt reads "
                f"formats {readable}; rebuild the cache with `fastprompt cache`."
            )
        check_manifest(self.manifest, manifest_path)
        self._check_fits()
        self._splits = {name: self._load_split(name, verify) for name in ("train", "val", "test")}
        self._index = {name: first_positions(self._splits[name].keys) for name in ("train", "val")}
        check_fewshot_keys(self.manifest, manifest_path, {name: set(self._index[name]) for name in self._index})

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

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    def split(self, name: str) -> SplitFeatures:
        """The features (N, V, D), centre features (N, D), labels (N,) and keys of "train", "val" or "test"."""
        if name not in self._splits:
            raise FastPromptError(f"Unknown split '{name}'; a cache has train, val and test.")
        return self._splits[name]

    def center_features(self, name: str, purpose: str = "this") -> torch.Tensor:
        """The (N, D) centre-view features of a split (one test-transform feature per image).

        Args:
            name: "train", "val" or "test".
            purpose: what needs them, for the error message ("the linear probe").

        Raises:
            FastPromptError: the cache predates the centre view of training images (format 1): rebuild it.
        """
        center = self.split(name).center
        if center is None:
            raise FastPromptError(
                f"The cache '{self.path}' (format {self.format_version}) holds no centre-crop feature of its "
                f"{SPLIT_WORDS[name]} images, which {purpose} needs; rebuild it with `fastprompt cache` (format "
                f"{FORMAT_VERSION})."
            )
        return center

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
        dim = self.manifest["feature_dim"]
        needed = sum(  # the stored views, the centre view where stored apart, and the label
            split["count"] * ((split["views"] + int(split.get("center", False))) * dim * itemsize + 8)
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
        stored_center = bool(info.get("center", False))
        center = np.empty((count, dim), dtype=features.dtype) if stored_center else None
        labels = np.empty((count,), dtype=np.int64)
        keys: list[str] = []
        for entry in self.manifest["shards"]:
            if entry["split"] != name:
                continue
            path = shard_path(self.path, entry["name"])
            if verify:
                verify_shard(path, entry, self.path)
            samples = read_shard(path, split=name)
            if len(samples) != entry["count"]:
                raise FastPromptError(
                    f"The shard '{path}' holds {len(samples)} samples but the manifest of '{self.path}' lists "
                    f"{entry['count']}; rebuild the cache with `fastprompt cache`."
                )
            for sample in samples:
                check_sample(sample, path, self.manifest, name, stored_center)
                key, label, sample_features, sample_center = sample
                if center is not None:
                    if sample_center is None:
                        raise FastPromptError(
                            f"Shard '{entry['name']}' of the cache '{self.path}' lacks the centre view of '{key}'; "
                            f"rebuild the cache with `fastprompt cache`."
                        )
                    center[len(keys)] = sample_center
                features[len(keys)] = sample_features
                labels[len(keys)] = label
                keys.append(key)
        if len(keys) != count:
            raise FastPromptError(
                f"The cache '{self.path}' lists {count} {name} images but its shards hold {len(keys)}."
            )
        try:
            on_device = torch.from_numpy(features).to(self.device)
            if center is not None:
                center_on_device = torch.from_numpy(center).to(self.device)
            else:  # val and test: their one view is the test transform; a format-1 train split has none
                center_on_device = on_device[:, 0] if name != "train" else None
            return SplitFeatures(on_device, torch.from_numpy(labels).to(self.device), keys, center_on_device)
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
