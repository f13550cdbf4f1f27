"""The two out-of-core passes of the conversion, each bounded by the memory budget.

1. *scatter* (:func:`scatter`): stream every input once, in row blocks, and
   append each row to the temporary bucket of the output file the global
   permutation sends it to;
2. *write* (:func:`write_output_file`): for each output file, gather its
   bucket's rows in the permuted order (block by block) and write them,
   shard-aligned, into ``chunk_{i}.zarr``.

Both passes run once per *element*: X, each kept layer (same layout as X,
CSR or dense) and each kept obsm array (dense, n_obs x k), one element at
a time, so the working memory is that of one element whatever their number.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import zarr
from tqdm.auto import tqdm

from ..errors import InputFileError
from ..store.disk_layout import COMPLETE_ATTRIBUTE
from ..store.format import XLayout
from ..store.zarr_layout import direct_array, missing_chunk_files, unwritten_chunks
from .jobs import Jobs
from .obs_records import InputObs, ObsPlan

__all__ = ["InputFile", "Matrix", "Part", "check_indptr", "csr_row_positions", "output_file_of", "scatter", "write_output_file"]


@dataclass
class Matrix:
    """One row-aligned 2-d element of an input file: X, a layer or an obsm array."""

    path: str  # inside the .h5ad: "X", "layers/counts", "obsm/X_pca"
    format: Literal["csr", "dense"]
    dtype: np.dtype
    n_cols: int
    indptr: np.ndarray | None = None  # CSR: kept for X; read by each pass for layers (one input at a time)

    @property
    def genes(self) -> bool:
        """Whether its columns are the input's var (X, layers), mapped onto the output var."""
        return not self.path.startswith("obsm/")


@dataclass
class Part:
    """One element of every output file: where it goes and its buckets (one per output file)."""

    path: str  # inside each chunk_{i}.zarr: "X", "layers/counts", "obsm/X_pca"
    buckets: list
    n_cols: int
    dtype: np.dtype


@dataclass
class InputFile:
    """One scanned input file: what the passes need to read its X, layers and obsm, and its obs/var."""

    path: Path
    label: str
    n_obs: int
    x_format: Literal["csr", "dense"]
    dtype: np.dtype
    var: pd.DataFrame
    indptr: np.ndarray | None = None  # X's, if kept (read again by each pass otherwise: O(n_obs))
    n_values: int = 0  # stored values of X (nnz, or n_obs x n_vars when dense)
    gene_map: np.ndarray | None = None  # input column -> output column, -1 = dropped
    dropped: dict[str, list[str]] = field(default_factory=dict)  # never carried: {"raw": [], "obsp": ["distances"]}
    # Each layer / obsm key: the element, or why it cannot be carried (a sparse obsm, a CSC layer).
    layers: dict[str, Matrix | str] = field(default_factory=dict)
    obsm: dict[str, Matrix | str] = field(default_factory=dict)

    def matrix(self, path: str) -> Matrix:
        """The element at ``path``: ``"X"``, ``"layers/<name>"`` or ``"obsm/<key>"``."""
        if path == "X":
            return Matrix("X", self.x_format, self.dtype, len(self.var), self.indptr)
        kind, _, key = path.partition("/")
        return getattr(self, kind)[key]


class _Bucket:
    """Temporary on-disk rows of one output file, in increasing global cell order."""

    def __init__(self, directory: Path, dense: bool):
        directory.mkdir(parents=True)
        self.dir = directory
        self.dense = dense
        self.n_rows = 0
        names = ("rows",) if dense else ("data", "indices", "nnz")
        self._files = {n: open(directory / f"{n}.bin", "wb") for n in names}

    def append_csr(self, data: np.ndarray, indices: np.ndarray, nnz: np.ndarray) -> None:
        self._files["data"].write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._files["indices"].write(memoryview(np.ascontiguousarray(indices)).cast("B"))
        self._files["nnz"].write(memoryview(nnz.astype(np.int64)).cast("B"))
        self.n_rows += nnz.size

    def append_dense(self, rows: np.ndarray) -> None:
        self._files["rows"].write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        self.n_rows += rows.shape[0]

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __getstate__(self) -> dict:  # a closed bucket travels between conversion processes
        return {**self.__dict__, "_files": {}}

    def extend(self, other: _Bucket) -> None:
        """Append another (closed) bucket's rows after this one's (copied by the kernel where it can)."""
        for name, f in self._files.items():
            f.flush()
            with open(other.path(name), "rb") as src:
                left = os.fstat(src.fileno()).st_size
                try:
                    while left > 0:
                        copied = os.copy_file_range(src.fileno(), f.fileno(), left)
                        if copied == 0:
                            break
                        left -= copied
                except (AttributeError, OSError):  # not Linux, or a filesystem without it
                    pass
                shutil.copyfileobj(src, f, 2**22)  # what is left, from where the kernel stopped
        self.n_rows += other.n_rows

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.bin"


