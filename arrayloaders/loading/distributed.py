"""Rank and world size: from explicit arguments or an initialised ``torch.distributed`` group.

The sharding itself is pure arithmetic in ``plan.py`` (each rank takes a
contiguous range of the epoch's shuffled rows); this module only finds out
who we are and checks that every rank plans with the same settings.
"""

from __future__ import annotations

import os

import torch.distributed as dist

__all__ = ["check_same_on_every_rank", "local_world_size", "rank_and_world_size"]


def local_world_size() -> int:
    """Ranks sharing this node: ``LOCAL_WORLD_SIZE`` (torchrun sets it), else 1.

    Read from the environment, not the process group: datasets are often
    built before the group is initialised, and the group does not say
    which ranks share a node.
    """
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments if given, else the process group's, else ``(0, 1)``."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
    if rank is not None:
        return int(rank), int(world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_same_on_every_rank(settings: dict) -> None:
    """Raise ``ValueError`` on every rank if the ranks' ``settings`` differ (needs an initialised group).

    Ranks that plan with different seeds or sizes would read overlapping or
    missing cells and yield different batch counts (a hang at the next
    all-reduce); one small all-gather at the start of an epoch rules it out.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, settings)
    differing = {k for g in gathered for k in settings if g[k] != settings[k]}
    if differing:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={g[k]!r}" for r, g in enumerate(gathered)) for k in sorted(differing))
        raise ValueError(f"the ranks disagree on {sorted(differing)} ({detail}); every rank must use the same values")
