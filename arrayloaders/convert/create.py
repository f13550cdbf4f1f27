"""``create_store_from_h5ads``: many ``.h5ad`` files in, one shuffled store out.

This module checks and scans the inputs, joins their var and obs (one dtype
per column: ``columns.py``), chooses the layers and obsm arrays to carry and
plans the output. The two out-of-core passes that move X, layers, obsm and
obs (as fixed-width records: ``obs_records.py``) are in ``buckets.py``;
building the store beside its output and swapping it in is ``output.py``'s.
For all cells at once only each cell's output file is held (1 byte per cell
up to 256 output files), and, while it is drawn, the permutation (8 bytes
per cell), which then waits on disk.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import psutil

from ..byte_sizes import parse_bytes
from ..errors import ConversionWarning, InputFileError
from ..interrupts import sigint_deferred
from ..store.format import XLayout, chunk_file_name, use_zarrs
from ..store.manifest import StoreManifest, write_manifest
from .buckets import InputFile, Matrix, Part, check_indptr, output_file_of, read_indptr, scatter, write_output_file
from .columns import check_name, harmonise_frames, join_columns
from .jobs import Jobs, available_cores
from .obs_records import InputObs, column_order, plan_obs
from .output import remove_tree, scratch_directory
from .upload import RemoteOutput, prepare_output

__all__ = ["create_store_from_h5ads"]

VarJoin = Literal["same", "inner", "outer"]
ObsJoin = Literal["outer", "inner"]

# Part of the budget kept for the libraries' own buffers (zarrs' threads,
# HDF5's chunk cache, pages of mapped buckets): measured at ~50 MiB, flat in
# the input size and budget.
_RESERVE = 64 * 2**20
# Stored values of X (all inputs) from which n_jobs=None uses every core.
_PARALLEL_FROM = 2**25


# --------------------------------------------------------------------------- inputs


def _input_paths(adata_paths) -> list[Path]:
    """The inputs as paths: a list (not one path), each file once, whatever its spelling."""
    if isinstance(adata_paths, (str, bytes, os.PathLike)):
        one = os.fsdecode(adata_paths)
        raise InputFileError(f"adata_paths must be a list of .h5ad paths, not a single path ({one!r}); pass [{one!r}]")
    paths = []
    for i, p in enumerate(adata_paths):
        if not isinstance(p, (str, bytes, os.PathLike)):
            raise InputFileError(f"adata_paths[{i}] is a {type(p).__name__}, not a path")
        paths.append(Path(os.fsdecode(p)))
    if not paths:
        raise InputFileError("no input files given")
    seen: dict = {}
    for p in paths:
        try:
            st = p.stat()
            key = (st.st_dev, st.st_ino)  # the same file through links, .. or another spelling
        except OSError:
            key = os.path.realpath(p)  # missing: reported, naming the file, when it is scanned
        if key in seen:
            also = f" (also given as {seen[key]})" if str(seen[key]) != str(p) else ""
            raise InputFileError(f"{p}: given twice{also}; each input file may appear once")
        seen[key] = p
    return paths


def _scan_input(path: Path, label: str) -> InputFile:
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
        if not isinstance(f.get("obs"), h5py.Group) or not isinstance(f.get("var"), h5py.Group):
            # anndata 0.12 writes a column named "" over its whole dataframe
            raise InputFileError(f"{path}: not an AnnData file (no obs/var groups)")
        node = f["X"]
        encoding = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else None)
        dropped = _not_carried(f)
        n_obs = InputObs(path, f).n_obs  # obs itself is read in row blocks, when planned (obs_records.py)
        for name in column_order(f["var"]):  # every var column is kept (var columns are joined outer)
            check_name(str(path), "var column", name)
        try:
            var = ad.io.read_elem(f["var"])
        except Exception as e:  # anndata raises many types for malformed elements
            raise InputFileError(f"{path}: cannot read var ({type(e).__name__}: {e})") from e
        if encoding == "csc_matrix":
            raise InputFileError(
                f"{path}: X is stored as CSC (column-compressed); rows cannot be streamed from it. "
                "Convert it to CSR first, e.g. adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
            )
        if encoding == "csr_matrix":
            x_format, dtype = "csr", np.dtype(node["data"].dtype)
            indptr = node["indptr"][:].astype(np.int64)  # checked now, read again by the passes
            shape = tuple(int(s) for s in node.attrs["shape"])
            nnz = node["data"].shape[0]
            if node["indices"].shape[0] != nnz:
                raise InputFileError(
                    f"{path}: X/indices has {node['indices'].shape[0]} entries but X/data {nnz} (damaged file)"
                )
            check_indptr(path, "X", indptr, shape[0], nnz)
            n_values = nnz
        elif encoding == "array" and isinstance(node, h5py.Dataset) and node.ndim == 2:
            x_format, dtype, indptr, shape = "dense", np.dtype(node.dtype), None, node.shape
            n_values = shape[0] * shape[1]
        else:
            raise InputFileError(f"{path}: X has unsupported encoding {encoding!r} (expected CSR or a dense array)")
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise InputFileError(f"{path}: X has non-numeric dtype {dtype}")
        if shape != (n_obs, len(var)):
            raise InputFileError(f"{path}: X shape {shape} does not match obs x var ({n_obs} x {len(var)})")
        if shape[0] == 0:
            raise InputFileError(f"{path}: has no cells (n_obs == 0)")
        if shape[1] == 0:
            raise InputFileError(f"{path}: has no genes (n_vars == 0)")
        elements = {kind: _scan_elements(path, f, kind, *shape) for kind in ("layers", "obsm")}
    # Names as plain str: files of pandas 3 hold its string dtype, which never
    # equals an object index of the same names.
    var.index = _str_index(var.index)
    return InputFile(path, label, shape[0], x_format, dtype, var, n_values=int(n_values), dropped=dropped, **elements)


def _numeric(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.number) or dtype == np.bool_)


def _scan_elements(path: Path, f: h5py.File, kind: str, n_obs: int, n_vars: int) -> dict[str, Matrix | str]:
    """Each ``layers``/``obsm`` entry of an open ``.h5ad``: what the passes need to read it, or why it cannot be carried.

    Carried: a layer stored as CSR or as a dense 2-d array (n_obs x n_vars),
    an obsm array stored dense (n_obs x k, k > 0); of a number or bool dtype.
    Anything else (a CSC layer, a sparse or DataFrame obsm) gets the reason
    it is not carried. An entry whose shape does not fit the file is damage:
    raised, naming the file.
    """
    group = f.get(kind)
    if group is None:
        return {}
    if not isinstance(group, h5py.Group):
        # anndata 0.12 writes a key "" over the whole element
        raise InputFileError(f"{path}: {kind} is not a group (a damaged file, or one written with an empty {kind} key)")
    out: dict[str, Matrix | str] = {}
    for key, node in _entries(group):
        where = f"{kind}/{key}"
        encoding = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else None)
        try:
            if encoding == "csr_matrix" and kind == "layers":
                fmt, dtype = "csr", np.dtype(node["data"].dtype)
                shape = tuple(int(s) for s in node.attrs["shape"])
            elif encoding == "array" and isinstance(node, h5py.Dataset) and node.ndim == 2:
                fmt, dtype, shape = "dense", np.dtype(node.dtype), tuple(node.shape)
            elif encoding == "csc_matrix" and kind == "layers":
                out[key] = "stored as CSC (column-compressed): rows cannot be streamed from it"
                continue
            elif kind == "obsm" and encoding in ("csr_matrix", "csc_matrix"):
                out[key] = f"sparse ({encoding}): only dense obsm arrays are carried"
                continue
            else:
                what = "a dense 2-d array" if kind == "obsm" else "CSR or a dense 2-d array"
                out[key] = f"has encoding {encoding!r}; only {what} is carried"
                continue
        except (KeyError, OSError) as e:
            raise InputFileError(f"{path}: {where} cannot be read ({e}; damaged file)") from e
        expected = (n_obs, n_vars) if kind == "layers" else (n_obs, shape[1])
        if shape != expected:
            raise InputFileError(f"{path}: {where} has shape {shape}, X has {n_obs} x {n_vars} (damaged file)")
        if not _numeric(dtype):
            out[key] = f"has dtype {dtype}; only numbers and bools are carried"
        elif shape[1] == 0:
            out[key] = "has no columns"
        else:
            out[key] = Matrix(where, fmt, dtype, shape[1])
    return out


def _entries(group: h5py.Group, prefix: str = "") -> Iterator[tuple[str, h5py.Group | h5py.Dataset]]:
    """The elements of a ``layers``/``obsm`` group by their AnnData key: an element anndata 0.12 wrote under a
    key with a ``/`` is nested in groups without an encoding (``layers/a/b`` for key ``"a/b"``)."""
    for name in group:
        node = group[name]
        if isinstance(node, h5py.Group) and "encoding-type" not in node.attrs and len(node):
            yield from _entries(node, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", node


# Elements of an AnnData that the store never holds: the conversion says so.
_NOT_CARRIED = ("obsp", "raw")

Kind = Literal["layers", "obsm"]


def _not_carried(f: h5py.File) -> dict[str, list[str]]:
    """What of an open ``.h5ad`` the store never holds: {"obsp": ["distances"], "raw": []}."""
    out = {}
    for name in _NOT_CARRIED:
        node = f.get(name)
        if node is None or (isinstance(node, h5py.Group) and name != "raw" and not len(node)):
            continue
        if name == "raw" and node.attrs.get("encoding-type") == "null":
            continue
        out[name] = sorted(node) if name != "raw" and isinstance(node, h5py.Group) else []
    return out


def _requested(value, argument: str) -> list[str] | None:
    """``layers=``/``obsm_keys=`` as a list of names (one name may be given as a str), or None for the default."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"{argument} must be a list of names (non-empty, without '/'), got {name!r} in it")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{argument} names {', '.join(map(repr, twice))} more than once")
    return names


