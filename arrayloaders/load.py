"""Reading one load of the plan: its runs of rows, decoded and permuted into place.

The same function fills a worker's ring slot and, for ``num_workers=0``,
freshly allocated arrays in the main process. Each run is decoded once into
a small buffer and its rows are copied straight to their permuted positions,
so a load costs one decode and one copy of its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import EpochPlan, Load, load_permutation
from .rows import CsrRows, DenseRows

__all__ = ["LoadedRows", "load_nnz", "read_load"]

INDEX_DTYPE = np.dtype(np.int32)  # column indices as torch's sparse CSR tensors take them


@dataclass
class LoadedRows:
    """A load's rows in yield order: CSR parts (``indptr``, ``data``, ``indices``) or ``dense``."""

    load: Load
    indptr: np.ndarray | None = None  # int64, n_rows + 1
    data: np.ndarray | None = None
    indices: np.ndarray | None = None  # int32
    dense: np.ndarray | None = None
    rows: np.ndarray | None = None  # global row index of each row (set by the loop)


def _row_lengths(indptrs: list[np.ndarray], load: Load) -> np.ndarray:
    """Stored entries of each row of ``load``, in chunk order (``indptrs``: each file's)."""
    return np.concatenate([np.diff(indptrs[f][a : b + 1]) for f, a, b in load.chunks.tolist()])


def load_nnz(indptrs: list[np.ndarray], load: Load) -> int:
    """Stored entries of ``load`` (``indptrs``: each file's CSR indptr)."""
    return int(sum(indptrs[f][b] - indptrs[f][a] for f, a, b in load.chunks.tolist()))


def read_load(
    readers: list[CsrRows] | list[DenseRows],
    plan: EpochPlan,
    load: Load,
    out: LoadedRows | None = None,
) -> LoadedRows:
    """Decode ``load``'s rows, permuted as the plan says, into ``out`` (arrays with room) or new arrays.

    Returns the filled parts, sized exactly (views of ``out``'s arrays).
    """
    n = load.n_rows
    order = load_permutation(plan.config, plan.epoch, load.index, n)  # output position -> chunk-order row
    position = np.empty(n, dtype=np.int64)  # chunk-order row -> output position
    position[order] = np.arange(n)
    first_row = np.concatenate([[0], np.cumsum(load.chunks[:, 2] - load.chunks[:, 1])])
    if isinstance(readers[0], DenseRows):
        dense = out.dense[:n] if out is not None else np.empty((n, readers[0].source.n_vars), readers[0].source.dtype)
        for f in np.unique(load.chunks[:, 0]).tolist():
            mine = np.flatnonzero(load.chunks[:, 0] == f)
            for i, rows in zip(mine.tolist(), readers[f].runs(load.chunks[mine, 1:])):
                dense[position[first_row[i] : first_row[i + 1]]] = rows
        return LoadedRows(load, dense=dense)

    lengths = _row_lengths([r.indptr for r in readers], load)
    indptr = out.indptr[: n + 1] if out is not None else np.empty(n + 1, dtype=np.int64)
    indptr[0] = 0
    np.cumsum(lengths[order], out=indptr[1:])
    nnz = int(indptr[-1])
    if out is not None:
        data, indices = out.data[:nnz], out.indices[:nnz]
    else:
        data, indices = np.empty(nnz, readers[0].source.dtype), np.empty(nnz, INDEX_DTYPE)
    destination = indptr[position].tolist()  # where each chunk-order row's entries go
    for f in np.unique(load.chunks[:, 0]).tolist():
        mine = np.flatnonzero(load.chunks[:, 0] == f)
        indptr_f = readers[f].indptr
        for i, (run_data, run_indices) in zip(mine.tolist(), readers[f].runs(load.chunks[mine, 1:])):
            _, a, b = load.chunks[i].tolist()
            starts = (indptr_f[a : b + 1] - indptr_f[a]).tolist()
            # One slice copy per row: rows are kilobytes, so this beats building
            # a per-entry index (8 bytes per entry, then a fancy-index pass).
            for q, (x, y) in enumerate(zip(starts[:-1], starts[1:]), start=first_row[i]):
                o = destination[q]
                data[o : o + y - x] = run_data[x:y]
                indices[o : o + y - x] = run_indices[x:y]
    return LoadedRows(load, indptr=indptr, data=data, indices=indices)