def csr_row_positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in ``data``/``indices`` of the given rows' entries, concatenated in order."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # Each row's run starts where the previous run ended in the output; shift
    # arange(total) by the per-row offset difference.
    shift = starts - (np.cumsum(lens) - lens)
    return np.arange(total, dtype=np.int64) + np.repeat(shift, lens)


class _AlignedAppender:
    """Appends to a pre-sized 1-D (or row-major 2-D) zarr array in shard-aligned writes.

    Writing whole shards means zarr never reads back and re-encodes a
    partially written shard.
    """

    def __init__(self, array: zarr.Array, align: int):
        self.array, self.align, self.pos = array, align, 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def append(self, values: np.ndarray) -> None:
        self._pending.append(values)
        self._pending_len += values.shape[0]
        if self._pending_len >= self.align:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending_len:
            return
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = buf.shape[0] if final else (buf.shape[0] // self.align) * self.align
        if n:
            write_complete(self.array, self.pos, self.pos + n, buf[:n])
        self.pos += n
        rest = buf[n:]
        self._pending, self._pending_len = ([rest] if rest.shape[0] else []), rest.shape[0]

    def close(self) -> None:
        self._flush(final=True)
        if self.pos != self.array.shape[0]:
            raise RuntimeError(f"internal error: wrote {self.pos} of {self.array.shape[0]} elements")



def check_indptr(path: Path, name: str, indptr: np.ndarray, n_obs: int, nnz: int) -> None:
    """Raise naming the file unless ``indptr`` of CSR element ``name`` is a valid row pointer over ``nnz`` entries."""
    if indptr.shape != (n_obs + 1,):
        raise InputFileError(f"{path}: {name}/indptr has {indptr.size} entries, expected n_obs + 1 = {n_obs + 1}")
    if indptr[0] != 0:
        raise InputFileError(f"{path}: {name}/indptr starts at {indptr[0]}, not 0 (damaged file)")
    steps = np.diff(indptr)
    if (steps < 0).any():
        row = int(np.flatnonzero(steps < 0)[0])
        raise InputFileError(
            f"{path}: {name}/indptr decreases at row {row} ({indptr[row]} -> {indptr[row + 1]}); damaged file"
        )
    if indptr[-1] != nnz:
        raise InputFileError(
            f"{path}: {name}/indptr ends at {indptr[-1]} but {name}/data holds {nnz} entries (damaged or truncated file)"
        )


def read_indptr(inp: InputFile, f: h5py.File, m: Matrix) -> np.ndarray:
    """A CSR element's row pointer as int64, checked (the file is open as ``f``)."""
    if m.indptr is not None:
        return m.indptr
    node = f[m.path]
    try:
        indptr = node["indptr"][:].astype(np.int64)
        nnz = node["data"].shape[0]
        n_indices = node["indices"].shape[0]
    except (KeyError, OSError) as e:
        raise InputFileError(f"{inp.path}: cannot read {m.path} ({e}; damaged file)") from e
    if n_indices != nnz:
        raise InputFileError(
            f"{inp.path}: {m.path}/indices has {n_indices} entries but {m.path}/data {nnz} (damaged file)"
        )
    check_indptr(inp.path, m.path, indptr, inp.n_obs, nnz)
    return indptr


def _exactly(values: np.ndarray, dtype: np.dtype, inp: InputFile, m: Matrix, r0: int, r1: int) -> np.ndarray:
    """``values`` as the store's ``dtype``; integers a float dtype cannot hold exactly are refused.

    The store's dtype is promoted over the inputs (int64 with float32 gives
    float64), and a float holds every integer only up to 2**(mantissa + 1):
    2**53 for float64. Past that, a count would be stored rounded.
    """
    out = values.astype(dtype, copy=False)
    if values.dtype.kind in "iu" and dtype.kind == "f" and values.dtype.itemsize * 8 > np.finfo(dtype).nmant + 1:
        with np.errstate(invalid="ignore", over="ignore"):
            wrong = out.astype(values.dtype) != values
        if wrong.any():
            raise InputFileError(
                f"{inp.path}: {m.path} holds the integer {values[wrong][0]} in rows {r0}-{r1 - 1}, which the store's "
                f"{dtype} (the inputs' dtypes promoted) cannot hold exactly; convert the inputs to one dtype first"
            )
    return out


def _read_block(inp: InputFile, m: Matrix, indptr, f: h5py.File, r0: int, r1: int, n_cols: int, dtype: np.dtype):
    """Rows ``r0:r1`` of one element of an input, genes mapped onto the output var (X and layers)."""
    gene_map = inp.gene_map if m.genes else None
    identity = gene_map is None or np.array_equal(gene_map, np.arange(n_cols))
    if m.format == "dense":
        block = _exactly(f[m.path][r0:r1], dtype, inp, m, r0, r1)
        if identity:
            return block
        out = np.zeros((r1 - r0, n_cols), dtype=dtype)
        keep = gene_map >= 0
        out[:, gene_map[keep]] = block[:, keep]
        return out
    a, b = indptr[r0], indptr[r1]
    data = _exactly(f[f"{m.path}/data"][a:b], dtype, inp, m, r0, r1)
    indices = f[f"{m.path}/indices"][a:b]
    if indices.size and (indices.min() < 0 or indices.max() >= m.n_cols):
        bad = int(indices.max() if indices.max() >= m.n_cols else indices.min())
        raise InputFileError(
            f"{inp.path}: {m.path}/indices holds column {bad} in rows {r0}-{r1 - 1}, outside the {m.n_cols} genes "
            "(damaged file)"
        )
    indptr = indptr[r0 : r1 + 1] - a
    if not identity:
        mapped = gene_map[indices]
        keep = mapped >= 0
        row_of = np.repeat(np.arange(r1 - r0), np.diff(indptr))[keep]
        mapped, data = mapped[keep], data[keep]
        # Genes of a row must stay sorted after re-indexing onto the new var.
        order = np.lexsort((mapped, row_of))
        data, indices = data[order], mapped[order]
        indptr = np.zeros(r1 - r0 + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=r1 - r0), out=indptr[1:])
    return data, indices.astype(np.int32, copy=False), indptr


