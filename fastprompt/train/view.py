"""What a run sees of a cache in its setting: the classes, the training features, the few-shot subset (or the whole
training split), the test split of the setting's classes, and the cache's templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError


class DatasetView:
    """The classes, features and subsets a run sees in its setting (few-shot: all classes; base2new: base ones)."""

    def __init__(self, cache, clip, setting: str) -> None:
        from fastprompt.data.fewshot import split_base_new

        self.cache, self.clip, self.setting = cache, clip, setting
        self.memo: dict = {}  # per-view results computed once for several runs (zero-shot weights of the heads)
        names = cache.classnames
        all_labels = list(range(len(names)))
        self.base, self.new = split_base_new(len(names)) if setting == "base2new" else (all_labels, [])
        self.base_names = [names[i] for i in self.base]
        self.new_names = [names[i] for i in self.new]
        self.train = cache.split("train")
        test = cache.split("test")
        self.test_base = _select(test.features[:, 0], test.labels, self.base)
        self.test_new = _select(test.features[:, 0], test.labels, self.new) if self.new else None

    def train_center(self) -> torch.Tensor:
        """(N, 1, D): each training image's centre-crop view as the only view (training without augmentation).

        Raises:
            FastPromptError: the cache predates the centre view (format 1).
        """
        return self.cache.center_features("train", "training without augmentation")[:, None]

    def subset(self, shots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
        """Training rows and their labels in the setting's class space, plus the subset's keys (shots 0: the whole
        training split of a `--full-train` cache, its validation split as the validation images)."""
        subset = self.cache.fewshot(shots, seed) if shots else whole_split(self.cache)
        labels = self.train.labels[subset.train_index]
        mapping = torch.full((len(self.cache.classnames),), -1, dtype=torch.long, device=labels.device)
        mapping[torch.tensor(self.base, device=labels.device)] = torch.arange(len(self.base), device=labels.device)
        relabelled = mapping[labels]
        keep = relabelled >= 0
        return subset.train_index[keep].cpu(), relabelled[keep].cpu(), subset.train_keys, subset.val_keys


def whole_split(cache):
    """The whole training and validation splits as a subset (shots 0), for a cache made with --full-train.

    Raises:
        FastPromptError: the cache holds only few-shot subsets.
    """
    from fastprompt.cache.loader import FewShotSubset

    if not cache.manifest.get("full_train"):
        raise FastPromptError(
            f"Shots 0 trains on the whole training split, which the cache '{cache.path}' does not hold; build one "
            f"with `fastprompt cache --full-train`."
        )
    train, val = cache.split("train"), cache.split("val")
    device = train.labels.device
    return FewShotSubset(
        0, 0, torch.arange(len(train.keys), device=device), torch.arange(len(val.keys), device=device),
        list(train.keys), list(val.keys),
    )  # fmt: skip


def _select(features: torch.Tensor, labels: torch.Tensor, classes: list[int], normalize: bool = True):
    if not classes:
        return None
    mapping = torch.full((int(labels.max()) + 1 if labels.numel() else 1,), -1, dtype=torch.long, device=labels.device)
    chosen = torch.tensor([c for c in classes if c < mapping.numel()], dtype=torch.long, device=labels.device)
    mapping[chosen] = torch.arange(chosen.numel(), device=labels.device)
    relabelled = mapping[labels]
    keep = relabelled >= 0
    chosen_features = features[keep].float()
    return (F.normalize(chosen_features, dim=-1) if normalize else chosen_features), relabelled[keep]


def _templates(cache) -> tuple[str, str]:
    templates = cache.manifest.get("templates") or {}
    from fastprompt.templates import coop_template, prograd_template

    return templates.get("prograd") or prograd_template(cache.dataset), templates.get("coop") or coop_template(
        cache.dataset
    )
