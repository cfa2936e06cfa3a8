"""Prompt templates of the paper's datasets (PROTOCOL.md section 3) and the prompt-ensemble set (CLIP++)."""

from __future__ import annotations

from fastprompt.errors import FastPromptError

# dataset -> (ProGrad template: teacher and context initialisation, CoOp zero-shot template: the "CLIP" row)
TEMPLATES: dict[str, tuple[str, str]] = {
    "OxfordPets": ("a type of pet, a photo of a {}.", "a photo of a {}, a type of pet."),
    "OxfordFlowers": ("a type of flower, a photo of a {}.", "a photo of a {}, a type of flower."),
    "FGVCAircraft": ("a type of aircraft, a photo of a {}.", "a photo of a {}, a type of aircraft."),
    "DescribableTextures": ("a texture of {}.", "{} texture."),
    "EuroSAT": ("a centered satellite photo of {}.", "a centered satellite photo of {}."),
    "StanfordCars": ("a photo of a {}.", "a photo of a {}."),
    "Food101": ("a type of food, a photo of {}.", "a photo of {}, a type of food."),
    "SUN397": ("a photo of a {}.", "a photo of a {}."),
    "Caltech101": ("a photo of a {}.", "a photo of a {}."),
    "UCF101": ("a photo of a person doing {}.", "a photo of a person doing {}."),
    "ImageNet": ("a photo of a {}.", "a photo of a {}."),
    "ImageNetV2": ("a photo of a {}.", "a photo of a {}."),
    "ImageNetSketch": ("a photo of a {}.", "a photo of a {}."),
    "ImageNetA": ("a photo of a {}.", "a photo of a {}."),
    "ImageNetR": ("a photo of a {}.", "a photo of a {}."),
}

DEFAULT_TEMPLATE = "a photo of a {}."

# The seven ImageNet templates of prompt ensembling; outside ImageNet the dataset's own template joins them.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

IMAGENET_FAMILY = ("ImageNet", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")


def prograd_template(dataset: str) -> str:
    """ProGrad's hand-written template for `dataset` (the teacher's prompt and the context initialisation)."""
    return TEMPLATES[dataset][0] if dataset in TEMPLATES else DEFAULT_TEMPLATE


def coop_template(dataset: str) -> str:
    """CoOp's single zero-shot template for `dataset` (the paper's "CLIP" row)."""
    return TEMPLATES[dataset][1] if dataset in TEMPLATES else DEFAULT_TEMPLATE


def ensemble_templates(dataset: str, own_template: str | None = None) -> list[str]:
    """CLIP++'s templates: the seven ImageNet ones, plus the dataset's own template outside the ImageNet family."""
    templates = list(ENSEMBLE_TEMPLATES)
    if dataset not in IMAGENET_FAMILY:
        own = own_template or coop_template(dataset)
        if own not in templates:
            templates.append(own)
    return templates


def template_prefix(template: str) -> str:
    """The words before the class name: "a type of pet, a photo of a {}." -> "a type of pet, a photo of a".

    Raises:
        FastPromptError: the template does not end with "{}." (the class name must come last for the prefix form).
    """
    if not template.endswith("{}."):
        raise FastPromptError(
            f"Template '{template}' must end with '{{}}.' to initialise a context (class name last); "
            f"reorder it as PROTOCOL.md section 3 does, e.g. 'a type of pet, a photo of a {{}}.'."
        )
    return template[: -len("{}.")].strip()