def _row_bytes(inp: InputFile, m: Matrix, indptr, n_cols: int, itemsize: int) -> np.ndarray:
    """Bytes each row of an element takes in memory (for budget-sized blocks)."""
    if m.format == "dense":
        return np.full(inp.n_obs, max(n_cols, m.n_cols) * itemsize, dtype=np.int64)
    return np.diff(indptr) * (itemsize + 4) + 8


def _blocks(row_bytes: np.ndarray, block_bytes: int) -> list[tuple[int, int]]:
    """Cut rows into consecutive blocks of about ``block_bytes`` (at least one row each)."""
    ends = np.searchsorted(np.cumsum(row_bytes), np.arange(block_bytes, row_bytes.sum() + block_bytes, block_bytes), "right")
    out, start = [], 0
    for e in ends:
        e = max(int(e), start + 1)
        if start >= row_bytes.size:
            break
        e = min(e, row_bytes.size)
        out.append((start, e))
        start = e
    return out


def output_file_of(order: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Each input cell's output file (``order``, ``bounds`` as ``plan_output_files`` gives them), in the smallest
    unsigned dtype: the only per-cell array pass 1 keeps in memory."""
    dest = np.empty(order.size, dtype=np.min_scalar_type(max(len(bounds) - 2, 0)))
    for j in range(len(bounds) - 1):
        dest[order[bounds[j] : bounds[j + 1]]] = j
    return dest


def _scatter_input(inp, i, element, dest_file, buckets, n_cols, dtype, dense, budget, obs, bar) -> None:
    """Append input ``i``'s rows of one element to the buckets ``dest_file`` (this input's cells) sends them to."""
    # A block is held about four times over (read, re-indexed, gathered per
    # destination, written) and allocator slack doubles that: a sixteenth.
    block_bytes = max(1, budget // 16)
    with h5py.File(inp.path, "r") as f:
        if obs is not None:
            source = InputObs(inp.path, f)
            blocks = list(source.blocks())

            def read(r0, r1):
                return obs.records(source, i, r0, r1)
        else:
            m = inp.matrix(element)
            indptr = read_indptr(inp, f, m) if m.format == "csr" else None
            blocks = _blocks(_row_bytes(inp, m, indptr, n_cols, dtype.itemsize), block_bytes)

            def read(r0, r1):
                try:
                    return _read_block(inp, m, indptr, f, r0, r1, n_cols, dtype)
                except OSError as e:  # HDF5's messages do not name the file
                    raise InputFileError(f"{inp.path}: cannot read {element} rows {r0}-{r1 - 1} ({e})") from e

        for r0, r1 in blocks:
            block = read(r0, r1)
            dest = dest_file[r0:r1]
            rows_by_dest = np.argsort(dest, kind="stable")
            cuts = np.searchsorted(dest[rows_by_dest], np.arange(len(buckets) + 1))
            for j in np.flatnonzero(np.diff(cuts)):
                rows = rows_by_dest[cuts[j] : cuts[j + 1]]
                if dense:
                    buckets[j].append_dense(block[rows])
                else:
                    data, indices, block_indptr = block
                    pos = csr_row_positions(block_indptr, rows)
                    buckets[j].append_csr(data[pos], indices[pos], np.diff(block_indptr)[rows])
            del block
            bar.update(r1 - r0)


def scatter_input(inp, i, element, dest_file, n_files, n_cols, dtype, dense, budget, directory, obs) -> list[_Bucket]:
    """One input's rows of one element into buckets of its own in ``directory`` (a task of a parallel pass 1)."""
    buckets = [_Bucket(directory / f"bucket_{j}", dense) for j in range(n_files)]
    with tqdm(disable=True) as bar:
        _scatter_input(inp, i, element, dest_file, buckets, n_cols, dtype, dense, budget, obs, bar)
    for b in buckets:
        b.close()
    return buckets


