"""Few-shot subsets exactly as the paper's toolkit (Dassl) draws them, and the base-to-new class split.

The procedure (PROTOCOL.md section 5): seed Python's `random` with the run seed; group the training items by label in
order of first appearance; for each label take `random.sample(items, K)`, or all items when the label has fewer than
K; then, with the same generator, draw the validation subset with min(K, 4) items per label.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from fastprompt.errors import FastPromptError

VAL_SHOTS_CAP = 4


class Labelled(Protocol):
    """Anything with an integer `label` (fastprompt's `Item`, the toolkit's `Datum`)."""

    label: int


T = TypeVar("T", bound=Labelled)


def group_by_label(items: Sequence[T]) -> dict[int, list[T]]:
    """Items per label, labels in order of first appearance, items in their original order."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def sample_per_label(items: Sequence[T], shots: int, rng: random.Random) -> list[T]:
    """The toolkit's `generate_fewshot_dataset` for one data source: `shots` items per label, drawn with `rng`.

    A label with fewer than `shots` items keeps all of them, in their order, and draws nothing from `rng`.
    """
    subset: list[T] = []
    for group in group_by_label(items).values():
        subset.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return subset


def sample_fewshot(
    train_items: Sequence[T],
    val_items: Sequence[T],
    shots: int,
    seed: int,
    sample_val: bool = True,
) -> tuple[list[T], list[T]]:
    """The few-shot training and validation subsets of one (shots, seed), as the reference draws them.

    Args:
        train_items: the full training split, in the split file's order.
        val_items: the full validation split, in its order.
        shots: K, images per class for training.
        seed: the run seed (1, 2, 3 in the paper).
        sample_val: draw the validation subset (min(K, 4) per class); False for ImageNet, where the reference draws
            none (the validation subset is then empty).

    Returns:
        (train subset, validation subset), each grouped by label in order of first appearance.

    Raises:
        FastPromptError: shots < 1.
    """
    if shots < 1:
        raise FastPromptError(f"The number of shots must be at least 1, got {shots}.")
    rng = random.Random(seed)
    train = sample_per_label(train_items, shots, rng)
    val = sample_per_label(val_items, min(shots, VAL_SHOTS_CAP), rng) if sample_val else []
    return train, val


def split_base_new(num_classes: int) -> tuple[list[int], list[int]]:
    """The base-to-new split: base = the first ceil(n / 2) labels, new = the rest.

    Returns:
        (base labels, new labels) in the original numbering; `relabel` maps each group to 0..m-1.
    """
    if num_classes < 2:
        raise FastPromptError(f"A base-to-new split needs at least 2 classes, got {num_classes}.")
    base_count = math.ceil(num_classes / 2)
    return list(range(base_count)), list(range(base_count, num_classes))


def relabel(labels: Sequence[int], selected: Sequence[int]) -> list[int]:
    """Keep the labels in `selected` and renumber them by their position there (other labels map to -1).

    Example: relabel([0, 5, 7], selected=[5, 6, 7]) == [-1, 0, 2].
    """
    position = {label: index for index, label in enumerate(selected)}
    return [position.get(label, -1) for label in labels]
