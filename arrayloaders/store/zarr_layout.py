"""What zarr's metadata says about an array's files: its :class:`~arrayloaders.store.disk_layout.ArrayLayout`, and what is missing.

The main process's side of direct reading (:mod:`~arrayloaders.store.shards`):
only the public zarr metadata API is used (``Array.metadata``, the codec
classes, ``encode_chunk_key``); the byte layout the readers rely on is the
one the zarr v3 sharding specification fixes. Workers get the layouts and
never import this module (nor zarr).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path, PurePosixPath

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from ..errors import StoreError
from .disk_layout import COMPLETE_ATTRIBUTE, ArrayLayout, DirectX, XSource
from .location import RemoteZarrStore
from .shards import DirectArray

__all__ = ["array_layout", "direct_array", "direct_sources", "direct_x", "map_whole_array", "missing_chunk_files", "open_x", "unwritten_chunks"]

_U32 = struct.Struct("<I")  # a stored crc32c
_KEY_PREFIXES = {"default": ("c",), "v2": ()}  # zarr v3's chunk key encodings: what precedes the coordinates


def _setting(value) -> str | None:
    """A codec setting as its string: zarr 3.1 holds enums (``Endian.little``), zarr 3.4 plain strings."""
    return getattr(value, "value", value)


def _codec(codecs) -> tuple[str | None, bool]:
    """(``raw``, ``blosc`` or ``zstd``: what follows the ``bytes`` codec, or None if not ours to read; whether
    chunks end in a crc32c)."""
    codecs = list(codecs)
    checked = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if checked:
        codecs = codecs[:-1]
    if any(isinstance(c, Crc32cCodec) for c in codecs) or not codecs or not isinstance(codecs[0], BytesCodec):
        return None, checked
    if not np.little_endian or _setting(codecs[0].endian) not in (None, "little"):
        return None, checked
    rest = codecs[1:]
    if not rest:
        return "raw", checked
    if len(rest) == 1 and isinstance(rest[0], BloscCodec):
        return "blosc", checked
    if len(rest) == 1 and isinstance(rest[0], ZstdCodec):
        return "zstd", checked
    return None, checked


def _key_prefix(meta, ndim: int) -> tuple[tuple[str, ...], str] | None:
    """(prefix, separator) of the array's chunk keys, or None for an encoding not known here.

    Checked against zarr's own ``encode_chunk_key`` on a few coordinates.
    """
    encoding = meta.chunk_key_encoding
    prefix, separator = _KEY_PREFIXES.get(getattr(encoding, "name", None)), getattr(encoding, "separator", None)
    if prefix is None or not isinstance(separator, str):
        return None
    for f in (0, 1, 12):
        coords = (f,) if ndim == 1 else (f, 0)
        if meta.encode_chunk_key(coords) != separator.join((*prefix, *map(str, coords))):
            return None
    return prefix, separator


def direct_array(array: zarr.Array) -> DirectArray | None:
    """A direct reader of ``array``, or ``None`` if its storage or codecs are not supported."""
    layout = array_layout(array)
    return None if layout is None else DirectArray(layout)


def array_layout(array: zarr.Array) -> ArrayLayout | None:
    """The layout of ``array`` for :class:`~arrayloaders.store.shards.DirectArray`, or ``None`` if it is not one it reads.

    It reads a local zarr v3 array whose codecs are ``bytes`` (little endian)
    optionally followed by ``blosc`` or ``zstd`` and then by ``crc32c``,
    directly or inside ``sharding_indexed`` (whose index is ``bytes`` +
    optional ``crc32c``), 1-d or 2-d with chunks and shards spanning whole rows;
    local, or remote (a :class:`~arrayloaders.store.location.RemoteZarrStore`).
    """
    meta = array.metadata
    remote = isinstance(array.store, RemoteZarrStore)
    if meta.zarr_format != 3 or not (remote or isinstance(array.store, zarr.storage.LocalStore)):
        return None
    if getattr(meta, "storage_transformers", ()) or array.ndim not in (1, 2):
        return None
    outer = tuple(meta.chunk_grid.chunk_shape)
    codecs = list(meta.codecs)
    index = None
    inner = outer
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        sharding = codecs[0]
        index_codecs = list(sharding.index_codecs)
        if not index_codecs or not isinstance(index_codecs[0], BytesCodec):
            return None
        if not np.little_endian or _setting(index_codecs[0].endian) not in (None, "little"):
            return None  # the index is read as little-endian uint64
        if not all(isinstance(c, Crc32cCodec) for c in index_codecs[1:]) or len(index_codecs) > 2:
            return None
        inner = tuple(sharding.chunk_shape)
        index = (_setting(sharding.index_location), 4 * (len(index_codecs) - 1))
        codecs = list(sharding.codecs)
    if any(isinstance(c, ShardingCodec) for c in codecs):
        return None
    codec, checked = _codec(codecs)
    keys = _key_prefix(meta, array.ndim)
    if codec is None or keys is None:
        return None
    if array.ndim == 2 and (outer[1] != array.shape[1] or inner[1] != array.shape[1]):
        return None  # chunks split rows: a run of rows is not one run of elements
    row = 1 if array.ndim == 1 else array.shape[1]
    return ArrayLayout(
        path=PurePosixPath(array.path) if remote else Path(array.store.root) / array.path,
        key_prefix=keys[0],
        key_separator=keys[1],
        ndim=array.ndim,
        dtype=np.dtype(array.dtype),
        fill_value=array.fill_value,
        n_elements=int(np.prod(array.shape)),
        file_elements=outer[0] * row,
        chunk_elements=inner[0] * row,
        codec=codec,
        index=index,
        complete=array.attrs.get(COMPLETE_ATTRIBUTE) is True,
        checked=checked,
        root=array.store.root if remote else None,
    )


def open_x(source: XSource, names: tuple[str, ...] = ()) -> list[zarr.Array]:
    """The arrays ``names`` of a CSR X (``data``, ``indices``, ``indptr``), or a dense X itself (no names).

    Raises
    ------
    StoreError
        Naming the X, when its metadata cannot be read (a ``zarr.json`` removed or damaged since the store was
        checked): zarr's own error (``KeyError: 'data'``) names no file.
    """
    try:
        if isinstance(source.store, RemoteZarrStore) and source.file and source.path.startswith(source.file + "/"):
            # From the file's top group, read once (its zarr.json holds every node's metadata, consolidated):
            # opened by its own path, each array would be a round trip more.
            node = zarr.open_group(store=source.store, path=source.file, mode="r")[source.path[len(source.file) + 1 :]]
            return [node] if not names else [node[name] for name in names]
        if not names:
            return [zarr.open_array(store=source.store, path=source.path, mode="r")]
        group = zarr.open_group(store=source.store, path=source.path, mode="r")
        return [group[name] for name in names]
    except Exception as e:  # noqa: BLE001 - zarr raises KeyError, ValueError, JSONDecodeError... for damaged metadata
        raise StoreError(f"{source.where}: cannot be opened ({type(e).__name__}: {e}); damaged or changed store") from e


def direct_x(source: XSource) -> DirectX | None:
    """``source`` as a worker reads it without zarr, or ``None`` if one of its arrays is not read directly."""
    layouts = tuple(array_layout(a) for a in open_x(source, ("data", "indices") if source.kind == "csr" else ()))
    if any(layout is None for layout in layouts):
        return None
    return DirectX(source.where, source.kind, source.n_obs, source.n_vars, source.dtype, layouts)


def direct_sources(sources: tuple[XSource, ...], indptrs: bool) -> tuple[XSource | DirectX, ...]:
    """``sources`` as workers read them: each as its :func:`direct_x` where it has one.

    A worker whose sources are all direct never imports zarr (half of its
    start). A CSR file stays an :class:`~arrayloaders.store.disk_layout.XSource` without
    shared row pointers (``indptrs`` false): its worker reads them through zarr.
    """
    return tuple(s if s.kind == "csr" and not indptrs else (direct_x(s) or s) for s in sources)


def map_whole_array(array: zarr.Array) -> np.ndarray | None:
    """A read-only memory map of a 1-d array stored as one raw chunk (codec ``bytes``, little endian, and
    optionally ``crc32c``, verified here), or ``None`` for any other layout.

    Every process that maps the file shares its pages (the page cache): one
    copy per machine, however many processes read it.

    Raises
    ------
    OSError
        The chunk file is missing, has the wrong size, or fails its checksum (naming the file).
    """
    meta = array.metadata
    remote = isinstance(array.store, RemoteZarrStore)
    if meta.zarr_format != 3 or array.ndim != 1 or not (remote or isinstance(array.store, zarr.storage.LocalStore)):
        return None
    if getattr(meta, "storage_transformers", ()) or tuple(meta.chunk_grid.chunk_shape) != tuple(array.shape):
        return None
    codec, checked = _codec(meta.codecs)
    if codec != "raw" or array.shape[0] == 0:
        return None  # compressed (or empty): read through zarr
    if remote:
        return _map_remote_whole_array(array, meta.encode_chunk_key((0,)), checked)
    path = Path(array.store.root) / array.path / meta.encode_chunk_key((0,))
    dtype = np.dtype(array.dtype).newbyteorder("<")
    nbytes = array.shape[0] * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise OSError(f"{path}: the chunk file is missing (damaged store)") from None
    if size != nbytes + 4 * checked:
        raise OSError(f"{path}: holds {size} bytes, expected {nbytes + 4 * checked} (damaged store)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if checked and google_crc32c.value(raw[:nbytes]) != _U32.unpack(raw[nbytes:].tobytes())[0]:
        raise OSError(f"{path}: checksum mismatch (damaged store)")
    return np.memmap(path, dtype=dtype, mode="r", shape=array.shape)


def _map_remote_whole_array(array: zarr.Array, chunk_key: str, checked: bool) -> np.ndarray | None:
    """:func:`map_whole_array` of a remote array whose store has a local cache: the object kept in the cache and
    mapped there, so that every rank and worker of the machine shares one copy; ``None`` without a cache."""
    import obstore

    from .remote import remote_error

    root = array.store.root
    cache = root.cache()
    if cache is None:
        return None
    key = f"{array.path}/{chunk_key}"
    try:
        etag = obstore.head(root.store(), key).get("e_tag")
    except Exception as e:  # noqa: BLE001 - obstore's errors, one line naming the object
        raise remote_error(root.child(key), e) from None
    if etag is None:
        return None
    dtype = np.dtype(array.dtype).newbyteorder("<")
    nbytes = array.shape[0] * dtype.itemsize

    def fetch() -> bytes:
        try:
            return bytes(obstore.get(root.store(), key, options={"if_match": etag}).bytes())
        except Exception as e:  # noqa: BLE001
            raise remote_error(root.child(key), e) from None

    for _ in range(2):  # a damaged cached copy is fetched again, once
        path = cache.whole(key, etag, fetch)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        size = raw.size
        intact = size == nbytes + 4 * checked and (
            not checked or google_crc32c.value(raw[:nbytes]) == _U32.unpack(raw[nbytes:].tobytes())[0])  # fmt: skip
        del raw
        if intact:
            return np.memmap(path, dtype=dtype, mode="r", shape=array.shape)
        cache.discard(path)
    raise OSError(f"{root.child(key)}: holds {size} bytes, expected {nbytes + 4 * checked}, or fails its checksum "
                  "(damaged store)")  # fmt: skip


def unwritten_chunks(array: zarr.Array, start: int = 0, stop: int | None = None) -> list[str] | None:
    """:meth:`DirectArray.unwritten` of a zarr array; ``None`` for layouts :class:`DirectArray` does not read."""
    reader = direct_array(array)
    if reader is None:
        return None
    try:
        return reader.unwritten(start, stop)
    finally:
        reader.close()


def missing_chunk_files(array: zarr.Array) -> list[str]:
    """Chunk (or shard) files of a local zarr v3 array that are not on disk, for any codecs.

    Lists the array's directory once and compares it with the keys its
    chunk grid implies. Inner chunks of shards are :func:`unwritten_chunks`'s.
    """
    meta = array.metadata
    if meta.zarr_format != 3 or not isinstance(array.store, zarr.storage.LocalStore):
        return []
    root = Path(array.store.root) / array.path
    grid = tuple(meta.chunk_grid.chunk_shape)
    counts = [-(-size // chunk) for size, chunk in zip(array.shape, grid)]
    if any(c == 0 for c in counts):
        return []
    present = set()
    for directory, _, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        present.update(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files)
    return [
        str(root / key)
        for coords in np.ndindex(*counts)
        if (key := meta.encode_chunk_key(tuple(int(c) for c in coords))) not in present
    ]
