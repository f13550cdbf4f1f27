"""The epoch plan: which rows are read together, in which order, cut into which batches.

Pure functions of (file sizes, sizes, seed, epoch, rank, world size, the
selection); no I/O. The main process computes the plan; each task sent to a
worker carries its load's *runs* and *take* (below), so workers need no plan.

Vocabulary:

- a *chunk* is a run of ``chunk_size`` consecutive cells inside one file
  (the last chunk of a file may be shorter);
- a *load* is what one worker decodes into one slot: *runs* of consecutive
  rows ``(file, start, stop)`` read in that order (the *read rows*), and a
  *take*: for each row the load yields, in yield order, its position among
  the read rows. A take may skip read rows (a subset) or repeat them (a
  sampler);
- a *window* is ``window`` consecutive loads whose rows are mixed together;
  batch ``b`` is rows ``b * batch_size : (b + 1) * batch_size`` of the epoch's
  yield order, which always lie inside one window (loads hold
  :attr:`PlanConfig.load_rows` rows, a whole number of batches). With
  ``window=1`` (stores shuffled at conversion) a load's take already holds
  its permutation, so a batch is one contiguous slice of one load, read
  without a copy; with a larger window the loads yield their rows in read
  order and :meth:`EpochPlan.window_order` permutes the whole window, so
  that a batch draws from ``window`` times more chunks (an unshuffled store
  then gives batches whose labels mix about as well as random ones).

Three selections, one mechanism:

- *every cell* (the default): the epoch's chunks, shuffled by ``(seed,
  epoch)``, concatenated into one row sequence; rank ``r`` of ``W`` takes its
  own contiguous range of it (:func:`_rank_pieces`), cut into loads; each
  load's rows are permuted by :func:`load_permutation`;
- *a subset* (``cells``, sorted global rows): the same chunks and reads, but
  only the subset's rows count and are yielded; rows outside it are read
  with their chunk and skipped;
- *a sequence* (a sampler's indices for this epoch, repeats allowed): rank
  ``r`` takes its contiguous share; each load is the next ``load_rows``
  indices, read as runs of the sorted distinct rows and yielded in the
  sequence's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["EpochPlan", "Load", "PlanConfig", "batch_rows", "load_permutation", "plan_epoch", "runs_of_rows"]

Equalize = Literal["drop", "pad"]


@dataclass(frozen=True)
class PlanConfig:
    """Everything the plan depends on besides the epoch and the selection's contents.

    ``n_selected`` is the number of rows an epoch draws from: the subset's
    size or the sampler's length (``None``: every cell).
    """

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
    n_selected: int | None = None
    window: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size", "preload_nchunks", "world_size", "window"):
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
    def n_epoch(self) -> int:
        """Rows an epoch draws from, before rank sharding."""
        return self.n_obs if self.n_selected is None else int(self.n_selected)

    @property
    def load_rows(self) -> int:
        """Rows per load: ``preload_nchunks * chunk_size``, rounded up to whole batches."""
        return -(-self.preload_nchunks * self.chunk_size // self.batch_size) * self.batch_size

    @property
    def rank_rows(self) -> int:
        """Rows each rank yields per epoch before ``drop_last``: ``n // W`` (drop) or ``ceil(n / W)`` (pad)."""
        n, world = self.n_epoch, self.world_size
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
    """One unit of reading: runs of rows read together, and the rows it yields from them."""

    index: int  # position in the epoch, 0-based
    runs: np.ndarray  # (k, 3) int64 rows of (file, start, stop), read in this order
    start: int  # epoch position of the load's first yielded row
    n_rows: int  # rows it yields
    take: np.ndarray | None = None  # given by a sequence; otherwise computed by EpochPlan.take

    @property
    def n_read(self) -> int:
        return int((self.runs[:, 2] - self.runs[:, 1]).sum())


