"""Pretraining a tiny open_clip model on the generated world with CLIP's contrastive loss, on the CPU in minutes.

A pool of scenes is rendered once (seeded), each with a "shape twin" that differs only in its shape; every step
draws half a batch of scenes plus their twins and gives each image a freshly sampled caption, so the same image is
seen with many phrasings and a caption is told from its twin's only by the shape. The loss is open_clip's
`ClipLoss` (symmetric cross-entropy over the batch's image-text similarities, scaled by the learnable logit scale).
The checkpoint is the model's state dict in fp16 (safetensors), loadable with
`fastprompt.load_clip(model_name, pretrained=path)`, with a JSON beside it recording the command, seed, data
version, versions, training time and measured zero-shot accuracy.

World v2's model continues from v1's checkpoint (`init`) on v2's scenes, with random resized crops of the training
images (`crop_probability`): a web-trained CLIP has seen objects at every scale and in part, which is what lets it read
the protocol's crops; v1's model, trained on whole images only, reads them at 0.6 of its accuracy on whole ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastprompt.testbed.captions import captions_for
from fastprompt.testbed.datasets import TESTBED_DATASETS, generate_split
from fastprompt.testbed.world import SHAPES, WORLDS, Scenes, render, sample_scenes
from fastprompt.testbed.zeroshot import images_to_tensor, zero_shot_accuracy

TESTBED_MODEL = "fastprompt-tiny"
EVAL_SEED = 1234  # test images for the zero-shot measurement; distinct from the default data seed 0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretraining run (recorded in the checkpoint's JSON).

    Attributes:
        model: open_clip model name (fastprompt's configs are registered).
        seed: seeds the scene pool, captions, batch order and the model's initialisation.
        steps: optimizer steps (the run is deterministic in steps; `max_minutes` only caps it).
        batch_size: image-caption pairs per step (half scenes, half their shape twins).
        pool_size: scenes rendered once (plus as many twins) and re-captioned at every draw.
        lr: peak AdamW learning rate (linear warm-up, then cosine to zero).
        warmup_steps: warm-up length.
        weight_decay: AdamW weight decay on matrices (not on biases, gains, embeddings or the logit scale).
        eval_every: steps between zero-shot measurements (0: only at the end).
        eval_per_class: test images per class for those measurements.
        max_minutes: stop early when training has taken this long (None: no cap).
        threads: torch CPU threads (None: leave torch's default).
        world: the world version to train on ("v1" or "v2").
        init: a checkpoint to start from (a path, or "v1" for the shipped v1 checkpoint); None: random weights.
        crop_probability: probability that a training image is replaced by a random resized crop of it (the cache's
            RandomResizedCrop: scale 0.08-1, aspect 3/4-4/3, bicubic, horizontal flip); 0: whole images, no draws.
    """

    model: str = TESTBED_MODEL
    seed: int = 0
    steps: int = 16000
    batch_size: int = 128
    pool_size: int = 10000
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_per_class: int = 100
    max_minutes: float | None = None
    threads: int | None = None
    world: str = "v1"
    init: str | None = None
    crop_probability: float = 0.0


