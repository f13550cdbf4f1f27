"""Elastic resume: the rest of an epoch interrupted at one world size, delivered at another.

A checkpoint holds the epoch and how many batches each rank had yielded
(ranks run in step: every rank's count is the same, so the state is the
same whichever rank saved it). At ``W`` ranks, rank ``r`` yields the rows
of ``plan_epoch(config(W, r), epoch)`` in its batch order; after ``p``
batches each, the rows not yet yielded are, rank after rank, the *rest* of
the epoch. Resumed at ``W'`` ranks, the rest is planned as a sequence
(as a sampler's would be: its order kept, rank ``r'`` taking its
contiguous share, padded by one row where the shares differ, so that every
rank yields the same number of batches; no row of the rest is dropped, the
last batch may be short). Resumed again at yet another size, the chain of
``(world size, batches)`` steps is replayed. Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .plan import EpochPlan, PlanConfig, plan_epoch

__all__ = ["Chain", "elastic_config", "elastic_plan", "yielded_rows"]

#: (world size, batches each rank had yielded) of each interruption of the epoch, oldest first
Chain = tuple[tuple[int, int], ...]


def yielded_rows(plan: EpochPlan) -> np.ndarray:
    """Every global row ``plan`` yields, in its batch order (batch ``b`` is rows ``b * batch_size`` on)."""
    out = []
    for w in range(-(-len(plan.loads) // plan.window)):
        rows = [plan.rows_of_load(plan.loads[i]) for i in plan.window_loads(w)]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        order = plan.window_order(w)
        out.append(rows if order is None else rows[order])
    return (np.concatenate(out) if out else np.zeros(0, np.int64))[: plan.n_rows]


def _rest_config(config: PlanConfig, n: int, world_size: int, rank: int) -> PlanConfig:
    """The plan settings of a rest of ``n`` rows at ``world_size`` ranks: a sequence, padded, nothing dropped."""
    return dataclasses.replace(config, world_size=world_size, rank=rank, n_selected=n, equalize="pad", drop_last=False,
                               window=1)  # fmt: skip


def _step_config(config: PlanConfig, chain: Chain, i: int, n: int | None) -> PlanConfig:
    world = chain[i][0]
    return dataclasses.replace(config, world_size=world, rank=0) if i == 0 else _rest_config(config, n, world, 0)


def rest_size(config: PlanConfig, chain: Chain) -> int:
    """Rows left in the epoch after every step of ``chain`` (``config``: the sizes and selection of the epoch)."""
    n = None
    for i, (world, done) in enumerate(chain):
        step = _step_config(config, chain, i, n)
        per_rank = step.n_batches * step.batch_size if step.drop_last else step.rank_rows
        n = world * max(0, per_rank - done * step.batch_size)
    return int(n)


def elastic_config(config: PlanConfig, chain: Chain) -> PlanConfig:
    """The plan settings of this rank (``config.rank`` of ``config.world_size``) for the rest of the epoch."""
    if not chain:
        return config
    n = rest_size(config, chain)
    if 0 < n < config.world_size:
        raise ValueError(
            f"cannot resume at world_size={config.world_size}: the rest of the epoch holds {n} cells, fewer than the "
            "ranks (resume at a smaller world size, or from the next epoch)"
        )
    return _rest_config(config, n, config.world_size, config.rank)


def elastic_plan(config: PlanConfig, epoch: int, cells: np.ndarray | None, sequence: np.ndarray | None,
                 chain: Chain) -> EpochPlan:  # fmt: skip
    """This rank's plan for the rest of ``epoch`` after the interruptions ``chain`` (``cells`` or the sampler's
    ``sequence``: the epoch's selection; ``config``: its sizes at the world size it resumes at)."""
    if not chain:
        return plan_epoch(config, epoch, cells=cells, sequence=sequence)
    n = None
    for i, (world, done) in enumerate(chain):
        step = _step_config(config, chain, i, n)
        rests = []
        for rank in range(world):
            plan = plan_epoch(dataclasses.replace(step, rank=rank), epoch, cells=cells, sequence=sequence)
            rests.append(yielded_rows(plan)[done * step.batch_size :])
        sequence, cells = np.concatenate(rests), None
        n = sequence.size
    return plan_epoch(elastic_config(config, chain), epoch, sequence=sequence)
