"""The environment a result was produced in: versions, devices, git commit."""

from __future__ import annotations

import functools
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from fastprompt.errors import FastPromptError, brief


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: Path | None = None) -> str:
    """The commit of the checkout holding `path` (default: this package), or "unknown"."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_names() -> list[str]:
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def check_device(device: str) -> str:
    """`device` when this machine has it: "cpu", "cuda" or "cuda:N" ("mps" on Apple silicon).

    Commands check their --device before reading any data, so that a typo or a missing GPU is one sentence at once.

    Raises:
        FastPromptError: another spelling, or a GPU this machine does not have.
    """
    match = re.fullmatch(r"(cpu|cuda|mps)(?::([0-9]+))?", device)
    if match is None or (match.group(1) != "cuda" and match.group(2) not in (None, "0")):
        raise FastPromptError(f"Unknown device {brief(device)}; use cpu, cuda or cuda:N.")
    kind, index = match.groups()
    if kind == "cuda" and not torch.cuda.is_available():
        raise FastPromptError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu.")
    if kind == "cuda" and index is not None and int(index) >= torch.cuda.device_count():
        raise FastPromptError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise FastPromptError("--device mps: this machine has no usable Apple GPU; use --device cpu.")
    return device


def environment() -> dict[str, str]:
    """Versions of the stack and the devices seen, as strings (read once per process: every run records it)."""
    return dict(_environment())


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, str]:
    import fastprompt

    return {
        "fastprompt": fastprompt.__version__,
        "git commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "open_clip": _version("open_clip_torch"),
        "webdataset": _version("webdataset"),
        "faiss": _version("faiss-cpu") if _version("faiss-cpu") != "not installed" else _version("faiss-gpu-cu12"),
        "numpy": _version("numpy"),
        "cuda (torch)": str(torch.version.cuda),
        "cuda available": str(torch.cuda.is_available()),
        "devices": ", ".join(device_names()) or f"cpu ({torch.get_num_threads()} threads)",
    }
