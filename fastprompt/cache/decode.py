"""Decoding and augmentation in DataLoader workers: each image is decoded once and all its views are made from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset as TorchDataset

from fastprompt.data.transforms import ViewTransform, load_rgb


@dataclass(frozen=True)
class ViewTask:
    """One image to encode: `views` augmented training views, or the test view when `augmented` is False.

    With `center`, an augmented task's views are followed by the test view (resize, centre crop) of the same decoded
    image: the training image's centre view, for one more pass of the image tower and no second decode.
    """

    path: str
    key: str
    augmented: bool
    views: int
    center: bool = False


@dataclass
class DecodedImage:
    """A worker's output for one task: pixels (views, 3, size, size), one more (the centre view, last) for a task with
    `center`; or None and the reason the image could not be read."""

    task_index: int
    pixels: torch.Tensor | None
    failure: str | None = None


class ViewDataset(TorchDataset):
    """Tasks -> decoded, transformed views; an unreadable image yields `pixels=None` instead of an exception."""

    def __init__(self, tasks: list[ViewTask], transform: ViewTransform):
        self.tasks = tasks
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> DecodedImage:
        task = self.tasks[index]
        try:
            image = load_rgb(task.path, exif_transpose=self.transform.exif_transpose)
        except Exception as error:  # any decoder failure (missing, empty, truncated, too large, not an image) skips it
            message = str(error).replace(task.path, task.key)
            return DecodedImage(index, None, f"{type(error).__name__}: {message}"[:200])
        if task.augmented:
            pixels = self.transform.train_views(image, task.key, task.views)
            if task.center:
                pixels = torch.cat([pixels, self.transform.test_view(image).unsqueeze(0)])
        else:
            pixels = self.transform.test_view(image).unsqueeze(0)
        return DecodedImage(index, pixels)


def keep_as_list(batch: list[DecodedImage]) -> list[DecodedImage]:
    """Collate function: images with failures cannot be stacked, so the main process concatenates the good ones."""
    return batch


def shard_bounded_batches(shard_bounds: list[tuple[int, int]], images_per_batch: int) -> list[list[int]]:
    """Task-index batches that never cross a shard boundary, so a shard's batches are the same in every process.

    Args:
        shard_bounds: [start, stop) task ranges, one per shard, in order.
        images_per_batch: images per batch (each contributes its views to the encoder batch).
    """
    batches = []
    for start, stop in shard_bounds:
        batches.extend(
            list(range(first, min(first + images_per_batch, stop))) for first in range(start, stop, images_per_batch)
        )
    return batches