@dataclass(frozen=True)
class EpochPlan:
    config: PlanConfig
    epoch: int
    loads: tuple[Load, ...]
    n_rows: int  # rows this rank yields this epoch
    n_batches: int
    cells: np.ndarray | None = None  # the subset, sorted global rows (None: every cell)
    sequence: bool = False  # the loads follow a sampled sequence

    def read_rows(self, load: Load) -> np.ndarray:
        """Global row indices of a load's read rows, in read order."""
        offsets = self.config.file_offsets
        return np.concatenate(
            [np.arange(offsets[f] + a, offsets[f] + b, dtype=np.int64) for f, a, b in load.runs.tolist()]
        )

    def take(self, load: Load) -> np.ndarray:
        """For each row ``load`` yields, in yield order, its position among the read rows."""
        if load.take is not None:
            return load.take
        if self.cells is None:
            kept = None
        else:
            rows = self.read_rows(load)
            at = np.minimum(np.searchsorted(self.cells, rows), self.cells.size - 1)
            kept = np.flatnonzero(self.cells[at] == rows)
        n = load.n_rows
        if self.config.window > 1:  # the window's permutation is applied when batches are cut
            return np.arange(n) if kept is None else kept
        order = load_permutation(self.config, self.epoch, load.index, n)
        return order if kept is None else kept[order]

    @property
    def window(self) -> int:
        """Loads mixed together (1 for a sampler's sequence: its order is kept)."""
        return 1 if self.sequence else self.config.window

    def window_loads(self, window: int) -> range:
        """The loads of window ``window``."""
        k = self.window
        return range(window * k, min((window + 1) * k, len(self.loads)))

    def window_order(self, window: int) -> np.ndarray:
        """Order of a window's rows (positions into its loads' yielded rows, concatenated), or ``None`` if ``window=1``."""
        if self.window == 1:
            return None
        n = sum(self.loads[i].n_rows for i in self.window_loads(window))
        if not self.config.shuffle:
            return np.arange(n)
        return _rng(self.config, self.epoch, 3, window).permutation(n)

    def selected_take(self, load: Load) -> np.ndarray | None:
        """The take of a load that skips or repeats read rows; ``None`` when it yields each read row once."""
        return None if load.take is None and self.cells is None else self.take(load)

    def rows_of_load(self, load: Load) -> np.ndarray:
        """Global row indices of a load, in the order the load yields them."""
        return self.read_rows(load)[self.take(load)]


def _chunks(file_n_obs: tuple[int, ...], chunk_size: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Chunks ``ids`` (default: all) of all files, numbered in store order, as (file, start, stop) rows."""
    n_obs = np.asarray(file_n_obs, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(-(-n_obs // chunk_size))])  # each file's first chunk
    if ids is None:
        ids = np.arange(first[-1], dtype=np.int64)
    f = np.repeat(np.arange(n_obs.size), np.diff(first))[ids]  # a gather: 10x faster than a search per chunk
    start = (ids - first[f]) * chunk_size
    return np.stack([f, start, np.minimum(start + chunk_size, n_obs[f])], axis=1) if ids.size else np.empty((0, 3), np.int64)


def _rng(config: PlanConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *stream])


def load_permutation(config: PlanConfig, epoch: int, load_index: int, n_rows: int) -> np.ndarray:
    """Order of a load's rows (positions into its chunk-order concatenation)."""
    if not config.shuffle:
        return np.arange(n_rows)
    return _rng(config, epoch, 1, load_index).permutation(n_rows)


class _Counted:
    """Selected rows inside (file, start, stop) pieces: how many, and where the k-th one lies."""

    def __init__(self, config: PlanConfig, cells: np.ndarray | None):
        self.offsets, self.cells = config.file_offsets, cells

    def counts(self, pieces: np.ndarray) -> np.ndarray:
        if self.cells is None:
            return pieces[:, 2] - pieces[:, 1]
        base = self.offsets[pieces[:, 0]]
        return np.searchsorted(self.cells, base + pieces[:, 2]) - np.searchsorted(self.cells, base + pieces[:, 1])

    def rows_of(self, pieces: np.ndarray, k: np.ndarray) -> np.ndarray:
        """:meth:`row_of` for many pieces at once."""
        if self.cells is None:
            return pieces[:, 1] + k
        base = self.offsets[pieces[:, 0]]
        return self.cells[np.searchsorted(self.cells, base + pieces[:, 1]) + k] - base

    def row_of(self, piece: np.ndarray, k: int) -> int:
        """The file row of the ``k``-th (0-based) selected row of ``piece``."""
        f, a, _ = (int(x) for x in piece)
        if self.cells is None:
            return a + k
        return int(self.cells[np.searchsorted(self.cells, self.offsets[f] + a) + k] - self.offsets[f])


def _pieces_of(pieces: np.ndarray, counts: np.ndarray, lo: int, hi: int, counted: _Counted) -> np.ndarray:
    """The (file, start, stop) pieces holding selected rows ``[lo, hi)`` of the concatenation of ``pieces``."""
    if hi <= lo:
        return np.empty((0, 3), dtype=np.int64)
    ends = np.cumsum(counts)
    first, last = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi, side="left"))
    out = pieces[first : last + 1].copy()
    skip = lo - int(ends[first] - counts[first])  # selected rows of the first piece before lo
    if skip:
        out[0, 1] = counted.row_of(pieces[first], skip)
    keep = hi - int(ends[last] - counts[last])  # selected rows of the last piece before hi
    if keep < counts[last]:
        out[-1, 2] = counted.row_of(pieces[last], keep)
    return out


