"""Choosing cells: a dataset's ``cells=`` subset or ``sampler=``, checked; subsets, splits and class balance.

The pure checks of what a user selects (:func:`checked_cells`, the sampler's
output each epoch) and :class:`SelectionMixin`, the dataset methods that
select: a derived dataset (``subset``, ``split``) narrows its parent's
selection and shares its sources and workers.
"""

from __future__ import annotations

import hashlib
import operator
import threading
from collections.abc import Iterable, Sequence
from typing import Self

import numpy as np
import torch

from .class_runs import ClassRunSampler

__all__ = ["SelectionMixin", "check_sampler", "checked_cells"]

_GLOBAL_GENERATOR = threading.Lock()  # held while a sampler runs on torch's global generator (``_sample``)


def checked_cells(cells: np.ndarray, n_obs: int, within: np.ndarray | None = None) -> np.ndarray:
    """``cells`` (a boolean mask over all cells, or row indices) as sorted distinct int64 rows; or a clear error.

    ``within``: the sorted rows of the dataset a subset is made from; ``cells`` must lie among them.
    """
    if cells.dtype == bool:
        if cells.ndim != 1 or cells.size != n_obs:
            raise ValueError(f"cells is a boolean mask of shape {cells.shape}; the dataset has {n_obs} cells")
        rows = np.flatnonzero(cells).astype(np.int64)
    elif cells.ndim != 1 or (cells.size and not np.issubdtype(cells.dtype, np.integer)):
        raise ValueError(f"cells must be a boolean mask or a 1-d array of row indices, got {cells.dtype} of shape {cells.shape}")
    else:
        big = _beyond_int64(cells)
        if big is not None:
            raise IndexError(f"cells holds row {big}, outside the dataset's {n_obs} cells")
        rows = np.sort(cells.astype(np.int64))
    if rows.size == 0:
        raise ValueError("cells selects no cells")
    if rows[0] < 0 or rows[-1] >= n_obs:
        bad = rows[0] if rows[0] < 0 else rows[-1]
        raise IndexError(f"cells holds row {bad}, outside the dataset's {n_obs} cells")
    if (np.diff(rows) == 0).any():
        raise ValueError("cells repeats rows; to yield rows more than once per epoch, use sampler=")
    outside = _outside(rows, within)
    if outside is not None:
        raise ValueError(
            f"cells holds row {outside}, outside the selection of the dataset it is a subset of "
            f"({within.size} cells): a subset narrows its parent's selection"
        )
    return rows


def _beyond_int64(rows: np.ndarray) -> int | None:
    """The first unsigned index int64 cannot hold (cast, it would wrap to a negative row), if any."""
    if rows.size and rows.dtype.kind == "u" and rows.dtype.itemsize == 8:
        big = rows[rows > np.iinfo(np.int64).max]
        if big.size:
            return int(big[0])
    return None


def _outside(rows: np.ndarray, within: np.ndarray | None) -> int | None:
    """The first of ``rows`` not among the sorted ``within`` (``None``: all are, or no constraint)."""
    if within is None or rows.size == 0:
        return None
    at = np.minimum(np.searchsorted(within, rows), within.size - 1)
    bad = within[at] != rows
    return int(rows[bad][0]) if bad.any() else None


def draws_by_epoch(sampler) -> bool:
    """Whether ``sampler``'s sequence for an epoch is known before its loop asks for it (and the same then).

    Fixed sequences are; so are samplers drawing from torch's global generator (torch's own with
    ``generator=None``, :class:`~arrayloaders.loading.class_runs.ClassRunSampler`), which the dataset seeds
    from ``(seed, epoch)``. A sampler with a generator of its own (or unknown state) draws differently for
    each call: the next epoch's loads are then not decoded ahead, so that it is called when it always was.
    """
    from .class_runs import ClassRunSampler

    if isinstance(sampler, (np.ndarray, torch.Tensor, list, tuple, range, ClassRunSampler)):
        return True
    return hasattr(sampler, "generator") and sampler.generator is None


