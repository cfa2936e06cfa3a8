"""Zero-shot classification with a (testbed) CLIP: cosine of normalised image and text features, argmax.

Self-contained on purpose (model + tokenizer + uint8 images in, accuracy out), so that pretraining can measure its
checkpoint without a feature cache, and the shipped checkpoint's numbers can be re-measured in a test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# open_clip's OPENAI_DATASET_MEAN/STD, the preprocessing every fastprompt config declares.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, scaled to [0, 1] and normalised with CLIP's mean and std."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def image_features(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Normalised image features (N, embed_dim) of uint8 images (N, H, W, 3)."""
    dtype = next(model.parameters()).dtype
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start : start + batch_size]).to(dtype)
        chunks.append(model.encode_image(pixels).float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def text_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot weights (K, embed_dim): per class, each template's normalised features, averaged, normalised again."""
    per_template = []
    for template in templates:
        tokens = tokenizer([template.format(name) for name in classnames])
        per_template.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)


def zero_shot_accuracy(
    model,
    tokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}.",),
) -> float:
    """Top-1 zero-shot accuracy in percent.

    Args:
        model: an open_clip CLIP (any precision; evaluated as it is, so call `.eval()` first).
        tokenizer: its tokenizer.
        images: (N, H, W, 3) uint8 at the model's image size.
        labels: (N,) int labels indexing `classnames`.
        classnames: the K class names.
        templates: prompt templates with one "{}"; several are ensembled.

    Returns:
        Accuracy in percent (0-100).
    """
    weights = text_classifier(model, tokenizer, classnames, templates)
    predictions = (image_features(model, images) @ weights.T).argmax(dim=-1).numpy()
    return float(100.0 * np.mean(predictions == np.asarray(labels)))
