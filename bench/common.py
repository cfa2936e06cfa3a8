"""Shared helpers of the CPU benchmarks: environment fields of every row, an appending CSV writer, wall-clock medians.

Every result row carries the device, the torch and open_clip versions, the git commit (`git rev-parse --short HEAD`,
with "+dirty" when the library or the benchmark differ from it) and the date (STYLE.md, "Benchmarks").
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# The shared/ folder beside the checkout holds the class names of the benchmark datasets.
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip_prompts.json"
ENV_FIELDS = ["device", "versions", "commit", "date"]
# The 37 OxfordPets class names as clip_prompts.json lists them, for a machine that has the checkout but not the
# shared/ folder beside it (bench/gpu_check.sh on a copy of the tree); tests check that the two lists agree.
OXFORD_PETS_CLASSNAMES = [
    "Abyssinian", "Bengal", "Birman", "Bombay", "British Shorthair", "Egyptian Mau", "Maine Coon", "Persian",
    "Ragdoll", "Russian Blue", "Siamese", "Sphynx", "american bulldog", "american pit bull terrier", "basset hound",
    "beagle", "boxer", "chihuahua", "english cocker spaniel", "english setter", "german shorthaired",
    "great pyrenees", "havanese", "japanese chin", "keeshond", "leonberger", "miniature pinscher", "newfoundland",
    "pomeranian", "pug", "saint bernard", "samoyed", "scottish terrier", "shiba inu", "staffordshire bull terrier",
    "wheaten terrier", "yorkshire terrier",
]  # fmt: skip


def git_commit(paths: tuple[str, ...] = ("fastprompt", "kernels", "bench")) -> str:
    """Short HEAD hash, '+dirty' if `paths` differ from it; 'uncommitted' without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", *paths],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, str]:
    """device, versions, commit and date of a result row."""
    try:
        import open_clip

        open_clip_version = open_clip.__version__
    except (ImportError, AttributeError):
        open_clip_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu {platform.machine()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"
    return {
        "device": device,
        "versions": f"torch {torch.__version__}; open_clip {open_clip_version}; python {platform.python_version()}",
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Append rows (each completed with the environment fields) to a CSV, writing the header when the file is new.

    Raises:
        SystemExit: the file exists with another header (move it away, or write elsewhere with --out).
    """
    path = Path(path)
    fields = [*fields, *[name for name in ENV_FIELDS if name not in fields]]
    env = environment()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != fields:
            raise SystemExit(f"{path} has another header ({','.join(header)}); move it away or pass --out.")
        new = False
    else:
        new = True
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})


def time_once(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: dict[str, int] | int, warmup: dict[str, int] | int = 1
) -> dict[str, list[float]]:
    """Wall-clock times of several variants, run round-robin so that they share the machine's load equally.

    Args:
        fns: name -> a call that does the timed work (inputs built beforehand).
        repeats: timed calls per variant (an int for all, or per name; 0 skips a variant).
        warmup: untimed calls per variant before the first round (an int for all, or per name; only for variants
            with repeats > 0).

    Returns:
        name -> list of seconds, in the order measured.
    """
    counts = {name: repeats if isinstance(repeats, int) else repeats.get(name, 0) for name in fns}
    warm = {name: warmup if isinstance(warmup, int) else warmup.get(name, 0) for name in fns}
    for round_index in range(max(warm.values(), default=0)):
        for name, fn in fns.items():
            if counts[name] > 0 and round_index < warm[name]:
                fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(max(counts.values(), default=0)):
        for name, fn in fns.items():
            if round_index < counts[name]:
                times[name].append(time_once(fn))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_classnames(prompts: Path, dataset: str) -> list[str]:
    """Class names of `dataset`: ImageNet from open_clip, the others from the shared clip_prompts.json."""
    if dataset == "ImageNet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if not Path(prompts).is_file():
        if dataset == "OxfordPets":
            print(f"{prompts} not found: using the OxfordPets class names built into bench/common.py")
            return list(OXFORD_PETS_CLASSNAMES)
        raise SystemExit(f"Class-name file {prompts} not found; pass --prompts path/to/clip_prompts.json.")
    data = json.loads(Path(prompts).read_text())
    try:
        return list(data["datasets"][dataset]["classnames"])
    except KeyError:
        raise SystemExit(f"{prompts} has no class names for {dataset}.") from None


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table of `columns` of `rows`."""
    cells = [[str(row.get(name, "")) for name in columns] for row in rows]
    widths = [
        max(len(name), *(len(cell[i]) for cell in cells)) if cells else len(name) for i, name in enumerate(columns)
    ]
    lines = ["  ".join(name.rjust(width) for name, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
