"""Online augmentation: prompt runs trained with a fresh crop of every image at every epoch, as the released code does.

The released ProGrad and CoOp draw a new RandomResizedCrop + flip of each training image every epoch (200 distinct
crops of an image at 16 shots); a cached trainer draws from V stored views. This module runs the release's way, with
the image tower in the loop, so that the two can be compared (docs/views.md): at the start of every epoch it decodes
nothing new (each image is decoded once), draws the epoch's crop of every training image, encodes them with the
frozen image tower, and hands the engine an (N, 1, D) feature tensor, normalised as `LockstepEngine.__init__` does.
Everything else (batches, schedule, losses, projection, update, evaluation) is the cached trainer's own engine.

The crop of image `key` at epoch `e` is the cache transform's training view number `e` of that image
(`ViewTransform.train_view(image, key, e)`, seeded by (augmentation seed, key, e)): deterministic, and for e < V the
very view a cache with V views stores, so online training is a cache with one view per epoch, used in order.

Runs are trained in groups whose epochs line up (same shots, batch size and epochs: the same number of iterations
per epoch), so that one encoding of the group's images per epoch serves every run of the group. Only the plain
prompt methods whose update is the engine's own are supported (CoOp, ProGrad, KD).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError, brief
from fastprompt.train.config import RunConfig, Schedule
from fastprompt.train.engine import LockstepEngine, RunState

ONLINE_METHODS = ("coop", "prograd", "kd")


@dataclass(frozen=True)
class OnlineOptions:
    """How online training runs.

    Attributes:
        augmentation_seed: mixed into every crop's generator; None: the cache's own (its manifest's train transform).
        images_per_pass: images per image-tower forward pass.
        device: where the encoder and the engine run.
        progress: show a progress bar over epochs.
    """

    augmentation_seed: int | None = None
    images_per_pass: int = 256
    device: str = "cpu"
    progress: bool = False


class EpochCrops:
    """The training images of a cache, decoded once, and their crops' features for one epoch.

    Args:
        cache: the FeatureCache whose training rows the runs index.
        dataset: the dataset the cache was made from (its training items give the image files).
        clip: the frozen CLIP whose image tower encodes the crops.
        options: the augmentation seed and pass size.

    Raises:
        FastPromptError: the dataset is not the cache's, or lacks an image the cache holds.
    """

    def __init__(self, cache, dataset, clip, options: OnlineOptions) -> None:
        from fastprompt.data.transforms import ViewTransform, load_rgb

        if dataset.name != cache.dataset:
            raise FastPromptError(f"The images are of {dataset.name} but the cache holds {cache.dataset}.")
        paths = {item.key: item.path for item in dataset.train}
        self.keys = cache.split("train").keys
        missing = [key for key in self.keys if key not in paths]
        if missing:
            raise FastPromptError(
                f"The dataset folder lacks {len(missing)} training image(s) the cache holds, e.g. {brief(missing[0])}; "
                "pass the folder the cache was made from."
            )
        recorded = cache.manifest.get("transforms", {}).get("train", {})
        seed = recorded.get("seed", 0) if options.augmentation_seed is None else options.augmentation_seed
        exif = bool(recorded.get("exif_transpose", False))
        self.transform = ViewTransform.from_preprocess_cfg(clip.preprocess_cfg, seed, exif)
        self.paths, self.load_rgb = paths, load_rgb
        self.images: dict[int, object] = {}
        self.clip, self.options = clip, options

    @torch.no_grad()
    def features(self, rows: torch.Tensor, epoch: int, total_rows: int) -> torch.Tensor:
        """(total_rows, 1, D) features, normalised: epoch `epoch`'s crop of each row in `rows`, zeros elsewhere."""
        for row in rows.tolist():
            if row not in self.images:
                self.images[row] = self.load_rgb(self.paths[self.keys[row]], self.transform.exif_transpose)
        model = self.clip.model
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        encoded = []
        row_list = rows.tolist()
        for start in range(0, len(row_list), self.options.images_per_pass):
            chunk = row_list[start : start + self.options.images_per_pass]
            pixels = torch.stack([self.transform.train_view(self.images[r], self.keys[r], epoch) for r in chunk])
            encoded.append(model.encode_image(pixels.to(device, dtype)).float())
        features = torch.cat(encoded)
        full = torch.zeros(total_rows, 1, features.shape[-1], device=features.device)
        full[rows.to(features.device), 0] = features
        return F.normalize(full, dim=-1)


def train_online(cache, dataset, clip, configs: list[RunConfig], out_dir: str | Path, options=None) -> list[dict]:
    """Train prompt runs with a fresh crop of every training image at every epoch; write them like a sweep.

    Args:
        cache: the FeatureCache of `dataset` (few-shot subsets, test features, class names); its stored training
            views are not used.
        dataset: the dataset read from its folder (`fastprompt.data.load_dataset`): the images to crop.
        clip: the Clip the cache was made with.
        configs: RunConfigs of CoOp, ProGrad or KD on `cache.dataset` (few-shot setting).
        out_dir: the sweep folder: one run folder per config and `results.jsonl`; finished runs are skipped.
        options: `OnlineOptions`.

    Returns:
        The sweep folder's result records.

    Raises:
        FastPromptError: a method other than CoOp, ProGrad or KD, another setting, or a dataset that does not match.
    """
    from fastprompt.locks import FolderLock
    from fastprompt.train.results import ResultWriter

    options = options or OnlineOptions()
    for config in configs:
        if config.method not in ONLINE_METHODS or config.setting != "fewshot" or config.dataset != cache.dataset:
            raise FastPromptError(
                f"Online augmentation trains {', '.join(ONLINE_METHODS)} in the few-shot setting on the cache's "
                f"dataset; run {config.run_id} is {config.method} ({config.setting}) on {config.dataset}."
            )
    out_dir = Path(out_dir)
    with FolderLock(out_dir, "fastprompt train --online-augment", remedy="pass another --out"):
        writer = ResultWriter(out_dir)
        pending = [c for c in configs if not writer.finished(c.run_id)]
        if pending:
            crops = EpochCrops(cache, dataset, clip, options)
            from fastprompt.train.sweep import _prompt_prefix, _templates  # the cached trainer's prompt layout

            prograd_template, _ = _templates(cache)
            groups: dict[tuple, list[RunConfig]] = defaultdict(list)
            for config in pending:
                prefix = _prompt_prefix(config, prograd_template)
                groups[(config.shots, config.batch_size, config.epochs, prefix, config.n_ctx)].append(config)
            for (*_, prefix, _), members in groups.items():
                _train_group(members, cache, clip, crops, prefix, prograd_template, writer, options)
        return writer.records()


def _train_group(configs, cache, clip, crops: EpochCrops, prefix, prograd_template, writer, options) -> None:
    from fastprompt.encoder import PromptEncoder
    from fastprompt.prompt import random_context
    from fastprompt.train.sweep import _close_epoch, _evaluate  # the cached trainer's epoch log and evaluation
    from fastprompt.train.view import DatasetView
    from fastprompt.zeroshot import zero_shot_weights

    view = DatasetView(cache, clip, "fewshot")
    encoder = PromptEncoder(clip, view.base_names, n_ctx=configs[0].n_ctx, prompt_prefix=prefix)
    teachers = {}
    if any(c.uses_teacher for c in configs):
        teachers["single"] = zero_shot_weights(clip, view.base_names, prograd_template)
    runs, contexts, keys = [], [], {}
    for config in configs:
        rows, labels, train_keys, val_keys = view.subset(config.shots, config.seed)
        keys[config.run_id] = (train_keys, val_keys)
        schedule = Schedule(
            rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr, config.warmup_epochs
        )
        teacher = "single" if config.uses_teacher else None
        runs.append(RunState(config, rows, labels, schedule, torch.Generator().manual_seed(config.seed), teacher))
        if config.init == "template":
            contexts.append(encoder.initial_context("template"))
        else:
            generator = torch.Generator().manual_seed(config.seed)
            contexts.append(random_context(config.n_ctx, encoder.width, generator).to(encoder.device))
    iterations = {(run.schedule.iterations, run.schedule.total_steps) for run in runs}
    if len(iterations) != 1:
        raise FastPromptError("Online augmentation needs the runs of a group to share their epochs; got several.")
    total_rows = cache.split("train").labels.numel()
    used = torch.unique(torch.cat([run.train_index for run in runs]))
    engine = LockstepEngine(
        encoder, torch.zeros(total_rows, 1, 1), runs, torch.stack(contexts), teachers, clip.logit_scale
    )
    started = time.monotonic()
    encode_seconds = 0.0
    epochs = runs[0].schedule.total_steps // runs[0].schedule.iterations
    for epoch in _epochs(epochs, options.progress):
        clock = time.monotonic()
        # Set as LockstepEngine.__init__ sets it: fp32, normalised, on the engine's device; one view per image.
        engine.features = crops.features(used, epoch, total_rows).to(engine.device, torch.float32)
        engine.num_views = 1
        encode_seconds += time.monotonic() - clock
        for _ in range(runs[0].schedule.iterations):
            stepped = engine.step()
            for index in stepped:
                run = engine.runs[index]
                if run.step % run.schedule.iterations == 0 and engine.collect(index):
                    _close_epoch(engine, index, encoder, view)
    for index, run in enumerate(engine.runs):
        engine.collect(index)
        context = engine.context(index)
        metrics, predictions = {}, None
        if run.status != "failed":
            accuracy, per_class, test_predictions = _evaluate(encoder, context, view.test_base)
            metrics = {"accuracy": accuracy, "per_class_accuracy": per_class}
            predictions = {"predictions": test_predictions, "labels": view.test_base[1]}
        metrics["augmentation"] = {"kind": "online", "seed": crops.transform.seed, "crops_per_image": epochs}
        timings = {
            "train_seconds": time.monotonic() - started,
            "image_tower_seconds": encode_seconds,
            "steps": run.step,
            "group_runs": len(runs),
        }
        train_keys, val_keys = keys[run.config.run_id]
        writer.write(
            run.config,
            cache,
            metrics,
            timings,
            train_keys,
            val_keys,
            context=context,
            log=run.log,
            status="failed" if run.status == "failed" else "done",
            reason=run.reason,
            divergence=run.divergence,
            predictions=predictions,
            classes=view.base_names,
        )


def _epochs(count: int, progress: bool):
    if not progress:
        return range(count)
    from tqdm.auto import tqdm

    return tqdm(range(count), unit="epoch", desc="online training", dynamic_ncols=True)
