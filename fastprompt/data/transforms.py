"""The image transforms of PROTOCOL.md section 4, with training views that are deterministic per (image, view).

Train view: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic), horizontal flip with probability
1/2, CLIP normalisation. The crop and flip are drawn from a `torch.Generator` seeded by a hash of (cache seed, image
key, view index), with torchvision's own sampling procedure, so a view is the same in every process and every run.
Test view: resize the short side to `size` (bicubic), centre crop `size`, CLIP normalisation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


@dataclass(frozen=True)
class ViewTransform:
    """The train and test transforms of one cache.

    Attributes:
        size: output side in pixels (the image tower's input size).
        mean, std: per-channel normalisation.
        interpolation: "bicubic" (the protocol) or "bilinear".
        scale, ratio: RandomResizedCrop's area and aspect-ratio ranges.
        flip_probability: horizontal flip probability of a training view.
        seed: the cache's augmentation seed, mixed into every view's generator.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    seed: int = 0

    @classmethod
    def from_preprocess_cfg(cls, cfg: dict, seed: int = 0) -> ViewTransform:
        """Build from `Clip.preprocess_cfg` (size, mean, std, interpolation)."""
        interpolation = cfg.get("interpolation", "bicubic")
        return cls(
            size=int(cfg["size"]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
            seed=seed,
        )

    def describe(self) -> dict:
        """The manifest's `transforms` entry: everything that determines the pixels of every view."""
        common = {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
        train = {
            "kind": "RandomResizedCrop+HorizontalFlip",
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip_probability": self.flip_probability,
            "seed": self.seed,
            "generator": "torch.Generator seeded by sha256(seed:key:view)",
            **common,
        }
        test = {"kind": "ResizeShortSide+CenterCrop", **common}
        return {"train": train, "test": test}

    def view_generator(self, key: str, view: int) -> torch.Generator:
        """The generator of one training view, seeded from (cache seed, image key, view index)."""
        digest = hashlib.sha256(f"{self.seed}:{key}:{view}".encode()).digest()
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return generator

    def crop_parameters(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params drawn from `generator`: (top, left, height, width)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
            crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
            crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item())
                return top, left, crop_height, crop_width
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            crop_width, crop_height = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            crop_width, crop_height = int(round(height * max(self.ratio))), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def _normalise(self, image: Image.Image) -> torch.Tensor:
        return F.normalize(F.to_tensor(image), self.mean, self.std)

    def train_view(self, image: Image.Image, key: str, view: int) -> torch.Tensor:
        """Training view `view` of `image` (RGB PIL), identified by its key: (3, size, size) float32."""
        generator = self.view_generator(key, view)
        top, left, crop_height, crop_width = self.crop_parameters(image.width, image.height, generator)
        crop = F.resized_crop(
            image, top, left, crop_height, crop_width, [self.size, self.size], INTERPOLATIONS[self.interpolation]
        )
        if torch.rand(1, generator=generator).item() < self.flip_probability:
            crop = F.hflip(crop)
        return self._normalise(crop)

    def train_views(self, image: Image.Image, key: str, views: int) -> torch.Tensor:
        """All training views of one image: (views, 3, size, size)."""
        return torch.stack([self.train_view(image, key, view) for view in range(views)])

    def test_view(self, image: Image.Image) -> torch.Tensor:
        """The test view: short side resized to `size`, centre crop: (3, size, size) float32."""
        resized = F.resize(image, self.size, INTERPOLATIONS[self.interpolation])
        return self._normalise(F.center_crop(resized, [self.size, self.size]))

    def as_dict(self) -> dict:
        """All fields, for rebuilding the transform from a manifest."""
        return asdict(self)


def load_rgb(path) -> Image.Image:
    """Decode an image file to RGB (raises the decoder's error for an unreadable file)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")
