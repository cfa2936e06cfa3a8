"""The testbed's realism, measured on the training and validation splits only (never on a test split).

For one written task and one checkpoint, `measure_properties` reports the four properties that make the testbed a
small copy of the paper's setting (docs/testbed.md):

1. zero-shot accuracy of the model on the task's training and validation images (the test transform: whole images),
   and its coarse part: how often the prediction names the right shape (the class name's last word), so that the
   errors can be told apart: a wrong fill with the right shape is a caption-vocabulary error, not an image one;
2. zero-shot accuracy on the augmented views the cache stores (the protocol's RandomResizedCrop + flip, the very
   views `fastprompt cache` makes, through its own transform and keys), and its ratio to (1) on the same images;
3. CoOp's linear probe at `shots` shots (C searched on the few-shot validation images), scored with zero-shot on the
   same held-out images: the training and validation images outside that seed's few-shot subsets;
4. the spurious cue: a nearest-class-mean classifier on the border pixels only (the background), fitted on the
   few-shot training images, scored on held-out training and validation images and on freshly generated images
   drawn as the test split is drawn (data seed `cue_seed`, not the test split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastprompt.testbed.datasets import TESTBED_DATASETS, generate_split
from fastprompt.testbed.zeroshot import text_classifier

BORDER = 4  # pixels of each image edge read by the background-only classifier: background in every v1 and v2 scene
CUE_SEED = 1234


@torch.no_grad()
def _encode(model, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Raw image-tower outputs (N, E) of normalised pixels (N, 3, H, W)."""
    return torch.cat(
        [model.encode_image(pixels[s : s + batch_size]).float() for s in range(0, len(pixels), batch_size)]
    )


def _accuracy(features: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, groups=None) -> float:
    """Top-1 accuracy in percent; with `groups` ((K,) int), a prediction counts when it is in the label's group."""
    predictions = (torch.nn.functional.normalize(features, dim=-1) @ weights.T).argmax(dim=-1)
    if groups is not None:
        predictions, labels = groups[predictions], groups[labels]
    return float(100.0 * (predictions == labels).float().mean())


def _border(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, F) float32: the pixels of a BORDER-wide frame around each image."""
    mask = np.zeros(images.shape[1:3], dtype=bool)
    mask[:BORDER], mask[-BORDER:], mask[:, :BORDER], mask[:, -BORDER:] = True, True, True, True
    return images[:, mask].reshape(len(images), -1).astype(np.float32)


def _nearest_mean(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, num_classes: int) -> np.ndarray:
    means = np.stack([train[train_labels == label].mean(axis=0) for label in range(num_classes)])
    return ((test[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)


def measure_properties(
    clip, root: str | Path, task_name: str, shots: int = 16, seeds=(1, 2, 3), views: int = 16, cue_seed: int = CUE_SEED
) -> dict:
    """The four properties of one written task (module docstring), in percent.

    Args:
        clip: the testbed CLIP (`load_testbed_clip`).
        root: the data root the task was written under (`fastprompt testbed build`).
        task_name: a testbed task.
        shots: K of the linear probe.
        seeds: few-shot seeds (the probe's figures are means over them).
        views: augmented views per training image, as a cache with `--views views` stores them.
        cue_seed: data seed of the generated test-distribution images for the cue's check.

    Returns:
        A flat dict of figures (see the keys), each accuracy in percent.
    """
    from fastprompt.data.fewshot import sample_fewshot
    from fastprompt.data.registry import load_dataset
    from fastprompt.data.transforms import ViewTransform, load_rgb
    from fastprompt.train.linear_probe import linear_probe

    task = TESTBED_DATASETS[task_name]
    dataset = load_dataset(task_name, root)
    model = clip.model
    weights = text_classifier(model, clip.tokenizer, task.classnames, [task.coop_template])
    transform = ViewTransform.from_preprocess_cfg(clip.preprocess_cfg)
    splits = {"train": dataset.train, "val": dataset.val}
    decoded = {name: [load_rgb(item.path) for item in items] for name, items in splits.items()}
    labels = {name: torch.tensor([item.label for item in items]) for name, items in splits.items()}
    whole = {
        name: _encode(model, torch.stack([transform.test_view(image) for image in images]))
        for name, images in decoded.items()
    }
    augmented = torch.stack(
        [
            transform.train_views(image, item.key, views)
            for image, item in zip(decoded["train"], splits["train"], strict=True)
        ]
    )
    augmented_features = _encode(model, augmented.flatten(0, 1)).view(len(augmented), views, -1)
    coarse_names = [name.split()[-1] for name in task.classnames]
    coarse = torch.tensor([sorted(set(coarse_names)).index(name) for name in coarse_names])
    result = {
        "zero_shot_train": _accuracy(whole["train"], weights, labels["train"]),
        "zero_shot_val": _accuracy(whole["val"], weights, labels["val"]),
        "zero_shot_train_val_coarse": _accuracy(
            torch.cat([whole["train"], whole["val"]]), weights, torch.cat([labels["train"], labels["val"]]), coarse
        ),
        "zero_shot_train_views": _accuracy(
            augmented_features.flatten(0, 1), weights, labels["train"].repeat_interleave(views)
        ),
        "views": views,
    }
    result["views_ratio"] = result["zero_shot_train_views"] / max(result["zero_shot_train"], 1e-9)

    num_classes = len(task.classnames)
    probe, zero_shot, cue_held_out = [], [], []
    border = {name: _border(np.stack([np.asarray(image) for image in images])) for name, images in decoded.items()}
    for seed in seeds:
        train_subset, val_subset = sample_fewshot(dataset.train, dataset.val, shots, seed)
        chosen = {"train": {item.key for item in train_subset}, "val": {item.key for item in val_subset}}
        fit = torch.tensor([item.key in chosen["train"] for item in splits["train"]])
        search = torch.tensor([item.key in chosen["val"] for item in splits["val"]])
        held_features = torch.cat([whole["train"][~fit], whole["val"][~search]])
        held_labels = torch.cat([labels["train"][~fit], labels["val"][~search]])
        outcome = linear_probe(
            whole["train"][fit],
            labels["train"][fit],
            whole["val"][search],
            labels["val"][search],
            held_features,
            held_labels,
            num_classes,
            normalize=False,
        )
        probe.append(outcome.accuracy)
        zero_shot.append(_accuracy(held_features, weights, held_labels))
        held_border = np.concatenate([border["train"][~fit.numpy()], border["val"][~search.numpy()]])
        guess = _nearest_mean(border["train"][fit.numpy()], labels["train"][fit].numpy(), held_border, num_classes)
        cue_held_out.append(100.0 * float(np.mean(guess == held_labels.numpy())))
        if seed == seeds[0]:
            generated, generated_labels = generate_split(task, "test", 50, seed=cue_seed)
            fitted = _nearest_mean(border["train"][fit.numpy()], labels["train"][fit].numpy(), _border(generated),
                                   num_classes)  # fmt: skip
            result["cue_test_distribution"] = 100.0 * float(np.mean(fitted == generated_labels))
    result.update(
        shots=shots,
        seeds=list(seeds),
        linear_probe_held_out=float(np.mean(probe)),
        zero_shot_held_out=float(np.mean(zero_shot)),
        cue_held_out=float(np.mean(cue_held_out)),
        chance=100.0 / num_classes,
    )
    return result
