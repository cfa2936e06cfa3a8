"""A trained prompt as ProGrad's teacher (the paper's Figure 7 upper bound): `--teacher RUN` puts the class text
features of a prompt trained before (e.g. CoOp on the whole training split of a `fastprompt cache --full-train` cache)
where the hand-crafted template's zero-shot weights would be.

The teacher must come from the same network, the same class list and the same context length as the runs it
teaches; anything else is refused in one sentence before any training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError


def teacher_run_folder(path: str | Path) -> Path:
    """The run folder of `path` (a run folder, or the prompt.safetensors inside one).

    Raises:
        FastPromptError: no run folder there (it holds no result.json and prompt.safetensors).
    """
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / "result.json").is_file() or not (folder / "prompt.safetensors").is_file():
        raise FastPromptError(
            f"The teacher '{path}' is not a run folder of `fastprompt train` (it needs result.json and "
            f"prompt.safetensors); pass the folder of a finished prompt run."
        )
    return folder


def check_teacher(result: dict, ctx: torch.Tensor, cache, classes: list[str], n_ctx: int, width: int, where) -> None:
    """Refuse a teacher of another network, class list or context length (one sentence each)."""
    model = (result.get("cache") or {}).get("model"), (result.get("cache") or {}).get("pretrained")
    ours = cache.manifest.get("model", {})
    if model != (ours.get("name"), ours.get("pretrained")):
        raise FastPromptError(
            f"The teacher '{where}' was trained on {model[0]} ({model[1]}), but the cache holds features of "
            f"{ours.get('name')} ({ours.get('pretrained')}); train the teacher on this cache's model."
        )
    config = result.get("config") or {}
    teacher_classes = result.get("classes")
    if teacher_classes is None and config.get("dataset") == cache.dataset and config.get("setting") == "fewshot":
        teacher_classes = list(cache.classnames)  # older run folders: the dataset's classes in few-shot
    if teacher_classes is None or not set(classes) <= set(teacher_classes):
        raise FastPromptError(
            f"The teacher '{where}' knows other classes than these runs ({config.get('dataset')}, "
            f"{len(teacher_classes or [])} classes, against {cache.dataset}'s {len(classes)}); train it on this "
            f"dataset."
        )
    if result.get("status") != "done":
        raise FastPromptError(f"The teacher '{where}' is a run that did not finish; pass a finished run.")
    if ctx.dim() != 2 or ctx.shape[0] != config.get("n_ctx") or ctx.shape[1] != width:
        raise FastPromptError(
            f"The teacher '{where}' holds a context of shape {tuple(ctx.shape)}, not ({config.get('n_ctx')}, {width}) "
            f"as its run and this model say; the file does not belong to that run."
        )
    if ctx.shape[0] != n_ctx:
        raise FastPromptError(
            f"The teacher '{where}' has {ctx.shape[0]} context vectors but these runs have {n_ctx}; train the "
            f"teacher with --n-ctx {n_ctx} or give the runs its length."
        )


def trained_teacher_weights(path: str, clip, cache, view, n_ctx: int | None = None) -> torch.Tensor:
    """Normalised class text features (K, E) of a trained prompt on the view's (base) classes.

    Args:
        path: a run folder of `fastprompt train` (or its prompt.safetensors).
        clip: the network of the cache.
        cache: the FeatureCache the runs train on.
        view: the sweep's DatasetView (its base classes are the runs' classes).
        n_ctx: the context length of the runs it teaches (None: not checked).

    Raises:
        FastPromptError: not a run folder, another network, other classes, a context of another length.
    """
    from safetensors.torch import load_file

    from fastprompt.encoder import PromptEncoder
    from fastprompt.templates import template_prefix
    from fastprompt.train.view import _templates

    folder = teacher_run_folder(path)
    try:
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        ctx = load_file(str(folder / "prompt.safetensors"))["ctx"].float()
    except (OSError, ValueError, KeyError) as error:
        raise FastPromptError(f"Could not read the teacher run '{folder}' ({error}); rerun it.") from None
    config = result.get("config") or {}
    from fastprompt.methods import METHODS

    declared = METHODS.get(config.get("method", ""))
    prefix = None
    if config.get("init") == "template":
        prefix = (declared.prompt_prefix if declared else None) or template_prefix(_templates(cache)[0])
    encoder = PromptEncoder(
        clip, view.base_names, n_ctx=int(config.get("n_ctx") or ctx.shape[0]), position=config.get("position", "end"),
        prompt_prefix=prefix,
    )  # fmt: skip
    check_teacher(result, ctx, cache, view.base_names, n_ctx or ctx.shape[0], encoder.width, folder)
    with torch.no_grad():
        return F.normalize(encoder(ctx[None].to(encoder.device))[0].float(), dim=-1)
