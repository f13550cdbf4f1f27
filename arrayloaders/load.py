"""Reading one load of the plan: its chunks' rows, permuted as the plan says.

The same function serves the in-process path and the worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import EpochPlan, Load, load_permutation
from .store import RowReader

__all__ = ["LoadedRows", "read_load"]


@dataclass
class LoadedRows:
    """A load's rows in yield order: CSR parts (``data``, ``indices``, ``indptr``) or ``dense``."""

    load: Load
    data: np.ndarray | None = None
    indices: np.ndarray | None = None
    indptr: np.ndarray | None = None
    dense: np.ndarray | None = None
    rows: np.ndarray | None = None  # global row index of each yielded row (set by the iterator)


def _stacked_row_order(load: Load) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per-file runs to read, and where each chunk-order row lands once files are stacked.

    Rows are read file by file (one reader each) and stacked in file order;
    the returned index maps chunk-order row ``i`` to its row in that stack.
    """
    files = load.chunks[:, 0]
    lengths = load.chunks[:, 2] - load.chunks[:, 1]
    runs, stack_start, offset = {}, np.empty(len(load.chunks), dtype=np.int64), 0
    for f in np.unique(files):
        mine = np.flatnonzero(files == f)
        runs[int(f)] = load.chunks[mine, 1:]
        stack_start[mine] = offset + np.concatenate([[0], np.cumsum(lengths[mine])[:-1]])
        offset += int(lengths[mine].sum())
    row_in_stack = np.repeat(stack_start, lengths) + (
        np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    return runs, row_in_stack


def read_load(readers: list[RowReader], plan: EpochPlan, load: Load, dense: bool) -> LoadedRows:
    """Read and permute one load."""
    runs, row_in_stack = _stacked_row_order(load)
    order = row_in_stack[load_permutation(plan.config, plan.epoch, load.index, row_in_stack.size)]
    if dense:
        block = np.concatenate([readers[f].read_dense(r) for f, r in runs.items()])
        return LoadedRows(load, dense=block[order])
    parts = [readers[f].read_csr(r) for f, r in runs.items()]
    data = np.concatenate([p[0] for p in parts])
    indices = np.concatenate([p[1] for p in parts])
    indptr = np.zeros(row_in_stack.size + 1, dtype=np.int64)
    np.cumsum(np.concatenate([np.diff(p[2]) for p in parts]), out=indptr[1:])
    out_indptr = np.zeros_like(indptr)
    np.cumsum(np.diff(indptr)[order], out=out_indptr[1:])
    out_data, out_indices = np.empty_like(data), np.empty_like(indices)
    gather_rows(data, indices, indptr, order, out_data, out_indices, out_indptr)
    return LoadedRows(load, data=out_data, indices=out_indices, indptr=out_indptr)


def gather_rows(data, indices, indptr, order, out_data, out_indices, out_indptr) -> None:
    """Copy CSR rows ``order`` of (data, indices, indptr) into the output arrays.

    One slice copy per row: rows are kilobytes, so this beats building a
    per-entry index (8 bytes per entry, then two fancy-index passes).
    """
    starts, ends, dst = indptr[order].tolist(), indptr[order + 1].tolist(), out_indptr.tolist()
    for i, (a, b) in enumerate(zip(starts, ends)):
        o = dst[i]
        out_data[o : o + b - a] = data[a:b]
        out_indices[o : o + b - a] = indices[a:b]
