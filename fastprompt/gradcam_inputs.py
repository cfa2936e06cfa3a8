"""The inputs of `fastprompt gradcam`, read and checked before any model runs: the images, the prompt runs, the class
list and templates they are scored with, and the agreement of runs, weights and classes (fastprompt/gradcam.py)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from fastprompt.errors import FastPromptError, brief, one_line
from fastprompt.prompt import clean_classname

MAX_IMAGES = 12  # rows of one figure; more no longer reads as a figure
MAX_PROMPTS = 4  # columns besides the image and zero-shot CLIP
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
ZERO_SHOT_LABEL = "zero-shot CLIP"
INSTALL = "Grad-CAM needs the grad-cam package; install it with `pip install fastprompt[gradcam]`."


@dataclass(frozen=True)
class ClassSource:
    """The class list and templates every head uses (`read_class_source`).

    Attributes:
        path: the cache folder they come from (None: a run's recorded cache that is gone).
        classnames: K class names in label order.
        dataset: the dataset name (the cache's, else the run's).
        templates: {"prograd": ..., "coop": ...} (the cache's, else fastprompt.templates' for the dataset).
        manifest: the cache's manifest (model record, weights checksum), {} where there is none.
    """

    path: Path | None
    classnames: tuple[str, ...]
    dataset: str
    templates: dict
    manifest: dict


@dataclass(frozen=True)
class PromptRun:
    """A trained prompt: its context and the run record that says how it was laid out."""

    path: Path
    ctx: torch.Tensor  # (n_ctx, W), or (K, n_ctx, W) when class-specific
    config: dict
    cache: dict
    label: str
    classes: tuple[str, ...] | None  # the classes it was trained on; None in a record older than that field


# ------------------------------------------------------------------------------------------------------ inputs
def require_grad_cam() -> None:
    """Raises FastPromptError when the grad-cam package is missing."""
    try:
        import pytorch_grad_cam  # noqa: F401  (import checks that the optional dependency is installed)
    except ImportError:
        raise FastPromptError(INSTALL) from None


def list_images(paths: Sequence[Path | str], limit: int = MAX_IMAGES) -> list[Path]:
    """Image files: each path a file, or a folder whose image files (any depth, by suffix) are taken in sorted order.

    Raises:
        FastPromptError: a path does not exist, a folder holds no image, or there are more than `limit` images.
    """
    from PIL import Image

    suffixes = {suffix.lower() for suffix in Image.registered_extensions()}
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not inside:
                raise FastPromptError(f"The folder '{path}' holds no image files; pass images or a folder of them.")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise FastPromptError(f"The image '{path}' does not exist; check the path.")
    if not found:
        raise FastPromptError("No images given; pass one or more image files or a folder.")
    if len(found) > limit:
        raise FastPromptError(
            f"{len(found)} images were given but a Grad-CAM figure shows at most {limit}; pass fewer images."
        )
    return found


def decode_images(paths: Sequence[Path]) -> list:
    """Each file decoded to RGB as the cache decodes it (fastprompt/data/transforms.py `load_rgb`).

    Raises:
        FastPromptError: a file cannot be decoded (not an image, truncated, empty, over the pixel limit).
    """
    from fastprompt.data.transforms import load_rgb

    pictures = []
    for path in paths:
        try:
            pictures.append(load_rgb(path))
        except Exception as error:  # PIL reports unreadable files with several exception types
            raise FastPromptError(
                f"Could not read the image '{path}' ({type(error).__name__}: {one_line(error, 120)}); pass a "
                f"readable image file."
            ) from None
    return pictures


def _read_json(path: Path, what: str) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FastPromptError(f"Could not read {what} '{path}' ({one_line(error, 120)}); pass a run folder.") from None
    if not isinstance(content, dict):
        raise FastPromptError(f"{what.capitalize()} '{path}' is not a JSON object; pass a run folder.")
    return content


def load_prompt_run(path: Path | str) -> PromptRun:
    """A trained prompt from a run folder of `fastprompt train` (or its prompt.safetensors or result.json).

    Raises:
        FastPromptError: the folder has no result.json or prompt.safetensors (e.g. a zero-shot run), the record lacks
            the prompt's layout, or the file holds no context tensor.
    """
    path = Path(path)
    if not path.exists():
        raise FastPromptError(f"The prompt '{path}' does not exist; pass a run folder of `fastprompt train`.")
    folder = path if path.is_dir() else path.parent
    record = _read_json(folder / "result.json", "the run record") if (folder / "result.json").is_file() else None
    if record is None:
        raise FastPromptError(
            f"'{path}' is not a run of `fastprompt train` (no result.json beside it); pass a run folder."
        )
    config, cache = record.get("config"), record.get("cache")
    if not isinstance(config, dict) or not isinstance(cache, dict):
        raise FastPromptError(f"The run record '{folder / 'result.json'}' has no config or cache entry; retrain it.")
    from fastprompt.methods import METHODS

    declared = METHODS.get(config.get("method")) if isinstance(config.get("method"), str) else None
    prompt_file = folder / "prompt.safetensors"
    if declared is None or declared.kind != "prompt" or not prompt_file.is_file():
        kinds = ", ".join(name for name, m in METHODS.items() if m.kind == "prompt")
        raise FastPromptError(
            f"The run '{folder}' ({brief(config.get('method'))}) has no context-only trained prompt to show (zero-shot "
            f"CLIP is its own column, --zeroshot); pass runs of {kinds}."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ctx = load_file(str(prompt_file)).get("ctx")
    except (SafetensorError, OSError) as error:
        raise FastPromptError(f"Could not read '{prompt_file}' ({one_line(error, 120)}); retrain the run.") from None
    n_ctx = config.get("n_ctx")
    expected_ndim = 3 if config.get("class_specific") else 2
    if ctx is None or ctx.ndim != expected_ndim or ctx.shape[-2] != n_ctx or not ctx.is_floating_point():
        shape = None if ctx is None else tuple(ctx.shape)
        raise FastPromptError(
            f"'{prompt_file}' holds no context of the recorded layout (tensor 'ctx' {shape}, n_ctx {brief(n_ctx)}); "
            f"retrain the run."
        )
    classes = record.get("classes")
    classes = tuple(str(name) for name in classes) if isinstance(classes, list) and classes else None
    return PromptRun(folder, ctx.float(), config, cache, declared.display, classes)


def _manifest_of(folder: Path) -> dict:
    from fastprompt.cache.validate import read_manifest

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FastPromptError(f"'{folder}' is not a feature cache (no manifest.json); pass a cache folder.")
    return read_manifest(manifest_path)


def _run_classes(run: PromptRun, manifest: dict | None) -> tuple[str, ...] | None:
    """The classes a run was trained on: its record's, else its cache's (the base half in base-to-new)."""
    if run.classes:
        return run.classes
    names = (manifest or {}).get("classnames")
    if not isinstance(names, list) or not names:
        return None
    if run.config.get("setting") == "base2new":
        from fastprompt.data.fewshot import split_base_new

        names = [names[i] for i in split_base_new(len(names))[0]]
    return tuple(str(name) for name in names)


def read_class_source(cache_dir: Path | str | None, runs: Sequence[PromptRun] = ()) -> ClassSource:
    """The class list and templates every head uses.

    With `cache_dir`: its manifest's class names and templates. Without: the classes the first run was trained on
    (its record), with the templates of the cache it records where that is still there, else those of its dataset
    (fastprompt.templates), as the sweep chose them.

    Raises:
        FastPromptError: neither a cache nor a run, a folder without a readable manifest with class names, runs
            trained on different class lists, or a run whose classes cannot be found.
    """
    from fastprompt.templates import coop_template, prograd_template

    if cache_dir is not None:
        path = Path(cache_dir)
        manifest = _manifest_of(path)
        names = manifest.get("classnames")
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
            raise FastPromptError(
                f"The cache manifest '{path / 'manifest.json'}' has no list of class names; rebuild it."
            )
        names = tuple(names)
        dataset = str(manifest.get("dataset") or "")
    elif not runs:
        raise FastPromptError("Zero-shot CLIP alone needs the class names: pass --cache with a feature cache folder.")
    else:
        path = recorded_cache(runs[0])
        manifest = read_manifest_if_there(path)
        names = _run_classes(runs[0], manifest)
        if not names:
            raise FastPromptError(
                f"The run '{runs[0].path}' records no class names and its cache '{path}' is not there any more; pass "
                f"--cache with the cache's folder."
            )
        for run in runs[1:]:
            theirs = _run_classes(run, read_manifest_if_there(recorded_cache(run)))
            if theirs is not None and theirs != names:
                raise FastPromptError(
                    f"The runs '{runs[0].path}' and '{run.path}' were trained on different classes; pass --cache to "
                    f"choose the class names."
                )
        dataset = str(runs[0].config.get("dataset") or (manifest or {}).get("dataset") or "")
        manifest = manifest or {}
    templates = dict(manifest.get("templates") or {})
    templates.setdefault("prograd", prograd_template(dataset))
    templates.setdefault("coop", coop_template(dataset))
    return ClassSource(path, names, dataset, templates, manifest)


def recorded_cache(run: PromptRun) -> Path | None:
    """The cache folder a run records (a relative path is taken from the current folder, as `train` was given it)."""
    path = run.cache.get("path")
    return Path(path) if isinstance(path, str) and path else None


def read_manifest_if_there(folder: Path | None) -> dict | None:
    """A cache folder's manifest, or None where the folder or its manifest is gone (a run's cache moved)."""
    return _manifest_of(folder) if folder is not None and (folder / "manifest.json").is_file() else None


def find_class(name: str, classnames: Sequence[str]) -> int | None:
    """Index of `name` among `classnames` (underscores and case ignored), or None."""
    wanted = clean_classname(name).lower()
    for index, candidate in enumerate(classnames):
        if clean_classname(candidate).lower() == wanted:
            return index
    return None


def true_classes(paths: Sequence[Path], classnames: Sequence[str], classname: str | None = None) -> list[int | None]:
    """Each image's true class: `classname` for every image, else its folder's name when that is a class, else None.

    Raises:
        FastPromptError: `classname` is not one of the classes.
    """
    if classname is not None:
        index = find_class(classname, classnames)
        if index is None:
            close = difflib.get_close_matches(classname, list(classnames), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise FastPromptError(f"--class {brief(classname)} is not one of the {len(classnames)} classes{hint}.")
        return [index] * len(paths)
    return [find_class(path.parent.name, classnames) for path in paths]


# ------------------------------------------------------------------------------------------------------ heads
def check_run(run: PromptRun, clip, classnames: Sequence[str]) -> None:
    """Refuse a prompt that cannot run on `clip` with this class list.

    Raises:
        FastPromptError: the run records another model, its context width is not the text tower's, or its
            class-specific context holds another number of classes.
    """
    recorded = run.cache.get("model")
    if recorded and recorded != clip.name:
        raise FastPromptError(
            f"The prompt '{run.path}' was trained with the model {recorded}, not {clip.name}; pass --model {recorded}."
        )
    width = clip.model.token_embedding.weight.shape[-1] if hasattr(clip.model, "token_embedding") else None
    if width is not None and run.ctx.shape[-1] != width:
        raise FastPromptError(
            f"The prompt '{run.path}' has context vectors of width {run.ctx.shape[-1]} but {clip.name}'s text tower "
            f"takes width {width}; pass the model it was trained with."
        )
    if run.ctx.ndim == 3 and run.ctx.shape[0] != len(classnames):
        raise FastPromptError(
            f"The class-specific prompt '{run.path}' holds contexts of {run.ctx.shape[0]} classes but the cache has "
            f"{len(classnames)}; pass --cache with the cache it was trained on."
        )


def check_weights(clip, source: ClassSource, runs: Sequence[PromptRun] = ()) -> None:
    """Refuse weights other than those the class cache, and each run's recorded cache that is still there, were made
    with, or another network (QuickGELU against GELU, fastprompt/cache/network.py).

    Raises:
        FastPromptError: a weights checksum differs, or the network built is not the cache's.
    """
    from fastprompt.cache.network import check_cache_network

    manifests = [(source.path, source.manifest)] if source.manifest else []
    for run in runs:
        recorded = recorded_cache(run)
        manifest = read_manifest_if_there(recorded) if recorded != source.path else None
        if manifest is not None:
            manifests.append((recorded, manifest))
    for path, manifest in manifests:
        model = manifest.get("model") or {}
        expected = model.get("weights_sha256")
        if expected and clip.weights_checksum != expected:
            raise FastPromptError(
                f"The weights loaded here ({clip.pretrained or 'random'}) differ from those the cache '{path}' was "
                f"made with ({model.get('pretrained') or 'random'}); pass the same --pretrained or --checkpoint."
            )
        check_cache_network(SimpleNamespace(manifest=manifest, path=path), clip)