def scatter(
    inputs, element, dest_file, n_files, n_cols, dtype, dense, budget, progress, scratch,
    obs: ObsPlan | None = None, jobs: Jobs | None = None,
) -> list[_Bucket]:  # fmt: skip
    """Pass 1 of one element (``"X"``, ``"layers/<name>"``, ``"obsm/<key>"``, or ``"obs"`` with its ``obs``
    plan): stream inputs once, appending each row to its output file's bucket in ``scratch``.

    ``dest_file[c]`` is the output file of global input cell ``c``. With
    ``jobs`` of several processes the inputs are read by them, each into
    buckets of its own, appended in input order afterwards: the buckets are
    the same bytes as one process writes.
    """
    desc = "shuffle" if element == "X" else f"shuffle {element}"
    offsets = np.concatenate([[0], np.cumsum([inp.n_obs for inp in inputs])])
    if jobs is not None and jobs.n > 1 and len(inputs) > 1:
        share = budget // min(jobs.n, len(inputs))
        tasks = [
            (inp, i, element, dest_file[offsets[i] : offsets[i + 1]], n_files, n_cols, dtype, dense, share,
             scratch / f"input_{i}", obs)
            for i, inp in enumerate(inputs)
        ]  # fmt: skip
        pieces = jobs.run(scatter_input, tasks, progress=progress, desc=desc, weights=[i.n_obs for i in inputs])
        buckets = [_Bucket(scratch / f"bucket_{j}", dense) for j in range(n_files)]
        for j, bucket in enumerate(buckets):
            for piece in pieces:
                bucket.extend(piece[j])
                shutil.rmtree(piece[j].dir)
            bucket.close()
        for i in range(len(inputs)):
            (scratch / f"input_{i}").rmdir()
        return buckets
    buckets = [_Bucket(scratch / f"bucket_{j}", dense) for j in range(n_files)]
    with tqdm(total=dest_file.size, unit="cells", unit_scale=True, desc=desc, disable=not progress) as bar:
        for i, inp in enumerate(inputs):
            dest = dest_file[offsets[i] : offsets[i + 1]]
            _scatter_input(inp, i, element, dest, buckets, n_cols, dtype, dense, budget, obs, bar)
    for b in buckets:
        b.close()
    return buckets


@contextmanager
def _mapped(path: Path, dtype: np.dtype, shape: tuple[int, ...]):
    """Map a bucket file for one block only.

    Pages touched through a mapping count as resident memory until it is
    unmapped; re-mapping per block keeps the whole bucket out of RSS.
    """
    m = np.memmap(path, dtype=dtype, mode="r", shape=shape)
    try:
        yield m
    finally:
        m._mmap.close()  # noqa: SLF001 - numpy exposes no public unmap
        del m


