"""What a store is on disk: its file names, its format versions, and how its arrays are laid out (XLayout).

A store is a directory of ``chunk_{i}.zarr`` AnnData (zarr v3) files plus
``arrayloaders.json``, the manifest (``manifest.py``), written last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "READABLE_VERSIONS", "XLayout", "chunk_file_name", "use_zarrs"]


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
