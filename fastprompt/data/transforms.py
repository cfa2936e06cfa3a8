"""The image transforms of PROTOCOL.md section 4, with training views that are deterministic per (image, view).

Train view: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic), horizontal flip with probability
1/2, CLIP normalisation. The crop and flip are drawn from a `torch.Generator` seeded by a hash of (cache seed, image
key, view index), with torchvision's own sampling procedure, so a view is the same in every process and every run.
Test view: resize the short side to `size` (bicubic), centre crop `size`, CLIP normalisation.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
# PIL's own refusal threshold at its default setting (2 x Image.MAX_IMAGE_PIXELS, about 13377 x 13377 pixels): the
# images the reference loader cannot read are those fastprompt skips, even where the process has raised or removed
# PIL's global limit (a lower global still applies, in Image.open)
MAX_IMAGE_PIXELS = 178_956_970
SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


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
        exif_transpose: decode images upright by their EXIF orientation tag (the reference ignores the tag).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    seed: int = 0
    exif_transpose: bool = False

    @classmethod
    def from_preprocess_cfg(cls, cfg: dict, seed: int = 0, exif_transpose: bool = False) -> ViewTransform:
        """Build from `Clip.preprocess_cfg` (size, mean, std, interpolation)."""
        interpolation = cfg.get("interpolation", "bicubic")
        return cls(
            size=int(cfg["size"]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
            seed=seed,
            exif_transpose=exif_transpose,
        )

    def describe(self) -> dict:
        """The manifest's `transforms` entry: everything that determines the pixels of every view."""
        common = {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
        if self.exif_transpose:  # recorded only when on, so caches made before the option keep their fingerprint
            common["exif_transpose"] = True
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


def load_rgb(path, exif_transpose: bool = False) -> Image.Image:
    """Decode an image file to 8-bit RGB as the reference loader does, except for 16-bit grayscale (docs/data.md).

    The reference (Dassl, and torchvision's default loader) is `Image.open(path).convert("RGB")`: alpha is dropped
    (not composited), palettes are expanded, grayscale is replicated, CMYK is converted by PIL, and the EXIF
    orientation is not applied. fastprompt does the same, with three decisions of its own:
    16-bit grayscale (modes I;16*, and I, which PIL gives 16-bit PGM files) is scaled to 8 bits (v / 257, rounded)
    where PIL's conversion clips every value above 255 to white; an image of more than `MAX_IMAGE_PIXELS` pixels is
    refused from its header before any pixel is decoded; an empty file is named as such. A truncated file raises as in
    the reference: `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is never set here.

    Args:
        path: the image file.
        exif_transpose: rotate and flip by the EXIF orientation tag (off: the reference ignores it).

    Raises:
        Exception: the decoder's error for an unreadable file (`PIL.UnidentifiedImageError`, `OSError` for a
            truncated one, `PIL.Image.DecompressionBombError` over the pixel limit).
    """
    if os.path.getsize(path) == 0:
        raise UnidentifiedImageError("the file is empty (0 bytes)")
    with warnings.catch_warnings():
        # the limit below is fastprompt's decision, and a palette's alpha is dropped as the reference drops it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"Image size ({pixels} pixels) exceeds fastprompt's limit of {MAX_IMAGE_PIXELS} pixels, "
                    f"could be a decompression bomb"
                )
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image.convert("RGB")`, except that 16-bit grayscale is scaled to 8 bits (PIL would clip it at 255)."""
    if image.mode in SIXTEEN_BIT_GRAY:
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray(((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8), "L")
    return image.convert("RGB")