def _sampled_rows(sampler, epoch: int, n_obs: int) -> np.ndarray:
    """One epoch of ``sampler``'s indices as int64 rows; anything that is not a row index is refused.

    A float would be truncated, a boolean mask read as the rows 0 and 1, a
    2-d array flattened: each is a different selection than meant.
    """
    def refuse(what: str) -> ValueError:
        return ValueError(
            f"the sampler yielded {what} in epoch {epoch}; a sampler yields row indices (ints), as "
            "return_index numbers them (for a boolean mask or a fixed subset, use cells=)"
        )

    if isinstance(sampler, torch.Tensor):
        sampler = sampler.detach().cpu().numpy()
    listed = not isinstance(sampler, np.ndarray)
    items = list(sampler) if listed else sampler
    values = np.asarray(items) if len(items) else np.zeros(0, np.int64)
    if listed and values.dtype.kind not in "biu":  # floats, mixed objects, ints beyond 64 bits: find the culprit
        for i in items:
            if isinstance(i, bool | np.bool_) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
                raise refuse(f"the boolean {i!r}")
            try:
                i = operator.index(i)
            except TypeError:
                raise refuse(f"{i!r} ({type(i).__name__})") from None
            if not -(2**63) <= i < 2**63:
                raise IndexError(f"the sampler yielded index {i} in epoch {epoch}, outside the dataset's {n_obs} cells")
    if values.dtype == bool:
        raise refuse(f"a boolean mask ({values.size} entries)")
    if values.ndim != 1:
        raise refuse(f"a {values.ndim}-d array of shape {values.shape}")
    if values.size and values.dtype.kind not in "iu":
        raise refuse(f"{values.dtype} values such as {values.ravel()[0].item()!r}")
    big = _beyond_int64(values)
    if big is not None:
        raise IndexError(f"the sampler yielded index {big} in epoch {epoch}, outside the dataset's {n_obs} cells")
    return values.astype(np.int64, copy=False)


def check_sampler(sampler) -> None:
    """Refuse, at construction, what cannot be a sampler (its output is checked each epoch)."""
    if sampler is None:
        return
    if not hasattr(sampler, "__len__"):
        raise ValueError(f"sampler must have a length (len(sampler) rows per epoch); {type(sampler).__name__} has none")
    if iter(sampler) is sampler:
        raise ValueError("sampler must be re-iterable (a Sampler, list or array), not an iterator: every epoch iterates it anew")
    shape = getattr(sampler, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"sampler is an array of shape {tuple(shape)}; a sampler of row indices is 1-d")


def _split_sizes(fractions: float | Sequence[float], n: int) -> list[int]:
    """Cells per part of ``split(fractions)`` over ``n`` cells; every part must get at least one."""
    if isinstance(fractions, int | float | np.number) and not isinstance(fractions, bool):
        if not 0 < fractions < 1:
            raise ValueError(f"split({fractions!r}): the fraction must be between 0 and 1")
        k = int(round(fractions * n))
        sizes, shown = [k, n - k], [fractions, 1 - fractions]
    else:
        shown = list(fractions)
        if len(shown) < 2 or not all(isinstance(f, int | float | np.number) and 0 < f < 1 for f in shown):
            raise ValueError(f"split({fractions!r}): give a fraction, or a list of two or more fractions, each in (0, 1)")
        if not np.isclose(sum(shown), 1.0):
            raise ValueError(f"split({fractions!r}): the fractions sum to {sum(shown):g}, not 1")
        sizes = [int(np.floor(f * n)) for f in shown]
        for i in range(n - sum(sizes)):  # as torch.utils.data.random_split: the rest one by one, from the first
            sizes[i % len(sizes)] += 1
    empty = [i for i, k in enumerate(sizes) if k == 0]
    if empty:
        raise ValueError(
            f"split({fractions!r}): part {empty[0]} (fraction {shown[empty[0]]:g}) gets no cell of the {n} "
            "being split; use a larger fraction"
        )
    return sizes


