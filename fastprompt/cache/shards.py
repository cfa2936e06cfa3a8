"""Webdataset shards: one tar per run of samples, written atomically, byte-for-byte reproducible, with a sha256.

A sample is one image: `<split>/<position>.npy` holds its features (views, D) in the stored dtype, `.center.npy` (a
training image only, format 2) the feature (D,) of its centre view (the test transform), `.cls` its label and
`.key.txt` the image's path relative to the dataset's image folder (its key). The key lives in a member rather than
in the tar name because webdataset cuts a sample's name at the first dot, and image paths have dots.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastprompt.errors import FastPromptError


@dataclass(frozen=True)
class Sample:
    """One image's cached features: `features` (views, D) and, for a training image, `center` (D,)."""

    position: int
    key: str
    label: int
    features: np.ndarray
    center: np.ndarray | None = None


def _member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed metadata: the same samples always give the same bytes (and checksum)
    info.mode = 0o644
    return info, io.BytesIO(payload)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, split: str, samples: list[Sample]) -> dict:
    """Write `samples` to the tar `path` through a temporary file and a rename.

    Returns:
        {"name", "split", "count", "bytes", "sha256"}: the shard's manifest entry.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            stem = f"{split}/{sample.position:08d}"
            members = [("npy", _npy_bytes(sample.features))]
            if sample.center is not None:
                members.append(("center.npy", _npy_bytes(sample.center)))
            members += [("cls", str(sample.label).encode()), ("key.txt", sample.key.encode())]
            for suffix, payload in members:
                tar.addfile(*_member(f"{stem}.{suffix}", payload))
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return {
        "name": path.name,
        "split": split,
        "count": len(samples),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def verify_shard(path: Path, entry: dict, cache_dir: Path) -> None:
    """Check a shard against its manifest entry.

    Raises:
        FastPromptError: the shard is missing, truncated or altered (the message says how to rebuild it).
    """
    rebuild = f"delete it and rerun the same `fastprompt cache` command with --out {cache_dir} to rebuild that shard."
    if not path.is_file():
        raise FastPromptError(f"Shard '{entry['name']}' of the cache '{cache_dir}' is missing; {rebuild}")
    if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
        raise FastPromptError(
            f"Shard '{entry['name']}' of the cache '{cache_dir}' fails its checksum (truncated or altered); {rebuild}"
        )


def read_shard(path: Path) -> list[tuple[str, int, np.ndarray, np.ndarray | None]]:
    """The samples of a shard in order: (key, label, features (views, D), centre feature (D,) or None)."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            stem, _, suffix = info.name.partition(".")
            extracted = tar.extractfile(info)
            if extracted is not None:
                members.setdefault(stem, {})[suffix] = extracted.read()
    samples = []
    for fields in members.values():
        features = np.load(io.BytesIO(fields["npy"]), allow_pickle=False)
        center = np.load(io.BytesIO(fields["center.npy"]), allow_pickle=False) if "center.npy" in fields else None
        samples.append((fields["key.txt"].decode(), int(fields["cls"]), features, center))
    return samples