def _choose(inputs: list[InputFile], kind: Kind, requested: list[str] | None) -> list[str]:
    """The layers (or obsm keys) to carry: those requested, or by default those every input can give.

    A requested key that an input lacks or cannot give raises naming the
    file. Kept keys must agree across inputs: a layer has one format (CSR or
    dense) everywhere (its dtype is promoted, as X's is); an obsm array has
    one width and one dtype everywhere.
    """
    if requested is None:
        first = inputs[0]
        keep = [k for k in getattr(first, kind) if all(isinstance(getattr(i, kind).get(k), Matrix) for i in inputs)]
        for key in keep:  # requested keys are checked as arguments (_requested)
            check_name(str(first.path), f"{kind} key", key, f"{'layers' if kind == 'layers' else 'obsm_keys'}=[...]")
    else:
        keep = requested
        for key in requested:
            for inp in inputs:
                found = getattr(inp, kind)
                if key not in found:
                    has = ", ".join(map(repr, found)) or "none"
                    raise InputFileError(f"{inp.path}: has no {kind} {key!r} (it has {has})")
                if not isinstance(found[key], Matrix):
                    raise InputFileError(f"{inp.path}: {kind} {key!r} cannot be carried: {found[key]}")
    for key in keep:
        matrices = [(inp, getattr(inp, kind)[key]) for inp in inputs]
        agree = (("format", "format"),) if kind == "layers" else (("n_cols", "width"), ("dtype", "dtype"))
        for attribute, what in agree:
            values = {getattr(m, attribute) for _, m in matrices}
            if len(values) > 1:
                by = {}
                for inp, m in matrices:
                    by.setdefault(getattr(m, attribute), []).append(str(inp.path))
                shown = "; ".join(f"{_shown(v)} in {', '.join(paths)}" for v, paths in by.items())
                leave_out = f"{'layers' if kind == 'layers' else 'obsm_keys'}=[...]"
                raise InputFileError(
                    f"{kind} {key!r} differs in {what} across the inputs ({shown}); make it agree or leave it out "
                    f"with {leave_out}"
                )
    return keep