def write_output_file(
    path: Path,
    parts: list[Part],
    ids: np.ndarray,
    obs: ObsPlan,
    obs_bucket: _Bucket,
    var: pd.DataFrame,
    layout: XLayout,
    budget: int,
    progress: bool,
    j: int,
) -> None:
    """Pass 2: write one ``chunk_{j}.zarr`` from its buckets, rows in ``ids`` order (global cell ids).

    ``parts`` are X first, then the layers and obsm arrays, each with its
    bucket ``j``; ``obs_bucket`` holds the file's obs records. Every chunk of every array is stored (a missing one is
    damage, never fill values) and carries a crc32c checksum when
    ``layout.checksum``.
    """
    # A bucket holds this file's cells in increasing global id: the bucket
    # row of cell ids[p] is its rank among the sorted ids.
    bucket_row = np.searchsorted(np.sort(ids), ids)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    records = np.fromfile(obs_bucket.path("rows"), dtype=obs.dtype)
    if records.size != ids.size:
        raise RuntimeError(f"internal error: {records.size} obs records for {ids.size} cells of {path.name}")
    write_obs_and_var(root, obs.frame(records[bucket_row]), var, layout)
    del records
    for part in parts:
        parent, _, name = part.path.rpartition("/")
        group = root if not parent else root[parent] if parent in root else root.create_group(parent, attributes=_DICT)
        label = path.name if part.path == "X" else f"{path.name} {part.path}"
        bucket = part.buckets[j]
        _write_matrix(group, name, bucket, bucket_row, part.n_cols, part.dtype, layout, budget, progress, label)
    # Every element must be in the consolidated metadata, or read_zarr would not see it.
    with _quiet_consolidation():
        zarr.consolidate_metadata(path)


_DICT = {"encoding-type": "dict", "encoding-version": "0.1.0"}  # anndata's mapping (layers, obsm)


@contextmanager
def _every_chunk_written():
    """zarr-python's own codec pipeline with ``write_empty_chunks``.

    zarr skips chunks that hold only the fill value unless told otherwise,
    and the zarrs pipeline (0.2) skips them even when told: without them, a
    deleted chunk file could not be told from an empty chunk.
    """
    with zarr.config.set(
        {"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline", "array.write_empty_chunks": True}
    ):
        yield


def write_obs_and_var(root: zarr.Group, obs: pd.DataFrame, var: pd.DataFrame, layout: XLayout) -> None:
    """The AnnData skeleton (obs, var, empty mappings), written by anndata with our codecs, every chunk stored.

    ``anndata.io.write_elem`` is public on anndata 0.12 and 0.13 alike and
    passes ``dataset_kwargs`` to every array it creates. ``write_zarr`` is not
    used: anndata 0.13 switches it to the zarrs pipeline, which drops chunks
    of fill values.
    """
    with _every_chunk_written(), warnings.catch_warnings(), ad.settings.override(auto_shard_zarr_v3=False):
        warnings.filterwarnings("ignore", category=FutureWarning)
        ad.io.write_elem(root, "/", ad.AnnData(obs=obs, var=var), dataset_kwargs={"compressors": layout.compressors("obs")})
    for name, node in root.members(max_depth=None):
        # anndata stores a missing element (raw=None) as a 0-d "null" array with no chunk at all
        if isinstance(node, zarr.Array) and node.attrs.get("encoding-type") != "null":
            missing = missing_chunk_files(node)
            if missing:
                raise RuntimeError(f"internal error: {len(missing)} chunk(s) of {name} were not written: {missing[:3]}")
            node.attrs[COMPLETE_ATTRIBUTE] = True


@contextmanager
def _quiet_consolidation():
    with warnings.catch_warnings():
        # Consolidated metadata is not in the zarr v3 spec yet; anndata uses it anyway.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def write_complete(array: zarr.Array, start: int, stop: int, values: np.ndarray) -> None:
    """``array[start:stop] = values`` (along the first axis), every chunk of the region stored, in chunk order.

    Written with the fast zarrs pipeline first; where it left a chunk out
    (all fill values), the region is written again with zarr-python's
    pipeline, which honours ``write_empty_chunks``. The check reads shard
    indexes (a few KiB per shard). Shards whose inner chunks were laid out
    out of order (as parallel encoders finish them) are rewritten in order,
    so that the same values always give the same bytes.
    """
    array[start:stop] = values
    row = int(np.prod(array.shape[1:]))
    if unwritten_chunks(array, start * row, stop * row):
        with _every_chunk_written():
            careful = zarr.open_array(store=array.store, path=array.path, mode="r+")
            careful[start:stop] = values
        still = unwritten_chunks(array, start * row, stop * row)
        if still:
            raise RuntimeError(f"internal error: {len(still)} chunk(s) were not written: {still[:3]}")
    direct = direct_array(array)
    if direct is not None:
        try:
            direct.order_chunks(start * row, stop * row)
        finally:
            direct.close()