def encode_text_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text`, run only up to the last end-of-text token of the batch.

    The text attention is causal and only the end-of-text position is read, so later (padding) positions cannot change
    the result: (B, 77) tokens -> (B, embed_dim), equal to `model.encode_text(tokens)`, 3-4x cheaper for short captions.
    """
    end_positions = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
    length = int(end_positions.max()) + 1
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    return x[torch.arange(len(tokens)), end_positions] @ model.text_projection


def shape_twins(scenes: Scenes, rng: np.random.Generator) -> Scenes:
    """A twin of every scene that differs only in its shape (a different shape, everything else equal).

    Each batch holds scenes with their twins, so telling a caption from its twin's takes the shape: without such
    pairs, colours and backgrounds separate most of a batch and the tiny ViT learned shapes far too slowly.
    """
    twins = scenes.subset(slice(None))
    offset = rng.integers(1, len(SHAPES), size=len(scenes))
    twins.shape = (scenes.shape + offset) % len(SHAPES)
    return twins


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _learning_rate(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


def random_resized_crops(
    images: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
) -> np.ndarray:
    """torchvision's RandomResizedCrop (its sampling procedure, bicubic) and a horizontal flip, drawn from `rng`.

    Args:
        images: (N, H, W, 3) uint8.
        rng: the generator of the crop boxes and flips.
        scale, ratio: the crop's area fraction and aspect-ratio ranges.
        flip_probability: probability of a horizontal flip.

    Returns:
        (N, H, W, 3) uint8 crops, each resized back to H x W.
    """
    n, height, width, _ = images.shape
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    crops = torch.empty_like(pixels)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for index in range(n):
        top, left, crop_height, crop_width = 0, 0, height, width
        for _ in range(10):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                crop_height, crop_width = h, w
                break
        crop = pixels[index : index + 1, :, top : top + crop_height, left : left + crop_width]
        crop = torch.nn.functional.interpolate(crop, size=(height, width), mode="bicubic", align_corners=False)
        crops[index] = crop[0].flip(-1) if rng.random() < flip_probability else crop[0]
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def measure_zero_shot(
    model, tokenizer, per_class: int = 100, seed: int = EVAL_SEED, world: str = "v1", crops: bool = False
) -> dict[str, float]:
    """Zero-shot accuracy (percent) on freshly generated images of the world's testbed tasks, "a photo of a {}.".

    v1 measures on generated test-split images (as its shipped record did); v2 on generated validation-split images,
    so that no v2 decision rests on anything drawn like a test split.

    Args:
        model: an open_clip CLIP in eval mode.
        tokenizer: its tokenizer.
        per_class: images per class.
        seed: data seed of the images.
        world: whose tasks to measure.
        crops: also measure on one random resized crop of each image (keys "<task>/crops").

    Returns:
        task name -> accuracy in percent.
    """
    split = "test" if world == "v1" else "val"
    accuracies = {}
    for name, task in TESTBED_DATASETS.items():
        if task.world != world:
            continue
        images, labels = generate_split(task, split, per_class, seed)
        templates = [task.coop_template]
        accuracies[name] = zero_shot_accuracy(model, tokenizer, images, labels, task.classnames, templates)
        if crops:
            cropped = random_resized_crops(images, np.random.default_rng(seed))
            accuracies[f"{name}/crops"] = zero_shot_accuracy(
                model, tokenizer, cropped, labels, task.classnames, templates
            )
    return accuracies


def _evaluate(model, tokenizer, config: PretrainConfig, step: int, started: float, losses: list, report) -> dict:
    model.eval()
    accuracy = measure_zero_shot(
        model, tokenizer, config.eval_per_class, world=config.world, crops=config.world != "v1"
    )
    recent = float(np.mean(losses[-50:])) if losses else float("nan")
    scores = ", ".join(f"{name} {value:.1f}%" for name, value in accuracy.items())
    report(f"step {step}/{config.steps}  loss {recent:.3f}  zero-shot: {scores}")
    return {"step": step, "seconds": round(time.perf_counter() - started, 1), "loss": round(recent, 4), **accuracy}


def pretrain(
    config: PretrainConfig, out: str | Path | None = None, command: str | None = None, report: Callable = print
) -> dict:
    """Train a CLIP from random weights on the world; save the fp16 checkpoint and its JSON when `out` is given.

    Args:
        config: the run's settings.
        out: checkpoint path (`.safetensors`); the JSON goes beside it with the suffix `.json`. None: don't save.
        command: the command line to record (for rebuilding).
        report: called with one progress line per evaluation.

    Returns:
        The record written to the JSON (config, losses, accuracies, timings, environment), plus "model" (the trained
        open_clip model, fp32, eval mode) when `out` is None.
    """
    import open_clip

    from fastprompt.clip import register_model_configs

    if config.threads:
        torch.set_num_threads(config.threads)
    register_model_configs()
    torch.manual_seed(config.seed)
    model = open_clip.create_model(config.model, pretrained=None)
    init_record = None
    if config.init is not None:
        init_record = load_initial_weights(model, config.init)
    tokenizer = open_clip.get_tokenizer(config.model)
    image_size = open_clip.get_model_preprocess_cfg(model).get("size", 64)
    image_size = image_size if isinstance(image_size, int) else int(image_size[0])

    world = WORLDS[config.world]
    rng = np.random.default_rng([config.seed, 0x5EED])
    started = time.perf_counter()
    pool_scenes = sample_scenes(rng, config.pool_size, image_size=image_size, world=world)
    twin_scenes = shape_twins(pool_scenes, rng)
    pool_images = render(pool_scenes, rng, image_size=image_size, outline_fraction=world.outline_fraction)
    twin_images = render(twin_scenes, rng, image_size=image_size, outline_fraction=world.outline_fraction)
    render_seconds = time.perf_counter() - started

    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_function = open_clip.ClipLoss()
    losses, evaluations = [], []
    started = time.perf_counter()
    stopped_early = False
    step = 0
    for step in range(config.steps):
        if config.max_minutes is not None and time.perf_counter() - started > 60.0 * config.max_minutes:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        model.train()
        index = rng.choice(config.pool_size, size=config.batch_size // 2, replace=False)
        batch = np.concatenate([pool_images[index], twin_images[index]])
        scenes = pool_scenes.subset(index), twin_scenes.subset(index)
        texts = tokenizer(captions_for(scenes[0], rng) + captions_for(scenes[1], rng))
        if config.crop_probability > 0:
            cropped = rng.random(len(batch)) < config.crop_probability
            batch[cropped] = random_resized_crops(batch[cropped], rng)
        images = images_to_tensor(batch)
        image_features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        text_features = torch.nn.functional.normalize(encode_text_truncated(model, texts), dim=-1)
        loss = loss_function(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            evaluations.append(_evaluate(model, tokenizer, config, step + 1, started, losses, report))
    steps_done = step + 1 if not stopped_early else step
    train_seconds = time.perf_counter() - started
    evaluations.append(_evaluate(model, tokenizer, config, steps_done, started, losses, report))
    final = {name: evaluations[-1][name] for name in TESTBED_DATASETS if name in evaluations[-1]}

    record = {
        "model": config.model,
        "data_version": world.version,
        "config": asdict(config),
        "command": command,
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "loss_first_50": float(np.mean(losses[:50])) if losses else None,
        "loss_last_50": float(np.mean(losses[-50:])) if losses else None,
        "zero_shot_accuracy": final,
        "zero_shot_eval": {
            "template": "coop template of each task",
            "per_class": config.eval_per_class,
            "data_seed": EVAL_SEED,
            **({} if config.world == "v1" else {"split": "val", "crops": "one random resized crop of each image"}),
        },
        "evaluations": evaluations,
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "environment": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    if init_record is not None:
        record["init"] = init_record
    if out is None:
        return {**record, "model_object": model}
    save_checkpoint(model, out, record)
    return record


def load_initial_weights(model: torch.nn.Module, init: str) -> dict:
    """Load a checkpoint into `model` to continue from it ("v1": the shipped v1 one); returns its file and sha256.

    Raises:
        FastPromptError: the file is missing or does not fit the model.
    """
    import hashlib

    from safetensors.torch import load_file

    from fastprompt.errors import FastPromptError
    from fastprompt.testbed import shipped_checkpoint

    path = shipped_checkpoint("v1") if init == "v1" else Path(init)
    if not path.is_file():
        raise FastPromptError(f"The initial checkpoint {path} does not exist; pass a checkpoint file or 'v1'.")
    state = {name: tensor.float() for name, tensor in load_file(str(path)).items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise FastPromptError(
            f"The initial checkpoint {path.name} does not fit the model: {str(error)[:200]}"
        ) from None
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _fix_metadata_order(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file's metadata in `metadata`'s own key order, in place.

    safetensors serialises the metadata from a hash map whose order changes from one map to the next, so the same
    weights could be written as two different files; byte-identical rebuilds need one order. The rewrite keeps the
    header's length (the same pairs, reordered), so nothing else in the file moves.
    """
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    written = json.loads(bytes(data[8 : 8 + length]))["__metadata__"]  # in the order the file holds them
    compact = {"separators": (",", ":")}
    old = json.dumps({"__metadata__": written}, **compact).encode()[1:-1]
    new = json.dumps({"__metadata__": metadata}, **compact).encode()[1:-1]
    start = data.index(old, 8, 8 + length)
    data[start : start + len(old)] = new
    path.write_bytes(bytes(data))


def save_checkpoint(model: torch.nn.Module, out: str | Path, record: dict) -> Path:
    """Write the model's state dict in fp16 as safetensors at `out` and `record` as JSON beside it (atomically)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    temporary = out.with_name(out.name + ".tmp")
    metadata = {"model": record["model"], "data_version": record["data_version"]}
    save_file(state, str(temporary), metadata=metadata)
    _fix_metadata_order(temporary, metadata)
    temporary.chmod(0o644)  # safetensors creates the file private; a shipped checkpoint is for everyone to read
    os.replace(temporary, out)
    record_path = out.with_suffix(".json")
    temporary = record_path.with_name(record_path.name + ".tmp")
    temporary.write_text(json.dumps({**record, "file": out.name}, indent=1) + "\n")
    os.replace(temporary, record_path)
    return out
