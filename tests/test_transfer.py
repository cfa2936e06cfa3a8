"""Transfer to other datasets (--eval-caches): the trained context is scored in the TARGET's prompt layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_cache import Split as _Split
from fake_cache import Subset as _Subset
from safetensors.torch import load_file

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.errors import FastPromptError
from fastprompt.train.config import RunConfig, expand_sweep, resolve
from fastprompt.train.sweep import SweepOptions, run_sweep
from fastprompt.train.transfer import TransferTargets, target_prefix
from fastprompt.zeroshot import accuracy

PETS = ["abyssinian", "bengal", "boxer", "pug", "samoyed"]
PETS_PREFIX = "a type of pet, a photo of a"  # 9 BPE tokens for 8 words: "a" falls after position 16, fixed
FOOD = ["apple pie", "baby back ribs", "churros", "falafel", "ramen", "sushi"]
FOOD_PREFIX = "a type of food, a photo of"  # 8 BPE tokens for 7 words: "of" falls after position 16, fixed
TEXTURES = ["banded", "bubbly", "cracked", "dotted", "knitted", "striped", "woven"]
TEXTURES_PREFIX = "a texture of"  # no comma: every template token is context, nothing fixed after it


class FakeCache:
    """An in-memory stand-in for FeatureCache: random features, `per_class` training images of 1 view per class."""

    def __init__(self, dataset: str, classnames: list[str], seed: int, per_class: int = 4, templates=None) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.path, self.dataset, self.classnames = Path(dataset), dataset, list(classnames)
        self.manifest = {"model": {"name": "fastprompt-tiny"}, "views": 1, "templates": templates or {}}
        labels = torch.arange(len(classnames) * per_class) % len(classnames)
        self._splits = {
            "train": _Split(torch.randn(labels.numel(), 1, 64, generator=generator), labels),
            "test": _Split(torch.randn(60, 1, 64, generator=generator), torch.zeros(60, dtype=torch.long)),
        }

    def split(self, name: str) -> _Split:
        return self._splits[name]

    def fewshot(self, shots: int, seed: int) -> _Subset:
        labels = self._splits["train"].labels
        chosen = torch.cat([(labels == c).nonzero()[:shots, 0] for c in range(len(self.classnames))])
        return _Subset(chosen, torch.arange(0), [f"t{i}" for i in chosen.tolist()], [])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


def _weights(clip, classnames: list[str], prefix: str | None, context: torch.Tensor) -> torch.Tensor:
    encoder = PromptEncoder(clip, classnames, n_ctx=context.shape[0], prompt_prefix=prefix)
    with torch.no_grad():
        return F.normalize(encoder(context[None])[0].float(), dim=-1)


def _accuracy(clip, target: FakeCache, prefix: str | None, context: torch.Tensor) -> float:
    test = target.split("test")
    scores = F.normalize(test.features[:, 0], dim=-1) @ _weights(clip, target.classnames, prefix, context).T
    return accuracy(scores.argmax(-1), test.labels, len(target.classnames))[0]


def test_transfer_uses_the_target_template_layout(tiny, tmp_path):
    source = FakeCache("OxfordPets", PETS, seed=1)
    food = FakeCache("Food101", FOOD, seed=2)
    textures = FakeCache("DescribableTextures", TEXTURES, seed=3)
    # Label each target's test images by the classes the (barely trained: one warm-up epoch) ProGrad context gives
    # them in the target's layout: that layout scores about 100 %, the source's layout measurably less.
    start = PromptEncoder(tiny, PETS, prompt_prefix=PETS_PREFIX).initial_context("template")
    for target, prefix in ((food, FOOD_PREFIX), (textures, TEXTURES_PREFIX)):
        test = target.split("test")
        test.labels = (test.features[:, 0] @ _weights(tiny, target.classnames, prefix, start).T).argmax(-1)
    configs = expand_sweep({"method": ["coop", "prograd"]}, {"dataset": "OxfordPets", "epochs": 1, "shots": 2})
    records = run_sweep(source, tiny, configs, tmp_path, SweepOptions(progress=False, targets=[food, textures]))
    assert len(records) == 2
    for record in records:
        context = load_file(tmp_path / record["run_id"] / "prompt.safetensors")["ctx"]
        if record["method"] == "coop":  # random initialisation, no template: all 16 positions are context everywhere
            for target in (food, textures):
                assert record["targets"][target.dataset] == pytest.approx(_accuracy(tiny, target, None, context))
            continue
        for target, prefix in ((food, FOOD_PREFIX), (textures, TEXTURES_PREFIX)):
            expected = _accuracy(tiny, target, prefix, context)
            source_layout = _accuracy(tiny, target, PETS_PREFIX, context)  # the source's leftover "a" after the ctx
            assert expected > 90.0 and source_layout < expected - 5.0, (target.dataset, expected, source_layout)
            assert record["targets"][target.dataset] == pytest.approx(expected), target.dataset


def test_target_templates_and_their_fallback(tiny):
    assert target_prefix(FakeCache("Food101", FOOD, seed=0)) == FOOD_PREFIX  # by dataset name
    own = {"prograd": "a blurry photo of a {}.", "coop": "a photo of a {}."}
    assert target_prefix(FakeCache("Food101", FOOD, seed=0, templates=own)) == "a blurry photo of a"  # the manifest's
    assert target_prefix(FakeCache("MyPhotos", FOOD, seed=0)) == "a photo of a"  # none known: the default template
    with pytest.raises(FastPromptError, match="MyBirds"):
        target_prefix(FakeCache("MyBirds", FOOD, seed=0, templates={"prograd": "a photo of a {}, a type of bird."}))

    # A template the context cannot hold is refused before training (4 vectors, Food101's 7-word prefix).
    imagenet = FakeCache("ImageNet", PETS, seed=0)
    targets = TransferTargets([FakeCache("Food101", FOOD, seed=0)], imagenet, tiny)
    short = resolve(RunConfig(method="prograd", dataset="ImageNet", shots=1, n_ctx=4))
    with pytest.raises(FastPromptError, match="--n-ctx 7 or more"):
        targets.check([short])
    targets.check([resolve(RunConfig(method="coop", dataset="ImageNet", shots=1, n_ctx=4))])  # no template: fine
