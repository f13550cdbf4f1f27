"""The epoch plan: which rows are read together, in which order, cut into which batches.

Pure functions of (file sizes, sizes, seed, epoch, rank, world size); no I/O.
Every process (the main iterator, each worker) can compute the same plan,
so only load numbers need to cross process boundaries.

Vocabulary:

- a *chunk* is a run of ``chunk_size`` consecutive cells inside one file
  (the last chunk of a file may be shorter);
- the epoch's chunks (all of them, shuffled by ``(seed, epoch)``) are
  concatenated into one row sequence; rank ``r`` of ``W`` takes its own
  contiguous range of it (:func:`_rank_rows`), which is cut into *loads* of
  :attr:`PlanConfig.load_rows` rows: ``preload_nchunks * chunk_size``
  rounded up to whole batches, so a load may start or end inside a chunk;
- a load's rows are read together and permuted by :func:`load_permutation`;
- batch ``b`` is rows ``b * batch_size : (b + 1) * batch_size`` of the epoch's
  permuted sequence, which always lie inside one load: a batch is one
  contiguous slice of one load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["EpochPlan", "Load", "PlanConfig", "batch_rows", "load_permutation", "plan_epoch"]

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
    def load_rows(self) -> int:
        """Rows per load: ``preload_nchunks * chunk_size``, rounded up to whole batches."""
        return -(-self.preload_nchunks * self.chunk_size // self.batch_size) * self.batch_size

    @property
    def rank_rows(self) -> int:
        """Rows each rank yields per epoch before ``drop_last``: ``n // W`` (drop) or ``ceil(n / W)`` (pad)."""
        n, world = self.n_obs, self.world_size
        return n // world if self.equalize == "drop" else -(-n // world)

    @property
    def n_batches(self) -> int:
        """Batches per epoch on each rank (the same for every epoch)."""
        rows = self.rank_rows
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    @property
    def file_offsets(self) -> np.ndarray:
        """Global row index of each file's first row (files concatenated in order)."""
        return np.concatenate([[0], np.cumsum(self.file_n_obs, dtype=np.int64)])


@dataclass(frozen=True)
class Load:
    """One unit of reading: runs of rows read together, then row-permuted."""

    index: int  # position in the epoch, 0-based
    chunks: np.ndarray  # (k, 3) int64 rows of (file, start, stop): whole chunks, or parts at the load's ends
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


def _epoch_chunks(config: PlanConfig, epoch: int) -> np.ndarray:
    """Every chunk of the store, in this epoch's order."""
    chunks = _chunks(config.file_n_obs, config.chunk_size)
    if config.shuffle:
        chunks = chunks[_rng(config, epoch, 0).permutation(len(chunks))]
    return chunks


def _rows_of(pieces: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The (file, start, stop) pieces holding rows ``[lo, hi)`` of the concatenation of ``pieces``."""
    if hi <= lo:
        return np.empty((0, 3), dtype=np.int64)
    lengths = pieces[:, 2] - pieces[:, 1]
    ends = np.cumsum(lengths)
    first, last = np.searchsorted(ends, lo, side="right"), np.searchsorted(ends, hi, side="left")
    out = pieces[first : last + 1].copy()
    out[0, 1] += lo - (ends[first] - lengths[first])  # skip rows before lo
    out[-1, 2] -= ends[last] - hi  # and after hi
    return out


def _rank_rows(config: PlanConfig, epoch: int) -> np.ndarray:
    """This rank's pieces of the epoch's row sequence, equalised across ranks.

    Rank ``r`` of ``W`` takes rows ``[r * n // W, (r + 1) * n // W)`` of the
    shuffled chunk sequence, so ranks are disjoint and differ by at most one
    row. ``"drop"`` cuts every rank to ``n // W`` rows (fewer than ``W`` rows of
    the store are not yielded in that epoch); ``"pad"`` brings every rank to
    ``ceil(n / W)`` by repeating its own first row.
    """
    chunks, n, world, rank = _epoch_chunks(config, epoch), config.n_obs, config.world_size, config.rank
    if world > 1 and n < world:
        raise ValueError(f"the dataset has {n} cells, fewer than world_size={world}: some rank would get none")
    lo, hi = rank * n // world, (rank + 1) * n // world
    if config.equalize == "drop":
        return _rows_of(chunks, lo, lo + n // world)
    mine = _rows_of(chunks, lo, hi)
    return np.concatenate([mine, _rows_of(mine, 0, -(-n // world) - (hi - lo))])


def plan_epoch(config: PlanConfig, epoch: int) -> EpochPlan:
    """The loads and batch count of one epoch on this rank."""
    mine = _rank_rows(config, epoch)
    n_batches = config.n_batches
    n_rows = n_batches * config.batch_size if config.drop_last else config.rank_rows
    loads = tuple(
        Load(i, _rows_of(mine, lo, min(lo + config.load_rows, n_rows)), lo)
        for i, lo in enumerate(range(0, n_rows, config.load_rows))
    )
    return EpochPlan(config, epoch, loads, n_rows, n_batches)


def batch_rows(plan: EpochPlan, batch: int) -> tuple[int, int, int]:
    """Where batch ``batch`` lies: (load index, first row, stop row) within that load."""
    if not 0 <= batch < plan.n_batches:
        raise IndexError(f"batch {batch} out of range for an epoch of {plan.n_batches} batches")
    lo = batch * plan.config.batch_size
    load = lo // plan.config.load_rows
    lo -= load * plan.config.load_rows
    return load, lo, min(lo + plan.config.batch_size, plan.loads[load].n_rows)
