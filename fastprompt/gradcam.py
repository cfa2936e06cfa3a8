"""Grad-CAM of zero-shot CLIP and of trained prompts on a few images (the paper's Figure 2).

Every head scores an image against fixed, normalised class text features (K, E) computed once per head: zero-shot
CLIP's from the cache's CoOp template (the paper's "CLIP" row), a trained prompt's from its context in the prompt
layout it was trained with (fastprompt/prompt.py). The image tower runs here, on the test view (PROTOCOL.md section 4),
wrapped as `ClipClassifier`: images (B, 3, S, S) -> logits (B, K) = logit_scale * normalise(f(x)) @ text.T.

Grad-CAM (Selvaraju et al.) of class c at a layer with activations A (B, C, h, w): weights alpha_k = mean over (h, w)
of d logit_c / d A_k, map = ReLU(sum_k alpha_k A_k), min-max normalised, bilinearly upsampled to (S, S) and normalised
again. The maths is the `grad-cam` package's (pytorch_grad_cam.GradCAM); tests hold it to a plain implementation.

Target layers: a ResNet image tower (open_clip's ModifiedResNet, e.g. RN50) uses its last bottleneck block
`visual.layer4[-1]`, as the paper does. A ViT uses `visual.transformer.resblocks[-1].ln_1`, the tokens entering the
last block's attention: after the last block only the class token is read, so the patch tokens of its output have no
gradient. The tokens are made a (B, C, h, w) grid by dropping the class token and reshaping the patches.

Decisions (docs/gradcam.md):
- Class names: a cache's manifest where one is given (`--cache`), else the classes the first prompt's run was trained
  on (its result.json). Every head scores that one class list. Templates: that cache's, else those of the cache the
  run records, else its dataset's (fastprompt.templates), as the sweep chose them. A shared context given another
  cache's classes is put into that cache's prompt layout, as transfer does (fastprompt/train/transfer.py).
- The target class of an image is its true class where known (`classname` for all images, else the image's folder
  name when it is one of the classes), else each head's own prediction.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastPromptError
from fastprompt.gradcam_inputs import (  # noqa: F401  (re-exported: the command and the tests use them from here)
    FIGURE_SUFFIXES,
    INSTALL,
    MAX_IMAGES,
    MAX_PROMPTS,
    ZERO_SHOT_LABEL,
    ClassSource,
    PromptRun,
    check_run,
    check_weights,
    decode_images,
    find_class,
    list_images,
    load_prompt_run,
    read_class_source,
    read_manifest_if_there,
    recorded_cache,
    require_grad_cam,
    true_classes,
)
from fastprompt.prompt import clean_classname


@dataclass(frozen=True)
class Head:
    """A classifier over the class list: a column label and normalised class text features (K, E)."""

    label: str
    class_weights: torch.Tensor


@dataclass(frozen=True)
class HeadCams:
    """One head on a batch: `cams` (B, S, S) in [0, 1], `probabilities` (B, K), `targets` (B,) the class each map is
    for, `predictions` (B,)."""

    cams: np.ndarray
    probabilities: torch.Tensor
    targets: list[int]
    predictions: list[int]


def zero_shot_head(clip, classnames: Sequence[str], template: str) -> Head:
    """Zero-shot CLIP with one template (the paper's "CLIP" row: CoOp's template of the dataset)."""
    from fastprompt.zeroshot import zero_shot_weights

    return Head(ZERO_SHOT_LABEL, zero_shot_weights(clip, list(classnames), template).float())


def prompt_head(
    clip, classnames: Sequence[str], run: PromptRun, prograd_template: str, label: str | None = None
) -> Head:
    """A trained prompt's head: its context in the layout it was trained with (fastprompt/prompt.py). A
    "template"-initialised run keeps its template prefix's fixed tokens: the method's own words (KgCoOp's), else the
    class cache's ProGrad template's, as the sweep lays it out."""
    from fastprompt.encoder import PromptEncoder
    from fastprompt.methods import METHODS
    from fastprompt.templates import template_prefix

    config = run.config
    prefix = None
    if config.get("init") == "template":  # as the sweep lays it out: the method's own words, else the template's
        prefix = METHODS[config["method"]].prompt_prefix or template_prefix(prograd_template)
    encoder = PromptEncoder(
        clip,
        list(classnames),
        n_ctx=int(config.get("n_ctx", run.ctx.shape[-2])),
        position=str(config.get("position", "end")),
        class_specific=bool(config.get("class_specific", False)),
        prompt_prefix=prefix,
    )
    with torch.no_grad():
        features = encoder(run.ctx[None].to(encoder.device))[0].float()
    return Head(label or run.label, F.normalize(features, dim=-1))


# ------------------------------------------------------------------------------------------------------ the CAM
class ClipClassifier(nn.Module):
    """CLIP's image tower as a classifier against fixed class text features: images (B, 3, S, S) -> logits (B, K).

    Args:
        visual: the open_clip image tower (frozen).
        class_weights: normalised class text features (K, E).
        logit_scale: the model's exp(logit_scale).
    """

    def __init__(self, visual: nn.Module, class_weights: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("class_weights", class_weights.detach().float())
        self.logit_scale = float(logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The weights are frozen: without an input that requires grad no activation would carry a gradient to hook.
        images = images.detach().requires_grad_(True)
        features = F.normalize(self.visual(images).float(), dim=-1)
        return self.logit_scale * features @ self.class_weights.T


def cam_target_layer(visual: nn.Module):
    """The layer Grad-CAM reads and the reshape of its output to (B, C, h, w) (None for a ResNet's, already so).

    Raises:
        FastPromptError: an image tower that is neither open_clip's ModifiedResNet nor its VisionTransformer.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        return visual.layer4[-1], None
    if isinstance(visual, VisionTransformer):
        grid_h, grid_w = visual.grid_size
        batch_first = getattr(visual.transformer, "batch_first", True)

        def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens if batch_first else tokens.transpose(0, 1)
            patches = tokens[:, -grid_h * grid_w :]  # the class token (and any other prefix token) comes first
            return patches.reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[-1]).permute(0, 3, 1, 2)

        return visual.transformer.resblocks[-1].ln_1, tokens_to_grid
    raise FastPromptError(
        f"Grad-CAM supports open_clip's ResNet and ViT image towers, not {type(visual).__name__}; use e.g. RN50 or "
        f"ViT-B-16."
    )


class _Predicted:
    """The Grad-CAM target of an image without a known class: the head's own top logit."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[int(logits.detach().argmax())]


def grad_cam(clip, head: Head, images: torch.Tensor, targets: Sequence[int | None] | None = None) -> HeadCams:
    """Grad-CAM of one head on a batch of test views.

    Args:
        clip: a `fastprompt.Clip`.
        head: the class text features to score against.
        images: (B, 3, S, S) normalised test views.
        targets: per image the class to explain, or None for the head's prediction (default: all None).

    Returns:
        The maps (B, S, S), class probabilities (B, K), the classes explained and the predictions.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = list(targets) if targets is not None else [None] * images.shape[0]
    device = next(clip.model.parameters()).device
    classifier = ClipClassifier(clip.model.visual, head.class_weights.to(device), clip.logit_scale)
    layer, reshape = cam_target_layer(clip.model.visual)
    cam = GradCAM(model=classifier, target_layers=[layer], reshape_transform=reshape)
    try:
        chosen = [_Predicted() if target is None else ClassifierOutputTarget(target) for target in targets]
        maps = cam(input_tensor=images.to(device), targets=chosen)
        logits = cam.outputs.detach().float().cpu()
    finally:
        cam.activations_and_grads.release()  # hooks stay on the shared image tower otherwise
    probabilities = logits.softmax(dim=-1)
    predictions = probabilities.argmax(dim=-1).tolist()
    explained = [p if t is None else t for p, t in zip(predictions, targets, strict=True)]
    return HeadCams(np.asarray(maps, dtype=np.float32), probabilities, explained, predictions)


# ------------------------------------------------------------------------------------------------------ the figure
def draw_figure(
    pictures: torch.Tensor,
    names: Sequence[str],
    heads: Sequence[Head],
    results: Sequence[HeadCams],
    classnames: Sequence[str],
    truths: Sequence[int | None],
    cell_inches: float = 2.2,
    dpi: int = 100,
    file_format: str = "png",
) -> bytes:
    """The grid as an image file: rows are images, columns the image then each head with its CAM overlaid.

    Args:
        pictures: (B, S, S, 3) test views in [0, 1] (what the image tower saw, before normalisation).
        names: B row labels (file names).
        heads, results: the columns and their `grad_cam` results.
        classnames: the K class names.
        truths: each image's true class or None.
        cell_inches, dpi: each cell is cell_inches square; the file is (1 + heads) x B cells at `dpi`.
        file_format: "png", "pdf", "svg" or "jpg".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = len(names), 1 + len(heads)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * cell_inches, rows * cell_inches), squeeze=False)
    try:
        for row in range(rows):
            truth = truths[row]
            title = names[row] if truth is None else f"{names[row]}\nclass: {clean_classname(classnames[truth])}"
            axes[row, 0].imshow(pictures[row].numpy())
            axes[row, 0].set_title(title, fontsize=7)
            for column, (head, result) in enumerate(zip(heads, results, strict=True), start=1):
                predicted = result.predictions[row]
                probability = float(result.probabilities[row, predicted])
                axis = axes[row, column]
                axis.imshow(pictures[row].numpy())
                axis.imshow(result.cams[row], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
                axis.set_title(f"{head.label}\n{clean_classname(classnames[predicted])} {probability:.0%}", fontsize=7)
        for axis in axes.flat:
            axis.axis("off")
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / (rows * cell_inches), hspace=0.35)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=file_format, dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ the job
@dataclass(frozen=True)
class GradCamFigure:
    """What `gradcam_figure` drew: the file, its heads, and per head the maps and predictions."""

    path: Path
    images: list[Path]
    heads: list[Head]
    results: list[HeadCams]
    classnames: tuple[str, ...]
    truths: list[int | None]


def weights_argument(pretrained: str | None, checkpoint: Path | str | None) -> str | None:
    """The `pretrained` argument of `load_clip` from `--pretrained` (a tag, a file, or 'none' for seeded random
    weights as `fastprompt cache` makes them) and `--checkpoint` (a file); neither: "openai".

    Raises:
        FastPromptError: both are given, or the checkpoint file does not exist.
    """
    if pretrained is not None and checkpoint is not None:
        raise FastPromptError("Pass either --pretrained or --checkpoint, not both.")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FastPromptError(f"Checkpoint file '{checkpoint}' does not exist; check the path.")
        return str(checkpoint)
    if pretrained is None:
        return "openai"
    if pretrained.lower() == "none":
        torch.manual_seed(0)  # `fastprompt cache --pretrained none` seeds 0: the same random weights
        return None
    return pretrained


def gradcam_figure(
    images: Sequence[Path | str],
    out: Path | str,
    model: str,
    pretrained: str | None = None,
    checkpoint: Path | str | None = None,
    prompts: Sequence[Path | str] = (),
    cache: Path | str | None = None,
    zeroshot: bool = True,
    classname: str | None = None,
    quick_gelu: bool | None = None,
    device: str = "cpu",
    cell_inches: float = 2.2,
    dpi: int = 100,
) -> GradCamFigure:
    """Grad-CAM of zero-shot CLIP and of each trained prompt on a few images, drawn as one figure at `out`.

    Files and options are checked before the model is loaded, the prompts against the model after it, and nothing
    is written unless every step succeeds.

    Args:
        images: image files or folders (at most MAX_IMAGES images).
        out: the figure file (.png, .pdf, .svg or .jpg), written atomically.
        model: the open_clip model name the prompts were trained with.
        pretrained, checkpoint: the weights (`weights_argument`).
        prompts: run folders of `fastprompt train` (at most MAX_PROMPTS).
        cache: the feature cache whose class names and templates are used; None: the first run's classes
            (`read_class_source`).
        zeroshot: show the zero-shot CLIP column.
        classname: the true class of every image (else each image's folder name where it is a class).
        quick_gelu: the network option of `load_clip`.
        device: where the model runs.
        cell_inches, dpi: the size of one cell of the grid.

    Raises:
        FastPromptError: any input that cannot be used, with one sentence saying what to do.
    """
    from fastprompt.atomic import write_bytes
    from fastprompt.clip import load_clip
    from fastprompt.data.transforms import ViewTransform

    require_grad_cam()
    out = Path(out)
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise FastPromptError(f"--out must name a {', '.join(FIGURE_SUFFIXES)} file, got '{out}'.")
    if out.is_dir():
        raise FastPromptError(f"--out '{out}' is a folder; name the figure file, e.g. '{out / 'gradcam.png'}'.")
    if len(prompts) > MAX_PROMPTS:
        raise FastPromptError(
            f"{len(prompts)} prompts were given but a Grad-CAM figure shows at most {MAX_PROMPTS}; pass fewer."
        )
    if not prompts and not zeroshot:
        raise FastPromptError("Nothing to show: pass --prompt runs, or leave zero-shot CLIP on (--zeroshot).")
    paths = list_images(images)
    decoded = decode_images(paths)
    runs = [load_prompt_run(prompt) for prompt in prompts]
    source = read_class_source(cache, runs)
    truths = true_classes(paths, source.classnames, classname)
    weights = weights_argument(pretrained, checkpoint)
    clip = load_clip(model, weights, device=device, quick_gelu=quick_gelu)
    for run in runs:
        check_run(run, clip, source.classnames)
    check_weights(clip, source, runs)
    heads = [zero_shot_head(clip, source.classnames, source.templates["coop"])] if zeroshot else []
    labels = [run.label for run in runs]
    for run, label in zip(runs, labels, strict=True):
        shown = label if labels.count(label) == 1 else f"{label} ({run.path.name})"
        heads.append(prompt_head(clip, source.classnames, run, source.templates["prograd"], shown))
    transform = ViewTransform.from_preprocess_cfg(clip.preprocess_cfg)
    views = torch.stack([transform.test_view(picture) for picture in decoded])  # (B, 3, S, S)
    results = [grad_cam(clip, head, views, truths) for head in heads]
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    shown_pixels = (views * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
    file_format = out.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    figure = draw_figure(
        shown_pixels, [p.name for p in paths], heads, results, source.classnames, truths, cell_inches, dpi, file_format
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, figure, "gradcam")
    return GradCamFigure(out, paths, heads, results, source.classnames, truths)


__all__ = [
    "MAX_IMAGES",
    "MAX_PROMPTS",
    "ClassSource",
    "ClipClassifier",
    "GradCamFigure",
    "Head",
    "HeadCams",
    "PromptRun",
    "cam_target_layer",
    "draw_figure",
    "grad_cam",
    "gradcam_figure",
    "load_prompt_run",
    "prompt_head",
    "read_class_source",
    "zero_shot_head",
]
