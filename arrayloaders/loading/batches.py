"""Batches: rows of decoded loads turned into torch tensors, with their obs and index.

The last step of the data path (DESIGN.md, step 5). Usually (stores shuffled
at conversion) a batch is one contiguous slice ``[lo, hi)`` of a load's
rows (``plan.batch_rows``), so sparse X is built from views of the load
without copying: each view is *lent* (``ring.Segment.lend``) so that the
slot it lives in is not refilled while the batch is alive. When batches mix
a window of several loads (unshuffled stores), their rows are gathered from
the window's loads into memory the batch owns. obs columns are held in
memory (a few bytes per cell) and gathered by global row index.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .load import LoadedRows

__all__ = ["Batch", "BatchMaker", "Categories", "MixedWindow", "ObsColumns", "keep"]

Batch = tuple[torch.Tensor, Any] | tuple[torch.Tensor, Any, torch.Tensor]
Lend = Callable[[np.ndarray], np.ndarray]


def keep(view: np.ndarray) -> np.ndarray:
    """The lending of arrays a batch owns outright (loads read in the main process): nothing to count."""
    return view


class Categories(list):
    """The labels behind the codes of one obs column, in code order: a ``list``, plus whether they are ordered.

    It compares, indexes and converts (``len``, ``np.array``) as the list of
    labels does; ``ordered`` says whether the labels have an order (the
    column is an ordered categorical), and :attr:`dtype` gives the pandas
    dtype that turns codes back into the column
    (``pd.Categorical.from_codes(codes, dtype=ds.categories[key].dtype)``).
    """

    def __init__(self, labels=(), ordered: bool = False):
        super().__init__(labels)
        self.ordered = bool(ordered)

    @property
    def dtype(self) -> pd.CategoricalDtype:
        return pd.CategoricalDtype(list(self), ordered=self.ordered)


class ObsColumns:
    """The requested obs columns of all added AnnData objects, concatenated.

    - Categoricals and strings become codes over the union of categories
      (first-seen order), so one label has one code across files; a
      missing label is code ``-1``. They are held in the smallest int dtype
      that fits (1 byte per cell for up to 127 labels) and yielded as int64.
      Their :class:`Categories` are ordered iff every added part of the
      column is an ordered categorical with the same categories in the same
      order.
    - Columns in ``as_codes`` become codes whatever their dtype: numbers
      (a batch or donor id stored as an int) get their distinct values,
      sorted, as categories.
    - Other numbers keep their dtype (bool, ints, floats).
    - Nullable numbers (pandas ``Int64``, ``boolean``, ``Float64``... : the
      converter writes a column so when it has missing values) become
      float64 with NaN for the missing values; integers beyond 2**53, which
      float64 cannot hold exactly, are refused.
    """

    def __init__(self, keys: list[str], as_codes: tuple[str, ...] = ()):
        self.keys, self.as_codes = keys, as_codes
        self.categories: dict[str, Categories] = {}
        self._parts: dict[str, list[pd.Series]] = {k: [] for k in keys}
        self.values: dict[str, np.ndarray] = {}

    def copy(self) -> ObsColumns:
        """A copy that can be added to without changing this one (the arrays are shared until then)."""
        new = ObsColumns(self.keys, self.as_codes)
        new.categories, new.values = dict(self.categories), dict(self.values)
        new._parts = {k: list(v) for k, v in self._parts.items()}
        return new

    def check(self, obs: pd.DataFrame, where: str) -> None:
        missing = [k for k in self.keys if k not in obs.columns]
        if missing:
            raise ValueError(f"{where}: obs has no column(s) {missing}; available: {list(obs.columns)}")

    def add(self, frames: list[pd.DataFrame]) -> None:
        for k in self.keys:
            self._parts[k] += [obs[k] for obs in frames]
        self._build()

    def _build(self) -> None:
        for k, parts in self._parts.items():
            text = any(isinstance(p.dtype, pd.CategoricalDtype) or p.dtype.kind not in "biuf" for p in parts)
            if text or k in self.as_codes:
                cats = pd.Index(pd.unique(np.concatenate([_categories(p) for p in parts])))
                if not text:  # numbers: in increasing order, so batch 3 has a lower code than batch 10
                    cats = cats.sort_values()
                self.categories[k] = Categories(cats, ordered=_all_ordered_alike(parts))
                dtype = next(t for t in (np.int8, np.int16, np.int32, np.int64) if len(cats) <= np.iinfo(t).max)
                self.values[k] = np.concatenate([_codes(p, cats, dtype) for p in parts])
            elif any(isinstance(p.dtype, pd.api.extensions.ExtensionDtype) for p in parts):
                self.values[k] = np.concatenate([_nullable_as_float(p, k) for p in parts])
            else:
                self.values[k] = np.concatenate([p.to_numpy() for p in parts])

    def gather(self, rows: np.ndarray, single: bool):
        out = {k: torch.from_numpy(self._yielded(k, self.values[k][rows])) for k in self.keys}
        return out[self.keys[0]] if single else out

    def _yielded(self, key: str, values: np.ndarray) -> np.ndarray:
        return values.astype(np.int64) if key in self.categories else values  # codes as torch's losses take them


def _all_ordered_alike(parts: list[pd.Series]) -> bool:
    """Whether every part is an ordered categorical with the same categories in the same order."""
    dtypes = [p.dtype for p in parts]
    if not dtypes or not all(isinstance(d, pd.CategoricalDtype) and d.ordered for d in dtypes):
        return False
    return all(d.categories.equals(dtypes[0].categories) for d in dtypes[1:])


def _nullable_as_float(s: pd.Series, key: str) -> np.ndarray:
    """A (maybe nullable) numeric column as float64, missing values NaN; integers must fit float64 exactly."""
    if s.dtype.kind in "iu":
        present = s.dropna()
        if len(present) and max(abs(int(present.min())), abs(int(present.max()))) > 2**53:
            raise ValueError(
                f"obs column {key!r} holds integers beyond 2**53 and missing values: they cannot be yielded exactly "
                "(as float64 with NaN); fill the missing values or convert the column to strings"
            )
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _codes(s: pd.Series, categories: pd.Index, dtype) -> np.ndarray:
    """Codes of ``s``'s values in ``categories`` (-1 where missing), via its own categories: no object array per cell."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes, labels = s.cat.codes.to_numpy(), s.cat.categories.to_numpy(dtype=object)
    else:
        codes, labels = pd.factorize(s, use_na_sentinel=True)
        labels = np.asarray(labels, dtype=object)
    remap = categories.get_indexer(labels).astype(dtype)
    return np.where(codes >= 0, remap[codes] if remap.size else -1, -1).astype(dtype, copy=False)


