"""fastprompt against OpenAI's own CLIP code (the `clip` package of clip-anytorch): an independent oracle.

Both sides hold the same random weights: OpenAI's `CLIP` with its own initialisation (and random batch-norm
statistics), every value rounded to fp16 as OpenAI's released weights are, compared in fp32. fastprompt loads them
through the `openai` pretrained tag (open_clip's download replaced by the local file), the way `fastprompt cache
--model RN50 --pretrained openai` does, so these tests also pin that the tag builds the QuickGELU network OpenAI trained
(PROTOCOL.md section 6b): built with nn.GELU instead, the text features differ by about 1.5e-2 and the ViT's image
features by about 7e-3 (relative), against an fp32 tolerance of 1e-5. RN50 and ViT-B/16 are the paper's backbones
with a ResNet and a transformer image tower.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close
from PIL import Image

from fastprompt.cache.extract import ImageEncoder
from fastprompt.clip import Clip, load_clip
from fastprompt.data.transforms import ViewTransform
from fastprompt.encoder import PromptEncoder
from fastprompt.templates import ENSEMBLE_TEMPLATES
from fastprompt.zeroshot import zero_shot_weights

PREFIXES = {4: "a photo of a", 8: "a type of pet, a photo of a"}  # n_ctx -> a template of exactly n_ctx words


def import_openai_clip():
    """OpenAI's `clip` package; its `from pkg_resources import packaging` needs a shim where setuptools >= 81."""
    try:
        import pkg_resources  # noqa: F401

        shimmed = False
    except ImportError:
        import packaging.version

        shim = types.ModuleType("pkg_resources")
        shim.packaging = packaging
        sys.modules["pkg_resources"] = shim
        shimmed = True
    try:
        import clip
    finally:
        if shimmed:
            del sys.modules["pkg_resources"]  # the shim only serves this import
    return clip


# OpenAI's CLIP(...) arguments, as its build_model reads them from the released RN50 and ViT-B/16 weights
OPENAI_ARGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B-16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}


@dataclass
class Pair:
    """One architecture with the same weights on both sides."""

    name: str
    ours: Clip
    theirs: torch.nn.Module
    openai: types.ModuleType  # the `clip` package (tokenize, preprocessing)


def _random_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every batch norm random statistics and scales: at initialisation a ResNet's last norm of each block is
    zero (its residual branch silent) and the statistics are (0, 1), so most of the image tower would go untested."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.weight.copy_(torch.rand(size, generator=generator) * 0.5 + 0.25)
            module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


@torch.no_grad()
def _make_pair(name: str, openai_clip, folder: Path) -> Pair:
    torch.manual_seed(0)
    theirs = openai_clip.model.CLIP(*OPENAI_ARGS[name])  # OpenAI's random initialisation
    _random_batch_norms(theirs, torch.Generator().manual_seed(1))
    for value in theirs.state_dict().values():  # fp16-representable, as OpenAI's released weights are
        value.copy_(value.half().float())
    theirs.eval()
    path = folder / f"{name}-random.pt"
    torch.save({key: value.half() for key, value in theirs.state_dict().items()}, path)
    with pytest.MonkeyPatch.context() as patch:  # the tag without the network: open_clip "downloads" the local file
        patch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kwargs: str(path))
        ours = load_clip(name, "openai")
    return Pair(name, ours, theirs, openai_clip)


@pytest.fixture(scope="module")
def openai_clip():
    return import_openai_clip()


@pytest.fixture(scope="module")
def rn50(openai_clip, tmp_path_factory) -> Pair:
    return _make_pair("RN50", openai_clip, Path(tmp_path_factory.mktemp("rn50")))


@pytest.fixture(scope="module")
def vit_b16(openai_clip, tmp_path_factory) -> Pair:
    return _make_pair("ViT-B-16", openai_clip, Path(tmp_path_factory.mktemp("vit_b16")))


@pytest.fixture(scope="module")
def classnames(clip_prompts) -> list[str]:
    pets, cars = clip_prompts["OxfordPets"]["classnames"], clip_prompts["StanfordCars"]["classnames"]
    return [pets[0], pets[4], cars[0]]  # one, two and six words: suffixes of three lengths