class SelectionMixin:
    """The selection methods of a dataset (``ZarrSparseDataset``/``ZarrDenseDataset``)."""

    @property
    def cells(self) -> np.ndarray | None:
        """The subset this dataset yields (sorted row indices, as ``return_index`` numbers them), or ``None`` for all."""
        return self._cells()

    @property
    def n_cells(self) -> int:
        """Rows an epoch draws from: the subset's size, the sampler's length, or every cell."""
        return self._plan_config().n_epoch

    def _cells(self) -> np.ndarray | None:
        if self._cells_given is None:
            return None
        if self._cells_checked is None:
            self._cells_checked = checked_cells(self._cells_given, self.n_obs, self._within)
        return self._cells_checked

    def _selection_id(self) -> str | None:
        """What the batch sequence depends on in the selection, for state_dict and the ranks' check."""
        if self.sampler is not None:
            return f"sampler {type(self.sampler).__name__} of length {len(self.sampler)}"
        cells = self._cells()
        return None if cells is None else "cells sha1 " + hashlib.sha1(cells.tobytes()).hexdigest()

    def _sample(self, epoch: int) -> np.ndarray:
        """The sampler's indices for ``epoch``, checked.

        The sampler runs with torch's global generator seeded from ``(seed,
        epoch)`` (and restored after), so samplers that draw from it (torch's
        own, with ``generator=None``) give the same sequence for the same
        epoch on every rank and after a resume. ``set_epoch`` is called on
        samplers that have it.
        """
        sampler, n_obs = self.sampler, self.n_obs
        # One sampler run at a time in this process: the global generator is one for all threads, and two loops
        # seeding and drawing from it at once (two threads) would each get a mix of both sequences.
        with _GLOBAL_GENERATOR:
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.default_rng([self.seed, epoch, 2]).integers(2**63)))
                sequence = _sampled_rows(sampler, epoch, n_obs)
        if sequence.size != len(sampler):
            raise ValueError(f"the sampler yielded {sequence.size} indices in epoch {epoch}, but len(sampler) is {len(sampler)}")
        bad = (sequence < 0) | (sequence >= n_obs)
        if bad.any():
            raise IndexError(
                f"the sampler yielded index {int(sequence[bad][0])} in epoch {epoch}, outside the dataset's "
                f"{n_obs} cells (rows are numbered as return_index numbers them)"
            )
        outside = _outside(np.unique(sequence), self._within)
        if outside is not None:
            raise ValueError(
                f"the sampler yielded index {outside} in epoch {epoch}, outside the selection of the dataset "
                f"this one is a subset of ({self._within.size} cells): a subset narrows its parent's selection"
            )
        return sequence

    def subset(self, cells=None, sampler: Iterable[int] | None = None) -> Self:
        """A dataset over the same sources and settings that narrows this one's selection.

        ``cells`` (a boolean mask or row indices, numbered as ``return_index``
        numbers them) must lie within this dataset's cells (its ``cells=``
        subset, or every cell); a ``sampler`` must draw only from them
        (checked each epoch). Without either, the subset has this one's
        selection. A dataset with a sampler cannot be narrowed further.

        Nothing is read again: the new dataset shares the sources, the obs
        columns in memory and the worker processes (one of them iterating at
        a time uses them; :meth:`close` on either stops them for both).
        """
        if cells is not None and sampler is not None:
            raise ValueError("give cells= (chunked access over a subset) or sampler= (your own order), not both")
        check_sampler(sampler)
        if self.sampler is not None:
            raise ValueError(
                "subset() narrows a selection of cells; this dataset draws with a sampler, which selects no fixed "
                "cells: make subsets (or split) first, then give the sampler to the last one"
            )
        parent = self._cells()
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)  # the runtime too: one set of workers for both
        new._within = parent
        new._cells_given = np.asarray(cells) if cells is not None else parent if sampler is None else None
        new._cells_checked = None
        new.sampler = sampler
        new._obs = self._obs.copy() if self._obs is not None else None
        new._epoch, new._start, new._start_shape, new._start_elastic = 0, 0, None, ()
        new._cells()  # refuse bad cells now
        return new

    def split(self, fractions: float | Sequence[float], seed: int = 0) -> tuple[Self, ...]:
        """Split the cells (of the subset, if any) at random into disjoint datasets.

        ``train, val = ds.split(0.9)``: ``round(0.9 * n)`` cells go to the
        first, the rest to the second. ``train, val, test = ds.split([0.8,
        0.1, 0.1])``: as ``torch.utils.data.random_split`` with fractions
        (summing to 1): ``floor(f * n)`` cells each, the remainder one by one
        to the first parts. The same ``seed`` gives the same split. All share
        the sources, the obs columns and the workers (see :meth:`subset`).
        """
        if self.sampler is not None:
            raise ValueError("split() divides cells; this dataset has a sampler: split before choosing one")
        cells = self._cells()
        pool = np.arange(self.n_obs, dtype=np.int64) if cells is None else cells
        sizes = _split_sizes(fractions, pool.size)
        order = np.random.default_rng(seed).permutation(pool.size)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return tuple(self.subset(cells=np.sort(pool[order[lo:hi]])) for lo, hi in zip(bounds[:-1], bounds[1:]))

    def class_weights(self, key: str) -> torch.Tensor:
        """Per-cell weights that give every class of obs column ``key`` the same total, for ``WeightedRandomSampler``.

        A float64 tensor with one weight per cell of the dataset (numbered
        as ``return_index`` numbers them): ``1 / (cells of its class)`` for
        cells of this dataset's selection, 0 for cells outside it and for
        cells with a missing label, whatever the column's dtype (a
        categorical's missing code, NaN, ``pd.NA`` in a nullable ``Int64``).
        ``key`` must be one of the ``obs_keys``.

        Examples
        --------
        >>> weights = ds.class_weights("cell_type")
        >>> sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=ds.n_cells)
        >>> balanced = ds.subset(sampler=sampler)
        """
        labels = self._class_codes("class_weights", key)
        inside = labels >= 0
        counts = np.bincount(labels[inside], minlength=1)
        weights = np.zeros(labels.size, dtype=np.float64)
        weights[inside] = 1.0 / counts[labels[inside]]
        return torch.from_numpy(weights)

    def class_run_sampler(
        self, key: str, num_samples: int | None = None, class_weights: Sequence[float] | None = None
    ) -> ClassRunSampler:
        """Class-balanced sampling at chunked-access speed, for stores whose cells are grouped by class.

        Draws runs of ``chunk_size`` consecutive cells of one class (see
        :class:`~arrayloaders.loading.class_runs.ClassRunSampler`), so the workers
        read runs, not single cells. Use it with ``subset(sampler=...)``.
        Cells of this dataset's selection with a label are drawn; each class
        of obs column ``key`` (one of the ``obs_keys``; codes as in
        ``categories[key]``, or the sorted distinct values of a numeric
        column; NaN and ``pd.NA`` are no class) gets an equal share of the
        cells, or ``class_weights``'s; cells without a label are never drawn.
        On a store that is not grouped by class (converted with shuffling)
        runs are single cells: it warns, and ``class_weights()`` with
        ``WeightedRandomSampler`` is the way there.

        Examples
        --------
        >>> balanced = ds.subset(sampler=ds.class_run_sampler("cell_type"))
        """
        labels = self._class_codes("class_run_sampler", key)
        return ClassRunSampler(labels, self.chunk_size, num_samples, class_weights, window=self.preload_nchunks)

    def _class_codes(self, caller: str, key: str) -> np.ndarray:
        """One class code per cell of obs column ``key``; -1 for cells outside the selection or without a label."""
        if self._obs is None or key not in self._obs.keys:
            keys = [] if self._obs is None else self._obs.keys
            raise ValueError(f"{caller}({key!r}): {key!r} is not among the obs_keys given when adding data ({keys})")
        values = self._obs.values[key]
        if key in self._obs.categories:
            labels = values.astype(np.int64, copy=True)  # -1 where missing
        else:  # numeric: each distinct value is a class; NaN (a float's or a nullable column's missing value) is none
            labels = np.full(values.size, -1, dtype=np.int64)
            present = ~np.isnan(values) if values.dtype.kind == "f" else np.ones(values.size, dtype=bool)
            labels[present] = np.unique(values[present], return_inverse=True)[1]
        cells = self._cells() if self.sampler is None else self._within
        if cells is not None:
            inside = np.zeros(labels.size, dtype=bool)
            inside[cells] = True
            labels[~inside] = -1
        return labels
