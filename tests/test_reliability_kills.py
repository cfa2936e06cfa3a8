"""SIGKILL at any moment of `fastprompt cache` and `fastprompt train`, then the same command again: the same files.

Kill moments come from the fault points (fastprompt/faults.py, docs/reliability.md): every write of either command
passes named points, and a child process armed with `kill_at` sends itself SIGKILL at the chosen one. The slow tier
also kills from outside at random wall-clock moments, and once through the real environment variable.

"The same files" is byte for byte, every file of the folder (hidden ones too), except the fields in
`reliability.VOLATILE`: the manifest's `created` and a result.json's `timings.train_seconds` (both wall-clock), and
a result.json's `environment["git commit"]` (the checkout's commit when the run was written).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

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

from fastprompt import faults
from fastprompt.atomic import remove_stale_temporaries


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted_runs(tmp_path_factory)


def kill_then_finish(args, folder, kills, logs, **kill_options) -> list[str]:
    """Run `args` once per kill in `kills` (each killed there), then once more to the end; returns where each kill
    landed. Checks after each kill that every file finished before it is intact, and at the end that no temporary
    file is left."""
    landed = []
    for kill in kills:
        before = files(folder) if folder.exists() else {}
        outcome = run_cli(args, logs, **{**kill_options, "kill_at": kill} if kill is not None else kill_options)
        if not outcome.killed:  # a wall-clock kill after the command had finished: nothing to check
            assert outcome.exitcode == 0, outcome.output
            landed.append("(finished first)")
            continue
        landed.append(outcome.points[-1] if outcome.points else "(before any write)")
        if folder.exists():
            assert_intact(before, folder)
    final = run_cli(args, logs)
    assert final.exitcode == 0, final.output
    assert not temporaries(folder), f"temporary files left behind: {temporaries(folder)}"
    return landed


def test_the_hook_picks_the_nth_point_or_a_named_one():
    try:
        faults.arm(enospc_at=3)
        faults.fault_point("a:write")
        faults.fault_point("b:write")
        with pytest.raises(OSError, match="No space left on device"):
            faults.fault_point("a:write")
        faults.arm(enospc_at="a:write@2")
        faults.fault_point("a:write")
        faults.fault_point("b:write")
        with pytest.raises(OSError) as raised:
            faults.fault_point("a:write")
        assert raised.value.errno == 28
        faults.disarm()
        faults.fault_point("a:write")  # unarmed: nothing happens
    finally:
        faults.disarm()


def test_a_rerun_removes_stale_temporaries_of_dead_processes_only(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(finished.stdout), os.getppid()
    for pid in (dead, alive, os.getpid()):
        (tmp_path / f".result.json.{pid}.tmp").write_text("half")
    (tmp_path / ".notes.txt").write_text("not ours")
    removed = remove_stale_temporaries(tmp_path, names=frozenset({"result.json"}))
    assert sorted(path.name for path in removed) == sorted(
        [f".result.json.{dead}.tmp", f".result.json.{os.getpid()}.tmp"]
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [".notes.txt", f".result.json.{alive}.tmp"]


def test_cache_killed_at_write_points_resumes_to_the_same_files(reference, tmp_path):
    """Four kills in a row: before the plan record's rename, in the middle of a shard's temporary file, between a
    shard and its progress record, before the manifest's rename; then the same command finishes the cache."""
    kills = ["plan.json:rename", "shard:write@2", "shard:done@3", "manifest.json:rename"]
    out = tmp_path / "cache"
    landed = kill_then_finish(cache_args(reference["images"], out), out, kills, tmp_path / "logs")
    assert landed == [kill.partition("@")[0] for kill in kills]
    assert_same_files(out, reference["cache"])


def test_train_killed_at_write_points_resumes_to_the_same_files(reference, tmp_path):
    """Kills in the middle of a checkpoint (some runs checkpointed at the new step, some not), between a run's
    result.json and its results.jsonl line, between that line and the removal of its checkpoint, and in the middle
    of a prompt file; then the same command finishes: the same runs once each, the same bytes, the same report."""
    kills = ["checkpoint:rename@3", "result:done@6", "index:done@1", "prompt:write@1"]
    out = tmp_path / "sweep"
    landed = kill_then_finish(train_args(reference["cache"], out), out, kills, tmp_path / "logs")
    assert landed == [kill.partition("@")[0] for kill in kills]
    assert_same_sweep(out, reference, tmp_path / "report")


