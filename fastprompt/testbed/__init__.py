"""An offline testbed: a generated shapes world, a tiny CLIP pretrained on it, and few-shot tasks in the CoOp layout.

- `world`: scenes (shape, colour, size, position, background texture; in v2 also solid or hollow) rendered with
  numpy, deterministic from a seed; two versions (`WORLDS`), v1 kept reproducible.
- `captions`: varied captions that mention some attributes of a scene.
- `pretrain`: CLIP's contrastive pretraining of a tiny open_clip model on the world, on the CPU in minutes.
- `datasets`: the downstream tasks (`TESTBED_DATASETS`), written to disk in the CoOp layout.
- `zeroshot`: zero-shot accuracy of a model on generated or written images.

The package ships the checkpoints made by `fastprompt testbed pretrain` for both worlds (see `shipped_checkpoint()`
and the JSON beside each for the exact command, seed, data version and measured accuracy); `load_testbed_clip()`
loads v2's, the default; v2's pretraining continues from v1's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastprompt.errors import FastPromptError, brief
from fastprompt.testbed.datasets import (
    DEFAULT_DATA_SEED,
    DEFAULT_PER_CLASS,
    DEFAULT_TASKS,
    TESTBED_DATASETS,
    V1_TASKS,
    TestbedTask,
    build_testbed,
    generate_split,
    load_split,
    write_dataset,
)
from fastprompt.testbed.world import DATA_VERSION, WORLDS

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS_BY_WORLD = {"v1": "fastprompt-testbed-v1.safetensors", "v2": "fastprompt-testbed-v2.safetensors"}
DEFAULT_WORLD = "v2"
SHIPPED_WEIGHTS = SHIPPED_WEIGHTS_BY_WORLD[DEFAULT_WORLD]

__all__ = [
    "DATA_VERSION",
    "DEFAULT_DATA_SEED",
    "DEFAULT_PER_CLASS",
    "DEFAULT_TASKS",
    "DEFAULT_WORLD",
    "TESTBED_DATASETS",
    "V1_TASKS",
    "WORLDS",
    "TestbedTask",
    "build_testbed",
    "generate_split",
    "load_split",
    "load_testbed_clip",
    "shipped_checkpoint",
    "shipped_record",
    "write_dataset",
]


def shipped_checkpoint(world: str = DEFAULT_WORLD) -> Path:
    """Path of the checkpoint shipped for `world` (fp16 safetensors, loadable with `fastprompt.load_clip`).

    Raises:
        FastPromptError: an unknown world, or the file is missing (a broken install); its JSON's command rebuilds it.
    """
    if world not in SHIPPED_WEIGHTS_BY_WORLD:
        raise FastPromptError(
            f"Unknown testbed world {brief(world)}; choose from {', '.join(SHIPPED_WEIGHTS_BY_WORLD)}."
        )
    name = SHIPPED_WEIGHTS_BY_WORLD[world]
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise FastPromptError(
            f"The shipped testbed checkpoint {name} is missing from the installed package; reinstall fastprompt, or "
            f"rebuild it with the command in docs/testbed.md."
        )
    return path


def shipped_record(world: str = DEFAULT_WORLD) -> dict:
    """The JSON beside a shipped checkpoint: command, seed, data version, versions, time, measured accuracy."""
    return json.loads(shipped_checkpoint(world).with_suffix(".json").read_text())


def load_testbed_clip(checkpoint: str | Path | None = None, device: str = "cpu", precision: str = "fp32"):
    """Load the testbed CLIP (the shipped checkpoint by default) through `fastprompt.load_clip`.

    Args:
        checkpoint: a checkpoint written by `fastprompt testbed pretrain`, or a world's name ("v1", "v2") for that
            shipped checkpoint; None: the shipped default (v2). Its model name is read from the JSON beside it (the
            testbed's config when there is none).
        device: where the model lives.
        precision: "fp32", "bf16" or "fp16".

    Returns:
        The frozen `fastprompt.Clip`.
    """
    from fastprompt.clip import load_clip
    from fastprompt.testbed.pretrain import TESTBED_MODEL

    if checkpoint is None or str(checkpoint) in SHIPPED_WEIGHTS_BY_WORLD:
        path = shipped_checkpoint(DEFAULT_WORLD if checkpoint is None else str(checkpoint))
    else:
        path = Path(checkpoint)
    record_path = path.with_suffix(".json")
    model = json.loads(record_path.read_text()).get("model", TESTBED_MODEL) if record_path.is_file() else TESTBED_MODEL
    return load_clip(model, pretrained=str(path), device=device, precision=precision)


def _register_datasets() -> None:
    """Register the testbed tasks with fastprompt.data's registry when that registry exists."""
    try:
        from fastprompt.data import register_dataset
    except ImportError:
        return
    for task in TESTBED_DATASETS.values():
        register_dataset(
            task.name,
            dataset_dir=task.dataset_dir,
            image_dir=task.image_dir,
            split_file=task.split_file,
            templates={"prograd": task.prograd_template, "coop": task.coop_template},
            replace=True,
        )


_register_datasets()
