"""The CLIP a cache was made with: rebuilt from the manifest's model record and checked against it (docs/models.md).

The weights' checksum identifies the weights, not the network: the same state dict runs as QuickGELU or GELU. So the
manifest also records the architecture as built (`Clip.architecture`), and everything that scores cached features
with a text tower (training on the cache, transfer to a target cache) checks that it builds that same network.
"""

from __future__ import annotations

import torch

from fastprompt.errors import FastPromptError

_ACTIVATIONS = {"quick_gelu": "QuickGELU", "gelu": "GELU", None: "no transformer"}


def load_cache_clip(cache, device: str = "cpu", quick_gelu: bool | None = None):
    """The Clip a cache was made with (model, weights and network from its manifest), checked against the cache.

    The network is rebuilt from the manifest's `architecture` record (QuickGELU or GELU; the weights' checksum cannot
    tell them apart). A cache from before that record is taken to hold features of open_clip's plain config (what
    fastprompt built then); that matters only where the image tower has the activation (ViTs, not ResNets).

    Args:
        cache: a `FeatureCache` (anything with `.manifest` and `.path`).
        device: where the model lives.
        quick_gelu: the network for a cache without an architecture record whose checkpoint does not say
            (`--quick-gelu/--no-quick-gelu`); must agree with the record where there is one.

    Raises:
        FastPromptError: the weights cannot be loaded or are not the ones the cache was made with, or the network
            built here is not the one the cache's features came from.
    """
    from fastprompt.clip import is_pretrained_tag, load_clip

    model = cache.manifest.get("model") or {}
    name, pretrained = model.get("name"), model.get("pretrained")
    if not name:
        raise FastPromptError(
            f"The cache '{cache.path}' does not record its model; rebuild it with `fastprompt cache`."
        )
    if pretrained in (None, "none"):
        torch.manual_seed(0)  # `fastprompt cache --pretrained none` seeds 0 too: the same random weights
        pretrained = None
    recorded = model.get("architecture") or None
    wanted = quick_gelu
    if recorded is not None:
        if quick_gelu is not None and quick_gelu != recorded.get("quick_gelu"):
            flag = "--quick-gelu" if quick_gelu else "--no-quick-gelu"
            raise FastPromptError(
                f"The cache '{cache.path}' was made with the {network_name(recorded)} network of {name}; drop "
                f"{flag}, or rebuild the cache with it."
            )
        wanted = None if is_pretrained_tag(name, pretrained) else recorded.get("quick_gelu")  # a tag decides itself
    clip = load_clip(name, pretrained, device=device, quick_gelu=wanted)
    expected = model.get("weights_sha256")
    if expected and clip.weights_checksum != expected:
        raise FastPromptError(
            f"The weights of {name} ({pretrained or 'random'}) loaded here differ from those the cache "
            f"'{cache.path}' was made with; point the cache at the same checkpoint or rebuild it."
        )
    check_cache_network(cache, clip)
    return clip


def check_cache_network(cache, clip) -> None:
    """Refuse a cache whose image features came from another network than `clip` (QuickGELU against GELU).

    Raises:
        FastPromptError: the recorded architecture differs from `clip.architecture`; or the cache predates the record
            and its image tower has an activation (a ViT) that differs from open_clip's plain config, which is what
            fastprompt built before the record existed.
    """
    from fastprompt.clip import ARCHITECTURE_KEYS, config_quick_gelu

    model = cache.manifest.get("model") or {}
    name = model.get("name") or clip.name
    recorded = model.get("architecture") or None
    built = clip.architecture
    if recorded is not None:
        if any(recorded.get(key) != built.get(key) for key in ARCHITECTURE_KEYS):
            raise FastPromptError(
                f"The cache '{cache.path}' was made with the {network_name(recorded)} network of {name}, but "
                f"{clip.pretrained or 'random weights'} builds the {network_name(built)} one here "
                f"({built.get('rule')}); rebuild the cache with `fastprompt cache`."
            )
    elif built.get("image_activation") in ("quick_gelu", "gelu"):
        assumed = "quick_gelu" if config_quick_gelu(name) else "gelu"
        if built["image_activation"] != assumed:
            raise FastPromptError(
                f"The cache '{cache.path}' predates fastprompt's record of the network, so its image features came "
                f"from open_clip's plain {name} ({_ACTIVATIONS[assumed]}), not the {network_name(built)} network "
                f"these weights were trained with ({built.get('rule')}); rebuild the cache with `fastprompt cache`."
            )


def network_name(architecture: dict) -> str:
    """'QuickGELU', or per tower where they differ ('GELU text / QuickGELU image')."""
    text, image = architecture.get("text_activation"), architecture.get("image_activation")
    if image is None or image == text:
        return _ACTIVATIONS.get(text, str(text))
    return f"{_ACTIVATIONS.get(text, str(text))} text / {_ACTIVATIONS.get(image, str(image))} image"
