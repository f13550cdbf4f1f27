"""Reading one load of the plan: its runs of rows, decoded and permuted into place.

The same function fills a worker's ring slot and, for loops that read in
their own thread, freshly allocated arrays in the main process. Each run is
decoded once into a small buffer and its rows are copied straight to the
output positions the load's *take* gives them (none, one or several), so a
load costs one decode of what it reads and one copy of what it yields.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..store.rows import CsrRows, DenseRows
from .genes import GeneSubset, densify, pick_genes
from .plan import Load

__all__ = ["LoadedRows", "RowFormat", "load_nnz", "read_load", "splittable"]

INDEX_DTYPE = np.dtype(np.int32)  # column indices as torch's sparse CSR tensors take them


@dataclass(frozen=True, eq=False)
class RowFormat:
    """What a load's rows become: all genes or a :class:`~arrayloaders.loading.genes.GeneSubset`; CSR or dense."""

    genes: GeneSubset | None = None
    dense: bool = False

    def n_vars(self, source_n_vars: int) -> int:
        """Columns of the yielded rows."""
        return source_n_vars if self.genes is None else self.genes.n_vars


ALL_GENES = RowFormat()


@dataclass
class LoadedRows:
    """A load's rows in yield order: CSR parts (``indptr``, ``data``, ``indices``) or ``dense``; obsm rows per key."""

    load: Load
    indptr: np.ndarray | None = None  # int64, n_rows + 1
    data: np.ndarray | None = None
    indices: np.ndarray | None = None  # int32
    dense: np.ndarray | None = None
    rows: np.ndarray | None = None  # global row index of each row (set by the loop)
    obsm: dict[str, np.ndarray] = field(default_factory=dict)


