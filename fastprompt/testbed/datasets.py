"""The testbed's downstream few-shot tasks, generated from the world and written to disk in the CoOp layout.

World v2's two tasks (the demo's) classify fine-grained variants, a shape and its fill (8 classes: "solid circle",
"hollow circle", ..., "hollow star"), that the pretraining captions name only coarsely ("a circle"):

- `TestbedFineShapes`, no shift; `TestbedFineShapesShift`, each class's training and validation images on its own
  background, test images on random ones (the spurious cue below).

World v1's two tasks (kept reproducible) classify the shape (8 classes named by their words: "circle", "square", ...):

- `TestbedShapes`, no shift: train, val and test images are drawn from the same distribution (any colour, size,
  position, background).
- `TestbedShapesShift`, domain shift with a spurious cue: every training and validation image of a class lies on that
  class's own background (a texture in a colour, e.g. every circle on a teal striped background), so the background
  alone predicts the label on the few-shot data; the test images lie on random backgrounds. The pretraining captions
  paired every shape with every background, so zero-shot CLIP knows shapes regardless of background; a prompt fitted
  to the few shots may latch onto the background instead. This is the situation in which ProGrad's paper says CoOp
  forgets general knowledge.

On disk (PROTOCOL.md section 5): `<root>/<dataset_dir>/images/<class>/<split>_<index>.png`, the split file
`<root>/<dataset_dir>/split_zhou_<Name>.json` = {"train": [[relative_path, label, classname], ...], "val", "test"}
with paths relative to `images/`, and `testbed.json` recording the data version, seed and counts (a folder built
with the same settings is reused).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastprompt.errors import FastPromptError
from fastprompt.testbed.world import (
    BACKGROUND_COLOUR_NAMES,
    FILLS,
    SHAPES,
    TEXTURES,
    WORLDS,
    WorldSpec,
    render,
    sample_scenes,
)

SPLITS = ("train", "val", "test")
DEFAULT_PER_CLASS = {"train": 32, "val": 8, "test": 100}
DEFAULT_DATA_SEED = 0

# The shift task's spurious cue: each shape's training and validation background (texture, background colour).
# Every pair is different, so the background identifies the class on the few-shot data.
SPURIOUS_BACKGROUNDS: dict[str, tuple[str, str]] = {
    "circle": ("striped", "teal"),
    "square": ("dotted", "brown"),
    "triangle": ("checkered", "gray"),
    "star": ("grid", "beige"),
    "cross": ("wavy", "black"),
    "diamond": ("dotted", "black"),
    "hexagon": ("checkered", "teal"),
    "heart": ("wavy", "gray"),
}
# World v2's classes: four shapes that stay distinct at 64 px, each solid and hollow.
FINE_SHAPES = ("circle", "square", "triangle", "star")
FINE_CLASSES = tuple(f"{fill} {shape}" for shape in FINE_SHAPES for fill in FILLS)
# The same eight (texture, colour) pairs as v1's cue, one per fine-grained class.
FINE_SPURIOUS_BACKGROUNDS: dict[str, tuple[str, str]] = dict(
    zip(FINE_CLASSES, SPURIOUS_BACKGROUNDS.values(), strict=True)
)


@dataclass(frozen=True)
class TestbedTask:
    """One downstream task: what to classify, where it lives on disk, its templates, and how images are drawn.

    Attributes:
        name: the dataset's registered name (split file `split_zhou_<name>.json`).
        dataset_dir: folder under the data root.
        classnames: class names in label order (natural words).
        prograd_template: ProGrad's template (teacher, context initialisation); ends in "{}.".
        coop_template: the zero-shot "CLIP" row's template.
        train_backgrounds: per class, the (texture, background colour) of its train and val images; None: random.
        description: one line for people.
        image_dir: the images' folder inside `dataset_dir`.
        world: the world version the images are drawn from ("v1" or "v2"); a v2 class name is "<fill> <shape>".
    """

    name: str
    dataset_dir: str
    classnames: tuple[str, ...]
    prograd_template: str = "a photo of a {}."
    coop_template: str = "a photo of a {}."
    train_backgrounds: dict[str, tuple[str, str]] | None = field(default=None, hash=False)
    description: str = ""
    image_dir: str = "images"
    world: str = "v1"

    @property
    def spec(self) -> WorldSpec:
        """The task's world."""
        return WORLDS[self.world]

    @property
    def split_file(self) -> str:
        """The split file's name inside `dataset_dir`."""
        return f"split_zhou_{self.name}.json"

    @property
    def templates(self) -> tuple[str, str]:
        """(ProGrad template, CoOp template)."""
        return self.prograd_template, self.coop_template


TESTBED_DATASETS: dict[str, TestbedTask] = {
    "TestbedShapes": TestbedTask(
        name="TestbedShapes",
        dataset_dir="testbed_shapes",
        classnames=SHAPES,
        description="shape of the object; train, val and test from the same distribution (no shift)",
    ),
    "TestbedShapesShift": TestbedTask(
        name="TestbedShapesShift",
        dataset_dir="testbed_shapes_shift",
        classnames=SHAPES,
        train_backgrounds=SPURIOUS_BACKGROUNDS,
        description="shape; each class's train/val images share one background (spurious cue), test ones random",
    ),
    "TestbedFineShapes": TestbedTask(
        name="TestbedFineShapes",
        dataset_dir="testbed_fine_shapes",
        classnames=FINE_CLASSES,
        description="shape and fill (solid or hollow), a variant the captions rarely name; no shift",
        world="v2",
    ),
    "TestbedFineShapesShift": TestbedTask(
        name="TestbedFineShapesShift",
        dataset_dir="testbed_fine_shapes_shift",
        classnames=FINE_CLASSES,
        train_backgrounds=FINE_SPURIOUS_BACKGROUNDS,
        description="shape and fill; each class's train/val images share one background (spurious cue), test random",
        world="v2",
    ),
}
# The tasks `build_testbed`, `fastprompt testbed build` and the demo use by default: world v2's.
DEFAULT_TASKS: tuple[str, ...] = ("TestbedFineShapes", "TestbedFineShapesShift")
V1_TASKS: tuple[str, ...] = ("TestbedShapes", "TestbedShapesShift")


