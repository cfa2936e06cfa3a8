"""Evaluating a trained context on other datasets: domain generalisation and cross-dataset transfer (PROTOCOL.md 5).

The context trained on the source (ImageNet in the paper) is scored on each target's cached test split in the
target's own prompt layout, as the reference does: it builds its prompt learner on the target dataset and loads the
learned context into token positions 1..M. So a template-initialised run (ProGrad, KD) is put into the target's
ProGrad prompt `"X " * (M - w) + target_prefix + " " + c + "."` (PROTOCOL.md section 2): the learned context fills
positions 1..M, and the target template's tokens after position M (the leftover "a" of the comma templates, "of" for
Food101) are the target's fixed tokens, never the source's. A randomly initialised run (CoOp) has no template: every
target gets `"X " * M + c + "."`. Domain generalisation targets (ImageNet V2, Sketch, A, R) share ImageNet's template,
so from an ImageNet source their layout is the source's.

A target's template is the one its cache records (manifest "templates", key "prograd"), else fastprompt.templates'
template for its dataset name, else "a photo of a {}.": the template a run trained on that dataset would start from.
A user's own dataset cached without templates therefore gets "a photo of a {}.". Targets must be caches made with the
same model and weights as the source.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.cache.network import check_cache_network
from fastprompt.errors import FastPromptError
from fastprompt.templates import coop_template, ensemble_templates, prograd_template, template_prefix
from fastprompt.zeroshot import accuracy, zero_shot_weights


def target_prefix(cache) -> str:
    """The words before the class name in `cache`'s ProGrad template (its manifest's, else its dataset's, else the
    default "a photo of a {}."): "a type of food, a photo of {}." -> "a type of food, a photo of".

    Raises:
        FastPromptError: the template does not end with "{}." (the class name must come last).
    """
    template = (cache.manifest.get("templates") or {}).get("prograd") or prograd_template(cache.dataset)
    try:
        return template_prefix(template)
    except FastPromptError as error:
        raise FastPromptError(f"Transfer target '{cache.path}' ({cache.dataset}): {error}") from None


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
            check_cache_network(target, clip)  # same weights can still be another network (QuickGELU vs GELU)
            test = target.split("test")
            features = F.normalize(test.features[:, 0].float(), dim=-1)
            self.targets.append((target, features, test.labels))
        self._encoders: dict[tuple, object] = {}

    def __bool__(self) -> bool:
        return bool(self.targets)

    def check(self, configs: list) -> None:
        """Refuse, before any training, a run whose context cannot be put into a target's prompt layout.

        Raises:
            FastPromptError: a target's template cannot give a prefix, or its prefix has more words than a
                template-initialised run has context vectors.
        """
        for config in configs:
            if not config.uses_prompt or config.class_specific or config.init != "template":
                continue
            for target, _, _ in self.targets:
                prefix = config.declaration.prompt_prefix or target_prefix(target)
                words = len(prefix.split())
                if words > config.n_ctx:
                    raise FastPromptError(
                        f"The transfer target {target.dataset} ('{target.path}') puts the context before its "
                        f"{words}-word template prefix '{prefix}', but run {config.run_id} has {config.n_ctx} context "
                        f"vectors; use --n-ctx {words} or more, or --init random."
                    )

    def prompt_accuracies(self, context: torch.Tensor, config) -> dict:
        """Accuracy (percent) of a shared context (M, W) on every target, in the target's layout: {dataset: accuracy}.

        Args:
            context: the trained context (M, W).
            config: the run's RunConfig (n_ctx, position, init: a "template" run takes each target's template).
        """
        from fastprompt.encoder import PromptEncoder

        scores = {}
        for target, features, labels in self.targets:
            own = config.declaration.prompt_prefix  # a method's fixed words (KgCoOp's) are its words on every target
            prefix = (own or target_prefix(target)) if config.init == "template" else None
            key = (target.dataset, config.n_ctx, config.position, prefix)
            if key not in self._encoders:
                self._encoders[key] = PromptEncoder(
                    self.clip, target.classnames, n_ctx=config.n_ctx, position=config.position, prompt_prefix=prefix
                )
            encoder = self._encoders[key]
            with torch.no_grad():
                weights = F.normalize(encoder(context[None].to(encoder.device))[0].float(), dim=-1)
            predictions = (features.to(weights.device) @ weights.T).argmax(dim=-1)
            scores[target.dataset] = accuracy(predictions, labels, len(target.classnames))[0]
        return scores

    def cocoop_accuracies(self, engine, index: int, config, prefix: str | None) -> dict:
        """Accuracy (percent) of CoCoOp run `index` of `engine` on every target: the learned context and meta-net
        with the target's class names, each test image conditioning its own context, as the release evaluates a
        CoCoOp prompt learner built on the target (its context words are the source's, `prefix`)."""
        from fastprompt.encoder import PromptEncoder

        scores = {}
        for target, features, labels in self.targets:
            key = ("cocoop", target.dataset, config.n_ctx, prefix)
            if key not in self._encoders:
                self._encoders[key] = PromptEncoder(self.clip, target.classnames, n_ctx=config.n_ctx,
                                                    prompt_prefix=prefix)  # fmt: skip
            scores[target.dataset] = engine.evaluate(index, features, labels, encoder=self._encoders[key])[0]
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