def _shown(value) -> str:
    """A format, width or dtype as an error message shows it."""
    if isinstance(value, str):
        return "CSR" if value == "csr" else "dense"
    return f"{value} columns" if isinstance(value, int) else str(value)


def _warn_not_carried(inputs: list[InputFile], kept: dict[str, list[str]], defaults: dict[str, bool]) -> None:
    """One warning for the whole conversion, naming each dropped element, why, and the files that have it.

    Dropped: layers and obsm keys the default leaves out (not in every input,
    or not of a kind the store holds), ``obsp`` and ``raw``. Keys left out
    of an explicit ``layers=``/``obsm_keys=`` list were the caller's choice:
    not named.
    """
    files: dict[str, list[str]] = {}
    for inp in inputs:
        for kind in ("layers", "obsm"):
            if not defaults[kind]:
                continue
            for key, m in getattr(inp, kind).items():
                if key not in kept[kind]:
                    why = "not in every input" if isinstance(m, Matrix) else m
                    files.setdefault(f"{kind} {key!r} ({why})", []).append(str(inp.path))
        for name, keys in inp.dropped.items():
            what = f"{name} {', '.join(repr(k) for k in keys)}" if keys else name
            files.setdefault(f"{what} (not carried)", []).append(str(inp.path))
    if files:
        listed = "; ".join(f"{what} from {', '.join(paths)}" for what, paths in files.items())
        message = f"the store does not hold these elements of the inputs: {listed}"
        warnings.warn(message, ConversionWarning, stacklevel=3)


