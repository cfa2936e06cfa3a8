"""A sweep across torchrun ranks: each rank trains its share of the runs, all write one sweep folder.

`torchrun --nproc_per_node N fastprompt train ...` starts N copies of the same command. Every rank resolves the same
runs, so every rank can compute the same split without talking: the runs are cut into units (a lock-step group of
`_sweep`, or a baseline run), a unit that alone costs more than a fair share (total / N) is halved until none does,
and the units go to ranks by longest-processing-time-first on a predicted cost (below). A rank then runs the ordinary
sweep on its own runs; its units of one layout train together as one lock-step group there. The split depends only on
the runs and N, never on what is already on disk, so a rerun with the same N gives every rank the same runs and
groups as before, and each resumes its groups from their checkpoints bit for bit (a rerun with another N regroups:
the same results up to float rounding, as `_restore` says).

Before any training the ranks check that they agree: a hash of the resolved runs, of the cache's manifest and of the
options that decide who trains what is all-gathered, and a difference stops every rank with one sentence. Rank 0
alone takes the folder's lock (a refusal reaches every rank), repairs the folder as a restart does (stale temporaries,
a torn or lost results.jsonl line), and every other rank checks that it sees rank 0's lock file, i.e. the same folder
(with several nodes: the same shared file system). From then on the ranks write only their own run folders, and
append their results.jsonl lines under an flock (results.py `shared_sweep_folder`), so lines never interleave.

Predicted cost of a prompt run: steps x classes x passes through the text tower per step (3 for runs with a teacher:
a forward and two cotangents; 2 otherwise). A baseline (zero-shot, CLIP++, linear probe) counts as `classes` (a few
text-tower passes over the class names, no training steps).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

from fastprompt.cache.ranks import Ranks, barrier, gather, share_from_main, start
from fastprompt.errors import FastPromptError
from fastprompt.locks import FolderLock, holder_of
from fastprompt.train.config import RunConfig, iterations_per_epoch
from fastprompt.train.results import ResultWriter, read_index, shared_sweep_folder


def sweep_ranks(device: str = "cpu") -> Ranks:
    """This process's rank: the torchrun group already started, or one started now from RANK and WORLD_SIZE
    (destroyed at exit), or rank 0 of 1 without torchrun."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, started_here=False)
    ranks = start(device)
    if ranks.started_here:
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return ranks


def run_cost(config: RunConfig, cache) -> float:
    """Predicted work of one run, in class-passes of the text tower (module docstring)."""
    classes = len(cache.classnames)
    if config.setting == "base2new":
        classes = (classes + 1) // 2  # PROTOCOL.md section 5: m = ceil(n / 2) base classes
    if not config.uses_prompt:
        return float(classes)
    images = cache.fewshot(config.shots, config.seed).train_index.numel() * classes // len(cache.classnames)
    steps = iterations_per_epoch(max(images, 1), config.batch_size) * config.epochs
    return float(steps * classes * (3 if config.uses_teacher else 2))


def _layout(config: RunConfig) -> tuple:
    """What puts runs into one lock-step group in `_sweep` (its prefix is the cache's template or none)."""
    return (config.setting, config.init == "template", config.n_ctx, config.position, config.class_specific,
            config.precision)  # fmt: skip


