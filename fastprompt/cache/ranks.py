"""torchrun support: which share of the shards this process extracts, and the barriers around the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the extraction processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard_index: int) -> bool:
        """Shards are dealt round-robin: shard i belongs to rank i mod world_size."""
        return shard_index % self.world_size == self.rank


def start(device: str) -> Ranks:
    """Join the torchrun group when RANK and WORLD_SIZE say there is one (NCCL on CUDA, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    started_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        started_here = True
    return Ranks(rank, world_size, local_rank, started_here)


def rank_device(device: str, ranks: Ranks) -> str:
    """Under torchrun, a plain "cuda" means this rank's own GPU."""
    if ranks.world_size > 1 and device == "cuda":
        return f"cuda:{ranks.local_rank}"
    return device


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


def share_from_main(ranks: Ranks, value: object) -> object:
    """Rank 0's `value` on every rank (e.g. rank 0's verdict on an existing cache folder)."""
    if ranks.world_size <= 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(ranks: Ranks, value: object) -> list[object]:
    """Every rank's `value`, in rank order (a one-element list without torchrun)."""
    if ranks.world_size <= 1:
        return [value]
    values: list[object] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def stop(ranks: Ranks) -> None:
    if ranks.started_here and dist.is_initialized():
        dist.destroy_process_group()