def _check_layers(inputs: list[InputFile], layers: list[str]) -> None:
    """Read and check the row pointer of every kept CSR layer now, before any output is written."""
    for inp in inputs:
        csr = [inp.layers[name] for name in layers if inp.layers[name].format == "csr"]
        if not csr:
            continue
        with h5py.File(inp.path, "r") as f:
            for m in csr:
                read_indptr(inp, f, m)


def _join_var(inputs: list[InputFile], var_join: VarJoin) -> pd.DataFrame:
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
    # Each gene's var values come from the first input that has it; columns
    # are harmonised over all inputs (outer join), as obs columns are.
    frames, labels = [inp.var for inp in inputs], [str(inp.path) for inp in inputs]
    columns = join_columns(frames, labels, "outer", what="var")
    values, _ = harmonise_frames(frames, labels, columns, what="var")
    stacked = np.concatenate([inp.var.index.to_numpy(dtype=object) for inp in inputs])
    first = ~pd.Index(stacked).duplicated(keep="first")
    rows = np.flatnonzero(first)[pd.Index(stacked[first]).get_indexer(names)]
    return pd.DataFrame({c: v.take(rows) for c, v in values.items()}, index=_str_index(names), columns=columns)


def _str_index(index) -> pd.Index:
    """Names as a plain ``object`` index of ``str`` (pandas 3 would infer its string dtype, which anndata 0.12 will not write)."""
    return pd.Index(np.asarray(pd.Index(index).astype(str), dtype=object), dtype=object)


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


# --------------------------------------------------------------------------- the conversion


