"""`fastprompt testbed`: pretrain the tiny testbed CLIP, write the testbed datasets, measure zero-shot accuracy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import _App, app

from fastprompt.testbed.datasets import DEFAULT_DATA_SEED
from fastprompt.testbed.pretrain import PretrainConfig

DEFAULTS = PretrainConfig()

testbed_app = _App(
    name="testbed",
    help="The offline testbed: a generated shapes world, a tiny CLIP pretrained on it, few-shot tasks in the CoOp "
    "layout.\n\nExamples:\n\n  fastprompt testbed build --out ~/data/testbed\n\n"
    "  fastprompt testbed zeroshot --data-root ~/data/testbed\n\n"
    "  fastprompt testbed pretrain --out my-testbed.safetensors --seed 0",
    no_args_is_help=True,
)
app.add_typer(testbed_app, name="testbed")


@testbed_app.command("pretrain")
def pretrain_command(
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors); its JSON record goes beside it.")],
    seed: Annotated[
        int, typer.Option(help="Seeds the scenes, captions, batch order and initialisation.")
    ] = DEFAULTS.seed,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = DEFAULTS.steps,
    batch_size: Annotated[int, typer.Option(min=2, help="Image-caption pairs per step.")] = DEFAULTS.batch_size,
    pool_size: Annotated[
        int, typer.Option(min=2, help="Scenes rendered once and re-captioned each draw.")
    ] = DEFAULTS.pool_size,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = DEFAULTS.lr,
    model: Annotated[str, typer.Option(help="open_clip model name.")] = DEFAULTS.model,
    eval_every: Annotated[
        int, typer.Option(help="Steps between zero-shot measurements (0: only at the end).")
    ] = DEFAULTS.eval_every,
    max_minutes: Annotated[float | None, typer.Option(help="Stop early after this many minutes.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    """Pretrain the testbed CLIP from random weights with CLIP's contrastive loss (CPU, minutes).

    The shipped checkpoint was made with `fastprompt testbed pretrain --out fastprompt-testbed-v1.safetensors`
    (every other option at its default); its JSON records the command and the measured accuracy.
    """
    from fastprompt.testbed.pretrain import pretrain

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that a fresh model has no pretrained weights
    config = PretrainConfig(
        model=model,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        pool_size=pool_size,
        lr=lr,
        eval_every=eval_every,
        max_minutes=max_minutes,
        threads=threads,
    )
    options = [f"--out {out.name}"] + [
        f"--{key.replace('_', '-')} {value}"
        for key, value in vars(config).items()
        if value != getattr(DEFAULTS, key) and key != "eval_every"  # evaluations do not change training
    ]
    command = "fastprompt testbed pretrain " + " ".join(options)
    record = pretrain(config, out=out, command=command, report=typer.echo)
    accuracy = ", ".join(f"{name} {value:.1f}%" for name, value in record["zero_shot_accuracy"].items())
    typer.echo(f"wrote {out} ({record['steps_done']} steps, {record['train_seconds']:.0f} s); zero-shot: {accuracy}")


@testbed_app.command("build")
def build_command(
    out: Annotated[Path, typer.Option(help="Data root; each task goes to a folder under it.")],
    task: Annotated[list[str] | None, typer.Option(help="Task name (repeatable); default: every task.")] = None,
    seed: Annotated[int, typer.Option(help="Data seed.")] = DEFAULT_DATA_SEED,
    train_per_class: Annotated[int, typer.Option(min=1, help="Training images per class.")] = 32,
    val_per_class: Annotated[int, typer.Option(min=1, help="Validation images per class.")] = 8,
    test_per_class: Annotated[int, typer.Option(min=1, help="Test images per class.")] = 100,
    force: Annotated[bool, typer.Option(help="Rewrite folders that are already built with these settings.")] = False,
) -> None:
    """Write the testbed's few-shot datasets in the CoOp layout (images/ and split_zhou_<Name>.json)."""
    from fastprompt.errors import FastPromptError, brief
    from fastprompt.testbed import TESTBED_DATASETS, build_testbed

    unknown = [name for name in task or [] if name not in TESTBED_DATASETS]
    if unknown:
        raise FastPromptError(f"Unknown testbed task {brief(unknown)}; known: {', '.join(TESTBED_DATASETS)}.")
    per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    folders = build_testbed(out, task or None, per_class, seed, force)
    for name, folder in folders.items():
        typer.echo(f"{name}: {folder} ({TESTBED_DATASETS[name].description})")


@testbed_app.command("zeroshot")
def zeroshot_command(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: the shipped one).")] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Read the test splits from this written testbed (default: generate them).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Data seed of generated test splits.")] = DEFAULT_DATA_SEED,
    test_per_class: Annotated[int, typer.Option(min=1, help="Generated test images per class.")] = 100,
) -> None:
    """Zero-shot accuracy of the testbed CLIP on every task's test split ("a photo of a {}.", argmax of cosine)."""
    from fastprompt.testbed import TESTBED_DATASETS, generate_split, load_split, load_testbed_clip
    from fastprompt.testbed.zeroshot import zero_shot_accuracy

    clip = load_testbed_clip(checkpoint)
    for name, task in TESTBED_DATASETS.items():
        if data_root is not None:
            images, labels = load_split(data_root, task, "test")
        else:
            images, labels = generate_split(task, "test", test_per_class, seed)
        accuracy = zero_shot_accuracy(clip.model, clip.tokenizer, images, labels, task.classnames, [task.coop_template])
        typer.echo(f"{name}: {accuracy:.2f}% zero-shot on {len(labels)} test images ({len(task.classnames)} classes)")
