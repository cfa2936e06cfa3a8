"""Shared by the reliability tests: a toy image folder, `fastprompt` commands in child processes with the fault hook
armed (fastprompt/faults.py), and byte-for-byte comparisons of cache and sweep folders.

A child is forked from a server that imported torch and fastprompt once (multiprocessing's forkserver), so a command
costs its own work, not the imports; it is a process of its own, which SIGKILL ends as it would end the real command.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload(
    ["torch", "open_clip", "safetensors.torch", "fastprompt.cli.app", "fastprompt.cli.cache", "fastprompt.cli.train",
     "fastprompt.cache.extract", "fastprompt.cache.loader", "fastprompt.train.sweep", "reliability"]
)  # fmt: skip
COMMON = ["--model", "fastprompt-tiny", "--pretrained", "none", "--num-workers", "0", "--no-progress"]
# Fields that legitimately differ between two runs of the same command: compared everywhere else, byte for byte.
VOLATILE = {
    "manifest.json": (("created",),),  # the time the manifest was written
    # wall-clock time of the run (since the last restart), and the checkout's commit when the run was written (a
    # commit between a kill and the rerun changes it: one landed while these tests ran)
    "result.json": (("timings", "train_seconds"), ("timings", "group_runs"), ("environment", "git commit")),
    # the same timings in each run's line; `group_runs` counts the runs trained together since the last restart
    "results.jsonl": (("train_seconds",), ("group_runs",)),
}
_serial = itertools.count()


def image_folder(root: Path) -> Path:
    """3 classes of small random PNGs in train/ val/ test/, one test image corrupt (the manifest's `skipped`)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for name in ("cat", "dog", "fish"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (root / "test" / "dog" / "1.png").write_bytes(b"this is not an image")
    return root


def cache_args(images: Path, out: Path) -> list[str]:
    """11 shards of at most 2 images: 72 write points (docs/reliability.md)."""
    return ["cache", "imagefolder", "--root", str(images), "--out", str(out), "--shots", "1,2", "--seeds", "1,2",
            "--views", "2", "--dtype", "fp32", "--shard-size", "2", *COMMON]  # fmt: skip


def train_args(cache: Path, out: Path, methods: str = "zeroshot,coop,prograd") -> list[str]:
    """12 runs (4 zero-shot, 8 prompt runs in two lock-step groups), a checkpoint after every step."""
    return ["train", "--cache", str(cache), "--out", str(out), "--methods", methods, "--epochs", "3",
            "--checkpoint-minutes", "0", "--no-progress"]  # fmt: skip


@dataclass
class Outcome:
    exitcode: int  # -9: killed
    output: str  # stdout and stderr
    points: list[str]  # the fault points reached, in order (the last one is where a kill landed)
    seconds: float

    @property
    def killed(self) -> bool:
        return self.exitcode == -9


def _child(args: list[str], log: str, kill_at, enospc_at, trace: str) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    import threading

    import torch
    from tqdm import tqdm

    from fastprompt import faults

    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock: a killed child would leak its semaphore
    faults.arm(kill_at, enospc_at, trace)
    sys.argv = ["fastprompt", *args]
    from fastprompt.cli.app import main

    main()


def run_cli(args: list[str], logs: Path, kill_at=None, enospc_at=None, kill_after: float | None = None,
            timeout: float = 300) -> Outcome:  # fmt: skip
    """Run `fastprompt <args>` in a child process; kill it at a fault point (kill_at), after `kill_after` seconds
    (SIGKILL from outside), or fail a write with ENOSPC (enospc_at)."""
    logs.mkdir(parents=True, exist_ok=True)
    serial = next(_serial)
    log, trace = logs / f"{serial}.log", logs / f"{serial}.trace"
    started = time.monotonic()
    process = CHILDREN.Process(target=_child, args=(args, str(log), kill_at, enospc_at, str(trace)))
    process.start()
    if kill_after is not None:
        process.join(kill_after)
        if process.exitcode is None:
            process.kill()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"fastprompt {' '.join(args)} ran past {timeout} s")
    points = [line.split(" ", 1)[1] for line in trace.read_text().splitlines()] if trace.exists() else []
    return Outcome(process.exitcode, log.read_text() if log.exists() else "", points, time.monotonic() - started)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), by relative path."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.tmp"))


def comparable(name: str, payload: bytes):
    """The bytes of a file, or for a file with volatile fields its JSON without them."""
    fields = VOLATILE.get(Path(name).name)
    if not fields:
        return payload
    if name.endswith(".jsonl"):
        return [_without(json.loads(line), fields) for line in payload.decode().splitlines()]
    return _without(json.loads(payload), fields)


def _without(content: dict, fields) -> dict:
    for path in fields:
        holder = content
        for key in path[:-1]:
            holder = holder[key]
        holder.pop(path[-1], None)
    return content


def assert_same_files(result: Path, reference: Path) -> None:
    """The same file names and, but for the volatile fields, the same bytes."""
    got, expected = files(result), files(reference)
    assert sorted(got) == sorted(expected), f"files differ: {sorted(set(got) ^ set(expected))}"
    differing = [name for name in expected if comparable(name, got[name]) != comparable(name, expected[name])]
    assert not differing, f"{result}: differs from the uninterrupted run in {differing}"


def assert_intact(before: dict[str, bytes], folder: Path) -> None:
    """Every file finished before a failed or killed command is still there with the same bytes (results.jsonl may
    have grown by whole lines). Not finished files: checkpoints (they advance, and go once their run is written),
    temporary files (a rerun removes those of killed processes) and the folder's lock file."""
    after = files(folder)
    for name, payload in before.items():
        if "checkpoint" in Path(name).name or name.endswith(".tmp") or Path(name).name == ".fastprompt.lock":
            continue
        assert name in after, f"{name} vanished"
        if name.endswith("results.jsonl"):
            assert after[name].startswith(payload), "results.jsonl lost lines"
            continue
        assert comparable(name, after[name]) == comparable(name, payload), f"{name} changed"


_uninterrupted: dict = {}


def uninterrupted_runs(tmp_path_factory) -> dict:
    """The toy images, and the cache, sweep and report of uninterrupted runs with the fault points they passed
    (made once per session, shared by the test modules)."""
    if not _uninterrupted:
        from fastprompt.report import build_report

        root = tmp_path_factory.mktemp("reliability")
        images = image_folder(root / "own")
        cache = root / "reference" / "cache"
        built = run_cli(cache_args(images, cache), root / "logs")
        assert built.exitcode == 0, built.output
        sweep = root / "reference" / "sweep"
        trained = run_cli(train_args(cache, sweep), root / "logs")
        assert trained.exitcode == 0, trained.output
        build_report(sweep, root / "reference" / "report", plots=False, timings=False)
        _uninterrupted.update(root=root, images=images, cache=cache, sweep=sweep, cache_run=built, train_run=trained)
    return _uninterrupted


def assert_same_sweep(sweep: Path, reference: dict, report_dir: Path) -> None:
    """The same sweep files as the uninterrupted sweep, and the same `fastprompt report` (markdown and CSV)."""
    from fastprompt.report import build_report

    assert_same_files(sweep, reference["sweep"])
    build_report(sweep, report_dir, plots=False, timings=False)
    assert_same_files(report_dir, reference["root"] / "reference" / "report")
