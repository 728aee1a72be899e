"""Sharding an extraction over torchrun processes (one node or several): ranks, barriers, the shares.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; every rank reads the same tree and extracts a disjoint,
deterministic share (sorted ids, round robin), so the cache does not depend on how many processes or
machines wrote it. Rank 0 creates (or wipes) the cache, holds its writer lock for the whole job, records
the split files' listings and seals the cache after the last barrier.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK: join the group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def all_sum(d: Dist, values: Sequence[int]) -> list[int]:
    """The element-wise sum of `values` over the ranks."""
    if not d.active:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(t)
    return [int(x) for x in t]


def shard(items: Sequence[T], d: Dist, key=lambda v: v.video_id) -> list[T]:
    """Each rank owns a disjoint, deterministic share: sorted ids, round-robin."""
    ordered = sorted(items, key=key)
    return ordered[d.rank::d.world]