def _categories(s: pd.Series) -> np.ndarray:
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.categories.to_numpy(dtype=object)
    return pd.unique(s.dropna().astype(object))


class MixedWindow:
    """The decoded loads of one window, and the order that mixes their rows (``plan.window_order``)."""

    def __init__(self, loads: list[LoadedRows], order: np.ndarray):
        self.loads, self.order = loads, order
        self.starts = np.cumsum([0] + [int(loaded.load.n_rows) for loaded in loads])
        self.indptrs = [loaded.indptr.tolist() if loaded.indptr is not None else None for loaded in loads]

    def locate(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """For window rows ``order[lo:hi]``: which load each comes from, and its row there."""
        pos = self.order[lo:hi]
        which = np.searchsorted(self.starts, pos, side="right") - 1
        return which, pos - self.starts[which]


@dataclass(frozen=True)
class BatchMaker:
    """Builds the batches of one dataset: ``(X, obs)`` or ``(X, obs, index)``.

    Parameters
    ----------
    n_vars
        Width of X. Loads arrive dense (dense stores, or densified by the
        workers for ``ZarrDenseDataset``) or CSR (``torch.sparse_csr`` X).
    obs
        The obs columns to gather, or ``None``.
    single_key
        ``obs`` is one tensor (one key was asked for by name), not a dict.
    return_index
        Add the int64 global row indices.
    pin_memory
        Copy every tensor of the batch into page-locked memory.
    obsm_keys
        obsm arrays whose rows arrive with the loads (``LoadedRows.obsm``),
        yielded in the obs dict.
    """

    n_vars: int
    obs: ObsColumns | None
    single_key: bool
    return_index: bool
    pin_memory: bool
    obsm_keys: tuple[str, ...] = ()

    def __call__(self, loaded: LoadedRows, lo: int, hi: int, lend: Lend) -> Batch:
        """The batch of rows ``[lo, hi)`` of ``loaded``; ``lend`` counts the views of it that X and obsm keep."""
        X = self._x(loaded, lo, hi, lend)
        rows = loaded.rows[lo:hi]
        obs = self._obs(rows, {key: lend(loaded.obsm[key][lo:hi]) for key in self.obsm_keys})
        batch = (X, obs, torch.from_numpy(rows.copy())) if self.return_index else (X, obs)
        return pinned(batch) if self.pin_memory else batch

    def _obs(self, rows: np.ndarray, obsm: dict[str, np.ndarray]):
        """The obs part of a batch: ``None``, one tensor (one key by name, no obsm) or a dict of tensors."""
        keys = self.obs.keys if self.obs is not None else []
        if not keys and not obsm:
            return None
        if self.single_key and not obsm:
            return self.obs.gather(rows, single=True)
        out = self.obs.gather(rows, single=False) if keys else {}
        for key, values in obsm.items():
            out[key] = torch.from_numpy(values if values.dtype.kind == "f" else values.astype(np.float32))
        return out

    def mixed(self, window: MixedWindow, lo: int, hi: int) -> Batch:
        """The batch of window rows ``order[lo:hi]``, gathered from the window's loads (a copy)."""
        which, row = window.locate(lo, hi)
        n = hi - lo
        rows = np.empty(n, dtype=np.int64)
        picks = []  # per load: (batch positions, rows in the load)
        for k, loaded in enumerate(window.loads):
            at = np.flatnonzero(which == k)
            picks.append((at, row[at]))
            rows[at] = loaded.rows[row[at]]
        first = window.loads[0]
        if first.dense is not None:
            dense = np.empty((n, first.dense.shape[1]), first.dense.dtype)
            for (at, r), loaded in zip(picks, window.loads):
                dense[at] = loaded.dense[r]
            X = torch.from_numpy(dense)
        else:
            X = self._gathered_csr(window, picks, n)
        obsm = {}
        for key in self.obsm_keys:
            obsm[key] = np.empty((n, first.obsm[key].shape[1]), first.obsm[key].dtype)
            for (at, r), loaded in zip(picks, window.loads):
                obsm[key][at] = loaded.obsm[key][r]
        obs = self._obs(rows, obsm)
        batch = (X, obs, torch.from_numpy(rows)) if self.return_index else (X, obs)
        return pinned(batch) if self.pin_memory else batch

    def _gathered_csr(self, window: MixedWindow, picks: list, n: int) -> torch.Tensor:
        lengths = np.empty(n, dtype=np.int64)
        for (at, r), loaded in zip(picks, window.loads):
            lengths[at] = loaded.indptr[r + 1] - loaded.indptr[r]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        first = window.loads[0]
        data = np.empty(int(indptr[-1]), first.data.dtype)
        indices = np.empty(int(indptr[-1]), first.indices.dtype)
        out = indptr.tolist()
        for (at, r), loaded, src in zip(picks, window.loads, window.indptrs):
            # One slice copy per row: rows are kilobytes (see load.read_load).
            for p, q in zip(at.tolist(), r.tolist()):
                a, b, o = src[q], src[q + 1], out[p]
                data[o : o + b - a] = loaded.data[a:b]
                indices[o : o + b - a] = loaded.indices[a:b]
        gathered = LoadedRows(first.load, indptr=indptr, data=data, indices=indices)
        return self._x(gathered, 0, n, keep)

    def _x(self, loaded: LoadedRows, lo: int, hi: int, lend: Lend) -> torch.Tensor:
        if loaded.dense is not None:
            return torch.from_numpy(lend(loaded.dense[lo:hi]))
        a, b = int(loaded.indptr[lo]), int(loaded.indptr[hi])
        index_dtype = np.int32 if b - a < 2**31 else np.int64
        crow = torch.from_numpy((loaded.indptr[lo : hi + 1] - a).astype(index_dtype))
        cols = torch.from_numpy(lend(loaded.indices[a:b]))
        if index_dtype is np.int64:
            cols = cols.long()
        values = torch.from_numpy(lend(loaded.data[a:b]))
        with warnings.catch_warnings():
            # torch warns that sparse CSR support is "beta" the first time one is built.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return torch.sparse_csr_tensor(crow, cols, values, size=(hi - lo, self.n_vars), check_invariants=False)


def pinned(value):
    """Every tensor of a batch (X, obs tensors or dicts of them, index) in page-locked memory, as torch's DataLoader pins.

    ``pin_memory()`` returns a tensor that is pinned already as it is: views
    of a ring slot page-locked for CUDA (``pinned_slots.py``) are not copied.
    A sparse X is pinned part by part, so that its values and column indices
    stay such views while its row pointers (made per batch) are copied.
    """
    if isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr:
        parts = value.crow_indices(), value.col_indices(), value.values()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return torch.sparse_csr_tensor(*(p.pin_memory() for p in parts), size=value.shape, check_invariants=False)
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: pinned(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(pinned(v) for v in value)
    return value