def _images() -> list[Image.Image]:
    """Two non-square RGB images with structure at several scales (a gradient, a disc, noise)."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((257, 311), (300, 240)):
        y, x = np.mgrid[0:height, 0:width]
        disc = ((y - height / 2) ** 2 + (x - width / 3) ** 2 < (min(height, width) / 4) ** 2) * 120.0
        gradient = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
        pixels = gradient + disc[..., None] + rng.normal(0, 20, (height, width, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))
    return images


@pytest.fixture(scope="module")
def openai_text(rn50, classnames) -> dict[str, torch.Tensor]:
    """OpenAI's encode_text of every prompt the text tests need, in one batch: {text: (E,) feature}."""
    templates = ["a photo of a {}.", *ENSEMBLE_TEMPLATES, *(f"{prefix} {{}}." for prefix in PREFIXES.values())]
    texts = sorted({template.format(name) for template in templates for name in classnames})
    with torch.no_grad():
        features = rn50.theirs.encode_text(rn50.openai.tokenize(texts)).float()
    return dict(zip(texts, features, strict=True))


@pytest.mark.parametrize("name", ["rn50", "vit_b16"])
def test_openai_tag_builds_the_quick_gelu_network(request, name):
    pair = request.getfixturevalue(name)
    architecture = pair.ours.architecture
    assert architecture["quick_gelu"] and architecture["text_activation"] == "quick_gelu"
    assert architecture["image_activation"] == (None if pair.name == "RN50" else "quick_gelu")  # ResNet: no GELU
    assert "tag 'openai'" in architecture["rule"]


@pytest.mark.parametrize("name", ["rn50", "vit_b16"])
def test_image_features_equal_openai(request, name):
    pair = request.getfixturevalue(name)
    transform = ViewTransform.from_preprocess_cfg(pair.ours.preprocess_cfg)
    preprocess = pair.openai.clip._transform(pair.theirs.visual.input_resolution)
    images = _images()
    pixels = torch.stack([transform.test_view(image) for image in images])  # the view `fastprompt cache` stores
    expected_pixels = torch.stack([preprocess(image) for image in images])
    assert_close(pixels, expected_pixels, what=f"{pair.name} test view pixels")
    features = ImageEncoder(pair.ours, "cpu", "fp32")(pixels)
    with torch.no_grad():
        expected = pair.theirs.encode_image(expected_pixels).float()
    assert_close(features, expected, what=f"{pair.name} image features")


# The text tests run on RN50 only: ViT-B/16's text tower is the same network (12 layers, width 512, 8 heads).
@pytest.mark.parametrize("ensemble", [False, True], ids=["single", "ensemble"])
def test_zero_shot_weights_equal_openai(rn50, classnames, openai_text, ensemble):
    templates = list(ENSEMBLE_TEMPLATES) if ensemble else ["a photo of a {}."]
    classnames = classnames[::2] if ensemble else classnames  # two names keep the seven templates' cost down
    weights = zero_shot_weights(rn50.ours, classnames, templates)
    per_template = [
        F.normalize(torch.stack([openai_text[template.format(name)] for name in classnames]), dim=-1)
        for template in templates
    ]
    expected = F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)  # PROTOCOL.md section 3
    assert_close(weights, expected, what=f"RN50 zero-shot weights ({len(templates)} templates)")


@pytest.mark.parametrize("n_ctx", sorted(PREFIXES))
def test_prompt_encoder_paths_equal_openai(rn50, classnames, openai_text, n_ctx):
    prefix = PREFIXES[n_ctx]  # as many words as context vectors: the learned context starts as real text
    encoder = PromptEncoder(rn50.ours, classnames, n_ctx=n_ctx, prompt_prefix=prefix)
    assert encoder.layout.n_placeholders == 0
    ctx = encoder.initial_context("template")[None]  # (1, n_ctx, W)
    expected = torch.stack([openai_text[f"{prefix} {name}."] for name in encoder.classnames])
    for path in ("reference", "truncated", "shared_prefix"):
        with torch.no_grad():
            features = getattr(encoder, path)(ctx)[0]
        assert_close(features, expected, what=f"RN50 PromptEncoder.{path} n_ctx={n_ctx}")
