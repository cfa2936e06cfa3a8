"""`build_cache`: from a dataset to a feature cache folder (PROTOCOL.md section 4, DESIGN.md "Files on disk").

Each image is decoded once (in DataLoader workers) and each (image, view) encoded once by the frozen image tower,
batched on the chosen device (fp16 or bf16 autocast and channels-last on CUDA). Shards are written atomically with a
progress record each; a rerun skips complete shards, so an interrupted run resumes and a complete cache costs nothing.
Under torchrun each rank extracts its share of the shards and rank 0 writes the manifest once all have finished.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastprompt.atomic import full_disk_reported
from fastprompt.cache import ranks as rank_tools
from fastprompt.cache.decode import ViewDataset, ViewTask, keep_as_list, shard_bounded_batches
from fastprompt.cache.plan import CacheOptions, CachePlan, ShardPlan, fewshot_subsets, make_plan
from fastprompt.cache.records import (
    MANIFEST,
    assemble_manifest,
    check_folder,
    done_shards,
    plan_record,
    remove_stale_files,
    start_folder,
    write_json_atomic,
    write_shard_record,
)
from fastprompt.cache.shards import Sample, write_shard
from fastprompt.data.transforms import ViewTransform
from fastprompt.errors import FastPromptError, brief
from fastprompt.locks import FolderLock

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
KEPT = "finished shards are kept"  # what a full disk leaves (fastprompt.atomic.full_disk_reported)


class SkippedImagesWarning(UserWarning):
    """Some images could not be read; they are listed in the manifest's `skipped`."""


@dataclass
class CacheSummary:
    """What one `build_cache` call did, all ranks together."""

    out: Path
    images: int = 0
    views: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    skipped: list[dict] = field(default_factory=list)
    nothing_to_do: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        if self.nothing_to_do:
            return [f"{self.out}: the cache is complete, nothing to do ({self.shards_reused} shards)."]
        return [
            f"{self.out}: {self.images} images, {self.views} views encoded in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s), {self.bytes_written / 1e6:.1f} MB written in "
            f"{self.shards_written} shards ({self.shards_reused} reused), {len(self.skipped)} skipped."
        ]


