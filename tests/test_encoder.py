"""PromptEncoder: the shared-prefix and truncated paths equal the plain path and open_clip's own encode_text."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder, plan_buckets
from fastprompt.errors import FastPromptError
from fastprompt.templates import template_prefix


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return load_clip("RN50")  # random weights; its text tower is the real 12 x 512 one


def _context_of(clip, text: str) -> torch.Tensor:
    """Token embeddings of `text` (without start/end tokens) as a (1, n, W) context."""
    ids = clip.tokenizer.encode(text)
    return clip.model.token_embedding(torch.tensor(ids))[None].float()


@pytest.mark.parametrize("model", ["tiny", "rn50"])
@pytest.mark.parametrize("dataset", ["StanfordCars", "SUN397"])
def test_equals_open_clip_encode_text(request, clip_prompts, model, dataset):
    clip = request.getfixturevalue(model)
    names = clip_prompts[dataset]["classnames"]
    encoder = PromptEncoder(clip, names, n_ctx=4)
    assert encoder.path == "shared_prefix"
    features = encoder(_context_of(clip, "a photo of a"))[0]
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer([f"a photo of a {name}." for name in encoder.classnames]))
    assert_close(features, expected, what=f"{model} {dataset}")
    # The class-wise error matters too: a wrong class order would still pass a global norm on similar rows.
    cosine = torch.nn.functional.cosine_similarity(features, expected, dim=-1)
    assert cosine.min() > 1 - 1e-5


def _paths_agree(encoder: PromptEncoder, ctx: torch.Tensor, paths: list[str]) -> None:
    results = {}
    for path in ["reference", *paths]:
        leaf = ctx.clone().requires_grad_(True)
        features = getattr(encoder, path)(leaf)
        weights = torch.randn_like(features)  # a random cotangent exercises every output
        (grad,) = torch.autograd.grad((features * weights).sum(), leaf)
        results[path] = (features.detach(), grad, weights)
    for path in paths:
        # same cotangent for each path: recompute with the reference's weights
        leaf = ctx.clone().requires_grad_(True)
        features = getattr(encoder, path)(leaf)
        (grad,) = torch.autograd.grad((features * results["reference"][2]).sum(), leaf)
        assert_close(features, results["reference"][0], what=f"{path} output")
        assert_close(grad, results["reference"][1], what=f"{path} gradient")


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("prefix", [None, "a type of pet, a photo of a"])
def test_shared_prefix_and_truncated_match_reference(tiny, clip_prompts, p, prefix):
    names = clip_prompts["OxfordPets"]["classnames"]
    encoder = PromptEncoder(tiny, names, n_ctx=16, prompt_prefix=prefix)
    ctx = torch.randn(p, 16, encoder.width)
    _paths_agree(encoder, ctx, ["truncated", "shared_prefix"])


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("position", ["middle", "front"])
def test_truncated_matches_reference_for_other_positions(tiny, clip_prompts, p, position):
    names = clip_prompts["DescribableTextures"]["classnames"]
    encoder = PromptEncoder(tiny, names, n_ctx=8, position=position)
    assert encoder.path == "truncated"
    _paths_agree(encoder, torch.randn(p, 8, encoder.width), ["truncated"])


@pytest.mark.parametrize("p", [1, 3])
def test_class_specific_context(tiny, clip_prompts, p):
    names = clip_prompts["EuroSAT"]["classnames"]
    encoder = PromptEncoder(tiny, names, n_ctx=4, class_specific=True)
    assert encoder.path == "truncated"
    _paths_agree(encoder, torch.randn(p, len(names), 4, encoder.width), ["truncated"])


def test_rn50_paths_agree_with_gradient(rn50, clip_prompts):
    names = clip_prompts["OxfordPets"]["classnames"][:6]
    encoder = PromptEncoder(rn50, names, n_ctx=16, prompt_prefix="a type of pet, a photo of a")
    _paths_agree(encoder, torch.randn(2, 16, encoder.width) * 0.02, ["truncated", "shared_prefix"])


def test_class_subset_keeps_order(tiny, clip_prompts):
    names = clip_prompts["Food101"]["classnames"]
    encoder = PromptEncoder(tiny, names, n_ctx=16)
    ctx = torch.randn(2, 16, encoder.width)
    subset = torch.tensor([7, 3, 99, 0, 42])
    assert_close(encoder(ctx, subset), encoder.reference(ctx)[:, subset], what="class subset")


def test_prograd_initial_context_comma_template(tiny):
    prefix = template_prefix("a type of pet, a photo of a {}.")
    encoder = PromptEncoder(tiny, ["abyssinian", "great pyrenees"], n_ctx=16, prompt_prefix=prefix)
    ctx = encoder.initial_context("template")
    words = len(prefix.split())  # 8 words, 9 BPE tokens (the comma)
    assert encoder.layout.n_placeholders == 16 - words
    assert torch.count_nonzero(ctx[: 16 - words]) == 0
    template_ids = tiny.tokenizer.encode(prefix)
    assert len(template_ids) == words + 1
    expected = tiny.model.token_embedding(torch.tensor(template_ids[:words])).float()
    assert torch.equal(ctx[16 - words :], expected)
    # the leftover template token ("a") is fixed, at position 17, first token of the suffix
    assert encoder.fixed_suffix_tokens()[0].item() == template_ids[-1]
    assert tiny.tokenizer.decode([template_ids[-1]]).strip() == "a"


def test_prograd_initial_context_plain_template(tiny):
    prefix = template_prefix("a photo of a {}.")
    encoder = PromptEncoder(tiny, ["cat"], n_ctx=16, prompt_prefix=prefix)
    ctx = encoder.initial_context("template")
    assert torch.count_nonzero(ctx[:12]) == 0
    expected = tiny.model.token_embedding(torch.tensor(tiny.tokenizer.encode(prefix))).float()
    assert torch.equal(ctx[12:], expected)
    assert encoder.fixed_suffix_tokens().tolist() == [*tiny.tokenizer.encode("cat."), tiny.tokenizer.eot_token_id]


def test_template_context_reproduces_template_features(tiny):
    """With the template initialisation the encoder gives the zero-shot text feature of the X-padded prompt."""
    encoder = PromptEncoder(tiny, ["cat", "dog"], n_ctx=4, prompt_prefix="a photo of a")
    features = encoder(encoder.initial_context("template")[None])[0]
    with torch.no_grad():
        expected = tiny.model.encode_text(tiny.tokenizer(["a photo of a cat.", "a photo of a dog."]))
    assert_close(features, expected)


def test_random_context_is_coop_init(tiny):
    encoder = PromptEncoder(tiny, ["cat"], n_ctx=16)
    ctx = encoder.initial_context("random", torch.Generator().manual_seed(1))
    assert ctx.shape == (16, encoder.width)
    assert 0.015 < ctx.std().item() < 0.025


def test_non_causal_tower_uses_plain_path(clip_prompts):
    clip = load_clip("fastprompt-tiny")
    clip.model.attn_mask = None  # a bidirectional text tower: truncation and shared prefix would be wrong
    names = clip_prompts["EuroSAT"]["classnames"]
    encoder = PromptEncoder(clip, names, n_ctx=4)
    assert encoder.path == "reference"
    assert "not causal" in encoder.tower.fast_path_reason
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer([f"a photo of a {name}." for name in encoder.classnames]))
    assert_close(encoder(_context_of(clip, "a photo of a"))[0], expected)
    with pytest.raises(FastPromptError, match="fast paths"):
        encoder.shared_prefix(torch.randn(1, 4, encoder.width))


def test_last_token_pooling_tower_uses_plain_path():
    clip = load_clip("fastprompt-tiny")
    clip.model.text_pool_type = "last"  # SigLIP-style pooling
    encoder = PromptEncoder(clip, ["cat", "dog"], n_ctx=4)
    assert encoder.path == "reference"
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer(["a photo of a cat.", "a photo of a dog."]))
    assert_close(encoder(_context_of(clip, "a photo of a"))[0], expected)


def test_tower_without_token_embedding_is_refused(tiny):
    class HuggingFaceLike:
        model = torch.nn.Module()
        tokenizer = tiny.tokenizer

    HuggingFaceLike.model.text = torch.nn.Linear(2, 2)
    with pytest.raises(FastPromptError, match="no token embedding"):
        PromptEncoder(HuggingFaceLike, ["cat"])


def test_bad_input_messages(tiny):
    with pytest.raises(FastPromptError, match="class list is empty"):
        PromptEncoder(tiny, [])
    with pytest.raises(FastPromptError, match="number 1 is empty"):
        PromptEncoder(tiny, ["cat", "  "])
    long_name = " ".join(["supercalifragilistic"] * 20)
    with pytest.raises(FastPromptError, match=r"tokens long, \d+ more than the model's 77-token context") as info:
        PromptEncoder(tiny, ["cat", long_name], n_ctx=16)
    assert "supercalifragilistic" in str(info.value)
    encoder = PromptEncoder(tiny, ["cat", "dog"], n_ctx=16)
    with pytest.raises(FastPromptError, match=r"shape \(2, 8, 64\).*\(P, 16, 64\)"):
        encoder(torch.randn(2, 8, 64))
    with pytest.raises(FastPromptError, match="floating-point"):
        encoder(torch.zeros(1, 16, 64, dtype=torch.long))
    with pytest.raises(FastPromptError, match="8 words but the context holds only 4"):
        PromptEncoder(tiny, ["cat"], n_ctx=4, prompt_prefix="a type of pet, a photo of a")


def test_plan_buckets_minimises_padding():
    lengths = [3] * 30 + [4] * 5 + [9] * 2
    groups = plan_buckets(lengths, overhead_tokens=4)
    assert sorted(k for group in groups for k in group) == list(range(len(lengths)))
    assert len(groups) >= 2  # the two long suffixes do not pad the thirty short ones
    assert plan_buckets(lengths, overhead_tokens=10_000) == [list(range(len(lengths)))]
