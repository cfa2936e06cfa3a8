"""Runs of cached-feature heads (Tip-Adapter, GDA, CLAP, the cosine classifier, ...): one `HeadTask` per run from the
sweep's dataset view, the head's `fit`, and the run folder written like every other run's.

A head that cannot run on this cache (no augmented views, an empty validation split) is written as a failed run with
the head's one-sentence reason; the rest of the sweep goes on.
"""

from __future__ import annotations

import time

import torch

from fastprompt.errors import FastPromptError
from fastprompt.train.config import RunConfig
from fastprompt.zeroshot import zero_shot_weights


def head_task(config: RunConfig, view, clip, template: str):
    """The HeadTask of run `config`: its few-shot training views and centre features, its validation images, the test
    split (raw features; the setting's classes) and the zero-shot classifier of `template` (ProGrad's teacher)."""
    from fastprompt.heads.task import HeadTask
    from fastprompt.train.view import _select, whole_split

    cache = view.cache
    subset = cache.fewshot(config.shots, config.seed) if config.shots else whole_split(cache)
    rows, labels, _, _ = view.subset(config.shots, config.seed)
    train = view.train
    device = train.features.device
    rows = rows.to(device)
    center = train.center[rows].float() if train.center is not None else None
    val = cache.split("val")
    val_features, val_labels = _select(
        val.features[subset.val_index, 0], val.labels[subset.val_index], view.base, normalize=False
    )
    test = cache.split("test")
    test_features, test_labels = _select(test.features[:, 0], test.labels, view.base, normalize=False)
    key = ("zero-shot weights", template)
    if key not in view.memo:
        view.memo[key] = zero_shot_weights(clip, view.base_names, template).to(device)
    return HeadTask(
        train_views=train.features[rows].float(),
        train_center=center,
        train_labels=labels.to(device),
        val_features=val_features,
        val_labels=val_labels,
        test_features=test_features,
        test_labels=test_labels,
        text_weights=view.memo[key],
        logit_scale=float(clip.logit_scale),
        config=config,
        generator=torch.Generator().manual_seed(config.seed),
    )


def check_needs(config: RunConfig, view) -> None:
    """What the method's declaration says it needs from the cache (fastprompt/methods.py `needs`).

    Raises:
        FastPromptError: augmented views asked of a cache with one view per image; a validation search asked of a
            subset without validation images.
    """
    needs = config.declaration.needs
    views = view.train.features.shape[1]
    if "views" in needs and views < 2:
        raise FastPromptError(
            f"{config.declaration.display} needs augmented views of the training images, but the cache holds "
            f"{views} view per image; rebuild it with `fastprompt cache --views 16`."
        )
    if "val" in needs and config.shots and not len(view.cache.fewshot(config.shots, config.seed).val_keys):
        raise FastPromptError(
            f"{config.declaration.display} chooses its settings on the few-shot validation images, and the "
            f"{config.shots}-shot subset of seed {config.seed} has none; use a dataset with a validation split."
        )


def run_head(config: RunConfig, view, clip, template: str, writer) -> dict:
    """Fit head `config.method` for one run and write its folder; returns its result.json content."""
    from fastprompt.heads import HEADS

    started = time.monotonic()
    rows, _, train_keys, val_keys = view.subset(config.shots, config.seed)
    try:
        check_needs(config, view)
        task = head_task(config, view, clip, template)
        result = HEADS[config.method].fit(task)
    except FastPromptError as error:
        timings = {"train_seconds": time.monotonic() - started, "steps": 0}
        return writer.write(config, view.cache, {}, timings, train_keys, val_keys, status="failed",
                            reason=str(error), classes=view.base_names)  # fmt: skip
    metrics = {"accuracy": result.accuracy, "per_class_accuracy": result.per_class_accuracy, **result.metrics}
    timings = {"train_seconds": time.monotonic() - started, "epochs": len(result.log)}
    return writer.write(
        config,
        view.cache,
        metrics,
        timings,
        train_keys,
        val_keys,
        log=result.log or None,
        tensors=result.state or None,
        predictions={"predictions": result.predictions, "labels": task.test_labels},
        classes=view.base_names,
    )