def resolve_precision(precision: str, device: str) -> str:
    """ "auto" is fp16 autocast on CUDA (the reference's image tower runs in fp16) and fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise FastPromptError(f"Unknown precision {brief(precision)}; use auto, fp32, fp16 or bf16.")
    return precision


class ImageEncoder:
    """The frozen image tower on one device and precision: pixels (B, 3, S, S) -> features (B, D) float32 on CPU."""

    def __init__(self, clip, device: str, precision: str):
        self.model = clip.model.to(device)
        self.device = torch.device(device)
        self.precision = precision
        visual = self.model.visual
        convolutions = sum(isinstance(module, torch.nn.Conv2d) for module in visual.modules())
        # ResNet towers gain from channels-last on CUDA; a ViT has a single patch-embedding convolution
        self.channels_last = self.device.type == "cuda" and convolutions > 1
        if self.channels_last:
            visual.to(memory_format=torch.channels_last)
        self.input_dtype = next(visual.parameters()).dtype

    def _autocast(self):
        if self.precision in AUTOCAST_DTYPES:
            return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.precision not in AUTOCAST_DTYPES:
            pixels = pixels.to(self.input_dtype)
        with self._autocast():
            return self.model.encode_image(pixels).float().cpu()


def model_record(clip, precision: str) -> dict:
    """The manifest's `model`: a checkpoint file is recorded by its absolute path, so the trainer finds it.

    `architecture` is the network as built (`Clip.architecture`: QuickGELU or GELU, per tower); the weights' checksum
    cannot tell them apart, so the trainer rebuilds the same network from this record (docs/models.md).
    """
    pretrained = None if clip.pretrained is None else str(clip.pretrained)
    if pretrained is not None and Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())
    return {
        "name": clip.name,
        "pretrained": pretrained,
        "weights_sha256": clip.weights_checksum,
        "precision": precision,
        "architecture": dict(getattr(clip, "architecture", None) or {}),
        "preprocess": {key: clip.preprocess_cfg[key] for key in ("size", "mean", "std", "interpolation")},
    }


def build_cache(
    dataset,
    clip,
    out: Path | str,
    options: CacheOptions | None = None,
    subsets: dict | None = None,
    device: str = "cpu",
    precision: str = "auto",
    batch_size: int = 256,
    num_workers: int = 4,
    progress: bool = True,
) -> CacheSummary:
    """Extract the features of `dataset` with `clip`'s image tower into the cache folder `out`.

    Args:
        dataset: a `fastprompt.data.Dataset`.
        clip: a frozen `Clip` (its model is moved to `device`).
        out: the cache folder (created; resumed when it holds this cache in part; refused when it holds another).
        options: shots, seeds, views, full train split, stored dtype, shard size, augmentation seed.
        subsets: {"K-S": (train items, val items)}; default: drawn as the reference draws them.
        device: "cpu", "cuda" or "cuda:N" ("cuda" is each rank's own GPU under torchrun).
        precision: "auto", "fp32", "fp16" or "bf16" (autocast for the last two).
        batch_size: views per forward pass of the image tower.
        num_workers: DataLoader worker processes decoding and augmenting images (0: in this process).
        progress: show a progress bar (rank 0).

    Returns:
        The summary of this call on this rank.
    """
    options = options or CacheOptions()
    out = Path(out)
    ranks = rank_tools.start(device)
    lock = FolderLock(out, "fastprompt cache", remedy="pass another --out")  # taken by rank 0 only, in _build
    try:
        return _build(
            dataset, clip, out, options, subsets, ranks, device, precision, batch_size, num_workers, progress, lock
        )
    finally:
        lock.release()
        rank_tools.stop(ranks)


def _build(dataset, clip, out, options, subsets, ranks, device, precision, batch_size, num_workers, progress, lock):
    device = rank_tools.rank_device(device, ranks)
    precision = resolve_precision(precision, device)
    encoder = ImageEncoder(clip, device, precision)
    transform = ViewTransform.from_preprocess_cfg(
        clip.preprocess_cfg, seed=options.augmentation_seed, exif_transpose=options.exif_transpose
    )
    feature_dim = int(encoder(torch.zeros(1, 3, transform.size, transform.size)).shape[-1])
    if subsets is None:
        subsets = fewshot_subsets(dataset, options.shots, options.seeds)
    plan = make_plan(dataset, subsets, options, feature_dim)
    record = plan_record(
        model_record(clip, precision), transform.describe(), options.views, options.dtype, feature_dim,
        dataset, plan, options.full_train,
    )  # fmt: skip
    verdict, refusal = None, None
    if ranks.is_main:
        try:
            lock.acquire()  # one build per folder; the ranks of this build share it (a refusal reaches them all)
            remove_stale_files(out)
            check_folder(out, record)
            with full_disk_reported("the plan record .progress/plan.json", out, KEPT):
                start_folder(out, record)
        except FastPromptError as error:
            verdict, refusal = str(error), error
    verdict = rank_tools.share_from_main(ranks, verdict)
    if verdict:
        raise refusal or FastPromptError(verdict)  # rank 0 keeps the error's type (FolderInUseError, DiskFullError)
    done = done_shards(out, plan.shards)
    summary = CacheSummary(out=out, shards_reused=len(done))
    if len(done) == len(plan.shards) and (out / MANIFEST).is_file():
        summary.nothing_to_do = True
        return summary
    todo = [shard for index, shard in enumerate(plan.shards) if ranks.owns(index) and shard.name not in done]
    started = time.perf_counter()
    _extract(
        plan, todo, encoder, transform, options.dtype, batch_size, num_workers, out, summary, progress and ranks.is_main
    )
    summary.seconds = time.perf_counter() - started
    summary = _combine(rank_tools.gather(ranks, summary))
    if ranks.is_main:
        records = done_shards(out, plan.shards)
        missing = [shard.name for shard in plan.shards if shard.name not in records]
        if missing:
            raise FastPromptError(f"Shards {', '.join(missing[:3])} of '{out}' were not written; rerun to finish.")
        manifest = assemble_manifest(record, plan, records)
        with full_disk_reported(MANIFEST, out, KEPT):
            write_json_atomic(out / MANIFEST, manifest)
        if manifest["skipped"]:
            listed = ", ".join(item["path"] for item in manifest["skipped"][:5])
            more = "" if len(manifest["skipped"]) <= 5 else ", ..."
            warnings.warn(
                f"{len(manifest['skipped'])} image(s) could not be read and were skipped ({listed}{more}); "
                f"they are listed under 'skipped' in {out / MANIFEST}.",
                SkippedImagesWarning,
                stacklevel=2,
            )
    rank_tools.barrier(ranks)
    return summary


def _extract(plan: CachePlan, shards: list[ShardPlan], encoder, transform, dtype, batch_size, num_workers, out,
             summary: CacheSummary, show_progress: bool) -> None:  # fmt: skip
    """Encode the given shards' images in order; every shard is written as soon as its last batch is encoded."""
    if not shards:
        return
    tasks: list[ViewTask] = []
    ends: list[int] = []
    batches: list[list[int]] = []
    for shard in shards:
        start = len(tasks)
        views, center = plan.views[shard.split], plan.center[shard.split]
        for item in plan.shard_items(shard):
            tasks.append(ViewTask(str(item.path), item.key, shard.split == "train", views, center))
        ends.append(len(tasks))
        images_per_batch = max(1, batch_size // plan.encoded_views(shard.split))
        batches.extend(shard_bounded_batches([(start, len(tasks))], images_per_batch))
    loader = DataLoader(
        ViewDataset(tasks, transform),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=keep_as_list,
        pin_memory=encoder.device.type == "cuda",
    )
    numpy_dtype = np.float16 if dtype == "float16" else np.float32
    shard_index, samples, skipped = 0, [], []
    bar = tqdm(total=len(tasks), unit="img", disable=not show_progress, desc="cache", smoothing=0.1)
    for batch in loader:
        shard = shards[shard_index]
        first_task = ends[shard_index - 1] if shard_index else 0
        readable = [decoded for decoded in batch if decoded.pixels is not None]
        if readable:
            features = encoder(torch.cat([decoded.pixels for decoded in readable]))
            per_image = torch.split(features, [decoded.pixels.shape[0] for decoded in readable])
            for decoded, image_features in zip(readable, per_image, strict=True):
                position = shard.start + decoded.task_index - first_task
                item = plan.splits[shard.split][position]
                stored = image_features.numpy().astype(numpy_dtype)
                views = plan.views[shard.split]  # the centre view, where there is one, follows the stored views
                center = stored[views] if plan.center[shard.split] else None
                samples.append(Sample(position, item.key, item.label, stored[:views], center))
                summary.images += 1
                summary.views += image_features.shape[0]
        skipped += [
            {"path": tasks[decoded.task_index].key, "reason": decoded.failure}
            for decoded in batch
            if decoded.pixels is None
        ]
        bar.update(len(batch))
        if batch[-1].task_index + 1 == ends[shard_index]:
            write_shard_and_record(out, shard, samples, skipped, summary)
            shard_index, samples, skipped = shard_index + 1, [], []
    bar.close()


def _combine(summaries: list[CacheSummary]) -> CacheSummary:
    """All ranks' work as one summary (the ranks run in parallel: the time is the slowest rank's)."""
    combined = summaries[0]
    for other in summaries[1:]:
        combined.images += other.images
        combined.views += other.views
        combined.bytes_written += other.bytes_written
        combined.shards_written += other.shards_written
        combined.skipped.extend(other.skipped)
        combined.seconds = max(combined.seconds, other.seconds)
    return combined


def write_shard_and_record(out: Path, shard: ShardPlan, samples: list[Sample], skipped: list[dict], summary) -> None:
    """Write one shard atomically, then its progress record: from then on a rerun skips it."""
    with full_disk_reported(f"shard {shard.name}", out, KEPT):
        entry = write_shard(out / shard.name, shard.split, samples)
    with full_disk_reported(f"the progress record of shard {shard.name}", out, KEPT):
        write_shard_record(out, entry, skipped)
    summary.bytes_written += entry["bytes"]
    summary.shards_written += 1
    summary.skipped.extend(skipped)
