"""Zero-shot CLIP: class weights from templates (single or ensembled, PROTOCOL.md section 3) and accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError
from fastprompt.prompt import clean_classname


@torch.no_grad()
def zero_shot_weights(clip, classnames: list[str], templates: str | list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised zero-shot class weights (K, E).

    Each template's text features are L2-normalised, averaged over templates and normalised again (with one
    template this is just the normalised text feature).

    Args:
        clip: a `fastprompt.Clip`.
        classnames: K class names (`_` becomes a space).
        templates: one template or a list, each with one `{}` for the class name.
    """
    if isinstance(templates, str):
        templates = [templates]
    if not templates:
        raise FastPromptError("No templates given; pass at least one, e.g. 'a photo of a {}.'.")
    if not classnames:
        raise FastPromptError("The class list is empty; give at least one class name.")
    names = [clean_classname(name) for name in classnames]
    device = next(clip.model.parameters()).device
    total = None
    for template in templates:
        if "{}" not in template:
            raise FastPromptError(f"Template '{template}' has no '{{}}' where the class name goes.")
        texts = [template.format(name) for name in names]
        features = []
        for start in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(texts[start : start + batch_size]).to(device)
            features.append(clip.model.encode_text(tokens).float())
        features = F.normalize(torch.cat(features), dim=-1)
        total = features if total is None else total + features
    return F.normalize(total / len(templates), dim=-1)


def classify(image_features: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Predicted labels (N,) for image features (N, D) (normalised here) against normalised weights (K, D)."""
    return (F.normalize(image_features.float(), dim=-1) @ class_weights.float().T).argmax(dim=-1)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> tuple[float, list]:
    """Top-1 accuracy in percent and per-class accuracies (percent; NaN for a class without test images)."""
    predictions, labels = predictions.cpu(), labels.cpu()
    overall = 100.0 * float((predictions == labels).float().mean()) if labels.numel() else float("nan")
    num_classes = num_classes or int(labels.max()) + 1
    correct = torch.zeros(num_classes).index_add_(0, labels, (predictions == labels).float())
    counts = torch.bincount(labels, minlength=num_classes).float()
    per_class = torch.where(counts > 0, 100.0 * correct / counts.clamp(min=1), torch.tensor(float("nan")))
    return overall, per_class.tolist()


def zero_shot_accuracy(
    image_features: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor
) -> tuple[float, list]:
    """Zero-shot accuracy (percent) and per-class accuracies of features (N, D) with labels (N,)."""
    return accuracy(classify(image_features, class_weights), labels, class_weights.shape[0])
