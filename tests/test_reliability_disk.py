"""A full disk at any write of `fastprompt cache` and `fastprompt train`: one sentence, finished files intact, and the
same command finishes the job once there is space again, with the same files as an uninterrupted run.

The fault hook (fastprompt/faults.py) raises OSError(ENOSPC) at a chosen write point of a child process. The write
points are named `<file>:<stage>` (docs/reliability.md): cache 12 (plan.json, shard, shard-record, manifest.json, each
at write, rename, done), train 20 (prompt, predictions, log, result, checkpoint, index-repair at the same three
stages, and the results.jsonl line at append and done). The default tier fails a write of every kind of file (in the
middle of the write, or at the sync before the rename); the slow tier fails at all 32 points of cache and train and at
random occurrences of them.
"""

from __future__ import annotations

import errno
import os
import random
import re

import pytest
from reliability import (
    assert_intact,
    assert_same_files,
    assert_same_sweep,
    cache_args,
    files,
    run_cli,
    temporaries,
    train_args,
    uninterrupted_runs,
)
from typer.testing import CliRunner

CACHE_KEPT = "finished shards are kept"
TRAIN_KEPT = "finished runs are kept, the others resume from their last checkpoint"
WHAT = {  # the file a failed write names, by its point
    "plan.json": r"the plan record \.progress/plan\.json",
    "shard": r"shard (train|val|test)-\d{5}\.tar",
    "shard-record": r"the progress record of shard (train|val|test)-\d{5}\.tar",
    "manifest.json": r"manifest\.json",
    "prompt": r"prompt\.safetensors of run \S+",
    "predictions": r"predictions\.npz of run \S+",
    "log": r"log\.jsonl of run \S+",
    "result": r"result\.json of run \S+",
    "index": r"the results\.jsonl line of run \S+",
    "checkpoint": r"the checkpoint of run \S+",
    "index-repair": r"results\.jsonl",
}
CACHE_POINTS = [f"{file}:{stage}" for file in ("plan.json", "shard", "shard-record", "manifest.json")
                for stage in ("write", "rename", "done")]  # fmt: skip
TRAIN_POINTS = [f"{file}:{stage}" for file in ("checkpoint", "prompt", "predictions", "log", "result")
                for stage in ("write", "rename", "done")] + ["index:append", "index:done"]  # fmt: skip
REPAIR_POINTS = ["index-repair:write", "index-repair:rename", "index-repair:done"]  # after a kill that needs a repair


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted_runs(tmp_path_factory)


