"""The pieces of the in-memory FeatureCache stand-ins that several test modules build (same interface as the real
cache's splits and few-shot subsets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """A split as `FeatureCache.split(name)` returns it: features (N, V, D), labels (N,), keys, centre view (N, D)."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str] = field(default_factory=list)
    center: torch.Tensor | None = None


@dataclass
class Subset:
    """A few-shot subset as `FeatureCache.fewshot(shots, seed)` returns it."""

    train_index: torch.Tensor
    val_index: torch.Tensor
    train_keys: list[str]
    val_keys: list[str]