def _split_rng(task: TestbedTask, split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.name.encode()), SPLITS.index(split)])


def generate_split(task: TestbedTask, split: str, per_class: int, seed: int = DEFAULT_DATA_SEED):
    """Images and labels of one split, in memory.

    Args:
        task: the task.
        split: "train", "val" or "test".
        per_class: images per class.
        seed: data seed (same seed, same images).

    Returns:
        (images (N, 64, 64, 3) uint8, labels (N,) int64), class-major order (N = per_class * number of classes).
    """
    rng = _split_rng(task, split, seed)
    labels = np.repeat(np.arange(len(task.classnames)), per_class)
    names = [task.classnames[label] for label in labels]
    shapes = np.array([SHAPES.index(name.split()[-1]) for name in names])
    hollow = np.array([name.split()[0] == "hollow" for name in names]) if task.spec.has_fill else None
    texture = background = None
    if task.train_backgrounds is not None and split in ("train", "val"):
        cues = [task.train_backgrounds[name] for name in names]
        texture = np.array([TEXTURES.index(t) for t, _ in cues])
        background = np.array([BACKGROUND_COLOUR_NAMES.index(c) for _, c in cues])
    world = task.spec
    scenes = sample_scenes(rng, len(labels), shape=shapes, texture=texture, background=background, world=world,
                           hollow=hollow)  # fmt: skip
    return render(scenes, rng, outline_fraction=world.outline_fraction), labels


def _metadata(task: TestbedTask, per_class: dict[str, int], seed: int) -> dict:
    return {
        "data_version": task.spec.version,
        "task": task.name,
        "seed": seed,
        "per_class": dict(per_class),
        "classnames": list(task.classnames),
        "templates": {"prograd": task.prograd_template, "coop": task.coop_template},
        "train_backgrounds": task.train_backgrounds,
        "description": task.description,
    }


def write_dataset(
    task: TestbedTask,
    root: str | Path,
    per_class: dict[str, int] | None = None,
    seed: int = DEFAULT_DATA_SEED,
    force: bool = False,
) -> Path:
    """Write one task in the CoOp layout under `root`, or reuse a folder already built with the same settings.

    Args:
        task: the task.
        root: the data root (the task goes to `root/task.dataset_dir`).
        per_class: images per class per split (default `DEFAULT_PER_CLASS`).
        seed: data seed.
        force: rewrite even when an identical build is there.

    Returns:
        The dataset folder.
    """
    from PIL import Image

    per_class = {**DEFAULT_PER_CLASS, **(per_class or {})}
    folder = Path(root) / task.dataset_dir
    metadata = json.loads(json.dumps(_metadata(task, per_class, seed)))  # as it reads back (tuples become lists)
    marker = folder / "testbed.json"
    if not force and marker.is_file() and (folder / task.split_file).is_file():
        if json.loads(marker.read_text()) == metadata:
            return folder
    split_rows: dict[str, list] = {}
    for split in SPLITS:
        images, labels = generate_split(task, split, per_class[split], seed)
        rows = []
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            classname = task.classnames[label]
            relative = f"{classname.replace(' ', '_')}/{split}_{index:05d}.png"
            path = folder / task.image_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            rows.append([relative, int(label), classname])
        split_rows[split] = rows
    _write_json_atomic(folder / task.split_file, split_rows)
    _write_json_atomic(marker, metadata)
    return folder


def build_testbed(
    root: str | Path,
    names: list[str] | None = None,
    per_class: dict[str, int] | None = None,
    seed: int = DEFAULT_DATA_SEED,
    force: bool = False,
) -> dict[str, Path]:
    """Write the testbed tasks named (default: world v2's, `DEFAULT_TASKS`) under `root`; returns name -> folder."""
    names = list(DEFAULT_TASKS) if names is None else names
    return {name: write_dataset(TESTBED_DATASETS[name], root, per_class, seed, force) for name in names}


def load_split(root: str | Path, task: TestbedTask, split: str = "test"):
    """Read one split of a written task back from disk (through its split file).

    Returns:
        (images (N, H, W, 3) uint8, labels (N,) int64), in the split file's order.

    Raises:
        FastPromptError: the split file is missing (build the testbed first).
    """
    from PIL import Image

    folder = Path(root) / task.dataset_dir
    split_path = folder / task.split_file
    if not split_path.is_file():
        raise FastPromptError(
            f"{split_path} does not exist; write the testbed first with `fastprompt testbed build --out {root}`."
        )
    rows = json.loads(split_path.read_text())[split]
    images = np.stack([np.asarray(Image.open(folder / task.image_dir / path).convert("RGB")) for path, _, _ in rows])
    return images, np.array([label for _, label, _ in rows], dtype=np.int64)


def _write_json_atomic(path: Path, payload) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, path)
