"""Concurrent writers: a second `fastprompt train` or `fastprompt cache` on a folder in use is refused in one sentence,
and the lock of a killed process (SIGKILL, its forked workers still alive) never stays behind (fastprompt/locks.py)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastprompt.cli.app import load_commands
from PIL import Image
from typer.testing import CliRunner

from fastprompt import locks
from fastprompt.clip import load_clip
from fastprompt.locks import LOCK_FILE, FolderInUseError, FolderLock, LockUnavailableWarning
from fastprompt.train.config import expand_sweep
from fastprompt.train.sweep import SweepOptions, run_sweep

# A process that takes the lock of argv[1] as command argv[2], optionally forks a child that outlives it (a DataLoader
# worker), says "held" and waits to be killed.
HOLDER = """
import os, sys, time
from fastprompt.locks import FolderLock
FolderLock(sys.argv[1], sys.argv[2]).acquire()
child = 0
if len(sys.argv) > 3 and sys.argv[3] == "fork":
    child = os.fork()
    if child == 0:
        time.sleep(300)
        os._exit(0)
print("held", child, flush=True)
time.sleep(300)
"""


class Holder:
    """A process holding the lock of `folder`, and (optionally) its forked child."""

    def __init__(self, folder: Path, command: str = "fastprompt train", fork: bool = False) -> None:
        argv = [sys.executable, "-c", HOLDER, str(folder), command, *(["fork"] if fork else [])]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("held"), self.process.stderr.read()
        self.child = int(line.split()[1])

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        if self.child:
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def holder_of():
    started: list[Holder] = []

    def start(folder: Path, command: str = "fastprompt train", fork: bool = False) -> Holder:
        started.append(Holder(folder, command, fork))
        return started[-1]

    yield start
    for holder in started:
        holder.close()


def _one_sentence(output: str) -> str:
    """The one error line of a command's output (stdout and stderr), checked to be one sentence."""
    lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith("Error: ") and lines[0].endswith(".") and lines[0].count("; ") == 1, lines[0]
    return lines[0]


# -------------------------------------------------------------------------------------------------------- the lock
def test_second_process_refused_then_proceeds_after_sigkill(tmp_path, holder_of):
    folder = tmp_path / "sweep"
    holder = holder_of(folder)
    with pytest.raises(FolderInUseError) as refused:
        FolderLock(folder, "fastprompt train").acquire()
    message = str(refused.value)
    assert f"pid {holder.process.pid} on {socket.gethostname()}" in message and "fastprompt train" in message
    assert str(folder) in message and "wait for it to finish" in message
    holder.kill()
    with FolderLock(folder, "fastprompt train") as lock:  # at once: the kernel dropped the dead holder's lock
        assert lock.held and json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()  # a clean release leaves nothing in the folder


def test_forked_worker_does_not_keep_a_killed_holders_lock(tmp_path, holder_of):
    folder = tmp_path / "cache"
    holder = holder_of(folder, "fastprompt cache", fork=True)
    with pytest.raises(FolderInUseError, match="fastprompt cache"):
        FolderLock(folder, "fastprompt cache").acquire()
    holder.kill()
    os.kill(holder.child, 0)  # the forked child (a DataLoader worker, say) is still alive
    with FolderLock(folder, "fastprompt cache"):
        pass


def test_reentrant_in_one_thread_refused_in_another(tmp_path):
    with FolderLock(tmp_path, "fastprompt train"):
        with FolderLock(tmp_path, "fastprompt train"):  # a command that locks before calling the library
            pass
        assert (tmp_path / LOCK_FILE).exists()  # still held by the outer one
        errors: list[Exception] = []

        def other() -> None:
            try:
                FolderLock(tmp_path, "fastprompt train").acquire()
            except FolderInUseError as error:
                errors.append(error)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert errors and "another thread of this process" in str(errors[0])
    assert not (tmp_path / LOCK_FILE).exists()


def test_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.warns(LockUnavailableWarning, match="cannot be locked"):
        with FolderLock(tmp_path / "nfs", "fastprompt train") as lock:
            assert not lock.held
    monkeypatch.setattr(locks, "fcntl", None)
    with pytest.warns(LockUnavailableWarning, match="no flock"):
        FolderLock(tmp_path / "windows", "fastprompt train").acquire()


