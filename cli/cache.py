"""`fastprompt cache`: extract a dataset's image features once into a feature cache (arguments in, library call out)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

from fastprompt.errors import FastPromptError, brief

HELP = (
    "Extract image features once into a feature cache (docs/data.md).\n\n"
    "The cache holds the whole test split (one test view per image), the union of the requested few-shot subsets "
    "(V augmented views per training image, one test view per validation image) or, with --full-train, the whole "
    "training and validation splits. Rerun the same command to resume after an interruption; a complete cache is left "
    "as it is.\n\n"
    "DATASET is a registered name (OxfordPets, Caltech101, OxfordFlowers, Food101, StanfordCars, SUN397, EuroSAT, "
    "UCF101, DescribableTextures, FGVCAircraft, ImageNet, ImageNetV2, ImageNetSketch, ImageNetA, ImageNetR), "
    "`imagefolder` (--root holds train/ val/ test/ with one folder per class) or `manifest` (--manifest: CSV or JSONL "
    "with path,label,split and optionally classname).\n\n"
    "Examples:\n\n"
    "fastprompt cache OxfordPets --root ~/data --out caches/pets-rn50 --device cuda\n\n"
    "fastprompt cache ImageNet --root ~/data --shots 1,2,4,8,16 --seeds 1,2,3 --views 16 --out caches/in --device cuda"
    "\n\n"
    "torchrun --nproc_per_node 8 $(which fastprompt) cache ImageNet --root ~/data --out caches/in --device cuda\n\n"
    "fastprompt cache imagefolder --root ~/my_photos --name MyPhotos --out caches/mine --full-train\n\n"
    "fastprompt cache manifest --manifest list.csv --classnames names.txt --out caches/listed"
)


def _integers(text: str, option: str, minimum: int = 0, none_words: tuple[str, ...] = ()) -> tuple[int, ...]:
    """Comma-separated integers of at least `minimum`; one of `none_words` ("none") gives an empty tuple."""
    if text.strip().lower() in none_words:
        return ()
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise FastPromptError(f"{option} takes comma-separated integers like 1,2,4, got {brief(text)}.")
    if any(value < minimum for value in values):
        raise FastPromptError(f"{option} takes integers of at least {minimum}, got {brief(text)}.")
    return values


@app.command("cache", help=HELP, no_args_is_help=True)
def cache_command(
    dataset: Annotated[str, typer.Argument(help="Registered dataset name, `imagefolder` or `manifest`.")],
    out: Annotated[Path, typer.Option("--out", help="The cache folder to create (or resume).")],
    root: Annotated[Path | None, typer.Option(help="Data root (the folder holding e.g. oxford_pets/).")] = None,
    model: Annotated[str, typer.Option(help="open_clip model name.")] = "RN50",
    pretrained: Annotated[
        str | None, typer.Option(help="Pretrained tag or checkpoint file; 'none' for seeded random weights.")
    ] = "openai",
    quick_gelu: Annotated[
        bool | None,
        typer.Option(
            "--quick-gelu/--no-quick-gelu",
            help="Build the QuickGELU network (OpenAI-trained weights) or the GELU one; needed for a plain "
            "checkpoint of e.g. RN50 or ViT-B-16, decided by the tag otherwise (docs/models.md).",
        ),
    ] = None,
    shots: Annotated[str, typer.Option(help="Few-shot sizes, comma-separated ('none' for no subsets).")] = "1,2,4,8,16",
    seeds: Annotated[str, typer.Option(help="Few-shot seeds, comma-separated.")] = "1,2,3",
    views: Annotated[int, typer.Option(help="Augmented views per training image.")] = 16,
    full_train: Annotated[bool, typer.Option(help="Store the whole training and validation splits.")] = False,
    dtype: Annotated[str, typer.Option(help="Stored feature dtype: fp16 or fp32.")] = "fp16",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (under torchrun cuda is each rank's GPU).")] = "cpu",
    precision: Annotated[str, typer.Option(help="auto (fp16 autocast on CUDA), fp32, fp16 or bf16.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Views per forward pass of the image tower.")] = 256,
    num_workers: Annotated[int, typer.Option(min=0, help="DataLoader workers decoding and augmenting images.")] = 4,
    shard_size: Annotated[str, typer.Option(help="Images per shard (1000) or a size bound (64MB).")] = "1000",
    augmentation_seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
    exif_transpose: Annotated[
        bool,
        typer.Option(help="Turn images upright by their EXIF orientation (the reference loader ignores it)."),
    ] = False,
    fewshot_pkl: Annotated[
        bool, typer.Option(help="Import the reference's split_fewshot/shot_K-seed_S.pkl files instead of sampling.")
    ] = False,
    manifest: Annotated[Path | None, typer.Option(help="CSV or JSONL list for DATASET=manifest.")] = None,
    classnames: Annotated[Path | None, typer.Option(help="Class names, one per line, for DATASET=manifest.")] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name recorded for imagefolder/manifest data.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    import torch

    from fastprompt.cache.extract import SkippedImagesWarning, build_cache, resolve_precision
    from fastprompt.cache.plan import CacheOptions, fewshot_subsets
    from fastprompt.clip import load_clip
    from fastprompt.data.registry import load_dataset
    from fastprompt.env import check_device

    resolve_precision(precision, check_device(device))  # before any data or model is read
    options = CacheOptions(
        shots=_integers(shots, "--shots", minimum=1, none_words=("", "none", "0")),
        seeds=_integers(seeds, "--seeds"),
        views=views,
        full_train=full_train,
        dtype=dtype,
        shard_size=shard_size,
        augmentation_seed=augmentation_seed,
        exif_transpose=exif_transpose,
    )
    data = load_dataset(dataset, root, manifest=manifest, classnames_file=classnames, dataset_name=name)
    if fewshot_pkl:
        subsets = _import_pkl_subsets(dataset, root, data, options)
    else:
        subsets = fewshot_subsets(data, options.shots, options.seeds)
    if options.shots and not data.train:
        typer.echo(f"{data.name} has no training split: caching its test split only.")
    if pretrained is None or pretrained.lower() == "none":
        torch.manual_seed(0)  # random weights, the same in every process and every rerun (resumable, comparable)
        pretrained = None
    clip = load_clip(model, pretrained, device="cpu", quick_gelu=quick_gelu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImagesWarning)
        summary = build_cache(
            data, clip, out, options, subsets, device=device, precision=precision, batch_size=batch_size,
            num_workers=num_workers, progress=progress,
        )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in caught:
            typer.secho(f"Warning: {warning.message}", err=True, fg=typer.colors.YELLOW)
        for line in summary.lines():
            typer.echo(line)


def _import_pkl_subsets(dataset: str, root: Path | None, data, options) -> dict:
    from fastprompt.data.pkl_import import fewshot_pkl_path, import_fewshot_pkl
    from fastprompt.data.registry import get_dataset_spec

    if root is None:
        raise FastPromptError("--fewshot-pkl needs --root, the data root holding the dataset's split_fewshot/ folder.")
    spec = get_dataset_spec(dataset)
    return {
        f"{k}-{seed}": import_fewshot_pkl(fewshot_pkl_path(spec, root, k, seed), spec, data.image_root)
        for k in options.shots
        for seed in options.seeds
    }
