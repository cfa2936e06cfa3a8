"""The runs that train nothing by gradient steps of the sweep: zero-shot CLIP, CLIP++ and CoOp's linear probe."""

from __future__ import annotations

import time

import torch

from fastprompt.templates import ensemble_templates
from fastprompt.train.config import RunConfig
from fastprompt.train.view import DatasetView, _select
from fastprompt.zeroshot import accuracy, zero_shot_weights


def _linear_probe_metrics(view: DatasetView, config: RunConfig, rows: torch.Tensor, labels: torch.Tensor) -> dict:
    """CoOp's lpclip (PROTOCOL.md section 6): one centre-view feature per training image (never the augmented views),
    not normalised; C searched on the few-shot validation images, or on the test images where the dataset has no
    validation split (ImageNet), as CoOp does there. `c_search_split` in the metrics says which.

    Raises:
        FastPromptError: the cache predates the training images' centre view (format 1): rebuild it.
    """
    from fastprompt.train.linear_probe import linear_probe

    cache = view.cache
    center = cache.center_features("train", "CoOp's linear probe")
    subset = cache.fewshot(config.shots, config.seed)
    val, test = cache.split("val"), cache.split("test")
    val_feats, val_labels = _select(
        val.center[subset.val_index], val.labels[subset.val_index], view.base, normalize=False
    )
    test_feats, test_labels = _select(test.center, test.labels, view.base, normalize=False)
    search_split = "val" if val_labels.numel() else "test"
    if search_split == "test":
        val_feats, val_labels = test_feats, test_labels
    result = linear_probe(
        center[rows.to(center.device)].float(),  # (n, D): one sample per training image
        labels.to(center.device),
        val_feats,
        val_labels,
        test_feats,
        test_labels,
        len(view.base_names),
        normalize=False,  # CoOp's probe fits the raw image-tower outputs
    )
    return {
        "accuracy": result.accuracy,
        "per_class_accuracy": result.per_class_accuracy,
        "best_c": result.best_c,
        "c_search_split": search_split,
        "predictions": result.predictions,
    }


def _baseline(config: RunConfig, view: DatasetView, clip, prograd_tpl: str, coop_tpl: str):
    """Zero-shot CLIP, CLIP++ and the linear probe: (metrics, timings, train keys, val keys)."""
    started = time.monotonic()
    rows, labels, train_keys, val_keys = view.subset(config.shots, config.seed)
    predictions: dict = {}
    if config.declaration.kind == "probe":
        metrics = _linear_probe_metrics(view, config, rows, labels)
        if metrics.get("predictions") is not None:
            predictions = {"predictions": metrics.pop("predictions"), "labels": view.test_base[1]}
    else:
        ensemble = config.declaration.templates == "ensemble"
        templates = ensemble_templates(view.cache.dataset, coop_tpl) if ensemble else coop_tpl
        weights = zero_shot_weights(clip, view.base_names, templates)
        test_feats, test_labels = view.test_base
        base_predictions = (test_feats @ weights.T.to(test_feats.device)).argmax(-1)
        acc, per_class = accuracy(base_predictions, test_labels, len(view.base_names))
        metrics = {"accuracy": acc, "per_class_accuracy": per_class}
        predictions = {"predictions": base_predictions, "labels": test_labels}
        if view.new_names:
            new_weights = zero_shot_weights(clip, view.new_names, templates)
            new_feats, new_labels = view.test_new
            new_predictions = (new_feats @ new_weights.T.to(new_feats.device)).argmax(-1)
            new_acc, _ = accuracy(new_predictions, new_labels, len(view.new_names))
            predictions.update(new_predictions=new_predictions, new_labels=new_labels)
            harmonic = 2 * acc * new_acc / (acc + new_acc) if acc + new_acc > 0 else 0.0
            metrics.update(base_accuracy=acc, new_accuracy=new_acc, harmonic_mean=harmonic)
    timings = {"train_seconds": time.monotonic() - started, "steps": 0}
    return metrics, timings, train_keys, val_keys, predictions
