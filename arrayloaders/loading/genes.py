"""Genes chosen at load time: which columns of X a dataset yields, in which order.

The worker side of ``var_names=`` (DESIGN.md, step 4, filling a slot): CSR
rows are decoded whole (they are stored whole), a load's rows back to back
in a scratch buffer; then :func:`pick_genes` keeps the entries of the
chosen genes, renumbered, writing rows in yield order straight into the
slot (one compiled pass over the load, :mod:`arrayloaders.loading.kernels`); the
main process still only slices. :func:`densify` writes the rows as dense
arrays instead (``ZarrDenseDataset``), also in the worker. :func:`choose_genes`
turns what the user gave into a :class:`GeneSubset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # workers import this module and need no pandas
    import pandas as pd

__all__ = ["GeneSubset", "choose_genes", "densify", "pick_genes"]


@dataclass(frozen=True, eq=False)
class GeneSubset:
    """Columns of X to yield: ``columns[j]`` is the store column that output column ``j`` holds.

    ``position`` maps every store column to its output column (-1 if not
    yielded). ``ordered``: the columns increase, so a row's kept entries
    are already in order.
    """

    columns: np.ndarray  # int64, distinct
    position: np.ndarray  # int32, one per store column
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
        if values.dtype.kind in "iuf":
            raise ValueError(
                f"{where}: var_names holds {values.dtype} numbers ({values.ravel()[:3].tolist()} ...), not gene "
                "names: give names, or a boolean mask over var (np.asarray(mask, dtype=bool))"
            )
        names = pd.Index([str(v) for v in values.ravel()])
        if not var_names.is_unique:
            dup = var_names[var_names.duplicated()][:5].tolist()
            raise ValueError(f"{where}: var_names are not unique ({dup} ...), so genes cannot be chosen by name")
        if names.has_duplicates:
            raise ValueError(f"{where}: var_names lists genes twice: {names[names.duplicated()][:5].tolist()}")
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
    return GeneSubset(columns.astype(np.int64), position, ordered)


def pick_genes(
    bounds: np.ndarray,
    data: np.ndarray,
    indices: np.ndarray,
    take: np.ndarray,
    genes: GeneSubset,
    indptr: np.ndarray,
    data_out: np.ndarray,
    indices_out: np.ndarray,
) -> int:
    """CSR rows of the entries of ``genes`` in the rows ``take`` picks; return the entries written.

    Read row ``r`` holds ``data``/``indices[bounds[r]:bounds[r + 1]]`` (a
    stored CSR row: columns increasing); output row ``p`` is read row
    ``take[p]`` (read rows may be skipped or repeated) and goes to
    ``indptr[p]:indptr[p + 1]`` of ``data_out``/``indices_out`` (room for
    all of the picked rows' entries), its columns renumbered and increasing.

    Raises
    ------
    IndexError
        A column index is past the genes (a damaged store).
    """
    from .kernels import pick_rows  # numba: imported where genes are chosen only

    n = pick_rows(bounds, data, indices, take, genes.position, genes.n_vars, genes.ordered, indptr, data_out, indices_out)
    if n < 0:
        raise IndexError(f"a column index is past the {genes.position.size} genes")
    return int(n)


def densify(
    bounds: np.ndarray, data: np.ndarray, indices: np.ndarray, take: np.ndarray, out: np.ndarray, genes: GeneSubset | None
) -> None:
    """The rows ``take`` picks (as for :func:`pick_genes`) as dense rows of ``out``: all genes or those of ``genes``.

    Raises
    ------
    IndexError
        A column index is past the genes (a damaged store).
    """
    from .kernels import densify_rows

    position = np.arange(out.shape[1], dtype=np.int32) if genes is None else genes.position
    if densify_rows(bounds, data, indices, take, position, out) < 0:
        raise IndexError(f"a column index is past the {position.size} genes")
