"""``create_store_from_h5ads``: many ``.h5ad`` files in, one shuffled store out.

Out-of-core in two passes, each bounded by the memory budget:

1. *scatter*: stream every input once, in row blocks, and append each row to
   the temporary bucket of the output file the global permutation sends it to;
2. *write*: for each output file, gather its bucket's rows in the permuted
   order (block by block) and write them, shard-aligned, into ``chunk_{i}.zarr``.

Only per-cell bookkeeping (the permutation, obs) is held for all cells at
once: tens of bytes per cell against kilobytes of X.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import psutil
import zarr
from tqdm.auto import tqdm

from .errors import InputFileError, StoreError
from .store import MANIFEST_NAME, StoreManifest, XLayout, chunk_file_name, use_zarrs, write_manifest

__all__ = ["create_store_from_h5ads", "parse_bytes"]

VarJoin = Literal["same", "inner", "outer"]

# Part of the budget kept for the libraries' own buffers (zarrs' threads,
# HDF5's chunk cache, pages of mapped buckets): measured at ~50 MiB, flat in
# the input size and budget.
_RESERVE = 64 * 2**20


# --------------------------------------------------------------------------- inputs


@dataclass
class _Input:
    """One scanned input file: what the plan needs, and how to map its genes."""

    path: Path
    label: str
    n_obs: int
    x_format: Literal["csr", "dense"]
    dtype: np.dtype
    var: pd.DataFrame
    obs: pd.DataFrame
    indptr: np.ndarray | None  # CSR only; O(n_obs) bookkeeping
    gene_map: np.ndarray | None = None  # input column -> output column, -1 = dropped


def _scan_input(path: Path, label: str) -> _Input:
    """Open one ``.h5ad`` and check it can be converted; raise naming the file if not."""
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, not an .h5ad file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: the file is empty (0 bytes)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputFileError(f"{path}: not an .h5ad (HDF5) file ({e})") from e
    with f:
        if "X" not in f:
            raise InputFileError(f"{path}: has no X matrix")
        if "obs" not in f or "var" not in f:
            raise InputFileError(f"{path}: not an AnnData file (no obs/var groups)")
        node = f["X"]
        encoding = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else None)
        try:
            obs = ad.io.read_elem(f["obs"])
            var = ad.io.read_elem(f["var"])
        except Exception as e:  # anndata raises many types for malformed elements
            raise InputFileError(f"{path}: cannot read obs/var ({type(e).__name__}: {e})") from e
        if encoding == "csc_matrix":
            raise InputFileError(
                f"{path}: X is stored as CSC (column-compressed); rows cannot be streamed from it. "
                "Convert it to CSR first, e.g. adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
            )
        if encoding == "csr_matrix":
            x_format, dtype = "csr", np.dtype(node["data"].dtype)
            indptr = node["indptr"][:].astype(np.int64)
            shape = tuple(int(s) for s in node.attrs["shape"])
        elif encoding == "array" and isinstance(node, h5py.Dataset) and node.ndim == 2:
            x_format, dtype, indptr, shape = "dense", np.dtype(node.dtype), None, node.shape
        else:
            raise InputFileError(f"{path}: X has unsupported encoding {encoding!r} (expected CSR or a dense array)")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise InputFileError(f"{path}: X has non-numeric dtype {dtype}")
    if shape != (len(obs), len(var)):
        raise InputFileError(f"{path}: X shape {shape} does not match obs x var ({len(obs)} x {len(var)})")
    if shape[0] == 0:
        raise InputFileError(f"{path}: has no cells (n_obs == 0)")
    if shape[1] == 0:
        raise InputFileError(f"{path}: has no genes (n_vars == 0)")
    return _Input(path, label, shape[0], x_format, dtype, var, obs, indptr)


def _join_var(inputs: list[_Input], var_join: VarJoin) -> pd.DataFrame:
    """Output var, and each input's ``gene_map`` onto it."""
    first = inputs[0]
    if var_join == "same":
        for inp in inputs[1:]:
            if not inp.var.index.equals(first.var.index):
                a, b = first.var.index, inp.var.index
                only_a, only_b = a.difference(b).size, b.difference(a).size
                detail = (
                    f"{len(a)} vs {len(b)} genes, {only_a} only in the first, {only_b} only in the second"
                    if only_a or only_b
                    else "same genes in a different order"
                )
                raise InputFileError(
                    f"var_names of {inp.path} differ from {first.path} ({detail}); "
                    "pass var_join='inner' or var_join='outer' to combine different gene sets"
                )
        names = first.var.index
    elif var_join in ("inner", "outer"):
        names = first.var.index
        for inp in inputs[1:]:
            if var_join == "inner":
                names = names[names.isin(inp.var.index)]
            else:
                names = names.append(inp.var.index[~inp.var.index.isin(names)])
        if len(names) == 0:
            raise InputFileError(
                f"var_join='inner': the inputs share no genes ({', '.join(str(i.path) for i in inputs)})"
            )
    else:
        raise ValueError(f"var_join must be 'same', 'inner' or 'outer', got {var_join!r}")
    for inp in inputs:
        if not inp.var.index.is_unique:
            raise InputFileError(f"{inp.path}: var_names are not unique; call adata.var_names_make_unique() first")
        inp.gene_map = names.get_indexer(inp.var.index).astype(np.int64)
    stacked = pd.concat([inp.var for inp in inputs])
    var = stacked[~stacked.index.duplicated(keep="first")].reindex(names)
    var.index = pd.Index(names.astype(str), dtype=object)
    return var


