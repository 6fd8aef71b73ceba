"""Rank / world size and sharding for evaluation under DDP (a no-op in a single process)."""

from __future__ import annotations

import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of global indices [0, n) that `rank` handles: no index twice, none padded."""
    return range(n * rank // world, n * (rank + 1) // world)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a single process)."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
