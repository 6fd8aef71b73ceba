"""Rank / world size and sharding for evaluation under DDP (a no-op in a single process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


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


class _Failed:
    """What rank 0 broadcasts when its function raised (every rank then raises)."""

    def __init__(self, message: str) -> None:
        self.message = message


def broadcast_from_rank0(fn: Callable[[], T]) -> T:
    """fn() evaluated on rank 0 only and its (picklable) value returned on every rank; fn() in one process.

    A decision that depends on a rank's own view (does the cache file exist on this node?) is
    made once, so all ranks take the same branch. If fn raises on rank 0, every rank raises
    (RuntimeError naming the error) instead of the others waiting forever. A collective: call
    it on every rank.
    """
    rank, world = dist_info()
    if world == 1:
        return fn()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, re-raised below
            box[0] = _Failed(f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], _Failed):
        raise RuntimeError(f"rank 0 failed while deciding for every rank: {box[0].message}")
    return box[0]