def create_store_from_h5ads(
    adata_paths: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    *,
    shuffle: bool = True,
    seed: int = 0,
    n_obs_per_file: int = 2**20,
    var_join: VarJoin = "same",
    obs_join: ObsJoin = "outer",
    obs_columns: Sequence[str] | None = None,
    source_key: str | None = "source_file",
    memory_budget: int | str | None = None,
    layout: XLayout | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tmp_dir: str | os.PathLike | None = None,
    layers: Sequence[str] | None = None,
    obsm_keys: Sequence[str] | None = None,
    n_jobs: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path | str:
    """Convert ``.h5ad`` files into one shuffled arrayloaders store.

    The store is built in a hidden sibling directory of ``output_path`` and
    moved into place only when complete, so ``output_path`` is always either
    absent, the complete old store, or the complete new one; a failed or
    killed conversion leaves nothing behind (a killed one's directory is
    removed by the next conversion to the same output).

    **obs (and var) columns get one dtype each**, whatever each input holds:

    - A column that is text in any input (categorical, with any categories,
      or strings: ``object`` or a pandas string dtype) becomes a categorical
      of strings. Values are rendered with ``str`` (so ``3`` and ``"3"`` are
      one category), categories come in first-seen order, missing values
      stay missing (code -1).
    - That categorical is ordered iff every input holding the column holds
      it as an ordered categorical with the same categories in the same
      order (inputs without the column do not count). If one input has it
      ordered and another differs, it is stored unordered with a
      :class:`~arrayloaders.errors.ConversionWarning` naming the column, the
      first ordered input and the first input that differs.
    - Otherwise it stays numeric: bool if bool everywhere; ints (and bools,
      as 0/1) widen to the narrowest int holding all; any float gives the
      float numpy promotes to (ints must be exactly representable), missing
      values as NaN.
    - A bool or int column with a missing value in some input (pandas'
      nullable ``Int64``/``boolean``), or that some input lacks (outer
      join), becomes nullable (``boolean``, ``Int64`` or the nullable int of
      its width), so values stay exact.
    - Other dtypes (dates, complex numbers) are refused with an
      :class:`~arrayloaders.errors.InputFileError` naming file and column.
    - So are names a zarr store cannot hold as keys, before anything is
      written: an obs or var column, a layer or an obsm key that holds a
      ``/`` (zarr's path separator; anndata 0.12 wrote such keys to
      ``.h5ad`` files as nested groups) or is empty. Escaping the ``/``
      would rename the column, so it is refused: rename it, or leave it out
      (``obs_columns``, ``layers``, ``obsm_keys``).

    Each column's result is recorded in the manifest's ``obs_schema`` (kind,
    dtype, categories, whether it has missing values, ``"ordered": true``
    for an ordered categorical). Every file opens with
    ``anndata.read_zarr`` on anndata 0.12 and 0.13 without changing anndata
    settings (names and categories are written as plain strings).

    Parameters
    ----------
    adata_paths
        A list of input ``.h5ad`` files, X stored as CSR or dense (CSC is
        refused); each file once.
    output_path
        The store directory to create: ``chunk_{i}.zarr`` AnnData (zarr v3)
        files plus ``arrayloaders.json``. It must not be, or contain, an
        input (symlinks and ``..`` are resolved).
    shuffle
        Shuffle cells globally across all inputs; ``False`` keeps input order.
    seed
        Seed of the shuffle: the same inputs and seed give the same store.
    n_obs_per_file
        At most this many cells per ``chunk_{i}.zarr``; files get balanced sizes.
    var_join
        ``"same"`` (default) requires identical var_names in every input;
        ``"inner"`` keeps genes present in all inputs; ``"outer"`` keeps every
        gene (first-seen order), missing genes are zeros. var columns are
        kept from all inputs (harmonised as obs columns are); a gene's values
        come from the first input that has it.
    obs_join
        ``"outer"`` (default, as ``anndata.concat``): keep every obs column
        of any input, missing values for the cells of inputs without it;
        ``"inner"``: keep only the columns every input has.
    obs_columns
        obs columns to keep (default: as ``obs_join`` says). Under
        ``obs_join="outer"`` a column some inputs lack is filled with missing
        values; under ``"inner"`` every input must have it.
    source_key
        Name of an added categorical obs column holding each cell's input
        path (non-empty, without ``/``); ``None`` to leave it out.
    memory_budget
        Working memory of the conversion, in bytes or as ``"512MB"``/``"2GiB"``.
        Default: a quarter of available memory, at most 2 GiB. On top come
        9 bytes per cell while the shuffle is drawn (then 1-2), and the
        bookkeeping of one output file: obs and row positions of its cells
        (``n_obs_per_file`` bounds it).
    layout
        Chunking and compression of X (:class:`~arrayloaders.XLayout`).
    overwrite
        Replace an existing store at ``output_path`` (swapped atomically, the
        old one deleted afterwards); otherwise refuse. Only an arrayloaders
        store that holds nothing but its own files is ever replaced.
    progress
        Show progress bars with cells/s.
    tmp_dir
        Where temporary buckets go (about the size of the inputs' X, layers
        and obsm together), outside ``output_path``; default: inside the new
        store's hidden directory.
    layers
        Layers to carry (a list of names; one name may be a str). Each is
        written into every file at ``layers/<name>`` with X's layout: CSR or
        dense as in the inputs (a layer CSR in one input and dense in another
        is refused), the same codecs and checksums, the same shuffled rows
        and the same var columns after ``var_join``; its dtype is promoted
        over the inputs as X's is. Default ``None``: every layer that all
        inputs have (CSR or dense); layers only some inputs have, and CSC
        layers, are dropped and named in one :class:`ConversionWarning`.
        A requested layer that an input lacks (or holds as CSC) raises an
        :class:`InputFileError` naming the file; ``[]`` carries none.
    obsm_keys
        obsm arrays to carry, as ``layers`` chooses layers. Each is a dense
        ``(n_obs, k)`` array in every input, with one ``k`` and one dtype
        (otherwise refused, naming the files), written at ``obsm/<key>`` with
        the rows shuffled with X. Sparse and DataFrame obsm entries are not
        carried: dropped with the warning by default, an error if requested.
        ``raw`` and ``obsp`` are never carried (named in the warning).
    n_jobs
        Processes that read the inputs (one input each at a time) and write
        the output files (one file each at a time). Default: the cores this
        process may use, once the inputs hold 2^25 values of X or more (one
        process below that: starting one costs about 2 s). ``memory_budget``
        is shared among them; each also holds the bookkeeping of the output
        file it writes. The store is the same, byte for byte, whatever
        ``n_jobs``.
    storage_options
        With ``output_path`` a URL of object storage (``s3://bucket/prefix``,
        ``gs://``, ``az://``): the keyword arguments of
        ``obstore.store.from_url`` (credentials from the environment
        without them). The store is built in ``tmp_dir`` (default: the
        system's temporary directory; it needs the store's size plus the
        buckets') and uploaded, each object checked, the manifest last; the
        files go under a prefix of their own (``g-<store_id>/``), so readers of
        a store it replaces never read its bytes. See :doc:`/remote`.

    Returns
    -------
    The store path.

    Raises
    ------
    InputFileError
        An input is missing, not an ``.h5ad``, empty, CSC, damaged, given
        twice, has an obs column the rule cannot store, a key zarr cannot
        hold (with ``/``, or empty), or is inconsistent with the others; the
        message names the file (and the column or key).
    StoreError
        ``output_path`` is or contains an input, is a file, or is a non-empty
        directory and ``overwrite`` is false or it is not an arrayloaders
        store (or holds files the store does not account for).
    """
    use_zarrs()
    if n_jobs is not None and (not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1):
        raise ValueError(f"n_jobs must be a positive int or None (all cores), got {n_jobs!r}")
    if source_key is not None and (not isinstance(source_key, str) or not source_key or "/" in source_key):
        raise ValueError(f"source_key must be a non-empty name without '/' (or None), got {source_key!r}")
    layout = layout or XLayout()
    budget = parse_bytes(memory_budget) if memory_budget is not None else _default_budget()
    if n_obs_per_file <= 0:
        raise ValueError(f"n_obs_per_file must be positive, got {n_obs_per_file}")
    requested = {"layers": _requested(layers, "layers"), "obsm": _requested(obsm_keys, "obsm_keys")}
    paths = _input_paths(adata_paths)
    output = prepare_output(output_path, paths, overwrite, tmp_dir, storage_options)  # checked before any work

    inputs = [_scan_input(p, str(p)) for p in paths]
    kept = {kind: _choose(inputs, kind, requested[kind]) for kind in ("layers", "obsm")}
    _warn_not_carried(inputs, kept, {kind: requested[kind] is None for kind in kept})
    x_formats = {inp.x_format for inp in inputs}
    if len(x_formats) > 1:
        by = {f: [str(i.path) for i in inputs if i.x_format == f] for f in x_formats}
        raise InputFileError(f"inputs mix CSR and dense X (CSR: {by['csr']}; dense: {by['dense']}); convert them to one kind")
    x_format = x_formats.pop()
    dtype = np.result_type(*[inp.dtype for inp in inputs])
    var = _join_var(inputs, var_join)
    # X, then each layer (its format, its dtype promoted over the inputs as X's is), then each obsm array.
    layer_parts = {
        name: Part(f"layers/{name}", [], len(var), np.result_type(*[i.layers[name].dtype for i in inputs]))
        for name in kept["layers"]
    }
    obsm_parts = {
        key: Part(f"obsm/{key}", [], inputs[0].obsm[key].n_cols, inputs[0].obsm[key].dtype) for key in kept["obsm"]
    }
    parts = [Part("X", [], len(var), dtype), *layer_parts.values(), *obsm_parts.values()]
    formats = {"X": x_format, **{p.path: inputs[0].layers[n].format for n, p in layer_parts.items()}}
    formats.update({p.path: "dense" for p in obsm_parts.values()})
    # A shard is buffered, concatenated and encoded whole (~4 copies): keep
    # that within half of the working memory, the row blocks take the other half.
    shard_bytes, largest = max((layout.shard_bytes(formats[p.path], p.n_cols, p.dtype.itemsize), p.path) for p in parts)
    if _RESERVE + 8 * shard_bytes > budget:
        raise ValueError(
            f"memory_budget={budget} bytes is too small for {largest} shards of {shard_bytes} bytes: it must be at "
            f"least {_RESERVE + 8 * shard_bytes}; raise memory_budget or pass a layout with smaller shards"
        )
    _check_layers(inputs, kept["layers"])
    working = budget - _RESERVE
    if n_jobs is None:  # starting processes (~2 s each) pays off only for large inputs
        n_jobs = available_cores() if sum(inp.n_values for inp in inputs) >= _PARALLEL_FROM else 1
    obs = plan_obs(paths, [inp.label for inp in inputs], obs_join, obs_columns, source_key)
    n_obs = sum(inp.n_obs for inp in inputs)
    order, bounds = plan_output_files(n_obs, n_obs_per_file, shuffle, seed)
    dest_file = output_file_of(order, bounds)
    obs_part = Part("obs", [], 1, obs.dtype)

    # Everything is built in a hidden sibling of the output and moved into
    # place once complete; an error or Ctrl-C anywhere below removes it.
    with output as staged:
        scratch = scratch_directory(Path(tmp_dir) if tmp_dir is not None else staged.path)
        jobs = Jobs(n_jobs)
        try:
            # The order waits on disk while pass 1 runs: per cell, only its output file is held.
            order_file = scratch / "order.bin"
            order.tofile(order_file)
            del order
            # Pass 1 element by element (scratch holds them all: about the size of the inputs' X,
            # layers, obsm and obs), then pass 2 file by file.
            n_files = len(bounds) - 1
            for i, part in enumerate([*parts, obs_part]):
                dense = part is obs_part or formats[part.path] == "dense"
                part.buckets = scatter(
                    inputs, part.path, dest_file, n_files, part.n_cols, part.dtype, dense, working, progress,
                    scratch / f"element_{i}", obs if part is obs_part else None, jobs,
                )  # fmt: skip
            del dest_file
            files = [{"name": chunk_file_name(j), "n_obs": int(bounds[j + 1] - bounds[j])} for j in range(n_files)]
            # Files are written in rounds of one per process, so that only their ids are held at once.
            for first in range(0, n_files, jobs.n):
                round_ = range(first, min(first + jobs.n, n_files))
                # Each process's zarrs gets its share of the cores, not all of them.
                threads = None if len(round_) == 1 else max(1, available_cores() // len(round_))
                tasks = [
                    (threads, staged.path / files[j]["name"], parts, _ids(order_file, bounds, j), obs,
                     obs_part.buckets[j], var, layout, working // len(round_), progress and len(round_) == 1, j)
                    for j in round_
                ]  # fmt: skip
                jobs.run(_write_file, tasks, progress=progress and len(round_) > 1, desc="write",
                         weights=[files[j]["n_obs"] for j in round_])  # fmt: skip
                for j in round_:
                    for part in [*parts, obs_part]:
                        shutil.rmtree(part.buckets[j].dir)
        finally:
            with sigint_deferred():  # the processes and the scratch files, even if Ctrl-C comes again
                jobs.close()
                remove_tree(scratch)
        write_manifest(
            staged.path,
            StoreManifest(
                n_obs=n_obs,
                n_vars=len(var),
                x_format=x_format,
                dtype=str(dtype),
                files=files,
                inputs=[{"path": str(inp.path), "n_obs": inp.n_obs} for inp in inputs],
                var_names=[str(v) for v in var.index],
                obs_schema=obs.schema,
                layout={"x": asdict(layout), "zarr_format": 3},
                shuffle=shuffle,
                seed=seed,
                var_join=var_join,
                obs_join=obs_join,
                source_key=source_key,
                layers={n: {"format": formats[p.path], "dtype": str(p.dtype)} for n, p in layer_parts.items()},
                obsm={k: {"k": p.n_cols, "dtype": str(p.dtype)} for k, p in obsm_parts.items()},
                store_id=uuid.uuid4().hex,
            ),
        )
        staged.commit()
    return output_path if isinstance(output, RemoteOutput) else Path(output_path)


def _ids(order_file: Path, bounds: np.ndarray, j: int) -> np.ndarray:
    """Global input ids of output file ``j``'s cells, in its order."""
    lo, hi = int(bounds[j]), int(bounds[j + 1])
    return np.fromfile(order_file, dtype=np.int64, count=hi - lo, offset=lo * 8)


def _write_file(threads: int | None, *args) -> None:
    """Pass 2 of one output file, in this process or a task process (which must choose zarrs too), zarrs on
    ``threads`` threads (None: all cores)."""
    use_zarrs(threads)
    write_output_file(*args)


def _default_budget() -> int:
    return int(min(2 * 2**30, psutil.virtual_memory().available / 4))