def test_a_file_in_the_way_is_one_sentence(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(locks.FastPromptError, match="exists and is not a folder"):
        FolderLock(tmp_path / "taken", "fastprompt train").acquire()


# ------------------------------------------------------------------------------------------ the library functions
NAMES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny")


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1), ("test", 2)):
        for name in NAMES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def _cache_args(root: Path, out: Path) -> list[str]:
    return ["cache", "imagefolder", "--root", str(root), "--out", str(out), "--model", "fastprompt-tiny",
            "--pretrained", "none", "--shots", "2", "--seeds", "1", "--views", "2", "--num-workers", "0",
            "--no-progress"]  # fmt: skip


def test_cli_cache_refused_while_building_then_resumes_after_sigkill(tmp_path, holder_of):
    _image_folder(tmp_path / "images")
    out = tmp_path / "cache"
    holder = holder_of(out, "fastprompt cache")
    refused = CliRunner().invoke(load_commands(), _cache_args(tmp_path / "images", out))
    assert refused.exit_code == 2
    line = _one_sentence(refused.output)
    assert f"'{out}' is in use by fastprompt cache (pid {holder.process.pid}" in line and "another --out" in line
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written
    holder.kill()  # its lock file stays behind, unlocked: the next build takes the folder as new
    built = CliRunner().invoke(load_commands(), _cache_args(tmp_path / "images", out))
    assert built.exit_code == 0, built.output
    assert (out / "manifest.json").is_file() and not (out / LOCK_FILE).exists()


def test_cli_train_refused_while_in_use_then_proceeds_after_sigkill(tmp_path, holder_of):
    _image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    assert CliRunner().invoke(load_commands(), _cache_args(tmp_path / "images", cache)).exit_code == 0
    out = tmp_path / "sweep"
    args = ["train", "--cache", str(cache), "--out", str(out), "--methods", "coop", "--epochs", "1", "--no-progress"]
    holder = holder_of(out)
    refused = CliRunner().invoke(load_commands(), args)
    assert refused.exit_code == 2
    line = _one_sentence(refused.output)
    assert f"pid {holder.process.pid}" in line and "fastprompt train" in line
    assert not (out / "results.jsonl").exists()
    holder.kill()
    done = CliRunner().invoke(load_commands(), args)
    assert done.exit_code == 0, done.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 1 and not (out / LOCK_FILE).exists()


def test_library_functions_refused_for_python_callers(tmp_path, holder_of, tiny):
    from test_train_sweep import FakeCache

    from fastprompt.cache.extract import build_cache
    from fastprompt.cache.plan import CacheOptions
    from fastprompt.data.registry import load_dataset

    configs = expand_sweep({"method": ["coop"], "seed": [1]}, {"dataset": "OxfordPets", "epochs": 1, "shots": 2})
    holder = holder_of(tmp_path / "sweep")
    with pytest.raises(FolderInUseError, match=f"pid {holder.process.pid}"):
        run_sweep(FakeCache(), tiny, configs, tmp_path / "sweep", SweepOptions(progress=False))
    assert not (tmp_path / "sweep" / "results.jsonl").exists()
    _image_folder(tmp_path / "images")
    holder = holder_of(tmp_path / "cache", "fastprompt cache")
    with pytest.raises(FolderInUseError, match=f"pid {holder.process.pid}"):
        build_cache(load_dataset("imagefolder", tmp_path / "images"), tiny, tmp_path / "cache",
                    CacheOptions(shots=(2,), seeds=(1,), views=2), num_workers=0, progress=False)  # fmt: skip
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [LOCK_FILE]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_ranks_share_one_lock_and_all_stop_on_a_refusal(tmp_path, holder_of):
    """Rank 0 alone takes the lock for the build (the ranks never refuse each other); when another process holds it,
    every rank stops with the refusal instead of waiting at a barrier."""
    _image_folder(tmp_path / "images")
    launcher = tmp_path / "launch_fastprompt.py"
    launcher.write_text("from fastprompt.cli.app import main\n\nmain()\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "cache"
    holder = holder_of(out, "fastprompt cache")
    refused = subprocess.run([*command, *_cache_args(tmp_path / "images", out)], capture_output=True, text=True,
                             timeout=240, env=environment)  # fmt: skip
    assert refused.returncode != 0 and f"in use by fastprompt cache (pid {holder.process.pid}" in refused.stderr
    # no traceback through our code (torchrun's agent prints one of its own when a rank exits with an error)
    assert not re.search(r'File "[^"]*/fastprompt/(locks|atomic|cache/|train/)', refused.stderr), refused.stderr
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    # a build under torchrun that takes the lock: tests/test_cache_distributed.py
