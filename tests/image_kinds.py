"""Image files of every kind a dataset may hold, generated with PIL from numpy arrays, with the treatment each gets.

`IMAGE_KINDS` lists them: each writes a file and says either the RGB pixels fastprompt must decode it to (computed
from the source array, independently of fastprompt's loader, wherever the format is lossless) or the regular
expression of the reason it is skipped with. docs/data.md ("What each kind of image gets") is the same table in words.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 13_400  # 13400^2 = 179.56 M pixels, just over fastprompt's limit (and PIL's default refusal threshold)


@dataclass(frozen=True)
class ImageKind:
    """One kind of image file.

    Attributes:
        name: the kind, also the file's stem.
        suffix: the file's extension.
        write: (path, rng) -> the expected RGB pixels (H, W, 3) uint8, or None for a skipped kind.
        reason: for a skipped kind, a regular expression its manifest reason matches.
    """

    name: str
    suffix: str
    write: Callable[[Path, np.random.Generator], np.ndarray | None]
    reason: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.suffix}"


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _gray_to_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def _reference(path: Path) -> np.ndarray:
    """The reference loader's pixels (`Image.open(path).convert("RGB")`): the expectation for lossy formats."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _rgb_jpeg(path, rng):
    Image.fromarray(_random(rng, 30, 40, 3)).save(path, quality=90)
    return _reference(path)


def _rgb_png(path, rng):
    pixels = _random(rng, 36, 28, 3)
    Image.fromarray(pixels).save(path)
    return pixels


def _rgba_png(path, rng):
    pixels = _random(rng, 32, 32, 4)
    pixels[:8, :, 3] = 0  # fully transparent rows keep their colour: alpha is dropped, not composited
    Image.fromarray(pixels, "RGBA").save(path)
    return pixels[..., :3]


def _palette(rng, transparency):
    image = Image.fromarray(_random(rng, 30, 34, 3)).quantize(16)
    if transparency is not None:
        image.info["transparency"] = transparency
    palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    return image, palette[np.asarray(image)]


def _palette_png(path, rng):
    image, expected = _palette(rng, None)
    image.save(path)
    return expected


def _palette_transparent_index_png(path, rng):
    image, expected = _palette(rng, 0)  # one transparent palette entry (tRNS with one index)
    image.save(path)
    return expected


def _palette_alpha_table_png(path, rng):
    image, expected = _palette(rng, bytes([0, 128] + [255] * 14))  # an alpha per palette entry (PIL warns on convert)
    image.save(path)
    return expected


def _gray_png(path, rng):
    values = _random(rng, 30, 30)
    Image.fromarray(values, "L").save(path)
    return _gray_to_rgb(values)


def _gray_alpha_png(path, rng):
    values = _random(rng, 30, 30, 2)
    Image.fromarray(values, "LA").save(path)
    return _gray_to_rgb(values[..., 0])


def _bilevel_png(path, rng):
    bits = rng.integers(0, 2, (30, 30)).astype(bool)
    Image.fromarray(bits).save(path)  # mode "1"
    return _gray_to_rgb(bits.astype(np.uint8) * 255)


def _gray16_png(path, rng):
    values = rng.integers(0, 65536, (30, 30)).astype(np.uint16)
    values[0, :4] = (0, 255, 256, 65535)
    Image.fromarray(values).save(path)  # mode "I;16", a 16-bit PNG
    return _gray_to_rgb(((values.astype(np.int64) + 128) // 257).astype(np.uint8))  # v / 257, rounded


def _gray_jpeg(path, rng):
    Image.fromarray(_random(rng, 30, 30), "L").save(path, quality=90)
    return _reference(path)


def _cmyk_jpeg(path, rng):
    Image.fromarray(_random(rng, 30, 30, 4), "CMYK").save(path, quality=90)
    return _reference(path)


def _exif_rotated_jpeg(path, rng):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the reference ignores it, so the stored 40 x 24 pixels are used
    Image.fromarray(_random(rng, 24, 40, 3)).save(path, quality=90, exif=exif.tobytes())
    return _reference(path)


def _truncated(image_format):
    def write(path, rng):
        buffer = io.BytesIO()
        Image.fromarray(_random(rng, 48, 48, 3)).save(buffer, format=image_format)
        path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        return None

    return write


def _zero_bytes(path, rng):
    path.write_bytes(b"")


def _decompression_bomb(path, rng):
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(path)  # 22 KB on disk, 179.56 M pixels once decoded


IMAGE_KINDS = (
    ImageKind("rgb", "jpg", _rgb_jpeg),
    ImageKind("rgb", "png", _rgb_png),
    ImageKind("rgba", "png", _rgba_png),
    ImageKind("palette", "png", _palette_png),
    ImageKind("palette_transparent_index", "png", _palette_transparent_index_png),
    ImageKind("palette_alpha_table", "png", _palette_alpha_table_png),
    ImageKind("gray", "png", _gray_png),
    ImageKind("gray_alpha", "png", _gray_alpha_png),
    ImageKind("bilevel", "png", _bilevel_png),
    ImageKind("gray16", "png", _gray16_png),
    ImageKind("gray", "jpg", _gray_jpeg),
    ImageKind("cmyk", "jpg", _cmyk_jpeg),
    ImageKind("exif_rotated", "jpg", _exif_rotated_jpeg),
    ImageKind("truncated", "jpg", _truncated("JPEG"), reason=r"^OSError: image file is truncated"),
    ImageKind("truncated", "png", _truncated("PNG"), reason=r"^OSError: .*(truncated|broken)"),
    ImageKind("zero_bytes", "jpg", _zero_bytes, reason=r"^UnidentifiedImageError: the file is empty \(0 bytes\)$"),
    ImageKind(
        "bomb", "png", _decompression_bomb, reason=r"^DecompressionBombError: Image size \(179560000 pixels\) exceeds"
    ),
)


def write_kind(kind: ImageKind, folder: Path, rng: np.random.Generator, prefix: str = "") -> tuple[Path, np.ndarray]:
    """Write one file of `kind` into `folder`: its path and the expected RGB pixels (None when it must be skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}{kind.filename}"
    return path, kind.write(path, rng)
