"""The epoch plan: which rows are read together, in which order, cut into which batches.

Pure functions of (file sizes, sizes, seed, epoch, rank, world size); no I/O.
Every process (the main iterator, each worker) can compute the same plan,
so only load numbers need to cross process boundaries.

Vocabulary:

- a *chunk* is a run of ``chunk_size`` consecutive cells inside one file
  (the last chunk of a file may be shorter);
- a *load* is ``preload_nchunks`` chunks read together; its rows are
  concatenated in chunk order and then permuted by :func:`load_permutation`;
- the epoch's row sequence is the loads' permuted rows, one load after the
  other; batch ``b`` is positions ``b * batch_size : (b + 1) * batch_size`` of
  it, so a batch may span the end of one load and the start of the next.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

__all__ = ["EpochPlan", "Load", "PlanConfig", "batch_segments", "load_permutation", "plan_epoch"]

Equalize = Literal["drop", "pad"]


@dataclass(frozen=True)
class PlanConfig:
    """Everything the plan depends on besides the epoch."""

    file_n_obs: tuple[int, ...]
    batch_size: int
    chunk_size: int
    preload_nchunks: int
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    equalize: Equalize = "drop"

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size", "preload_nchunks", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.equalize not in ("drop", "pad"):
            raise ValueError(f"equalize must be 'drop' or 'pad', got {self.equalize!r}")
        if any(n < 0 for n in self.file_n_obs):
            raise ValueError(f"file sizes must be non-negative, got {self.file_n_obs}")

    @property
    def n_obs(self) -> int:
        return int(sum(self.file_n_obs))

    @property
    def file_offsets(self) -> np.ndarray:
        """Global row index of each file's first row (files concatenated in order)."""
        return np.concatenate([[0], np.cumsum(self.file_n_obs, dtype=np.int64)])


@dataclass(frozen=True)
class Load:
    """One unit of reading: chunks read together, then row-permuted."""

    index: int  # position in the epoch, 0-based
    chunks: np.ndarray  # (k, 3) int64 rows of (file, start, stop)
    start: int  # epoch position of the load's first row

    @property
    def n_rows(self) -> int:
        return int((self.chunks[:, 2] - self.chunks[:, 1]).sum())


@dataclass(frozen=True)
class EpochPlan:
    config: PlanConfig
    epoch: int
    loads: tuple[Load, ...]
    n_rows: int  # rows this rank yields this epoch
    n_batches: int

    @cached_property
    def load_starts(self) -> list[int]:
        return [load.start for load in self.loads]

    def rows_of_load(self, load: Load) -> np.ndarray:
        """Global row indices of a load, in the order the load yields them."""
        offsets = self.config.file_offsets
        rows = np.concatenate(
            [np.arange(offsets[f] + a, offsets[f] + b, dtype=np.int64) for f, a, b in load.chunks]
        )
        return rows[load_permutation(self.config, self.epoch, load.index, rows.size)]


def _chunks(file_n_obs: tuple[int, ...], chunk_size: int) -> np.ndarray:
    """All chunks of all files in store order, as (file, start, stop) rows."""
    parts = []
    for f, n in enumerate(file_n_obs):
        starts = np.arange(0, n, chunk_size, dtype=np.int64)
        parts.append(np.stack([np.full_like(starts, f), starts, np.minimum(starts + chunk_size, n)], axis=1))
    return np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.int64)


def _rng(config: PlanConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *stream])


def load_permutation(config: PlanConfig, epoch: int, load_index: int, n_rows: int) -> np.ndarray:
    """Order of a load's rows (positions into its chunk-order concatenation)."""
    if not config.shuffle:
        return np.arange(n_rows)
    return _rng(config, epoch, 1, load_index).permutation(n_rows)


def _rank_chunks(config: PlanConfig, epoch: int) -> tuple[np.ndarray, int]:
    """This rank's chunks in epoch order, and the rows every rank yields."""
    chunks = _chunks(config.file_n_obs, config.chunk_size)
    if config.shuffle:
        chunks = chunks[_rng(config, epoch, 0).permutation(len(chunks))]
    if config.world_size == 1:
        return chunks, config.n_obs
    # Deal whole chunks round-robin; ranks then differ by at most a chunk or
    # so of rows, equalised below so every rank yields as many batches.
    lengths = chunks[:, 2] - chunks[:, 1]
    per_rank = [int(lengths[r :: config.world_size].sum()) for r in range(config.world_size)]
    mine = chunks[config.rank :: config.world_size]
    return mine, (min(per_rank) if config.equalize == "drop" else max(per_rank))


def plan_epoch(config: PlanConfig, epoch: int) -> EpochPlan:
    """The loads and batch count of one epoch on this rank."""
    chunks, n_rows = _rank_chunks(config, epoch)
    own_rows = int((chunks[:, 2] - chunks[:, 1]).sum())
    if n_rows > own_rows:  # "pad": repeat this rank's first chunks
        lengths = chunks[:, 2] - chunks[:, 1]
        need = np.searchsorted(np.cumsum(lengths), n_rows - own_rows) + 1
        chunks = np.concatenate([chunks, chunks[:need]])
    n_batches = n_rows // config.batch_size if config.drop_last else -(-n_rows // config.batch_size)
    n_rows_yielded = n_batches * config.batch_size if config.drop_last else n_rows
    loads, start = [], 0
    for i, lo in enumerate(range(0, len(chunks), config.preload_nchunks)):
        if start >= n_rows_yielded:
            break  # later loads hold only rows that are dropped
        load = Load(i, chunks[lo : lo + config.preload_nchunks], start)
        loads.append(load)
        start += load.n_rows
    return EpochPlan(config, epoch, tuple(loads), n_rows_yielded, n_batches)


def batch_segments(plan: EpochPlan, batch: int) -> list[tuple[int, int, int]]:
    """Pieces of batch ``batch``: (load index, first row, stop row) within each load."""
    if not 0 <= batch < plan.n_batches:
        raise IndexError(f"batch {batch} out of range for an epoch of {plan.n_batches} batches")
    bs = plan.config.batch_size
    lo, hi = batch * bs, min((batch + 1) * bs, plan.n_rows)
    out = []
    for i in range(bisect.bisect_right(plan.load_starts, lo) - 1, len(plan.loads)):
        load = plan.loads[i]
        if load.start >= hi:
            break
        a, b = max(lo, load.start), min(hi, load.start + load.n_rows)
        if a < b:
            out.append((load.index, a - load.start, b - load.start))
    return out