def plan_units(configs: list[RunConfig], costs: list[float], world_size: int, max_group: int) -> list[list[int]]:
    """The runs (indices into `configs`) cut into units of work, in a canonical order (by run id): a baseline run
    alone, prompt runs of one layout in slices of at most `max_group`, and then the costliest unit halved while it
    costs more than a fair share (total / world_size) and holds two runs or more."""
    ids = [c.run_id for c in configs]
    ordered = sorted(range(len(configs)), key=lambda i: ids[i])
    units: list[list[int]] = [[i] for i in ordered if not configs[i].uses_prompt]
    layouts: dict[tuple, list[int]] = {}
    for i in ordered:
        if configs[i].uses_prompt:
            layouts.setdefault(_layout(configs[i]), []).append(i)
    for members in layouts.values():
        units += [members[start : start + max_group] for start in range(0, len(members), max_group)]
    fair = sum(costs) / world_size
    priced = [(sum(costs[i] for i in unit), unit) for unit in units]
    while True:
        splittable = [index for index, (cost, unit) in enumerate(priced) if len(unit) > 1 and cost > fair]
        if not splittable:
            return [unit for _, unit in priced]
        index = max(splittable, key=lambda i: (priced[i][0], -i))
        unit = priced.pop(index)[1]
        halves = [unit[: (len(unit) + 1) // 2], unit[(len(unit) + 1) // 2 :]]
        priced[index:index] = [(sum(costs[i] for i in half), half) for half in halves]


def assign(costs: list[float], world_size: int) -> list[int]:
    """Longest processing time first: units by falling cost, each to the rank with the least work so far (ties: the
    lower index). Returns the rank of each unit; within 4/3 of the best possible makespan (Graham, 1969)."""
    loads = [0.0] * world_size
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[index] = rank
        loads[rank] += costs[index]
    return owner


def split_runs(configs: list[RunConfig], cache, world_size: int, max_group: int) -> list[list[RunConfig]]:
    """Every rank's runs, in the order of `configs`; every run belongs to exactly one rank."""
    costs = [run_cost(c, cache) for c in configs]
    units = plan_units(configs, costs, world_size, max_group)
    owners = assign([sum(costs[i] for i in unit) for unit in units], world_size)
    rank_of = {i: owner for unit, owner in zip(units, owners, strict=True) for i in unit}
    return [[c for i, c in enumerate(configs) if rank_of[i] == rank] for rank in range(world_size)]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprints(cache, configs: list[RunConfig], options) -> dict[str, str]:
    """Hashes of what every rank must agree on: the runs (the command's arguments), the cache (its manifest: the
    model, the class names, the shards' checksums) and the options that decide the split and the results."""
    targets = [getattr(target, "manifest", None) for target in options.targets]
    update = getattr(options.update_fn, "__qualname__", repr(options.update_fn))
    return {
        "runs": _digest(sorted((c.run_id, c.to_dict()) for c in configs)),
        "cache": _digest(cache.manifest),
        "options": _digest([options.max_group, options.class_chunk, update, targets]),
    }


def check_agreement(ranks: Ranks, mine: dict[str, str]) -> None:
    """Refuse, on every rank, a sweep whose ranks resolved different runs, caches or options.

    Raises:
        FastPromptError: in one sentence, naming what differs and on which ranks.
    """
    everyone = gather(ranks, mine)
    for part, what in (("runs", "runs (the command's arguments)"), ("cache", "cache"), ("options", "options")):
        differ = [rank for rank, theirs in enumerate(everyone) if theirs[part] != everyone[0][part]]
        if differ:
            listed = ", ".join(str(rank) for rank in differ)
            raise FastPromptError(
                f"The torchrun ranks disagree on the sweep: the {what} of rank(s) {listed} differ from rank 0's; start "
                f"every rank with the same command on the same cache."
            )


def _open_folder(ranks: Ranks, out_dir: Path, lock: FolderLock) -> None:
    """Rank 0 locks and repairs the folder; every rank checks that it sees that folder. A refusal reaches all."""
    verdict, refusal, holder = None, None, None
    if ranks.is_main:
        try:
            lock.acquire()
            ResultWriter(out_dir)  # the repairs of a restart, done once, before any rank writes
            holder = holder_of(out_dir)
        except FastPromptError as error:
            verdict, refusal = str(error), error
    verdict, holder = share_from_main(ranks, (verdict, holder))
    if verdict:
        raise refusal or FastPromptError(verdict)  # rank 0 keeps the error's type (FolderInUseError, DiskFullError)
    sees = holder is None or holder_of(out_dir) == holder  # None: a file system without locks, nothing to compare
    blind = [rank for rank, seen in enumerate(gather(ranks, sees)) if not seen]
    if blind:
        listed = ", ".join(str(rank) for rank in blind)
        raise FastPromptError(
            f"Rank(s) {listed} do not see rank 0's sweep folder '{out_dir}' (another --out, or a folder that is not "
            f"shared between the nodes); pass every rank the same --out on a file system that all nodes share."
        )


def sweep_on_ranks(cache, clip, configs: list[RunConfig], out_dir: Path, options, ranks: Ranks, sweep) -> list[dict]:
    """`run_sweep` under torchrun: check agreement, open the folder, train this rank's share with `sweep` (the
    sweep of one process, `_sweep`), wait for every rank; returns every record of results.jsonl.

    Raises:
        FastPromptError: the ranks disagree, do not share the folder, or another process holds it.
    """
    out_dir = Path(out_dir)
    options = dataclasses.replace(options, progress=options.progress and ranks.is_main)  # one bar, rank 0's share
    check_agreement(ranks, fingerprints(cache, configs, options))
    lock = FolderLock(out_dir, "fastprompt train", remedy="pass another --out")
    try:
        _open_folder(ranks, out_dir, lock)
        mine = split_runs(configs, cache, ranks.world_size, options.max_group)[ranks.rank]
        with shared_sweep_folder(out_dir):
            barrier(ranks)  # every rank past the repair before the first write
            sweep(cache, clip, mine, out_dir, options)
        barrier(ranks)  # every run written: the index is whole
        return list(read_index(out_dir).values())
    finally:
        lock.release()
