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
    "  fastprompt testbed pretrain --out my-testbed.safetensors --seed 0\n\n"
    "  fastprompt testbed properties --data-root ~/data/testbed",
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
    world: Annotated[str, typer.Option(help="World version to train on: v1 or v2.")] = DEFAULTS.world,
    init: Annotated[
        str | None, typer.Option(help="Checkpoint to continue from ('v1': the shipped v1 one; default: random).")
    ] = None,
    crop_probability: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of training images replaced by a random resized crop.")
    ] = DEFAULTS.crop_probability,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = DEFAULTS.warmup_steps,
) -> None:
    """Pretrain the testbed CLIP with CLIP's contrastive loss (CPU, minutes).

    The shipped checkpoints' JSON files record the commands that made them (docs/testbed.md): v1 from random weights
    on world v1, v2 continuing from v1 on world v2 with random resized crops.
    """
    from fastprompt.errors import FastPromptError, brief
    from fastprompt.testbed.world import WORLDS

    if world not in WORLDS:
        raise FastPromptError(f"Unknown --world {brief(world)}; choose from {', '.join(WORLDS)}.")
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
        world=world,
        init=init,
        crop_probability=crop_probability,
        warmup_steps=warmup_steps,
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
    task: Annotated[list[str] | None, typer.Option(help="Task name (repeatable); default: world v2's tasks.")] = None,
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


def _tasks_of(names: list[str] | None, world: str) -> list[str]:
    from fastprompt.errors import FastPromptError, brief
    from fastprompt.testbed import TESTBED_DATASETS

    unknown = [name for name in names or [] if name not in TESTBED_DATASETS]
    if unknown:
        raise FastPromptError(f"Unknown testbed task {brief(unknown)}; known: {', '.join(TESTBED_DATASETS)}.")
    return names or [name for name, task in TESTBED_DATASETS.items() if task.world == world]


@testbed_app.command("zeroshot")
def zeroshot_command(
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint file, or v1 / v2 for a shipped one (default: v2).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Read the test splits from this written testbed (default: generate them).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Data seed of generated test splits.")] = DEFAULT_DATA_SEED,
    test_per_class: Annotated[int, typer.Option(min=1, help="Generated test images per class.")] = 100,
    task: Annotated[
        list[str] | None, typer.Option(help="Task name (repeatable); default: the tasks of v1 or v2 by checkpoint.")
    ] = None,
) -> None:
    """Zero-shot accuracy of the testbed CLIP on the tasks' test splits ("a photo of a {}.", argmax of cosine)."""
    from fastprompt.testbed import TESTBED_DATASETS, generate_split, load_split, load_testbed_clip
    from fastprompt.testbed.zeroshot import zero_shot_accuracy

    clip = load_testbed_clip(checkpoint)
    world = "v1" if checkpoint == "v1" else "v2"
    for name in _tasks_of(task, world):
        task_spec = TESTBED_DATASETS[name]
        if data_root is not None:
            images, labels = load_split(data_root, task_spec, "test")
        else:
            images, labels = generate_split(task_spec, "test", test_per_class, seed)
        classnames, templates = task_spec.classnames, [task_spec.coop_template]
        accuracy = zero_shot_accuracy(clip.model, clip.tokenizer, images, labels, classnames, templates)
        typer.echo(f"{name}: {accuracy:.2f}% zero-shot on {len(labels)} test images ({len(classnames)} classes)")


@testbed_app.command("properties")
def properties_command(
    data_root: Annotated[Path, typer.Option(help="A testbed written by `fastprompt testbed build`.")],
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint file, or v1 / v2 for a shipped one (default: v2).")
    ] = None,
    task: Annotated[list[str] | None, typer.Option(help="Task name (repeatable); default: world v2's tasks.")] = None,
    shots: Annotated[int, typer.Option(min=1, help="Shots of the linear probe.")] = 16,
    views: Annotated[int, typer.Option(min=1, help="Augmented views per training image.")] = 16,
) -> None:
    """The testbed's realism on the training and validation splits only: zero-shot accuracy on whole images and on
    the cache's augmented views, the linear probe against zero-shot, and the spurious cue (docs/testbed.md)."""
    import json

    from fastprompt.testbed import load_testbed_clip
    from fastprompt.testbed.properties import measure_properties

    clip = load_testbed_clip(checkpoint)
    for name in _tasks_of(task, "v1" if checkpoint == "v1" else "v2"):
        figures = measure_properties(clip, data_root, name, shots=shots, views=views)
        rounded = {key: round(value, 2) if isinstance(value, float) else value for key, value in figures.items()}
        typer.echo(f"{name}: {json.dumps(rounded)}")