def _write_matrix(root, name, bucket, bucket_row, n_vars, dtype, layout, budget, progress, label) -> None:
    """One element (X, a layer, an obsm array) of one output file at ``root[name]``, as X is laid out.

    Dense: a 2-d array whose inner chunks and shards span whole rows (rows
    per chunk from ``layout.dense_rows``). CSR: a group of ``data``,
    ``indices`` (the narrowest dtype) and ``indptr`` arrays.
    """
    n_rows = bucket_row.size
    block_bytes = max(1, budget // 16)
    complete = {COMPLETE_ATTRIBUTE: True}
    if bucket.dense:
        rows_per_chunk, rows_per_shard = layout.dense_rows(n_vars, dtype.itemsize)
        x = root.create_array(
            name, shape=(n_rows, n_vars), dtype=dtype, chunks=(rows_per_chunk, n_vars),
            shards=(rows_per_shard, n_vars), compressors=layout.compressors(),
            attributes={"encoding-type": "array", "encoding-version": "0.2.0", **complete},
        )  # fmt: skip
        writer = _AlignedAppender(x, rows_per_shard)
        step = max(1, block_bytes // max(1, n_vars * dtype.itemsize))
        with tqdm(total=n_rows, unit="cells", unit_scale=True, desc=f"write {label}", disable=not progress) as bar:
            for p0 in range(0, n_rows, step):
                with _mapped(bucket.path("rows"), dtype, (bucket.n_rows, n_vars)) as src:
                    writer.append(np.array(src[bucket_row[p0 : p0 + step]]))
                bar.update(min(step, n_rows - p0))
        writer.close()
        return
    nnz_in_bucket = np.fromfile(bucket.path("nnz"), dtype=np.int64)
    bucket_indptr = np.zeros(nnz_in_bucket.size + 1, dtype=np.int64)
    np.cumsum(nnz_in_bucket, out=bucket_indptr[1:])
    row_nnz = nnz_in_bucket[bucket_row]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    total = int(indptr[-1])
    group = root.create_group(
        name, attributes={"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_rows, n_vars]}
    )
    arrays = {}
    indices_dtype = layout.indices_dtype(n_vars)
    for part, dt, role in (("data", dtype, "values"), ("indices", indices_dtype, "indices")):
        arrays[part] = group.create_array(
            part, shape=(total,), dtype=dt, chunks=(layout.chunk_elements,),
            shards=(layout.shard_elements,), compressors=layout.compressors(role), attributes=complete,
        )  # fmt: skip
    indptr_array = group.create_array(
        "indptr", shape=(n_rows + 1,), dtype=np.int64, chunks=(n_rows + 1,),
        compressors=layout.compressors("indptr"), attributes=complete,
    )  # fmt: skip
    write_complete(indptr_array, 0, n_rows + 1, indptr)
    # Buckets hold int32 indices; the output may be narrower.
    dtypes = {"data": dtype, "indices": np.dtype(np.int32)}
    writers = {part: _AlignedAppender(arrays[part], layout.shard_elements) for part in arrays}
    # Each block gathers about block_bytes of entries (positions: 8 B each).
    row_bytes = row_nnz * (dtype.itemsize + 4 + 8)
    with tqdm(total=n_rows, unit="cells", unit_scale=True, desc=f"write {label}", disable=not progress) as bar:
        for p0, p1 in _blocks(row_bytes, block_bytes) if n_rows else []:
            pos = csr_row_positions(bucket_indptr, bucket_row[p0:p1])
            for part, writer in writers.items():
                with _mapped(bucket.path(part), dtypes[part], (total,)) as src:
                    writer.append(np.asarray(src[pos], dtype=arrays[part].dtype))
            del pos
            bar.update(p1 - p0)
    for w in writers.values():
        w.close()
