"""Where and how an array's chunks lie on disk: all that a direct reader needs, in plain values.

The main process learns a layout from zarr's metadata once
(:mod:`~arrayloaders.store.zarr_layout`) and sends it to its workers, which read
the files with it (:class:`~arrayloaders.store.shards.DirectArray`) and so never
import zarr: its import was about 0.15 s of a worker's 0.3 s start, paid
again by every worker while the first epoch runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from .remote import RemoteRoot

__all__ = ["COMPLETE_ATTRIBUTE", "MAX_TABLES", "MISSING", "ArrayLayout", "DirectX", "XSource"]

#: zarr attribute (value ``True``) of an array whose every chunk was written.
COMPLETE_ATTRIBUTE = "arrayloaders:every_chunk_written"
#: A shard index's entry (offset and size) for a chunk that was never written (the zarr v3 sharding specification).
MISSING = 2**64 - 1
#: Shard indexes a reader keeps per array (8 KiB each for the default 2^22 / 2^13 shards).
MAX_TABLES = 16384


@dataclass(frozen=True)
class ArrayLayout:
    """One zarr v3 array as :class:`~arrayloaders.store.shards.DirectArray` reads it (flattened in C order).

    Made by :func:`arrayloaders.store.zarr_layout.array_layout`, which checks that
    the array is one this describes.
    """

    path: Path | PurePosixPath  # the array's directory; its key under ``root`` for a remote store
    key_prefix: tuple[str, ...]  # of its chunk keys: ("c",) for zarr v3's default encoding, () for "v2"
    key_separator: str
    ndim: int  # 1, or 2 with chunks spanning whole rows
    dtype: np.dtype
    fill_value: object
    n_elements: int
    file_elements: int  # elements per file (a shard, or an unsharded chunk)
    chunk_elements: int  # elements per inner chunk (per chunk, unsharded)
    codec: Literal["raw", "blosc", "zstd"]  # what follows the little-endian ``bytes`` codec
    index: tuple[str, int] | None = None  # (where, checksum bytes) of a shard index; None if unsharded
    complete: bool = False  # every chunk was written: a missing one is damage
    checked: bool = False  # every stored chunk ends in its crc32c
    root: RemoteRoot | None = None  # the remote store holding ``path``; None on a local file system

    def file_path(self, f: int) -> Path | PurePosixPath:
        """The file (or, remote, the key) holding elements ``[f * file_elements, (f + 1) * file_elements)``."""
        coords = (f,) if self.ndim == 1 else (f, 0)
        return self.path / self.key_separator.join((*self.key_prefix, *map(str, coords)))

    @property
    def where(self) -> str:
        """The array's directory or URL, for messages."""
        return str(self.path) if self.root is None else self.root.child(str(self.path))


@dataclass(frozen=True)
class DirectX:
    """An X (or obsm array) whose arrays are all read directly: what a worker needs to read its rows.

    It mirrors the fields of :class:`~arrayloaders.store.disk_layout.XSource` that readers
    use, with the store replaced by the arrays' layouts (a zarr store would
    import zarr when unpickled).
    """

    where: str  # the X's directory, for messages
    kind: Literal["csr", "dense"]
    n_obs: int
    n_vars: int
    dtype: str  # what the loader yields (the values' stored dtype may differ)
    arrays: tuple[ArrayLayout, ...]  # (data, indices) for CSR, (X,) for dense


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
    #: the path of the store file (its top group) holding this X, for a store's; "" otherwise
    file: str = ""

    @property
    def label(self) -> str:
        return f"{self.store}/{self.path}"

    @property
    def location(self) -> str | None:
        """The directory or URL of the store file holding this X (its top group); ``None`` if not a store's."""
        root = getattr(self.store, "root", None)
        if isinstance(root, RemoteRoot):
            return root.child(self.path.split("/", 1)[0])
        return str(root) if root is not None else None

    @property
    def where(self) -> str:
        """The X's directory, for messages (as :attr:`arrayloaders.store.disk_layout.DirectX.where`); else its label."""
        root = getattr(self.store, "root", None)
        if isinstance(root, RemoteRoot):
            return root.child(self.path)
        return str(Path(root) / self.path) if root is not None else self.label
