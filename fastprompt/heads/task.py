"""What a cached-feature head receives (`HeadTask`), what it returns (`HeadResult`) and how it is declared (`HeadSpec`).

A head works on the frozen image features of one run only: no text tower, no encoder. The sweep builds the task from
the feature cache and the run's few-shot subset, calls ``HEADS[name].fit(task)`` and writes the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastprompt.errors import FastPromptError
from fastprompt.train.config import RunConfig


@dataclass
class HeadTask:
    """One run's data for a head (all tensors on the CPU or one device, fp32 features, int64 labels).

    Attributes:
        train_views: (n, V, D) raw (not normalised) features of the few-shot training images, V cached augmented views
            per image (RandomResizedCrop + flip).
        train_center: (n, D) centre-crop (test transform) feature of each training image, or None.
        train_labels: (n,) int64 in [0, K).
        val_features: (m, D) raw features of the few-shot validation images (test transform); m may be 0.
        val_labels: (m,) int64.
        test_features: (t, D) raw test features.
        test_labels: (t,) int64.
        text_weights: (K, D) L2-normalised zero-shot classifier (hand-crafted template), ProGrad's teacher.
        logit_scale: CLIP's exp(logit_scale) (100 for the released weights).
        config: the resolved run configuration (epochs, lr, batch_size, lam, momentum, weight_decay, warm-up).
        generator: seeded with ``config.seed``; the only source of randomness of a head.
    """

    train_views: torch.Tensor
    train_center: torch.Tensor | None
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    text_weights: torch.Tensor
    logit_scale: float
    config: RunConfig
    generator: torch.Generator

    @property
    def num_classes(self) -> int:
        return self.text_weights.shape[0]


@dataclass
class HeadResult:
    """What a head reports.

    Attributes:
        accuracy: test top-1 accuracy in percent.
        per_class_accuracy: test accuracy per class in percent (NaN for a class without test images).
        predictions: (t,) int64 test predictions.
        metrics: extra results to store (chosen alpha/beta/blend, the split they were searched on, ...).
        log: per-epoch records of a trained head: epoch, lr, loss, train_accuracy; with ``+prograd`` also cos_mean and
            conflict_fraction.
        state: the trained tensors (the caller saves them as safetensors).
    """

    accuracy: float
    per_class_accuracy: list
    predictions: torch.Tensor
    metrics: dict
    log: list[dict]
    state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class HeadSpec:
    """A head's declaration: how to fit it and the RunConfig values its paper or release uses.

    Attributes:
        fit: the head itself, ``HeadTask -> HeadResult``.
        defaults: RunConfig field values of the method (epochs, lr, batch_size, momentum, weight_decay, warm-up);
            a field left out keeps RunConfig's own default or rule (e.g. epochs by shots).
        needs_views: whether the method uses the cached augmented views of the training images.
        needs_val: whether it searches a hyper-parameter on the few-shot validation split (an empty one is an error).
        trained: whether it is trained by gradient steps (then it has a per-epoch log).
        prograd: whether it is the ``+prograd`` variant (ProGrad's projection against the zero-shot teacher).
        source: where the defaults come from.
        dataset_defaults: dataset name -> RunConfig values that override ``defaults`` on that dataset (the release's
            per-dataset configs).
    """

    fit: Callable[[HeadTask], HeadResult]
    defaults: dict
    needs_views: bool
    needs_val: bool
    trained: bool
    prograd: bool
    source: str
    dataset_defaults: dict[str, dict] = field(default_factory=dict)

    def defaults_for(self, dataset: str) -> dict:
        """``defaults`` with the dataset's overrides applied."""
        return {**self.defaults, **self.dataset_defaults.get(dataset, {})}


def check_task(task: HeadTask, *, needs_val: bool) -> None:
    """Check shapes, dtypes and labels of a task; raise FastPromptError with one sentence on the first problem."""
    views = task.train_views
    if not isinstance(views, torch.Tensor) or views.dim() != 3:
        raise FastPromptError(
            f"train_views must be an (n, V, D) tensor of image features, got shape {_shape(views)}; "
            "add a view axis of size 1 if there is one view per image."
        )
    n, num_views, dim = views.shape
    if n == 0 or num_views == 0:
        raise FastPromptError(f"train_views has shape {tuple(views.shape)}: a head needs at least one training view.")
    weights = task.text_weights
    if weights.dim() != 2 or weights.shape[1] != dim:
        raise FastPromptError(
            f"text_weights must be (K, {dim}) to match the image features, got shape {_shape(weights)}."
        )
    num_classes = weights.shape[0]
    _check_split("train", views[:, 0], task.train_labels, num_classes, dim)
    if task.train_center is not None and tuple(task.train_center.shape) != (n, dim):
        raise FastPromptError(f"train_center must be ({n}, {dim}) or None, got shape {_shape(task.train_center)}.")
    _check_split("val", task.val_features, task.val_labels, num_classes, dim, allow_empty=True)
    _check_split("test", task.test_features, task.test_labels, num_classes, dim)
    if needs_val and task.val_features.shape[0] == 0:
        raise FastPromptError(
            f"The validation split is empty, but {task.config.method} searches its hyper-parameters on it; "
            "give the run a few-shot validation split (or pass the split to search on as val_features explicitly)."
        )
    if not (task.logit_scale > 0 and torch.isfinite(torch.tensor(float(task.logit_scale)))):
        raise FastPromptError(f"logit_scale must be a positive number (got {task.logit_scale}).")


def _check_split(name: str, features, labels, num_classes: int, dim: int, allow_empty: bool = False) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != dim:
        raise FastPromptError(f"{name} features must be (N, {dim}), got shape {_shape(features)}.")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (features.shape[0],):
        raise FastPromptError(
            f"{name} labels must be ({features.shape[0]},) to match its features, got shape {_shape(labels)}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise FastPromptError(f"{name} labels must be integer class indices, got {labels.dtype}.")
    if features.shape[0] == 0:
        if allow_empty:
            return
        raise FastPromptError(f"The {name} split is empty; a head needs at least one {name} image.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise FastPromptError(
            f"{name} labels must lie in [0, {num_classes}) for the {num_classes} classes of text_weights, "
            f"got [{int(labels.min())}, {int(labels.max())}]."
        )


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
