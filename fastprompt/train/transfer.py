"""Evaluating a trained context on other datasets: domain generalisation and cross-dataset transfer (PROTOCOL.md 5).

The context trained on the source (ImageNet in the paper) is put in front of each target's class names and scored
on the target's cached test split. Targets must be caches made with the same model and weights as the source.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError
from fastprompt.templates import coop_template, ensemble_templates
from fastprompt.zeroshot import accuracy, zero_shot_weights


class TransferTargets:
    """The test splits of target caches, and the encoders that score a context on their class names.

    Args:
        targets: loaded FeatureCaches of the target datasets.
        source: the source FeatureCache (its model and weights must match the targets').
        clip: the Clip both were made with.
    """

    def __init__(self, targets: list, source, clip) -> None:
        weights = (source.manifest.get("model") or {}).get("weights_sha256")
        self.clip = clip
        self.targets = []
        for target in targets:
            theirs = (target.manifest.get("model") or {}).get("weights_sha256")
            if weights and theirs and theirs != weights:
                raise FastPromptError(
                    f"The target cache '{target.path}' was made with other weights than the source cache "
                    f"'{source.path}'; rebuild it with the same --model and --pretrained."
                )
            test = target.split("test")
            features = F.normalize(test.features[:, 0].float(), dim=-1)
            self.targets.append((target, features, test.labels))
        self._encoders: dict[tuple, object] = {}

    def __bool__(self) -> bool:
        return bool(self.targets)

    def prompt_accuracies(self, context: torch.Tensor, n_ctx: int, position: str, prefix: str | None) -> dict:
        """Accuracy (percent) of a shared context (M, W) on every target: {dataset: accuracy}."""
        from fastprompt.encoder import PromptEncoder

        scores = {}
        for target, features, labels in self.targets:
            key = (target.dataset, n_ctx, position, prefix)
            if key not in self._encoders:
                self._encoders[key] = PromptEncoder(
                    self.clip, target.classnames, n_ctx=n_ctx, position=position, prompt_prefix=prefix
                )
            encoder = self._encoders[key]
            with torch.no_grad():
                weights = F.normalize(encoder(context[None].to(encoder.device))[0].float(), dim=-1)
            predictions = (features.to(weights.device) @ weights.T).argmax(dim=-1)
            scores[target.dataset] = accuracy(predictions, labels, len(target.classnames))[0]
        return scores

    def zero_shot_accuracies(self, ensemble: bool) -> dict:
        """Zero-shot CLIP (each target's CoOp template) or CLIP++ accuracy on every target."""
        scores = {}
        for target, features, labels in self.targets:
            template = (target.manifest.get("templates") or {}).get("coop") or coop_template(target.dataset)
            templates = ensemble_templates(target.dataset, template) if ensemble else template
            weights = zero_shot_weights(self.clip, target.classnames, templates)
            predictions = (features.to(weights.device) @ weights.T).argmax(dim=-1)
            scores[target.dataset] = accuracy(predictions, labels, len(target.classnames))[0]
        return scores
