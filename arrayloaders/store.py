"""The on-disk store: layout settings, the manifest, and opening a store.

A store is a directory of ``chunk_{i}.zarr`` AnnData (zarr v3) files plus
``arrayloaders.json``. The manifest is written last (atomically), so a
directory without it is never taken for a store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from .disk_layout import COMPLETE_ATTRIBUTE
from .errors import StoreError
from .zarr_layout import missing_chunk_files

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "XLayout",
    "StoreManifest",
    "check_files",
    "manifest_stamp",
    "read_manifest",
    "read_obs",
    "use_zarrs",
    "write_manifest",
]

MANIFEST_NAME = "arrayloaders.json"
# 2: obs columns may be nullable or hold missing values (obs_schema records
#    "missing"), every chunk is written and checksummed (crc32c).
# 3: files may hold layers (layers/<name>, laid out as X) and obsm arrays
#    (obsm/<key>, dense n_obs x k), recorded in "layers" and "obsm".
# 1 and 2 are read too (no layers, no obsm).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


def use_zarrs(threads: int | None = None) -> None:
    """Route zarr's decoding and encoding through the zarrs (Rust) codec pipeline.

    Called for the user on every path that reads or writes a store, so nobody
    has to remember ``zarr.config.set``. ``threads`` caps zarrs' thread pool
    (worker processes use 1 each, so W workers do not start W x cores threads).
    """
    import zarrs  # noqa: F401 - registers the pipeline class

    settings = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
    if threads is not None:
        settings["threading.max_workers"] = threads
    zarr.config.set(settings)


def chunk_file_name(i: int) -> str:
    return f"chunk_{i}.zarr"


@dataclass(frozen=True)
class XLayout:
    """How X is chunked and compressed on disk.

    The loader reads runs of consecutive rows, i.e. one contiguous range of
    ``data``/``indices`` per run, so small inner chunks waste little decode at
    the ends of a range while shards keep the file count low.

    Parameters
    ----------
    compressor
        ``"zstd"``, ``"blosc-lz4"`` or ``"none"``.
    level
        Compression level (zstd or blosc).
    chunk_elements, shard_elements
        Inner chunk and shard length of the CSR ``data`` and ``indices`` arrays.
    dense_chunk_bytes, dense_shard_bytes
        Dense X: rows per inner chunk and per shard are chosen so they hold
        about this many bytes (at least one row, and one chunk, each).
    checksum
        Append a crc32c checksum (zarr v3's ``crc32c`` codec) to every chunk
        of X and obs, verified on every read: a damaged store is never read
        as data. ``False`` only to measure what the check costs.
    """

    # Measured on 200k generated cells x 33.5k genes, one core, numcodecs'
    # blosc: count values decode 27 % faster and take half the space with
    # *bit* shuffle (0.59 B/value) than with byte shuffle (1.21 B/value);
    # column indices decode fastest with byte shuffle, and as uint16 when
    # the genes fit (25 % faster per index than int32, same size on disk).
    # zstd-3 decodes 4x slower than blosc-lz4. Inner chunks of 2^13
    # elements: a row picked by a sampler costs one inner chunk decoded per
    # array, and against 2^14 that makes a sampler's epoch 1.3x faster for a
    # chunked epoch 6 % slower (2^12: chunked access 17 % slower).
    compressor: Literal["zstd", "blosc-lz4", "none"] = "blosc-lz4"
    level: int = 5
    chunk_elements: int = 2**13
    shard_elements: int = 2**22
    dense_chunk_bytes: int = 2**17
    dense_shard_bytes: int = 2**24
    checksum: bool = True

    def __post_init__(self) -> None:
        if self.compressor not in ("zstd", "blosc-lz4", "none"):
            raise ValueError(f"XLayout.compressor must be 'zstd', 'blosc-lz4' or 'none', got {self.compressor!r}")
        if self.chunk_elements <= 0 or self.shard_elements % self.chunk_elements:
            raise ValueError(
                f"XLayout.shard_elements ({self.shard_elements}) must be a positive multiple of "
                f"chunk_elements ({self.chunk_elements})"
            )

    def compressors(self, role: Literal["values", "indices", "indptr", "obs"] = "values") -> tuple[Any, ...]:
        """Codecs after ``bytes`` of an array of X values (data, dense X), of column indices, of a row pointer,
        or of obs/var.

        The compressor, then the crc32c checksum of the compressed bytes. A
        row pointer is not compressed (it is stored as one chunk, which every
        process maps: ``shards.map_whole_array``).
        """
        check = (zarr.codecs.Crc32cCodec(),) if self.checksum else ()
        if role == "indptr":
            return check
        if role == "obs":  # small; strings too: zstd, whatever X uses
            return (zarr.codecs.ZstdCodec(level=3), *check)
        if self.compressor == "zstd":
            return (zarr.codecs.ZstdCodec(level=self.level), *check)
        if self.compressor == "blosc-lz4":
            shuffle = "bitshuffle" if role == "values" else "shuffle"
            return (zarr.codecs.BloscCodec(cname="lz4", clevel=self.level, shuffle=shuffle), *check)
        return check

    @staticmethod
    def indices_dtype(n_vars: int) -> np.dtype:
        """Smallest dtype that holds every column index (as annbatch does): uint16 up to 65,536 genes."""
        return np.dtype(np.uint16) if n_vars <= 2**16 else np.dtype(np.int32)

    def dense_rows(self, n_vars: int, itemsize: int) -> tuple[int, int]:
        """(rows per inner chunk, rows per shard) of a dense X with ``n_vars`` columns."""
        row_bytes = max(1, n_vars * itemsize)
        rows = max(1, self.dense_chunk_bytes // row_bytes)
        per_shard = max(1, self.dense_shard_bytes // (rows * row_bytes)) * rows
        return rows, per_shard

    def shard_bytes(self, x_format: str, n_vars: int, itemsize: int) -> int:
        """Uncompressed bytes of one shard of X (data and indices together for CSR)."""
        if x_format == "dense":
            return self.dense_rows(n_vars, itemsize)[1] * n_vars * itemsize
        return self.shard_elements * (itemsize + self.indices_dtype(n_vars).itemsize)


@dataclass(frozen=True)
class StoreManifest:
    """What ``arrayloaders.json`` records about a store."""

    n_obs: int
    n_vars: int
    x_format: Literal["csr", "dense"]
    dtype: str
    files: list[dict[str, Any]]  # [{"name": "chunk_0.zarr", "n_obs": ...}, ...]
    inputs: list[dict[str, Any]]  # [{"path": ..., "n_obs": ...}, ...]
    var_names: list[str]
    obs_schema: dict[str, dict[str, Any]]
    layout: dict[str, Any]
    shuffle: bool
    seed: int
    var_join: str
    source_key: str | None
    obs_join: str | None = None  # None: written before obs joins (version 1), all inputs had every column
    # Version 3. Each file holds layers/<name> with X's shape and layout: {name: {"format": "csr"|"dense", "dtype": ...}}
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ... and obsm/<key>, a dense (n_obs, k) array: {key: {"k": k, "dtype": ...}}
    obsm: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A random id given at conversion: a checkpoint resumes only the store it was taken on, not the same
    # inputs converted again (with another seed, or other data of the same sizes). None: written before it.
    store_id: str | None = None
    format_version: int = FORMAT_VERSION
    format: str = "arrayloaders-store"
    created_by: str = field(default_factory=lambda: f"arrayloaders {_version()}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @property
    def identity(self) -> str:
        """What a checkpoint records of this store: its ``store_id`` (or, written before it, a digest of the manifest)."""
        if self.store_id is not None:
            return f"store {self.store_id}"
        return "store (no store_id) sha1 " + hashlib.sha1(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str, path: Path) -> StoreManifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: the manifest is not valid JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != "arrayloaders-store":
            raise StoreError(f"{path}: not an arrayloaders manifest")
        if raw.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{path}: store format version {raw.get('format_version')} is not supported by this "
                f"arrayloaders (reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-create the store "
                "or upgrade arrayloaders"
            )
        try:
            return cls(**raw)
        except TypeError as e:
            raise StoreError(f"{path}: the manifest is missing or has unknown fields ({e})") from e


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("arrayloaders")
    except PackageNotFoundError:
        return "unknown"


def write_manifest(store: Path, manifest: StoreManifest) -> None:
    """Write the manifest atomically: a reader sees the whole file or none."""
    tmp = store / (MANIFEST_NAME + ".partial")
    tmp.write_text(manifest.to_json())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, store / MANIFEST_NAME)


def manifest_stamp(store: str | os.PathLike) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of the manifest of ``store``, ``None`` if it has none.

    A conversion writes the manifest last, into a new file (``write_manifest``):
    a store converted again at the same path has another stamp. The device is
    left out, so that the stamp holds in another machine over a shared file system.
    """
    try:
        st = os.stat(Path(store) / MANIFEST_NAME)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_manifest(store: str | os.PathLike, verify: bool = True) -> StoreManifest:
    """Read and check the manifest of ``store``.

    Parameters
    ----------
    store
        The store directory.
    verify
        Also check the manifest against the files it lists.

    Raises
    ------
    StoreError
        If ``store`` is not a directory, has no manifest (not a store, or a
        conversion that did not finish), or its chunk files are missing.
    """
    store = Path(store)
    if not store.is_dir():
        raise StoreError(f"{store}: no such store directory")
    path = store / MANIFEST_NAME
    if not path.is_file():
        raise StoreError(
            f"{store}: not an arrayloaders store (no {MANIFEST_NAME}); it was not made by "
            "create_store_from_h5ads or its conversion did not finish"
        )
    manifest = StoreManifest.from_json(path.read_text(), path)
    if verify:
        check_files(store, manifest)
    return manifest


def check_files(store: Path, manifest: StoreManifest) -> None:
    """Check the manifest against the files it lists, reading zarr metadata only (no chunk data).

    The totals add up, names are unique, every file exists with the shape and
    dtype of X, obs, var, layers and obsm arrays the manifest says, and every chunk file of an
    array written with all its chunks (:data:`~arrayloaders.disk_layout.COMPLETE_ATTRIBUTE`)
    is on disk.

    Raises
    ------
    StoreError
        Naming the store (or file) and the manifest field or array at fault.
    """
    def edited(field: str, detail: str) -> StoreError:
        return StoreError(f"{store}: the manifest's {field} {detail} (edited or damaged {MANIFEST_NAME})")

    names = [f.get("name") for f in manifest.files]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise edited("'files'", f"list {', '.join(map(str, twice))} more than once")
    counts = [f.get("n_obs") for f in manifest.files]
    if not all(isinstance(n, int) and n >= 0 for n in counts):
        raise edited("'files'", "hold an n_obs that is not a count")
    if manifest.n_obs != sum(counts):
        raise edited("'n_obs'", f"({manifest.n_obs}) is not the sum of its files' n_obs ({sum(counts)})")
    if manifest.n_vars != len(manifest.var_names):
        raise edited("'n_vars'", f"({manifest.n_vars}) differs from the length of 'var_names' ({len(manifest.var_names)})")
    missing = [n for n in names if not (store / n).is_dir()]
    if missing:
        raise StoreError(f"{store}: files listed in the manifest are missing: {', '.join(missing)}")
    for entry in manifest.files:
        where = store / entry["name"]
        try:
            group = zarr.open_group(where, mode="r")
            arrays = {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
        except Exception as e:  # noqa: BLE001 - zarr raises many types for damaged metadata
            raise StoreError(f"{where}: cannot be opened as a zarr group ({type(e).__name__}: {e})") from e
        n_obs = entry["n_obs"]
        x_shape, x_dtype = _x_shape_and_dtype(group, arrays, manifest.x_format, where)
        if x_shape != (n_obs, manifest.n_vars):
            raise edited(
                f"'files' entry of {entry['name']}", f"says {n_obs} x {manifest.n_vars}, but its X is {x_shape[0]} x {x_shape[1]}"
            )
        if x_dtype != np.dtype(manifest.dtype):
            raise edited("'dtype'", f"({manifest.dtype}) differs from X of {entry['name']} ({x_dtype})")
        _check_layers_and_obsm(group, arrays, manifest, n_obs, where)
        # a column is an array, or a group (categorical: codes; nullable: values) of arrays of one length
        lengths = {name.split("/")[1]: a.shape[0] for name, a in arrays.items()
                   if name.startswith("obs/") and name.rsplit("/", 1)[-1] not in ("categories", "mask")}  # fmt: skip
        wrong = {c: n for c, n in lengths.items() if n != n_obs}
        if "_index" not in lengths or wrong:
            got = ", ".join(f"{c}: {n}" for c, n in wrong.items()) or "no _index"
            raise StoreError(f"{where}/obs: holds {got} cells, the manifest says {n_obs} (damaged store)")
        columns = list(group["obs"].attrs.get("column-order", []))
        if columns != list(manifest.obs_schema):
            raise edited("'obs_schema'", f"lists columns {list(manifest.obs_schema)}, {entry['name']} holds {columns}")
        if arrays.get("var/_index") is None or arrays["var/_index"].shape != (manifest.n_vars,):
            raise StoreError(f"{where}/var: does not hold the manifest's {manifest.n_vars} genes (damaged store)")
        for name, array in arrays.items():
            if array.attrs.get(COMPLETE_ATTRIBUTE) is True:
                gone = missing_chunk_files(array)
                if gone:
                    raise StoreError(
                        f"{gone[0]}: chunk file of {entry['name']}/{name} is missing (every chunk of this store "
                        "was written: damaged store)"
                    )


def read_obs(store: str | os.PathLike, name: str, columns: list[str] | None = None, index: bool = True):
    """The obs of file ``name`` of a store as a ``pandas.DataFrame``, read by anndata.

    ``columns`` reads only those columns (and the index), e.g. the loader's
    ``obs_keys``; with ``index=False`` (and ``columns``) the obs_names are
    not read and the frame gets a ``RangeIndex``: the loader needs none of
    them, and they are the largest part of obs (~70 bytes per cell). zarr verifies each chunk's checksum as it decodes, but its
    errors name no file: here a damaged obs raises a :class:`StoreError` that
    names the array. (Missing chunk files are found earlier, by
    :func:`read_manifest`.)
    """
    import anndata as ad  # not at import time: worker processes import this module
    import pandas as pd

    where = Path(store) / name
    group = zarr.open_group(where, mode="r")
    obs = group["obs"]
    try:
        if columns is None:
            return ad.io.read_elem(obs)
        missing = [c for c in columns if c not in obs.attrs.get("column-order", [])]
        if missing:
            raise StoreError(f"{where}/obs: has no column(s) {missing}; it has {list(obs.attrs.get('column-order', []))}")
        names = obs[obs.attrs.get("_index", "_index")]
        rows = ad.io.read_elem(names) if index else pd.RangeIndex(names.shape[0])
        return pd.DataFrame({c: ad.io.read_elem(obs[c]) for c in columns}, index=rows, columns=list(columns))
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr, zarrs and anndata raise many types
        culprit = _damaged_array(obs) or "obs"
        raise StoreError(f"{where}/{culprit}: cannot be read ({type(e).__name__}: {e}); damaged store") from e


def _damaged_array(group: zarr.Group) -> str | None:
    """The path (relative to the file) of the first array of ``group`` that zarr cannot read."""
    for _, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            try:
                node[...]
            except Exception:  # noqa: BLE001
                return node.path
    return None


def _x_shape_and_dtype(
    group, arrays: dict, x_format: str, where: Path, path: str = "X"
) -> tuple[tuple[int, int], np.dtype]:
    """(shape, dtype) of a file's X (or a layer at ``path``) from its metadata, checking the parts of a CSR one agree."""
    try:
        if x_format == "csr":
            shape = tuple(int(s) for s in group[path].attrs["shape"])
            data, indices, indptr = arrays[f"{path}/data"], arrays[f"{path}/indices"], arrays[f"{path}/indptr"]
            if data.shape != indices.shape or indptr.shape != (shape[0] + 1,):
                raise StoreError(
                    f"{where}/{path}: data {data.shape}, indices {indices.shape} and indptr {indptr.shape} do not fit "
                    f"a CSR matrix of {shape[0]} rows (damaged store)"
                )
            return shape, np.dtype(data.dtype)
        x = arrays[path]
        return tuple(x.shape), np.dtype(x.dtype)
    except KeyError as e:
        raise StoreError(f"{where}/{path}: {e} is missing (damaged store, or {path} is not {x_format})") from e


def _check_layers_and_obsm(group, arrays: dict, manifest: StoreManifest, n_obs: int, where: Path) -> None:
    """Every layer and obsm array the manifest records is in the file, with its shape and dtype."""
    for name, spec in manifest.layers.items():
        path = f"layers/{name}"
        if not isinstance(spec, dict) or spec.get("format") not in ("csr", "dense"):
            raise StoreError(f"{where.parent}: the manifest's 'layers' entry {name!r} is not valid ({spec!r})")
        shape, dtype = _x_shape_and_dtype(group, arrays, spec["format"], where, path)
        if shape != (n_obs, manifest.n_vars):
            raise StoreError(
                f"{where}/{path}: is {shape[0]} x {shape[1]}, the manifest says {n_obs} x {manifest.n_vars} (damaged store)"
            )
        if dtype != np.dtype(spec.get("dtype")):
            raise StoreError(f"{where}/{path}: holds {dtype}, the manifest says {spec.get('dtype')} (damaged store)")
    for key, spec in manifest.obsm.items():
        path = f"obsm/{key}"
        if not isinstance(spec, dict) or not isinstance(spec.get("k"), int):
            raise StoreError(f"{where.parent}: the manifest's 'obsm' entry {key!r} is not valid ({spec!r})")
        array = arrays.get(path)
        if array is None:
            raise StoreError(f"{where}/{path}: is missing (damaged store)")
        if array.shape != (n_obs, spec["k"]):
            raise StoreError(
                f"{where}/{path}: has shape {array.shape}, the manifest says ({n_obs}, {spec['k']}) (damaged store)"
            )
        if np.dtype(array.dtype) != np.dtype(spec.get("dtype")):
            raise StoreError(f"{where}/{path}: holds {array.dtype}, the manifest says {spec['dtype']} (damaged store)")


def foreign_entries(store: Path, manifest: StoreManifest) -> list[str]:
    """Paths inside ``store`` (relative to it) that the store did not write: a user's files.

    Ours are the manifest, the listed ``chunk_{i}.zarr`` directories, and
    inside those only ``zarr.json`` metadata and chunk files under a ``c``
    directory (``c/0``, ``c/3/0``). Symbolic links are never ours.
    """
    listed = {f["name"] for f in manifest.files}
    foreign = []
    for entry in sorted(os.scandir(store), key=lambda e: e.name):
        if entry.name == MANIFEST_NAME and entry.is_file(follow_symlinks=False):
            continue
        if entry.name not in listed or not entry.is_dir(follow_symlinks=False):
            foreign.append(entry.name)
            continue
        for root, dirs, files in os.walk(entry.path):
            rel = Path(root).relative_to(store)
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in dirs if d not in links]
            for name in links + files:
                if name in links or os.path.islink(os.path.join(root, name)) or not _metadata_or_chunk(rel.parts, name):
                    foreign.append(str(rel / name))
    return foreign


def _metadata_or_chunk(parts: tuple[str, ...], name: str) -> bool:
    """Whether a file at ``parts/name`` is zarr v3 metadata or a chunk key (``…/c/1/0``)."""
    if name == "zarr.json":
        return True
    if not name.isdigit():
        return False
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return i > 0 and parts[i] == "c"


# --------------------------------------------------------------------------- reading