def assert_one_sentence(output: str, point: str, folder, kept: str) -> None:
    """The failed command's whole report: one line naming the file, the folder and what to do; no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    what = WHAT[point.partition(":")[0]]
    pattern = (
        rf"Error: No space left on device while writing {what} in {re.escape(str(folder))}; "
        rf"free space and rerun the same command: {re.escape(kept)}\."
    )
    assert re.fullmatch(pattern, errors[0]), errors[0]


def fill_disk_then_finish(args, folder, faults, logs, kept) -> list[str]:
    """Run `args` once per fault (("enospc_at", point) or ("kill_at", point)), then once more to the end. After each
    full disk: exit status 2, one sentence, no temporary file, every file finished before intact."""
    failed = []
    for kind, point in faults:
        before = files(folder) if folder.exists() else {}
        outcome = run_cli(args, logs, **{kind: point})
        if kind == "kill_at":
            assert outcome.killed, outcome.output
            continue
        assert outcome.exitcode == 2, f"{point}: {outcome.output}"
        where = outcome.points[-1]  # the point that failed: the last one reached
        assert_one_sentence(outcome.output, where, folder, kept)
        assert not temporaries(folder), f"{where}: temporary files left behind: {temporaries(folder)}"
        assert_intact(before, folder)
        failed.append(where)
    final = run_cli(args, logs)
    assert final.exitcode == 0, final.output
    assert not temporaries(folder)
    return failed


def test_cache_full_disk_at_each_write(reference, tmp_path):
    points = ["plan.json:write", "shard:write", "shard:rename", "shard-record:write", "manifest.json:rename"]
    out = tmp_path / "cache"
    failed = fill_disk_then_finish(
        cache_args(reference["images"], out), out, [("enospc_at", p) for p in points], tmp_path / "logs", CACHE_KEPT
    )
    assert failed == points
    assert_same_files(out, reference["cache"])


def test_train_full_disk_at_each_write(reference, tmp_path):
    points = ["checkpoint:write", "prompt:write", "predictions:write", "log:rename", "result:write", "index:append"]
    faults = [("enospc_at", p) for p in points] + [("kill_at", "result:done@2"), ("enospc_at", "index-repair:write")]
    out = tmp_path / "sweep"
    failed = fill_disk_then_finish(train_args(reference["cache"], out), out, faults, tmp_path / "logs", TRAIN_KEPT)
    assert failed == [*points, "index-repair:write"]
    assert_same_sweep(out, reference, tmp_path / "report")


def test_a_full_disk_no_write_names_is_one_sentence_too(tmp_path):
    """A full disk where no write of ours could name the file (another library's write): still one sentence."""
    from fastprompt.cli.app import _App

    app = _App()

    @app.command("write")
    def write() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "somewhere"))

    @app.command("other")
    def other() -> None: ...

    result = CliRunner().invoke(app, ["write"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.splitlines() == [
        f"Error: No space left on device while writing {tmp_path / 'somewhere'}; free space and rerun the same command."
    ]


# ---------------------------------------------------------------------------------------------------- slow tier
RANDOM_OCCURRENCES = 12  # independent trials per command: ENOSPC at the n-th point of a fresh run (seeded)


@pytest.mark.slow
def test_cache_full_disk_at_every_point(reference, tmp_path):
    out = tmp_path / "chain" / "cache"
    faults = [("enospc_at", point) for point in CACHE_POINTS]
    failed = fill_disk_then_finish(cache_args(reference["images"], out), out, faults, tmp_path / "logs", CACHE_KEPT)
    assert failed == CACHE_POINTS
    assert_same_files(out, reference["cache"])
    rng = random.Random(28)
    for number in rng.sample(range(1, len(reference["cache_run"].points) + 1), RANDOM_OCCURRENCES):
        out = tmp_path / f"point-{number}" / "cache"
        args = cache_args(reference["images"], out)
        fill_disk_then_finish(args, out, [("enospc_at", str(number))], tmp_path / "logs", CACHE_KEPT)
        assert_same_files(out, reference["cache"])
    print(f"\ncache: ENOSPC at {len(CACHE_POINTS)} distinct points and {RANDOM_OCCURRENCES} random occurrences")


@pytest.mark.slow
def test_train_full_disk_at_every_point(reference, tmp_path):
    out = tmp_path / "chain" / "sweep"
    faults = [("enospc_at", point) for point in TRAIN_POINTS]
    faults += [("kill_at", "result:done@2")] + [("enospc_at", point) for point in REPAIR_POINTS]
    failed = fill_disk_then_finish(train_args(reference["cache"], out), out, faults, tmp_path / "logs", TRAIN_KEPT)
    assert failed == TRAIN_POINTS + REPAIR_POINTS
    assert_same_sweep(out, reference, tmp_path / "chain" / "report")
    rng = random.Random(28)
    for number in rng.sample(range(1, len(reference["train_run"].points) + 1), RANDOM_OCCURRENCES):
        out = tmp_path / f"point-{number}" / "sweep"
        args = train_args(reference["cache"], out)
        fill_disk_then_finish(args, out, [("enospc_at", str(number))], tmp_path / "logs", TRAIN_KEPT)
        assert_same_sweep(out, reference, out.parent / "report")
    print(f"\ntrain: ENOSPC at {len(TRAIN_POINTS) + 3} distinct points and {RANDOM_OCCURRENCES} random occurrences")
