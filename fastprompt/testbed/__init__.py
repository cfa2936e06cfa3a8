"""An offline testbed: a generated shapes world, a tiny CLIP pretrained on it, and few-shot tasks in the CoOp layout.

- `world`: scenes (shape, colour, size, position, background texture) rendered with numpy, deterministic from a seed.
- `captions`: varied captions that mention some attributes of a scene.
- `pretrain`: CLIP's contrastive pretraining of a tiny open_clip model on the world, on the CPU in minutes.
- `datasets`: the downstream tasks (`TESTBED_DATASETS`), written to disk in the CoOp layout.
- `zeroshot`: zero-shot accuracy of a model on generated or written images.

The package ships a checkpoint made by `fastprompt testbed pretrain` (see `shipped_checkpoint()` and the JSON beside
it for the exact command, seed, data version and measured accuracy); `load_testbed_clip()` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastprompt.errors import FastPromptError
from fastprompt.testbed.datasets import (
    DEFAULT_DATA_SEED,
    DEFAULT_PER_CLASS,
    TESTBED_DATASETS,
    TestbedTask,
    build_testbed,
    generate_split,
    load_split,
    write_dataset,
)
from fastprompt.testbed.world import DATA_VERSION

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS = "fastprompt-testbed-v1.safetensors"

__all__ = [
    "DATA_VERSION",
    "DEFAULT_DATA_SEED",
    "DEFAULT_PER_CLASS",
    "TESTBED_DATASETS",
    "TestbedTask",
    "build_testbed",
    "generate_split",
    "load_split",
    "load_testbed_clip",
    "shipped_checkpoint",
    "shipped_record",
    "write_dataset",
]


def shipped_checkpoint() -> Path:
    """Path of the checkpoint shipped in the package (fp16 safetensors, loadable with `fastprompt.load_clip`).

    Raises:
        FastPromptError: the file is missing (a broken install); `fastprompt testbed pretrain` rebuilds it.
    """
    path = WEIGHTS_DIR / SHIPPED_WEIGHTS
    if not path.is_file():
        raise FastPromptError(
            f"The shipped testbed checkpoint {SHIPPED_WEIGHTS} is missing from the installed package; reinstall "
            f"fastprompt, or rebuild it with `fastprompt testbed pretrain --out {SHIPPED_WEIGHTS}`."
        )
    return path


def shipped_record() -> dict:
    """The JSON beside the shipped checkpoint: command, seed, data version, versions, time, measured accuracy."""
    return json.loads(shipped_checkpoint().with_suffix(".json").read_text())


def load_testbed_clip(checkpoint: str | Path | None = None, device: str = "cpu", precision: str = "fp32"):
    """Load the testbed CLIP (the shipped checkpoint by default) through `fastprompt.load_clip`.

    Args:
        checkpoint: a checkpoint written by `fastprompt testbed pretrain`; None: the shipped one. Its model name is
            read from the JSON beside it (the testbed's config when there is none).
        device: where the model lives.
        precision: "fp32", "bf16" or "fp16".

    Returns:
        The frozen `fastprompt.Clip`.
    """
    from fastprompt.clip import load_clip
    from fastprompt.testbed.pretrain import TESTBED_MODEL

    path = shipped_checkpoint() if checkpoint is None else Path(checkpoint)
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
