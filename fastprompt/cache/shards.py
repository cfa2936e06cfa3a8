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
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastprompt.atomic import temporary_path
from fastprompt.errors import FastPromptError
from fastprompt.faults import fault_point

# the only member names `write_shard` writes: `<split>/<position>.<suffix>`
MEMBER_NAME = re.compile(r"(?P<stem>(?P<split>train|val|test)/\d{8,})\.(?P<suffix>npy|center\.npy|cls|key\.txt)")


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
    temporary = temporary_path(path)
    try:
        with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
            for number, sample in enumerate(samples):
                stem = f"{split}/{sample.position:08d}"
                members = [("npy", _npy_bytes(sample.features))]
                if sample.center is not None:
                    members.append(("center.npy", _npy_bytes(sample.center)))
                members += [("cls", str(sample.label).encode()), ("key.txt", sample.key.encode())]
                for suffix, payload in members:
                    tar.addfile(*_member(f"{stem}.{suffix}", payload))
                if number == 0:
                    fault_point("shard:write")  # the temporary tar is begun, not finished
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        fault_point("shard:rename")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half shard behind
        raise
    fault_point("shard:done")
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


def _refuse(path: Path, problem: str) -> FastPromptError:
    return FastPromptError(
        f"Refused the shard '{path}': {problem}; a fastprompt shard holds only regular files named "
        f"<split>/<8 digits>.npy, .center.npy, .cls and .key.txt, so rebuild the cache with `fastprompt cache`."
    )


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link to '{info.linkname}'"
    if info.islnk():
        return f"a hard link to '{info.linkname}'"
    return "a directory" if info.isdir() else "a device, pipe or other special file"


def read_shard(path: Path, split: str | None = None) -> list[tuple[str, int, np.ndarray, np.ndarray | None]]:
    """The samples of a shard in order: (key, label, features (views, D), centre feature (D,) or None).

    The tar is read member by member in memory, never extracted, so no member name can write or read anything on
    disk; still, a shard from elsewhere is refused rather than half-read when a member is not a regular file (a link,
    a directory), has a name fastprompt does not write (absolute, with `..`, another split), appears twice, or a
    sample lacks a member or holds one that does not parse.

    Raises:
        FastPromptError: the shard is not a tar, or any of the above (naming the shard and the member).
    """
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isreg():
                    raise _refuse(path, f"its member '{info.name}' is {_member_kind(info)}")
                match = MEMBER_NAME.fullmatch(info.name)
                if match is None or (split is not None and match["split"] != split):
                    expected = f"a {split} sample" if split else "a sample"
                    raise _refuse(path, f"its member '{info.name}' is not named as {expected}")
                fields = members.setdefault(match["stem"], {})
                if match["suffix"] in fields:
                    raise _refuse(path, f"its member '{info.name}' appears twice")
                fields[match["suffix"]] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as error:
        raise _refuse(path, f"it is not a readable tar ({error})") from None
    samples = []
    for stem, fields in members.items():
        missing = [suffix for suffix in ("npy", "cls", "key.txt") if suffix not in fields]
        if missing:
            raise _refuse(path, f"its sample '{stem}' lacks the member(s) {', '.join(missing)}")
        try:
            features = np.load(io.BytesIO(fields["npy"]), allow_pickle=False)
            center = np.load(io.BytesIO(fields["center.npy"]), allow_pickle=False) if "center.npy" in fields else None
            samples.append((fields["key.txt"].decode(), int(fields["cls"]), features, center))
        except (ValueError, OSError, EOFError, UnicodeDecodeError) as error:
            raise _refuse(path, f"its sample '{stem}' does not parse ({error})") from None
    return samples
