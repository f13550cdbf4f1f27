"""Reading one load of the plan: its runs of rows, decoded and permuted into place.

The same function fills a worker's ring slot and, for loops that read in
their own thread, freshly allocated arrays in the main process. Each run is
decoded once into a small buffer and its rows are copied straight to the
output positions the load's *take* gives them (none, one or several), so a
load costs one decode of what it reads and one copy of what it yields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Load
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


def _row_lengths(indptrs: list[np.ndarray], runs: np.ndarray) -> np.ndarray:
    """Stored entries of each read row of ``runs``, in read order (``indptrs``: each file's)."""
    lengths = runs[:, 2] - runs[:, 1]
    # The file row of every read row, without a Python loop over runs (a sampler's load has thousands).
    rows = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(runs[:, 1] - np.cumsum(lengths) + lengths, lengths)
    files = np.repeat(runs[:, 0], lengths)
    out = np.empty(rows.size, dtype=np.int64)
    for f in np.unique(runs[:, 0]).tolist():
        mine = files == f
        out[mine] = indptrs[f][rows[mine] + 1] - indptrs[f][rows[mine]]
    return out


def load_nnz(indptrs: list[np.ndarray], runs: np.ndarray, take: np.ndarray | None = None) -> int:
    """Stored entries a load yields: of every read row once (``take=None``), or of the rows ``take`` picks."""
    if take is None:
        return int(sum(indptrs[f][b] - indptrs[f][a] for f, a, b in runs.tolist()))
    return int(_row_lengths(indptrs, runs)[take].sum())


def read_load(
    readers: list[CsrRows] | list[DenseRows],
    load: Load,
    take: np.ndarray,
    out: LoadedRows | None = None,
) -> LoadedRows:
    """Decode ``load``'s runs and yield the rows ``take`` picks, in its order, into ``out`` or new arrays.

    ``take[p]`` is the read row (position in the runs' concatenation) that
    output row ``p`` comes from: read rows may be skipped or repeated. Runs
    are read file by file, in order. Returns the filled parts, sized exactly
    (views of ``out``'s arrays).
    """
    runs, n = load.runs, take.size
    first_row = np.concatenate([[0], np.cumsum(runs[:, 2] - runs[:, 1])])
    # The output rows each read row feeds: outputs[bounds[r]:bounds[r + 1]] for read row r.
    outputs = np.argsort(take, kind="stable")
    bounds = np.searchsorted(take[outputs], first_row)  # per run: where its outputs start
    if isinstance(readers[0], DenseRows):
        source = readers[0].source
        dense = out.dense[:n] if out is not None else np.empty((n, source.n_vars), source.dtype)
        for f in np.unique(runs[:, 0]).tolist():
            mine = np.flatnonzero(runs[:, 0] == f)
            for i, rows in zip(mine.tolist(), readers[f].runs(runs[mine, 1:])):
                fed = outputs[bounds[i] : bounds[i + 1]]
                dense[fed] = rows[take[fed] - first_row[i]]
        return LoadedRows(load, dense=dense)

    lengths = _row_lengths([r.indptr for r in readers], runs)
    indptr = out.indptr[: n + 1] if out is not None else np.empty(n + 1, dtype=np.int64)
    indptr[0] = 0
    np.cumsum(lengths[take], out=indptr[1:])
    nnz = int(indptr[-1])
    if out is not None:
        data, indices = out.data[:nnz], out.indices[:nnz]
    else:
        data, indices = np.empty(nnz, readers[0].source.dtype), np.empty(nnz, INDEX_DTYPE)
    destination = indptr[:-1].tolist()  # where each output row's entries go
    take_list, outputs_list = take.tolist(), outputs.tolist()
    for f in np.unique(runs[:, 0]).tolist():
        mine = np.flatnonzero(runs[:, 0] == f)
        indptr_f = readers[f].indptr
        for i, (run_data, run_indices) in zip(mine.tolist(), readers[f].runs(runs[mine, 1:])):
            _, a, b = runs[i].tolist()
            starts = (indptr_f[a : b + 1] - indptr_f[a]).tolist()
            r0 = int(first_row[i])
            # One slice copy per output row: rows are kilobytes, so this beats building
            # a per-entry index (8 bytes per entry, then a fancy-index pass).
            for p in outputs_list[bounds[i] : bounds[i + 1]]:
                q = take_list[p] - r0
                x, y, o = starts[q], starts[q + 1], destination[p]
                data[o : o + y - x] = run_data[x:y]
                indices[o : o + y - x] = run_indices[x:y]
    return LoadedRows(load, indptr=indptr, data=data, indices=indices)