def _harmonise_obs(
    inputs: list[_Input], obs_columns: Sequence[str] | None, source_key: str | None
) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Concatenate every input's obs with one dtype per column.

    Categoricals (and strings, which anndata stores as categoricals anyway)
    get the union of categories in first-seen order; codes are remapped.
    """
    if obs_columns is None:
        columns: list[str] = []
        for inp in inputs:
            columns += [c for c in inp.obs.columns if c not in columns]
    else:
        columns = list(obs_columns)
    for inp in inputs:
        missing = [c for c in columns if c not in inp.obs.columns]
        if missing:
            raise InputFileError(
                f"{inp.path}: obs has no column(s) {missing}; pass obs_columns=[...] to keep only "
                "columns every input has"
            )
    if source_key is not None and source_key in columns:
        raise InputFileError(
            f"obs column {source_key!r} exists in the inputs and would be overwritten by the source "
            "file column; pass another source_key= (or source_key=None)"
        )
    schema: dict[str, dict] = {}
    parts = {c: [inp.obs[c] for inp in inputs] for c in columns}
    out = {}
    for c, series in parts.items():
        if any(isinstance(s.dtype, pd.CategoricalDtype) or not _is_plain_numeric(s) for s in series):
            categories: list = []
            seen: set = set()
            for s in series:
                cats = s.cat.categories if isinstance(s.dtype, pd.CategoricalDtype) else pd.unique(s.dropna())
                for v in cats:
                    if v not in seen:
                        seen.add(v)
                        categories.append(v)
            dtype = pd.CategoricalDtype(categories)
            out[c] = pd.Categorical(np.concatenate([s.astype(object).to_numpy() for s in series]), dtype=dtype)
            schema[c] = {"kind": "categorical", "categories": [_json_scalar(v) for v in categories]}
        else:
            dtype = np.result_type(*[s.dtype for s in series])
            out[c] = np.concatenate([s.to_numpy().astype(dtype) for s in series])
            schema[c] = {"kind": "numeric", "dtype": str(dtype)}
    if source_key is not None:
        labels = [inp.label for inp in inputs]
        codes = np.repeat(np.arange(len(inputs)), [inp.n_obs for inp in inputs])
        out[source_key] = pd.Categorical.from_codes(codes, categories=pd.Index(labels).unique())
        schema[source_key] = {"kind": "categorical", "categories": list(pd.Index(labels).unique())}
    index = pd.Index(np.concatenate([inp.obs.index.astype(str).to_numpy(dtype=object) for inp in inputs]))
    obs = pd.DataFrame(out, index=index, columns=list(out))
    return obs, schema


def _is_plain_numeric(s: pd.Series) -> bool:
    return s.dtype.kind in "biuf"


def _json_scalar(v):
    return v.item() if isinstance(v, np.generic) else v


# --------------------------------------------------------------------------- plan


def plan_output_files(n_obs: int, n_obs_per_file: int, shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The global order of cells and the output file boundaries.

    Returns ``(order, bounds)``: output position ``p`` holds global input cell
    ``order[p]``; output file ``j`` holds positions ``bounds[j]:bounds[j+1]``.
    Files get balanced sizes of at most ``n_obs_per_file`` cells.
    """
    n_files = max(1, -(-n_obs // n_obs_per_file))
    bounds = np.linspace(0, n_obs, n_files + 1).round().astype(np.int64)
    order = np.random.default_rng(seed).permutation(n_obs) if shuffle else np.arange(n_obs)
    return order, bounds


def parse_bytes(value: int | str) -> int:
    """``"512MB"``, ``"2GiB"``, ``"1.5G"`` or an int of bytes -> bytes."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"cannot parse a size from {value!r} (examples: 512MB, 2GiB, 1000000)")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


# --------------------------------------------------------------------------- buckets


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
        self.array[self.pos : self.pos + n] = buf[:n]
        self.pos += n
        rest = buf[n:]
        self._pending, self._pending_len = ([rest] if rest.shape[0] else []), rest.shape[0]

    def close(self) -> None:
        self._flush(final=True)
        if self.pos != self.array.shape[0]:
            raise RuntimeError(f"internal error: wrote {self.pos} of {self.array.shape[0]} elements")


# --------------------------------------------------------------------------- the conversion


def create_store_from_h5ads(
    adata_paths: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    *,
    shuffle: bool = True,
    seed: int = 0,
    n_obs_per_file: int = 2**20,
    var_join: VarJoin = "same",
    obs_columns: Sequence[str] | None = None,
    source_key: str | None = "source_file",
    memory_budget: int | str | None = None,
    layout: XLayout | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tmp_dir: str | os.PathLike | None = None,
) -> Path:
    """Convert ``.h5ad`` files into one shuffled arrayloaders store.

    Parameters
    ----------
    adata_paths
        Input ``.h5ad`` files, X stored as CSR or dense (CSC is refused).
    output_path
        The store directory to create: ``chunk_{i}.zarr`` AnnData (zarr v3)
        files plus ``arrayloaders.json``.
    shuffle
        Shuffle cells globally across all inputs; ``False`` keeps input order.
    seed
        Seed of the shuffle: the same inputs and seed give the same store.
    n_obs_per_file
        At most this many cells per ``chunk_{i}.zarr``; files get balanced sizes.
    var_join
        ``"same"`` (default) requires identical var_names in every input;
        ``"inner"`` keeps genes present in all inputs; ``"outer"`` keeps every
        gene (first-seen order), missing genes are zeros.
    obs_columns
        obs columns to keep (default: all; every input must have them).
    source_key
        Name of an added categorical obs column holding each cell's input
        path; ``None`` to leave it out.
    memory_budget
        Working memory of the conversion, in bytes or as ``"512MB"``/``"2GiB"``.
        Default: a quarter of available memory, at most 2 GiB. Per-cell
        bookkeeping (order, obs) comes on top: tens of bytes per cell.
    layout
        Chunking and compression of X (:class:`~arrayloaders.store.XLayout`).
    overwrite
        Replace an existing store at ``output_path``; otherwise refuse.
    progress
        Show progress bars with cells/s.
    tmp_dir
        Where temporary buckets go (about the size of the input X);
        default: inside ``output_path``.

    Returns
    -------
    The store path.

    Raises
    ------
    InputFileError
        An input is missing, not an ``.h5ad``, empty, CSC, or inconsistent
        with the others; the message names the file.
    StoreError
        ``output_path`` exists and ``overwrite`` is false.
    """
    use_zarrs()
    layout = layout or XLayout()
    budget = parse_bytes(memory_budget) if memory_budget is not None else _default_budget()
    if n_obs_per_file <= 0:
        raise ValueError(f"n_obs_per_file must be positive, got {n_obs_per_file}")
    paths = [Path(p) for p in adata_paths]
    if not paths:
        raise InputFileError("no input files given")
    out = Path(output_path)
    _prepare_output(out, overwrite)

    inputs = [_scan_input(p, str(p)) for p in paths]
    x_formats = {inp.x_format for inp in inputs}
    if len(x_formats) > 1:
        by = {f: [str(i.path) for i in inputs if i.x_format == f] for f in x_formats}
        raise InputFileError(f"inputs mix CSR and dense X (CSR: {by['csr']}; dense: {by['dense']}); convert them to one kind")
    x_format = x_formats.pop()
    dtype = np.result_type(*[inp.dtype for inp in inputs])
    var = _join_var(inputs, var_join)
    shard_bytes = layout.shard_bytes(x_format, len(var), dtype.itemsize)
    # A shard is buffered, concatenated and encoded whole (~4 copies): keep
    # that within half of the working memory, the row blocks take the other half.
    if _RESERVE + 8 * shard_bytes > budget:
        raise ValueError(
            f"memory_budget={budget} bytes is too small for X shards of {shard_bytes} bytes: it must be at "
            f"least {_RESERVE + 8 * shard_bytes}; raise memory_budget or pass a layout with smaller shards"
        )
    working = budget - _RESERVE
    obs, obs_schema = _harmonise_obs(inputs, obs_columns, source_key)
    n_obs = len(obs)
    order, bounds = plan_output_files(n_obs, n_obs_per_file, shuffle, seed)

    work = Path(tmp_dir) if tmp_dir is not None else out
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".arrayloaders-tmp-", dir=work))
    try:
        buckets = _scatter(inputs, order, bounds, len(var), dtype, x_format == "dense", working, progress, scratch)
        files = []
        for j, bucket in enumerate(buckets):
            name = chunk_file_name(j)
            lo, hi = bounds[j], bounds[j + 1]
            _write_output_file(
                out / name, bucket, order[lo:hi], obs.iloc[order[lo:hi]], var, dtype, layout, working, progress, j
            )
            files.append({"name": name, "n_obs": int(hi - lo)})
            shutil.rmtree(bucket.dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    write_manifest(
        out,
        StoreManifest(
            n_obs=n_obs,
            n_vars=len(var),
            x_format=x_format,
            dtype=str(dtype),
            files=files,
            inputs=[{"path": str(inp.path), "n_obs": inp.n_obs} for inp in inputs],
            var_names=[str(v) for v in var.index],
            obs_schema=obs_schema,
            layout={"x": asdict(layout), "zarr_format": 3},
            shuffle=shuffle,
            seed=seed,
            var_join=var_join,
            source_key=source_key,
        ),
    )
    return out


def _default_budget() -> int:
    return int(min(2 * 2**30, psutil.virtual_memory().available / 4))


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise StoreError(f"{out}: already exists and is not empty; pass overwrite=True to replace it")
        # Drop the manifest first: if we are killed while deleting, what is
        # left no longer opens as a store.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _read_block(inp: _Input, f: h5py.File, r0: int, r1: int, n_vars: int, dtype: np.dtype):
    """Rows ``r0:r1`` of one input, genes mapped onto the output var."""
    if inp.x_format == "dense":
        block = f["X"][r0:r1].astype(dtype, copy=False)
        if np.array_equal(inp.gene_map, np.arange(n_vars)):
            return block
        out = np.zeros((r1 - r0, n_vars), dtype=dtype)
        keep = inp.gene_map >= 0
        out[:, inp.gene_map[keep]] = block[:, keep]
        return out
    a, b = inp.indptr[r0], inp.indptr[r1]
    data = f["X/data"][a:b].astype(dtype, copy=False)
    indices = f["X/indices"][a:b]
    indptr = inp.indptr[r0 : r1 + 1] - a
    if not np.array_equal(inp.gene_map, np.arange(n_vars)):
        mapped = inp.gene_map[indices]
        keep = mapped >= 0
        row_of = np.repeat(np.arange(r1 - r0), np.diff(indptr))[keep]
        mapped, data = mapped[keep], data[keep]
        # Genes of a row must stay sorted after re-indexing onto the new var.
        order = np.lexsort((mapped, row_of))
        data, indices = data[order], mapped[order]
        indptr = np.zeros(r1 - r0 + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=r1 - r0), out=indptr[1:])
    return data, indices.astype(np.int32, copy=False), indptr


def _row_bytes(inp: _Input, n_vars: int, itemsize: int) -> np.ndarray:
    """Bytes each row of an input takes in memory (for budget-sized blocks)."""
    if inp.x_format == "dense":
        return np.full(inp.n_obs, max(n_vars, len(inp.var)) * itemsize, dtype=np.int64)
    return np.diff(inp.indptr) * (itemsize + 4) + 8


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


def _scatter(inputs, order, bounds, n_vars, dtype, dense, budget, progress, scratch) -> list[_Bucket]:
    """Pass 1: stream inputs once, appending each row to its output file's bucket."""
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    dest_file = np.searchsorted(bounds, position, side="right") - 1
    del position
    buckets = [_Bucket(scratch / f"bucket_{j}", dense) for j in range(len(bounds) - 1)]
    # A block is held about four times over (read, re-indexed, gathered per
    # destination, written) and allocator slack doubles that: a sixteenth.
    block_bytes = max(1, budget // 16)
    offset = 0
    with tqdm(total=order.size, unit="cells", unit_scale=True, desc="shuffle", disable=not progress) as bar:
        for inp in inputs:
            with h5py.File(inp.path, "r") as f:
                for r0, r1 in _blocks(_row_bytes(inp, n_vars, dtype.itemsize), block_bytes):
                    block = _read_block(inp, f, r0, r1, n_vars, dtype)
                    dest = dest_file[offset + r0 : offset + r1]
                    rows_by_dest = np.argsort(dest, kind="stable")
                    cuts = np.searchsorted(dest[rows_by_dest], np.arange(len(buckets) + 1))
                    for j in np.flatnonzero(np.diff(cuts)):
                        rows = rows_by_dest[cuts[j] : cuts[j + 1]]
                        if dense:
                            buckets[j].append_dense(block[rows])
                        else:
                            data, indices, indptr = block
                            pos = csr_row_positions(indptr, rows)
                            buckets[j].append_csr(data[pos], indices[pos], np.diff(indptr)[rows])
                    del block
                    bar.update(r1 - r0)
            offset += inp.n_obs
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


def _write_output_file(path, bucket, ids, obs, var, dtype, layout, budget, progress, j) -> None:
    """Pass 2: write one ``chunk_{j}.zarr`` from its bucket, rows in ``ids`` order."""
    # The bucket holds this file's cells in increasing global id: the bucket
    # row of cell ids[p] is its rank among the sorted ids.
    bucket_row = np.searchsorted(np.sort(ids), ids)
    n_vars = len(var)
    obs = obs.copy()
    obs.index = pd.Index(obs.index.astype(str), dtype=object)
    # Write the AnnData skeleton (obs, var, empty mappings) with anndata
    # itself; X is added below with our chunking and sharding.
    with _quiet_consolidation(), ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        ad.AnnData(obs=obs, var=var).write_zarr(path)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    _write_x(root, bucket, bucket_row, n_vars, dtype, layout, budget, progress, path.name)
    # anndata consolidated the skeleton's metadata; X must be in it, or
    # read_zarr would not see X.
    with _quiet_consolidation():
        zarr.consolidate_metadata(path)


@contextmanager
def _quiet_consolidation():
    with warnings.catch_warnings():
        # Consolidated metadata is not in the zarr v3 spec yet; anndata uses it anyway.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def _write_x(root, bucket, bucket_row, n_vars, dtype, layout, budget, progress, name) -> None:
    n_rows = bucket_row.size
    block_bytes = max(1, budget // 16)
    if bucket.dense:
        rows_per_chunk, rows_per_shard = layout.dense_rows(n_vars, dtype.itemsize)
        x = root.create_array(
            "X", shape=(n_rows, n_vars), dtype=dtype, chunks=(rows_per_chunk, n_vars),
            shards=(rows_per_shard, n_vars), compressors=layout.compressors(),
        )  # fmt: skip
        x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        writer = _AlignedAppender(x, rows_per_shard)
        step = max(1, block_bytes // max(1, n_vars * dtype.itemsize))
        with tqdm(total=n_rows, unit="cells", unit_scale=True, desc=f"write {name}", disable=not progress) as bar:
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
        "X", attributes={"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_rows, n_vars]}
    )
    arrays = {}
    indices_dtype = layout.indices_dtype(n_vars)
    for name, dt, role in (("data", dtype, "values"), ("indices", indices_dtype, "indices")):
        arrays[name] = group.create_array(
            name, shape=(total,), dtype=dt, chunks=(layout.chunk_elements,),
            shards=(layout.shard_elements,), compressors=layout.compressors(role),
        )  # fmt: skip
    indptr_array = group.create_array(
        "indptr", shape=(n_rows + 1,), dtype=np.int64, chunks=(min(2**16, n_rows + 1),),
        compressors=layout.compressors("indices"),
    )  # fmt: skip
    indptr_array[:] = indptr
    # Buckets hold int32 indices; the output may be narrower.
    dtypes = {"data": dtype, "indices": np.dtype(np.int32)}
    writers = {name: _AlignedAppender(arrays[name], layout.shard_elements) for name in arrays}
    # Each block gathers about block_bytes of entries (positions: 8 B each).
    row_bytes = row_nnz * (dtype.itemsize + 4 + 8)
    with tqdm(total=n_rows, unit="cells", unit_scale=True, desc=f"write {name}", disable=not progress) as bar:
        for p0, p1 in _blocks(row_bytes, block_bytes) if n_rows else []:
            pos = csr_row_positions(bucket_indptr, bucket_row[p0:p1])
            for name in writers:
                with _mapped(bucket.path(name), dtypes[name], (total,)) as src:
                    writers[name].append(np.asarray(src[pos], dtype=arrays[name].dtype))
            del pos
            bar.update(p1 - p0)
    for w in writers.values():
        w.close()