def _read_rows(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(file, row in that file) of every read row of ``runs``, in read order, without a Python loop over runs."""
    lengths = runs[:, 2] - runs[:, 1]
    rows = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(runs[:, 1] - np.cumsum(lengths) + lengths, lengths)
    return np.repeat(runs[:, 0], lengths), rows


def _row_lengths(indptrs: list[np.ndarray], files: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Stored entries of each of ``rows`` (rows of ``files``; ``indptrs``: each file's)."""
    out = np.empty(rows.size, dtype=np.int64)
    for f in np.unique(files).tolist():
        mine = files == f
        out[mine] = indptrs[f][rows[mine] + 1] - indptrs[f][rows[mine]]
    return out


def load_nnz(indptrs: list[np.ndarray], runs: np.ndarray, take: np.ndarray | None = None) -> int:
    """Stored entries a load yields: of every read row once (``take=None``), or of the rows ``take`` picks."""
    if take is None:
        return int(sum(indptrs[f][b] - indptrs[f][a] for f, a, b in runs.tolist()))
    return int(_row_lengths(indptrs, *_read_rows(runs))[take].sum())


def read_load(
    readers: list[CsrRows] | list[DenseRows],
    load: Load,
    take: np.ndarray,
    out: LoadedRows | None = None,
    fmt: RowFormat = ALL_GENES,
    obsm: dict[str, list[DenseRows]] | None = None,
    part: tuple[int, int] | None = None,
) -> LoadedRows:
    """Decode ``load``'s runs and yield the rows ``take`` picks, in its order, into ``out`` or new arrays.

    ``take[p]`` is the read row (position in the runs' concatenation) that
    output row ``p`` comes from: read rows may be skipped or repeated. Runs
    are read file by file, in order. Rows keep the genes of ``fmt`` and are
    densified if it says so; the same rows of each obsm array (``obsm``:
    its readers, one per file) come with them. Returns the filled parts,
    sized exactly (views of ``out``'s arrays).

    ``part=(i, j)`` decodes only runs ``i:j`` and writes only the output
    rows they feed, at their final places (the row pointer is the whole
    load's): several processes can fill one load's ``out`` side by side,
    one part each. Only where :func:`splittable` says so.
    """
    if part is not None and not splittable(fmt, "csr" if isinstance(readers[0], CsrRows) else "dense"):
        raise ValueError("this load cannot be read in parts (genes are chosen, or CSR rows densified)")
    loaded = _read_x(readers, load, take, out, fmt, part)
    for key, key_readers in (obsm or {}).items():
        into = LoadedRows(load, dense=out.obsm[key]) if out is not None else None
        loaded.obsm[key] = _read_dense(key_readers, load, take, into, None, part).dense
    return loaded


def splittable(fmt: RowFormat, kind: str) -> bool:
    """Whether loads of an X of ``kind`` (``"csr"``, ``"dense"``) in format ``fmt`` can be read in parts:
    where every output row's place is known before decoding (dense rows; CSR rows of all genes), not
    where genes are chosen from CSR rows (a row's place depends on the kept entries of the rows before)."""
    return kind != "csr" or (fmt.genes is None and not fmt.dense)


def _read_x(readers, load: Load, take: np.ndarray, out: LoadedRows | None, fmt: RowFormat, part) -> LoadedRows:
    if not isinstance(readers[0], CsrRows):
        return _read_dense(readers, load, take, out, fmt.genes, part)
    if fmt.genes is None and not fmt.dense:
        return _read_csr(readers, load, take, out, part)
    return _read_picked(readers, load, take, out, fmt)


def _runs_by_file(runs: np.ndarray, part: tuple[int, int] | None) -> list[tuple[int, np.ndarray]]:
    """(file, indices of its runs) for each file with runs in ``part`` (all runs if ``None``), files in order."""
    lo, hi = part if part is not None else (0, runs.shape[0])
    files = runs[lo:hi, 0]
    return [(f, lo + np.flatnonzero(files == f)) for f in np.unique(files).tolist()]


def _outputs(load: Load, take: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first read row of each run, output rows sorted by read row, where each run's outputs start in them)."""
    runs = load.runs
    first_row = np.concatenate([[0], np.cumsum(runs[:, 2] - runs[:, 1])])
    outputs = np.argsort(take, kind="stable")
    return first_row, outputs, np.searchsorted(take[outputs], first_row)


def _fed_by(load: Load, take: np.ndarray, part: tuple[int, int] | None) -> np.ndarray:
    """The output rows that runs ``part`` feed (all of them if ``None``)."""
    if part is None:
        return np.arange(take.size)
    _, outputs, bounds = _outputs(load, take)
    return outputs[bounds[part[0]] : bounds[part[1]]]


def _read_dense(readers: list[DenseRows], load: Load, take: np.ndarray, out: LoadedRows | None, genes, part=None) -> LoadedRows:
    runs, n = load.runs, take.size
    first_row, outputs, bounds = _outputs(load, take)
    source = readers[0].source
    width = source.n_vars if genes is None else genes.n_vars
    dense = out.dense[:n] if out is not None else np.empty((n, width), source.dtype)
    for f, mine in _runs_by_file(runs, part):
        for i, rows in zip(mine.tolist(), readers[f].runs(runs[mine, 1:])):
            fed = outputs[bounds[i] : bounds[i + 1]]
            picked = rows[take[fed] - first_row[i]]
            dense[fed] = picked if genes is None else picked[:, genes.columns]
    return LoadedRows(load, dense=dense)


def _sampled(readers: list[CsrRows], load: Load, n_read: int) -> bool:
    """Whether to gather ``load``'s rows inner chunk by inner chunk (runs of a few rows: a sampler's).

    Each inner chunk is then decoded once for all the rows it holds, and
    each row's entries go straight to their place. Long runs (chunked
    access) decode run by run, whole chunks in place.
    """
    return all(r.direct for r in readers) and 4 * load.runs.shape[0] > n_read


def _compiled(readers: list[CsrRows]) -> bool:
    """Whether gathering inner chunk by inner chunk runs compiled now, for every file's arrays.

    Then it is also the faster way to read long runs into their shuffled
    places: the compiled loop saves the Python per chunk and per row that
    reading run by run costs (:mod:`~arrayloaders.store.chunk_gather`).
    """
    return all(r.compiled for r in readers)  # compiled implies direct


def _read_csr(readers: list[CsrRows], load: Load, take: np.ndarray, out: LoadedRows | None, part=None) -> LoadedRows:
    """CSR rows of ``load``, all genes: each output row's entries copied once from its decoded run."""
    runs, n = load.runs, take.size
    files, rows = _read_rows(runs)
    lengths = _row_lengths([r.indptr for r in readers], files, rows)
    indptr = out.indptr[: n + 1] if out is not None else np.empty(n + 1, dtype=np.int64)
    indptr[0] = 0
    np.cumsum(lengths[take], out=indptr[1:])
    nnz = int(indptr[-1])
    if out is not None:
        data, indices = out.data[:nnz], out.indices[:nnz]
    else:
        data, indices = np.empty(nnz, readers[0].source.dtype), np.empty(nnz, INDEX_DTYPE)
    if _sampled(readers, load, rows.size) or _compiled(readers):
        fed = _fed_by(load, take, part)
        _gather(readers, files[take[fed]], rows[take[fed]], indptr[fed], data, indices)
        return LoadedRows(load, indptr=indptr, data=data, indices=indices)
    # The output rows each read row feeds: outputs[bounds[i]:bounds[i + 1]] for run i.
    first_row, outputs, bounds = _outputs(load, take)
    destination = indptr[:-1].tolist()  # where each output row's entries go
    take_list, outputs_list = take.tolist(), outputs.tolist()
    for f, mine in _runs_by_file(runs, part):
        indptr_f = readers[f].indptr
        for i, (run_data, run_indices) in zip(mine.tolist(), readers[f].runs(runs[mine, 1:])):
            _, a, b = runs[i].tolist()
            starts = (indptr_f[a : b + 1] - indptr_f[a]).tolist()
            r0 = int(first_row[i])
            # One slice copy per output row: rows are kilobytes, so this beats building
            # a per-entry index (8 bytes per entry, then a fancy-index pass). The compiled
            # loop above is faster still, mostly by saving the Python around each chunk.
            for p in outputs_list[bounds[i] : bounds[i + 1]]:
                q = take_list[p] - r0
                x, y, o = starts[q], starts[q + 1], destination[p]
                data[o : o + y - x] = run_data[x:y]
                indices[o : o + y - x] = run_indices[x:y]
    return LoadedRows(load, indptr=indptr, data=data, indices=indices)


def _read_picked(readers: list[CsrRows], load: Load, take: np.ndarray, out: LoadedRows | None, fmt: RowFormat) -> LoadedRows:
    """Rows of ``load`` with only the entries of ``fmt.genes`` (if any), renumbered; CSR or densified.

    Every entry is decoded (rows are stored whole), back to back into a
    scratch buffer: a sampler's rows in yield order, chunked access's runs
    in read order. One compiled pass (:func:`pick_genes`, :func:`densify`)
    then writes each output row's kept entries straight into place,
    whatever the order of ``take``.
    """
    runs, n = load.runs, take.size
    files, rows = _read_rows(runs)
    lengths = _row_lengths([r.indptr for r in readers], files, rows)
    sampled = _sampled(readers, load, rows.size)
    sizes, picks = (lengths[take], np.arange(n)) if sampled else (lengths, take)
    bounds = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    data, indices = _scratch(readers[0], int(bounds[-1]))
    if sampled:
        _gather(readers, files[take], rows[take], bounds[:-1], data, indices)
    else:
        first_entry = bounds[np.concatenate([[0], np.cumsum(runs[:, 2] - runs[:, 1])])[:-1]]
        for f in np.unique(runs[:, 0]).tolist():
            mine = np.flatnonzero(runs[:, 0] == f)
            readers[f].read_runs(runs[mine, 1:], first_entry[mine], data, indices)
    dtype = readers[0].source.dtype
    try:
        if fmt.dense:
            dense = out.dense[:n] if out is not None else np.empty((n, fmt.n_vars(readers[0].source.n_vars)), dtype)
            densify(bounds, data, indices, picks, dense, fmt.genes)
            return LoadedRows(load, dense=dense)
        if out is not None:
            indptr, data_out, indices_out = out.indptr[: n + 1], out.data, out.indices
        else:
            room = int(lengths[take].sum())
            indptr, data_out, indices_out = np.empty(n + 1, np.int64), np.empty(room, dtype), np.empty(room, INDEX_DTYPE)
        nnz = pick_genes(bounds, data, indices, picks, fmt.genes, indptr, data_out, indices_out)
    except IndexError as e:  # the decode checks indices (checksums or bounds); this is the last guard
        where = ", ".join(sorted({readers[f].where("indices") for f in np.unique(runs[:, 0]).tolist()}))
        raise OSError(f"{where}: {e} (damaged store)") from e
    return LoadedRows(load, indptr=indptr, data=data_out[:nnz], indices=indices_out[:nnz])


def _gather(readers: list[CsrRows], files: np.ndarray, rows: np.ndarray, dests: np.ndarray, data, indices) -> None:
    """Rows ``rows`` of ``files`` (any order, repeats allowed) into ``data``/``indices`` at offsets ``dests``."""
    for f in np.unique(files).tolist():
        mine = np.flatnonzero(files == f)
        readers[f].gather(rows[mine], dests[mine], data, indices)


_scratch_of_thread = threading.local()


def _scratch(reader: CsrRows, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Buffers of at least ``size`` entries for decoded CSR rows, kept per thread (loops may read in threads).

    Reused from load to load: a fresh buffer of a load's entries (~100 MB)
    would cost its page faults every time.
    """
    dtypes = (np.dtype(reader.source.dtype), reader.indices_dtype)
    held = getattr(_scratch_of_thread, "buffers", None)
    if held is None or held[0].size < size or (held[0].dtype, held[1].dtype) != dtypes:
        held = (np.empty(size, dtypes[0]), np.empty(size, dtypes[1]))
        _scratch_of_thread.buffers = held
    return held[0][:size], held[1][:size]