def _cut(pieces: np.ndarray, counts: np.ndarray, los: np.ndarray, his: np.ndarray, counted: _Counted) -> list[np.ndarray]:
    """``_pieces_of(pieces, counts, lo, hi)`` for every ``(lo, hi)`` of consecutive, non-empty ranges, vectorised.

    One gather builds every range's pieces (an epoch of 100M cells has 12k
    loads and 3M chunks: a numpy call per load was most of its planning).
    """
    ends = np.cumsum(counts)
    first, last = np.searchsorted(ends, los, side="right"), np.searchsorted(ends, his, side="left")
    sizes = last - first + 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    taken = np.repeat(first - bounds[:-1], sizes) + np.arange(bounds[-1])
    out = pieces[taken]  # a copy: the first and last piece of a range are trimmed below
    before = ends - counts  # selected rows ahead of each piece
    skip = los - before[first]
    trim = skip > 0
    out[bounds[:-1][trim], 1] = counted.rows_of(pieces[first[trim]], skip[trim])
    keep = his - before[last]
    trim = keep < counts[last]
    out[bounds[1:][trim] - 1, 2] = counted.rows_of(pieces[last[trim]], keep[trim])
    return [out[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _epoch_chunks(config: PlanConfig, epoch: int, counted: _Counted) -> np.ndarray:
    """Every chunk holding a selected row, in this epoch's order."""
    n_chunks = int(sum(-(-n // config.chunk_size) for n in config.file_n_obs))
    ids = np.arange(n_chunks, dtype=np.int64)
    if counted.cells is not None:
        ids = ids[counted.counts(_chunks(config.file_n_obs, config.chunk_size)) > 0]
    if config.shuffle:
        ids = ids[_rng(config, epoch, 0).permutation(ids.size)]  # chunk numbers, not rows of (file, start, stop)
    return _chunks(config.file_n_obs, config.chunk_size, ids)


def _check_world(config: PlanConfig) -> None:
    n, world = config.n_epoch, config.world_size
    if world > 1 and n < world:
        raise ValueError(f"the epoch has {n} cells, fewer than world_size={world}: some rank would get none")


def _rank_pieces(config: PlanConfig, epoch: int, counted: _Counted) -> np.ndarray:
    """This rank's pieces of the epoch's row sequence, equalised across ranks.

    Rank ``r`` of ``W`` takes selected rows ``[r * n // W, (r + 1) * n // W)`` of
    the shuffled chunk sequence, so ranks are disjoint and differ by at most
    one row. ``"drop"`` cuts every rank to ``n // W`` rows (fewer than ``W``
    rows are not yielded in that epoch); ``"pad"`` brings every rank to
    ``ceil(n / W)`` by repeating its own first row.
    """
    chunks, n, world, rank = _epoch_chunks(config, epoch, counted), config.n_epoch, config.world_size, config.rank
    counts = counted.counts(chunks)
    lo, hi = rank * n // world, (rank + 1) * n // world
    if config.equalize == "drop":
        return _pieces_of(chunks, counts, lo, lo + n // world, counted)
    mine = _pieces_of(chunks, counts, lo, hi, counted)
    pad = _pieces_of(mine, counted.counts(mine), 0, -(-n // world) - (hi - lo), counted)
    return np.concatenate([mine, pad])


def runs_of_rows(config: PlanConfig, rows: np.ndarray) -> np.ndarray:
    """Sorted distinct global ``rows`` as (file, start, stop) runs of consecutive rows."""
    if rows.size == 0:
        return np.empty((0, 3), dtype=np.int64)
    offsets = config.file_offsets
    files = np.searchsorted(offsets, rows, side="right") - 1
    breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(files) != 0)) + 1
    first, last = np.concatenate([[0], breaks]), np.concatenate([breaks, [rows.size]]) - 1
    f = files[first]
    return np.stack([f, rows[first] - offsets[f], rows[last] + 1 - offsets[f]], axis=1).astype(np.int64)


def _sequence_loads(config: PlanConfig, sequence: np.ndarray) -> tuple[Load, ...]:
    """Loads of a rank's share of a sampled sequence: its indices ``load_rows`` at a time."""
    loads = []
    for i, lo in enumerate(range(0, sequence.size, config.load_rows)):
        part = sequence[lo : lo + config.load_rows]
        distinct = np.unique(part)
        loads.append(Load(i, runs_of_rows(config, distinct), lo, part.size, np.searchsorted(distinct, part)))
    return tuple(loads)


def plan_epoch(
    config: PlanConfig, epoch: int, cells: np.ndarray | None = None, sequence: np.ndarray | None = None
) -> EpochPlan:
    """The loads and batch count of one epoch on this rank.

    Parameters
    ----------
    config
        Sizes, seed, rank; ``config.n_selected`` must be ``len(cells)`` or
        ``len(sequence)`` when one is given.
    epoch
        The epoch: with the seed, all the randomness.
    cells
        A subset: sorted distinct global rows (chunked access over them).
    sequence
        This epoch's sampled global rows, in order, repeats allowed (no
        further shuffling: the sampler's order is the yield order).
    """
    if cells is not None and sequence is not None:
        raise ValueError("give cells or a sequence, not both")
    selected = cells if cells is not None else sequence
    if (selected is None) != (config.n_selected is None) or (selected is not None and selected.size != config.n_selected):
        raise ValueError(f"config.n_selected={config.n_selected} does not match the selection given")
    _check_world(config)
    n_batches = config.n_batches
    n_rows = n_batches * config.batch_size if config.drop_last else config.rank_rows
    if sequence is not None:
        n, world, rank = config.n_epoch, config.world_size, config.rank
        lo, hi = rank * n // world, (rank + 1) * n // world
        mine = sequence[lo:hi]
        if config.equalize == "pad" and mine.size < -(-n // world):
            mine = np.concatenate([mine, mine[:1]])
        loads = _sequence_loads(config, mine[:n_rows])
        return EpochPlan(config, epoch, loads, n_rows, n_batches, sequence=True)
    counted = _Counted(config, cells)
    mine = _rank_pieces(config, epoch, counted)
    los = np.arange(0, n_rows, config.load_rows, dtype=np.int64)
    his = np.minimum(los + config.load_rows, n_rows)
    runs = _cut(mine, counted.counts(mine), los, his, counted)
    loads = tuple(Load(i, r, lo, hi - lo) for i, (r, lo, hi) in enumerate(zip(runs, los.tolist(), his.tolist())))
    return EpochPlan(config, epoch, loads, n_rows, n_batches, cells)


def batch_rows(plan: EpochPlan, batch: int) -> tuple[int, int, int]:
    """Where batch ``batch`` lies: (window index, first row, stop row) within that window.

    With ``window=1`` (the default for shuffled stores) a window is a load.
    """
    if not 0 <= batch < plan.n_batches:
        raise IndexError(f"batch {batch} out of range for an epoch of {plan.n_batches} batches")
    window_rows = plan.config.load_rows * plan.window
    lo = batch * plan.config.batch_size
    window = lo // window_rows
    lo -= window * window_rows
    n = sum(plan.loads[i].n_rows for i in plan.window_loads(window))
    return window, lo, min(lo + plan.config.batch_size, n)
