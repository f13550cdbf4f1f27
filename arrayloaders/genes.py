"""Genes chosen at load time: which columns of X a dataset yields, in which order.

The worker side of ``var_names=`` (DESIGN.md, step 4, filling a slot): CSR
rows are decoded whole (they are stored whole), then :func:`keep_genes`
drops the entries of other genes and renumbers the rest in one vectorised
pass: per decoded run of rows for chunked access, before anything is copied
into the slot; per load for a sampler's gathered rows. The main process
still only slices. :func:`densify` writes rows as dense arrays
(``ZarrDenseDataset``), also in the worker. Both are pure functions of
arrays; :func:`choose_genes` turns what the user gave into a
:class:`GeneSubset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # workers import this module and need no pandas
    import pandas as pd

__all__ = ["GeneSubset", "choose_genes", "densify", "keep_genes"]


@dataclass(frozen=True, eq=False)
class GeneSubset:
    """Columns of X to yield: ``columns[j]`` is the store column that output column ``j`` holds.

    ``position`` maps every store column to its output column (-1 if not
    yielded); ``wanted`` says whether it is yielded (one byte per column,
    the cheapest table to look every entry of a load up in). ``ordered``:
    the columns increase, so a row's kept entries are already in order.
    """

    columns: np.ndarray  # int64, distinct
    position: np.ndarray  # int32, one per store column
    wanted: np.ndarray  # bool, one per store column
    ordered: bool

    @property
    def n_vars(self) -> int:
        return int(self.columns.size)


def choose_genes(var_names: pd.Index, chosen: Sequence[str] | np.ndarray | pd.Index, where: str) -> GeneSubset:
    """The :class:`GeneSubset` of ``chosen``: gene names (in the order to yield them) or a boolean mask over var.

    Raises
    ------
    ValueError
        Unknown or repeated names, a mask of the wrong length, an empty
        choice, or ``var_names`` that are not unique; the message names
        ``where`` (the store or AnnData) and the first few offenders.
    """
    import pandas as pd

    values = np.asarray(chosen)
    if values.dtype == bool:
        if values.shape != (len(var_names),):
            raise ValueError(f"{where}: var_names mask has {values.size} entries, but var has {len(var_names)} genes")
        columns = np.flatnonzero(values)
    else:
        names = pd.Index([str(v) for v in values.ravel()])
        if not var_names.is_unique:
            dup = var_names[var_names.duplicated()][:5].tolist()
            raise ValueError(f"{where}: var_names are not unique ({dup} ...), so genes cannot be chosen by name")
        if names.has_duplicates:
            raise ValueError(f"var_names lists genes twice: {names[names.duplicated()][:5].tolist()}")
        columns = var_names.get_indexer(names)
        if (columns < 0).any():
            unknown = names[columns < 0]
            raise ValueError(
                f"{where}: {len(unknown)} of the {len(names)} genes in var_names are not in var, e.g. "
                f"{unknown[:5].tolist()}"
            )
    if columns.size == 0:
        raise ValueError(f"{where}: var_names chooses no gene")
    position = np.full(len(var_names), -1, dtype=np.int32)
    position[columns] = np.arange(columns.size, dtype=np.int32)
    ordered = bool((np.diff(columns) > 0).all())
    return GeneSubset(columns.astype(np.int64), position, position >= 0, ordered)


def keep_genes(indptr: np.ndarray, data: np.ndarray, indices: np.ndarray, genes: GeneSubset) -> int:
    """Keep, in place, only the entries of ``genes`` in CSR rows, renumbered; return the entries left.

    ``indptr`` (n_rows + 1) is rewritten; ``data[:nnz]``/``indices[:nnz]``
    hold the kept entries, each row's in increasing output column.
    ``indices`` may be the stored uint16 (output columns are fewer than the
    store's, so they fit).
    """
    nnz = int(indptr[-1])
    # One byte-table lookup per entry, then work on the kept entries only (a few % for an HVG list).
    # (np.take: 2-3x faster than fancy indexing for these gathers.)
    kept = np.flatnonzero(np.take(genes.wanted, indices[:nnz]))
    indptr[:] = np.searchsorted(kept, indptr)  # kept entries before each row's first
    n = kept.size
    values, columns = np.take(data, kept), np.take(genes.position, np.take(indices, kept))
    if not genes.ordered and n:
        # Output order differs from store order: sort each row's entries by output column
        # (rows are already in order: numpy's stable sort finds those runs).
        rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
        key = rows * genes.n_vars + columns
        if (indptr.size - 1) * genes.n_vars <= 2**16:
            key = key.astype(np.uint16)  # numpy sorts 16-bit keys by radix: 4x faster (a 32-cell run)
        order = np.argsort(key, kind="stable")
        values, columns = values[order], columns[order]
    data[:n] = values
    indices[:n] = columns
    return n


def densify(indptr: np.ndarray, data: np.ndarray, indices: np.ndarray, out: np.ndarray) -> None:
    """Write CSR rows (``indptr`` over ``data``/``indices``, column numbers of ``out``) into the 2-d ``out``."""
    out[...] = 0
    n_rows = indptr.size - 1
    nnz = int(indptr[-1])
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    out.reshape(-1)[rows * out.shape[1] + indices[:nnz]] = data[:nnz]
