"""The on-disk store: layout settings, the manifest, and opening a store.

A store is a directory of ``chunk_{i}.zarr`` AnnData (zarr v3) files plus
``arrayloaders.json``. The manifest is written last (atomically), so a
directory without it is never taken for a store.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from .errors import StoreError

__all__ = [
    "MANIFEST_NAME",
    "FORMAT_VERSION",
    "XLayout",
    "StoreManifest",
    "XSource",
    "read_manifest",
    "use_zarrs",
    "write_manifest",
]

MANIFEST_NAME = "arrayloaders.json"
# 2: obs columns may be nullable or hold missing values (obs_schema records
#    "missing"), every chunk is written and checksummed (crc32c). 1 is read too.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


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
    """

    # Measured on 200k generated cells x 33.5k genes, one core, numcodecs'
    # blosc: count values decode 27 % faster and take half the space with
    # *bit* shuffle (0.59 B/value) than with byte shuffle (1.21 B/value);
    # column indices decode fastest with byte shuffle, and as uint16 when
    # the genes fit (25 % faster per index than int32, same size on disk).
    # zstd-3 decodes 4x slower than blosc-lz4. Inner chunks of 2^14
    # elements waste least decode at the two ends of a 32-cell run.
    compressor: Literal["zstd", "blosc-lz4", "none"] = "blosc-lz4"
    level: int = 5
    chunk_elements: int = 2**14
    shard_elements: int = 2**22
    dense_chunk_bytes: int = 2**17
    dense_shard_bytes: int = 2**24

    def __post_init__(self) -> None:
        if self.compressor not in ("zstd", "blosc-lz4", "none"):
            raise ValueError(f"XLayout.compressor must be 'zstd', 'blosc-lz4' or 'none', got {self.compressor!r}")
        if self.chunk_elements <= 0 or self.shard_elements % self.chunk_elements:
            raise ValueError(
                f"XLayout.shard_elements ({self.shard_elements}) must be a positive multiple of "
                f"chunk_elements ({self.chunk_elements})"
            )

    def compressors(self, role: Literal["values", "indices"] = "values") -> tuple[Any, ...]:
        """Compressor of an array of X values (data, dense X) or of column indices / indptr."""
        if self.compressor == "zstd":
            return (zarr.codecs.ZstdCodec(level=self.level),)
        if self.compressor == "blosc-lz4":
            shuffle = "bitshuffle" if role == "values" else "shuffle"
            return (zarr.codecs.BloscCodec(cname="lz4", clevel=self.level, shuffle=shuffle),)
        return ()

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
    format_version: int = FORMAT_VERSION
    format: str = "arrayloaders-store"
    created_by: str = field(default_factory=lambda: f"arrayloaders {_version()}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

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
    if not verify:
        return manifest
    missing = [f["name"] for f in manifest.files if not (store / f["name"]).is_dir()]
    if missing:
        raise StoreError(f"{store}: files listed in the manifest are missing: {', '.join(missing)}")
    return manifest


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


@dataclass(frozen=True)
class XSource:
    """Where one AnnData's X lives: enough to reopen it in another process.

    zarr stores pickle by location, so a worker opens its own handles.
    """

    store: Any  # a zarr.abc.store.Store
    path: str  # of the X group (CSR) or array (dense) inside the store
    kind: Literal["csr", "dense"]
    n_obs: int
    n_vars: int
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.store}/{self.path}"
