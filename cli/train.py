"""`fastprompt train`: a sweep of prompt-tuning runs (and baselines) on a feature cache, trained in lock-step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

from fastprompt.errors import FastPromptError

HELP = """Train a sweep of runs on a feature cache: the cartesian product of the swept options, many runs at once.

Methods (fastprompt/methods.py; `fastprompt train --list-methods` prints each one's loss and defaults):
zeroshot (CLIP), zeroshot_ensemble (CLIP++), linear_probe, coop, cocoop, kgcoop, kd, prograd, prograd_ensemble
(ProGrad++), prograd_cocoop; cached-feature heads tip_adapter, tip_adapter_f, gda, clap, cosine, linear_sgd, and
"+prograd" variants of the trained heads (tip_adapter_f+prograd, clap+prograd, cosine+prograd, linear_sgd+prograd).
Unset options take PROTOCOL.md's defaults (epochs by shots, lambda 0.8 at 8/16 shots on Flowers/DTD/EuroSAT, ...)
or the method's own (CoCoOp: 4 context vectors, batch 1, 10 epochs; KgCoOp: 4, batch 128, 100 epochs).
An interrupted sweep restarted with the same command skips finished runs and resumes the others.

Examples:

  fastprompt train --cache caches/oxford_pets --out sweeps/pets --methods coop,prograd --shots 1,2,4,8,16 --seeds 1,2,3

  fastprompt train --cache caches/eurosat --out sweeps/lam --methods prograd --lambda 1.0,0.8,0.5 --epochs 50

  fastprompt train --cache caches/imagenet --out sweeps/b2n --setting base2new --shots 4 --class-chunk auto

  fastprompt train --cache caches/pets --out sweeps/file --sweep sweep.toml --dry-run

  fastprompt train --cache caches/pets --out sweeps/fig1 --methods coop,prograd --no-augment --angles

  fastprompt train --cache caches/pets --out sweeps/online --methods coop,prograd --online-augment --data ~/data

  fastprompt train --cache caches/pets_full --out sweeps/teacher --methods coop --shots 0 --seeds 1

  fastprompt train --cache caches/pets --out sweeps/fig7 --methods prograd --teacher sweeps/teacher/<coop run folder>

  fastprompt train --cache caches/imagenet --out sweeps/dg --methods zeroshot,coop,prograd --shots 4 \
      --eval-caches caches/imagenetv2,caches/imagenet_sketch,caches/imagenet_a,caches/imagenet_r
"""


def _list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("train", help=HELP, no_args_is_help=True)
def train_command(
    cache: Annotated[
        Path | None, typer.Option(help="Feature cache folder (made by `fastprompt cache`); required.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Sweep folder: one sub-folder per run plus results.jsonl; required.")
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "zeroshot,coop,prograd",
    shots: Annotated[str | None, typer.Option(help="Comma-separated shot counts (default: all in the cache).")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (default: all in the cache).")] = None,
    lam: Annotated[
        str | None, typer.Option("--lambda", help="ProGrad lambda(s), e.g. 1.0,0.8 (default: policy).")
    ] = None,
    alpha: Annotated[str | None, typer.Option(help="KD weight(s) of the KL term, e.g. 0.25,1,4.")] = None,
    setting: Annotated[str, typer.Option(help="fewshot or base2new.")] = "fewshot",
    sweep: Annotated[Path | None, typer.Option(help="TOML/YAML sweep file with [sweep] and [fixed] tables.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs for every run (default: 50/100/200 by shots).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default 32).")] = None,
    n_ctx: Annotated[int | None, typer.Option(help="Context vectors M (default 16).")] = None,
    init: Annotated[str | None, typer.Option(help="template or random (default: by method).")] = None,
    position: Annotated[str | None, typer.Option(help="Class name position: end, middle, front.")] = None,
    class_specific: Annotated[bool | None, typer.Option(help="One context per class.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 0.002).")] = None,
    temperature: Annotated[float | None, typer.Option(help="KL temperature (default 1).")] = None,
    lambda_policy: Annotated[
        str | None,
        typer.Option(
            help="Default lambda: release (0.8 at 8/16 shots on Flowers/DTD/EuroSAT) or paper (0.8 at 16 shots on "
            "every dataset); 1.0 otherwise."
        ),
    ] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 text tower (CUDA autocast).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate the test split every k epochs.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    quick_gelu: Annotated[
        bool | None,
        typer.Option(
            "--quick-gelu/--no-quick-gelu",
            help="The network for a cache that does not record it and whose checkpoint does not say (docs/models.md).",
        ),
    ] = None,
    class_chunk: Annotated[
        str | None,
        typer.Option(
            help="Classes per encoder chunk (bounds memory; exact), or 'auto': the largest chunk that fits in the "
            "device's free memory (fastprompt/train/memory.py)."
        ),
    ] = None,
    checkpoint_minutes: Annotated[float, typer.Option(help="Checkpoint running runs this often.")] = 10.0,
    eval_caches: Annotated[
        str | None, typer.Option(help="Comma-separated target caches to evaluate every trained context on.")
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(help="A trained prompt run (folder) as the KL target instead of the template (Figure 7)."),
    ] = None,
    augment: Annotated[
        bool, typer.Option(help="--no-augment: train on each image's centre-crop view only (Figure 1 c, d).")
    ] = True,
    angles: Annotated[
        bool, typer.Option(help="Log the G_d/G_g angle of CoOp and KD runs too (G_g computed, not used).")
    ] = False,
    online_augment: Annotated[
        bool,
        typer.Option(
            help="Train CoOp/ProGrad/KD with a fresh crop per image and epoch, the image tower in the loop, as the "
            "released code does (slow but exact; needs --data; docs/views.md)."
        ),
    ] = False,
    data: Annotated[
        Path | None, typer.Option(help="The dataset root the cache was made from (for --online-augment).")
    ] = None,
    keep_freed_memory: Annotated[
        bool,
        typer.Option(
            help="CPU: keep freed memory in the process so that large activations are reused, not faulted in at "
            "every step (glibc; bench/results/README.md). The process keeps its peak memory until it exits."
        ),
    ] = True,
    list_methods: Annotated[bool, typer.Option(help="Print every method's loss and defaults, and stop.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved runs and stop.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    from fastprompt.cache.loader import FeatureCache
    from fastprompt.cache.network import load_cache_clip
    from fastprompt.env import check_device
    from fastprompt.train.config import expand_sweep, load_sweep_file
    from fastprompt.train.memory import parse_class_chunk
    from fastprompt.train.results import summary_table
    from fastprompt.train.sweep import SweepOptions, run_sweep

    if list_methods:
        _print_methods()
        return
    if cache is None or out is None:
        raise FastPromptError("`fastprompt train` needs --cache (a feature cache folder) and --out (the sweep folder).")
    check_device(device)
    chunk = parse_class_chunk(class_chunk)
    if keep_freed_memory and device == "cpu" and chunk != "auto":  # auto sizes chunks by the system's free memory,
        # which does not count what this process keeps
        from fastprompt.train.memory import keep_freed_memory as keep

        keep()
    if not checkpoint_minutes >= 0:  # also NaN; 0 is allowed: a checkpoint after every step (SweepOptions)
        raise FastPromptError(
            f"--checkpoint-minutes must be a number of minutes >= 0 (0: after every step), got {checkpoint_minutes}."
        )
    if not cache.exists():
        raise FastPromptError(f"Cache folder '{cache}' does not exist; build it with `fastprompt cache`.")
    from fastprompt.train.distributed import sweep_ranks

    ranks = sweep_ranks(device)  # under torchrun: join the group first, so that "cuda" is this rank's own GPU
    features = FeatureCache(cache, device=device)
    held = features.fewshot_settings()
    axes: dict[str, list] = {"method": _list(methods)}
    axes["shots"] = _list(shots) or sorted({k for k, _ in held})
    axes["seed"] = _list(seeds) or sorted({s for _, s in held})
    if lam is not None:
        axes["lambda"] = _list(lam)
    if alpha is not None:
        axes["alpha"] = _list(alpha)
    fixed = {
        "dataset": features.dataset, "setting": setting, "epochs": epochs, "batch_size": batch_size, "n_ctx": n_ctx,
        "init": init, "position": position, "class_specific": class_specific, "lr": lr, "temperature": temperature,
        "lambda_policy": lambda_policy, "precision": precision, "eval_every": eval_every,
        "teacher": str(teacher) if teacher is not None else None, "augment": None if augment else False,
        "angles": angles or None,
    }  # fmt: skip
    if sweep is not None:
        file_axes, file_fixed = load_sweep_file(sweep)
        axes.update(file_axes)
        fixed.update({k: v for k, v in file_fixed.items() if fixed.get(k) is None})
    if not axes["shots"] or not axes["seed"]:
        raise FastPromptError(f"The cache '{cache}' holds no few-shot subsets; rebuild it with --shots and --seeds.")
    configs = expand_sweep(axes, fixed)
    if ranks.is_main:  # under torchrun every rank resolves the same runs; one list is enough
        typer.echo(f"{len(configs)} run(s) on {features.dataset} ({cache}):")
        for config in configs:
            typer.echo(f"  {config.run_id}  {_settings(config)}")
    if dry_run:
        return
    clip = load_cache_clip(features, device=device, quick_gelu=quick_gelu)
    targets = [FeatureCache(Path(path), device=device) for path in _list(eval_caches) or []]
    if online_augment:
        records = _train_online(features, clip, configs, out, data, device, progress)
    else:
        options = SweepOptions(device=device, class_chunk=chunk, checkpoint_minutes=checkpoint_minutes,
                               progress=progress, targets=targets)  # fmt: skip
        records = run_sweep(features, clip, configs, out, options)
    if not ranks.is_main:
        return  # rank 0 prints the table of every rank's runs
    wanted = {c.run_id for c in configs}
    typer.echo("")
    typer.echo(summary_table([r for r in records if r["run_id"] in wanted]))
    typer.echo(f"\nRuns and results.jsonl in {out}")


def _print_methods() -> None:
    from fastprompt.methods import METHODS, defaults_of

    for name, declared in METHODS.items():
        defaults = ", ".join(f"{k}={v}" for k, v in defaults_of(name).items()) or "PROTOCOL.md's"
        typer.echo(f"{name:24s} {declared.display}: {declared.loss}. Defaults: {defaults}.")


def _train_online(features, clip, configs, out: Path, data: Path | None, device: str, progress: bool) -> list[dict]:
    from fastprompt.data.registry import load_dataset
    from fastprompt.train.online import OnlineOptions, train_online

    if data is None:
        raise FastPromptError("--online-augment reads the images again: pass the dataset root with --data.")
    dataset = load_dataset(features.dataset, data)
    return train_online(features, dataset, clip, configs, out, OnlineOptions(device=device, progress=progress))


def _settings(config) -> str:
    """The resolved settings worth seeing in the run list: a prompt's layout only where the method has a prompt."""
    text = f"epochs={config.epochs} batch={config.batch_size} lr={config.lr:g}"
    if config.declaration.kind in ("prompt", "cocoop"):
        text += f" init={config.init} n_ctx={config.n_ctx}"
    return text