def test_checkpoints_never_change_a_result(reference, tmp_path):
    """A sweep that checkpoints after every step (the reference) and one that never does write the same files."""
    args = train_args(reference["cache"], tmp_path / "sweep")
    args[args.index("--checkpoint-minutes") + 1] = "1000"
    outcome = run_cli(args, tmp_path / "logs")
    assert outcome.exitcode == 0, outcome.output
    assert outcome.points.count("checkpoint:write") < reference["train_run"].points.count("checkpoint:write")
    assert_same_files(tmp_path / "sweep", reference["sweep"])


# ---------------------------------------------------------------------------------------------------- slow tier
KILLS_PER_COMMAND = 24  # at fault points: one at each distinct point, the rest anywhere (seeded)
WALL_CLOCK_KILLS = 8  # from outside, at random moments of the command's run (seeded)
FOLDER = {"cache": "cache", "train": "sweep"}  # a report's title is its sweep folder's name: the reference's


def _kill_points(points: list[str], rng: random.Random) -> list[int]:
    """1-based indices into `points`: a random occurrence of every distinct point, then random ones, sorted."""
    by_name: dict[str, list[int]] = {}
    for number, name in enumerate(points, start=1):
        by_name.setdefault(name, []).append(number)
    chosen = {rng.choice(numbers) for numbers in by_name.values()}
    while len(chosen) < KILLS_PER_COMMAND:
        chosen.add(rng.randint(1, len(points)))
    return sorted(chosen)


def _campaign(reference, tmp_path, command: str) -> dict:
    rng = random.Random(13)
    run = reference[f"{command}_run"]
    logs = tmp_path / "logs"

    def args(out):
        return cache_args(reference["images"], out) if command == "cache" else train_args(reference["cache"], out)

    def check(out):
        if command == "cache":
            assert_same_files(out, reference["cache"])
        else:
            assert_same_sweep(out, reference, out.parent / "report")

    timed = run_cli(args(tmp_path / "timed" / FOLDER[command]), logs)  # the reference's time included starting up
    assert timed.exitcode == 0, timed.output
    landed: Counter[str] = Counter()
    for number in _kill_points(run.points, rng):
        out = tmp_path / f"point-{number}" / FOLDER[command]
        landed.update(kill_then_finish(args(out), out, [str(number)], logs))
        check(out)
    for trial in range(WALL_CLOCK_KILLS):
        out = tmp_path / f"clock-{trial}" / FOLDER[command]
        after = rng.uniform(0.05, timed.seconds)
        landed.update(f"clock: {where}" for where in kill_then_finish(args(out), out, [None], logs, kill_after=after))
        check(out)
    out = tmp_path / "chained" / FOLDER[command]  # three kills in a row, each in the rerun of the one before
    landed.update(f"chained: {w}" for w in kill_then_finish(args(out), out, [str(len(run.points) // 4)] * 3, logs))
    check(out)
    return dict(landed)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["cache", "train"])
def test_many_kills_resume_to_the_same_files(reference, tmp_path, command):
    landed = _campaign(reference, tmp_path, command)
    kills = sum(count for where, count in landed.items() if "finished first" not in where)
    assert kills >= 20
    points = len(reference[f"{command}_run"].points)
    print(f"\n{command}: {kills} kills ({points} write points in an uninterrupted run), all identical after a rerun:")
    for where, count in sorted(landed.items()):
        print(f"  {count:3d}  {where}")


@pytest.mark.slow
def test_the_environment_variable_kills_the_real_command(reference, tmp_path):
    """FASTPROMPT_KILL_AT, read at import, in `python -m fastprompt.cli` itself."""
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "fastprompt.cli", *cache_args(reference["images"], out)]
    environment = {**os.environ, faults.KILL: "shard:rename@4", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert len(list(out.glob("*.tar"))) == 3 and temporaries(out)  # the fourth shard's complete temporary file
    environment.pop(faults.KILL)
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert not temporaries(out)
    assert_same_files(out, reference["cache"])
