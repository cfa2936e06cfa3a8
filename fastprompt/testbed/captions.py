"""Captions for the generated world: varied templates that mention the shape and some of the other attributes.

Every caption names the shape; colour, size, background and position are each mentioned only some of the time, in
random order of phrasing ("a photo of a small red circle", "a green star on a striped background", "a triangle").
Like web alt-text, this teaches the text tower words for every attribute without making any one phrasing special.

In world v2 a shape is solid or hollow, and the captions say so only rarely (`MENTION_FILL`), with one of two words
each: like the fine-grained names of real few-shot tasks (an aircraft variant, a flower species), that web captions
mostly leave out, the fill is plain in every image and seldom in the text.
"""

from __future__ import annotations

import numpy as np

from fastprompt.testbed.world import (
    BACKGROUND_COLOUR_NAMES,
    FILLS,
    SHAPE_COLOUR_NAMES,
    SHAPES,
    SIZES,
    TEXTURES,
    Scenes,
    position_word,
)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a {}.",
    "a {}",
    "there is a {}.",
    "a photo of the {}.",
    "this is a {}.",
    "a bad photo of a {}.",
)
# How often each optional attribute is mentioned.
MENTION_COLOUR = 0.5
MENTION_SIZE = 0.35
MENTION_BACKGROUND = 0.3
MENTION_POSITION = 0.1
# World v2's fine-grained attribute: rare in the captions, so that zero-shot CLIP knows it only roughly.
MENTION_FILL = 0.08
FILL_WORDS = {"solid": ("solid", "filled"), "hollow": ("hollow", "outlined")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium",), "large": ("large", "big")}
TEXTURE_WORDS = {
    "striped": "striped",
    "dotted": "dotted",
    "checkered": "checkered",
    "grid": "grid",
    "wavy": "wavy",
}


def _background_phrase(texture: str, colour: str, rng: np.random.Generator) -> str:
    if texture == "plain":
        return f"on a {colour} background" if rng.random() < 0.7 else f"on a plain {colour} background"
    word = TEXTURE_WORDS[texture]
    return f"on a {word} background" if rng.random() < 0.6 else f"on a {colour} {word} background"


def caption(
    shape: str,
    colour: str,
    size: str,
    texture: str,
    background: str,
    position: str,
    rng: np.random.Generator,
    fill: str | None = None,
) -> str:
    """One caption for one scene, with randomly chosen template and mentioned attributes.

    Args:
        shape, colour, size, texture, background, position: the scene's attribute words.
        rng: decides the template and which attributes are mentioned.
        fill: "solid" or "hollow" in a world with fills (None: no fill, and nothing more is drawn from `rng`).

    Returns:
        The caption, e.g. "a photo of a small red circle on a striped background.".
    """
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    words = [shape]
    if rng.random() < MENTION_COLOUR:
        words.insert(0, colour)
    mention_size = rng.random() < (MENTION_SIZE if size != "medium" else MENTION_SIZE / 4)
    if mention_size:
        options = SIZE_WORDS[size]
        words.insert(0, options[rng.integers(len(options))])
    extras = []
    if rng.random() < MENTION_BACKGROUND:
        extras.append(_background_phrase(texture, background, rng))
    if rng.random() < MENTION_POSITION:
        extras.append(position)
    if len(extras) == 2 and rng.random() < 0.5:
        extras.reverse()
    if fill is not None and rng.random() < MENTION_FILL:
        options = FILL_WORDS[fill]
        words.insert(len(words) - 1, options[rng.integers(len(options))])
    return template.format(" ".join(words + extras))


def captions_for(scenes: Scenes, rng: np.random.Generator) -> list[str]:
    """One caption per scene (see `caption`)."""
    positions = position_word(scenes)
    fills = [None] * len(scenes) if scenes.hollow is None else [FILLS[int(h)] for h in scenes.hollow]
    return [
        caption(
            SHAPES[scenes.shape[i]],
            SHAPE_COLOUR_NAMES[scenes.colour[i]],
            SIZES[scenes.size[i]],
            TEXTURES[scenes.texture[i]],
            BACKGROUND_COLOUR_NAMES[scenes.background[i]],
            positions[i],
            rng,
            fills[i],
        )
        for i in range(len(scenes))
    ]
