"""Datasets: readers of the CoOp layout, ImageNet and a user's own data; the registry; few-shot subsets."""

from __future__ import annotations

from fastprompt.data.fewshot import sample_fewshot, split_base_new
from fastprompt.data.items import Dataset, Item
from fastprompt.data.registry import DatasetSpec, load_dataset, register_dataset, supported_datasets

__all__ = [
    "Dataset",
    "DatasetSpec",
    "Item",
    "load_dataset",
    "register_dataset",
    "sample_fewshot",
    "split_base_new",
    "supported_datasets",
]
