"""Reading ranges of elements of a zarr v3 array straight from its files on disk.

zarr-python costs 200-450 µs per read call, whatever the size, and a load of
8,192 cells in 32-cell runs needs ~500 calls: that overhead, not decoding,
bounded the loader (see the engine issue). zarr has no public batched read.
For the layouts this package writes (and any local zarr v3 array with the
same codecs) :class:`DirectArray` reads instead with one ``preadv`` and one
decode per inner chunk, straight into the caller's buffer (blosc and crc32c
called in C, :mod:`~arrayloaders.store.native_codecs`; zstd through numcodecs),
keeping the process's shard files open within one budget
(:mod:`~arrayloaders.store.open_files`):

- the array lies in a :class:`zarr.storage.LocalStore`, or in object storage
  (``layout.root``: byte ranges fetched through obstore,
  :mod:`~arrayloaders.store.range_fetcher`, many at a time);
- its codecs are ``bytes`` (little endian) optionally followed by ``blosc``
  or ``zstd`` and then optionally by ``crc32c``, either directly or inside
  ``sharding_indexed`` (whose index is ``bytes`` + optional ``crc32c``, at
  the start or end of the shard);
- it is 1-d, or 2-d with chunks (and shards) that span whole rows, so that a
  run of rows is one run of elements in C order.

:func:`~arrayloaders.store.zarr_layout.array_layout` learns that from zarr's
metadata (in the main process) and returns ``None`` for anything else: the
caller then reads through zarr. A reader is made from the layout alone, so
this module imports no zarr (a worker never does). The byte layout read here
is the one the zarr v3 sharding specification fixes.

**Damage is never read as data.** A chunk with a ``crc32c`` checksum is
verified (over its stored bytes) before it is decoded; a checksum mismatch,
a chunk that does not decode, or a truncated shard raises an ``OSError``
naming the file and the chunk. Our stores write every chunk (zarr's
``write_empty_chunks``) and mark their arrays with :data:`COMPLETE_ATTRIBUTE`;
there a missing shard file or inner chunk is damage too, not fill values.
Arrays without the mark (older stores, other writers) read a missing chunk
as the fill value, as zarr does.
"""

from __future__ import annotations

import os
import struct
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

from .disk_layout import COMPLETE_ATTRIBUTE, ArrayLayout
from .disk_layout import MAX_TABLES as _MAX_TABLES
from .disk_layout import MISSING as _MISSING
from .native_codecs import native_codecs
from .open_files import shard_files
from .remote_shards import RemoteShards

if TYPE_CHECKING:
    pass

__all__ = ["COMPLETE_ATTRIBUTE", "DirectArray"]


_U32 = struct.Struct("<I")  # a stored crc32c
_BLOSC_SIZES = struct.Struct("<4xI4xI")  # a blosc header's decoded and stored sizes (bytes 4-8, 12-16)
_PREFETCH_GAP = 1 << 18  # bytes between wanted chunks still read ahead in one request


def _decoder(codec: str) -> Callable[[memoryview, np.ndarray], None]:
    """A function decoding one stored chunk (its checksum, if any, cut off) of ``codec`` into a buffer.

    The checksum (zarr v3's ``crc32c`` codec: 4 bytes, little endian, of the
    bytes before it) is checked by the reader, not here: it has the chunk's
    bytes as a numpy view already, which saves a conversion per chunk.
    """
    if codec == "raw":

        def copy(src: memoryview, out: np.ndarray) -> None:
            if len(src) != out.nbytes:
                raise ValueError(f"the chunk holds {len(src)} bytes, expected {out.nbytes}")
            out.view(np.uint8)[:] = np.frombuffer(src, dtype=np.uint8)

        return copy
    if codec == "blosc":
        import numcodecs.blosc  # here: a reader with the native codecs never needs it (numcodecs' import: ~35 ms)

        def blosc(src: memoryview, out: np.ndarray) -> None:
            # blosc fills only as many bytes as the chunk holds (bytes 4-8 of its
            # 16-byte header): check, or stale bytes would be left in ``out``.
            held = int.from_bytes(src[4:8], "little")
            if held != out.nbytes:
                raise ValueError(f"a blosc chunk holds {held} bytes, expected {out.nbytes}")
            numcodecs.blosc.decompress(src, out)

        return blosc
    if codec == "zstd":
        import numcodecs.zstd

        zstd = numcodecs.zstd.Zstd()

        def decode_zstd(src: memoryview, out: np.ndarray) -> None:
            # Decoded into ``out``, a frame of fewer bytes would leave stale bytes after it, unseen
            # (numcodecs does not compare sizes): decode whole, check, then copy.
            decoded = zstd.decode(src)
            if len(decoded) != out.nbytes:
                raise ValueError(f"a zstd chunk holds {len(decoded)} bytes, expected {out.nbytes}")
            out.view(np.uint8)[:] = np.frombuffer(decoded, dtype=np.uint8)

        return decode_zstd
    raise ValueError(f"no decoder for codec {codec!r}")


class DirectArray(RemoteShards):
    """Elements ``[start, stop)`` of a zarr v3 array (flattened in C order), decoded into a buffer.

    Made from an :class:`~arrayloaders.store.disk_layout.ArrayLayout` (a worker's, sent by
    the main process), or with :meth:`open` from a zarr array. Not
    thread-safe: one per thread or process.
    """

    def __init__(self, layout: ArrayLayout):
        self.layout = layout
        self.path, self.dtype, self.fill_value = layout.path, np.dtype(layout.dtype), layout.fill_value
        self.n_elements, self.file_elements, self.chunk_elements = layout.n_elements, layout.file_elements, layout.chunk_elements
        self._index_at = layout.index  # (where, bytes per entry) of a shard index, None if unsharded
        self.complete = layout.complete  # every chunk was written: a missing one is damage
        self.checked = layout.checked  # every stored chunk ends in its crc32c
        self._per_file = layout.file_elements // layout.chunk_elements
        # Descriptors live in the process's one set of open shard files (arrayloaders.store.open_files),
        # closed with this reader at the latest.
        self._files = shard_files()
        self._owner = self._files.owner()
        weakref.finalize(self, self._files.close_all, self._owner)
        self._tables: dict[int, np.ndarray | None] = {}
        # blosc chunks decoded by blosc's C function (``None``: through ``decode``)
        self._native = native_codecs() if layout.codec == "blosc" else None
        self._decode = _decoder(layout.codec) if self._native is None else None
        self._scratch = np.empty(self.chunk_elements, self.dtype)
        self._scratch_addr = self._scratch.ctypes.data
        self._set_compressed(bytearray(self.chunk_elements * self.dtype.itemsize + 1024))
        self._paths: dict[int, Path] = {}  # of the files opened so far
        # Remote: byte ranges come from the process's fetcher; a file is named by its key, not a descriptor.
        self._remote = layout.root
        self._etags: dict[int, str | None] = {}  # file -> the ETag its index was read with
        self._remote_files: dict[str, int] = {}  # key -> file
        # The inner chunk whose decoded elements ``_scratch`` holds: rows read one at a time in
        # store order (a sampler's) often share one, and it is then decoded once, not per row.
        self._scratch_chunk = -1

    @property
    def compiled(self) -> bool:
        """Whether :meth:`gather` runs compiled now: blosc chunks, and the loop already loaded in this process."""
        return self._native is not None and _compiled_loop_warm()

    # ------------------------------------------------------------------ files

    def _file(self, f: int) -> tuple[int, np.ndarray, Path] | None:
        """(fd, chunk table, path) of file ``f``; the table holds (offset, nbytes) per inner chunk.

        Tables are kept (16 bytes per inner chunk); descriptors are kept for
        the process's most recently used files only. The descriptor stays
        open at least until this reader asks for another file.
        """
        if self._remote is not None:
            return self._remote_file(f)
        fd = self._files.get(self._owner, f)
        if fd is not None:
            path = self._paths[f]
        else:
            if f in self._tables and self._tables[f] is None:
                return None
            path = self._paths.get(f)
            if path is None:
                path = self._paths[f] = self.layout.file_path(f)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if self.complete:
                    lo, hi = f * self.file_elements, min((f + 1) * self.file_elements, self.n_elements)
                    raise OSError(
                        f"{path}: the file is missing, but the array holds elements [{lo}, {hi}) there "
                        "(every chunk of this store was written: damaged store)"
                    ) from None
                self._tables[f] = None  # never written: all fill value
                return None
            self._files.put(self._owner, f, fd)
        table = self._tables.get(f)
        if table is None:
            try:
                table = self._chunk_table(fd, path)
            except BaseException:
                self._files.close(self._owner, f)
                raise
            if len(self._tables) >= _MAX_TABLES:
                self._tables.pop(next(iter(self._tables)))
            self._tables[f] = table
        return fd, table, path

    def _chunk_table(self, fd: int, path: Path) -> np.ndarray:
        size = os.fstat(fd).st_size
        if self._index_at is None:
            return np.array([[0, size]], dtype=np.uint64)
        where, checksum = self._index_at
        nbytes = 16 * self._per_file + checksum
        at = size - nbytes if where == "end" else 0
        return self._parse_index(os.pread(fd, nbytes, at) if at >= 0 else b"", size, path)

    def _parse_index(self, raw: bytes, size: int, path) -> np.ndarray:
        """The chunk table of a shard of ``size`` bytes from its index bytes ``raw``, checked."""
        where, checksum = self._index_at
        nbytes = 16 * self._per_file + checksum
        if len(raw) != nbytes:
            raise OSError(f"{path}: shard is {size} bytes, too short for its index of {nbytes} bytes")
        if checksum and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise OSError(f"{path}: the shard index does not match its crc32c checksum (damaged or truncated file)")
        table = np.frombuffer(raw[: 16 * self._per_file], dtype="<u8").reshape(-1, 2)
        written = table[:, 1] != _MISSING
        data_end = size - nbytes if where == "end" else size
        if (table[written, 0] + table[written, 1] > data_end).any():
            raise OSError(f"{path}: the shard index points past the end of the file (truncated file)")
        return table

    def close(self) -> None:
        self._files.close_all(self._owner)

    def order_chunks(self, start: int, stop: int) -> int:
        """Lay out the inner chunks of the shards holding elements ``[start, stop)`` in chunk order.

        zarrs appends the inner chunks of a shard written on its own in the
        order its threads finish them, so the same values could be laid out
        differently from run to run. In chunk order, a store's bytes depend
        on its values only. Shards already in order are left alone (their
        index is read, 4 KiB); returns how many were rewritten.
        """
        if self._index_at is None or stop <= start:
            return 0
        where, checksum = self._index_at
        rewritten = 0
        for f in range(start // self.file_elements, -(-stop // self.file_elements)):
            got = self._file(f)
            if got is None:
                continue
            _, table, path = got
            written = np.flatnonzero(table[:, 1] != _MISSING)
            if (np.diff(table[written, 0].astype(np.int64)) > 0).all():
                continue
            raw = path.read_bytes()
            index_nbytes = 16 * self._per_file + checksum
            at = index_nbytes if where == "start" else 0
            ordered, pieces = table.copy(), []
            for c in written:
                offset, nbytes = int(table[c, 0]), int(table[c, 1])
                pieces.append(raw[offset : offset + nbytes])
                ordered[c, 0] = at
                at += nbytes
            index = ordered.astype("<u8").tobytes()
            if checksum:
                index += _U32.pack(google_crc32c.value(index))
            body = b"".join(pieces)
            staged = path.with_name(path.name + ".ordering")
            staged.write_bytes(index + body if where == "start" else body + index)
            os.replace(staged, path)
            self._files.close(self._owner, f)
            self._tables.pop(f, None)
            rewritten += 1
        return rewritten

    # ------------------------------------------------------------------ reading

    def prefetch(self, start: int, stop: int) -> None:
        """Ask the kernel to start reading the bytes of elements ``[start, stop)`` (``POSIX_FADV_WILLNEED``).

        Issued for a whole load before decoding it, so that on a cold cache
        the disk works on many reads at once while the first runs decode.
        """
        if stop <= start:
            return
        ce = self.chunk_elements
        first, last = start // ce, (stop - 1) // ce
        if self._remote is not None:
            self._want_remote(np.arange(first, last + 1))
            return
        if not hasattr(os, "posix_fadvise"):
            return
        for f in range(first // self._per_file, last // self._per_file + 1):
            entry = self._file(f)
            if entry is None:
                continue
            fd, table, _ = entry
            lo, hi = max(first - f * self._per_file, 0), min(last - f * self._per_file, len(table) - 1)
            written = [(o, o + n) for o, n in table[lo : hi + 1].tolist() if n != _MISSING]
            if written:
                begin = min(w[0] for w in written)
                os.posix_fadvise(fd, begin, max(w[1] for w in written) - begin, os.POSIX_FADV_WILLNEED)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Decode elements ``[start, stop)`` into ``out`` (1-d, contiguous, ``stop - start`` long)."""
        if not 0 <= start <= stop <= self.n_elements:
            raise IndexError(f"{self.path}: elements [{start}, {stop}) out of range [0, {self.n_elements})")
        ce = self.chunk_elements
        c = start // ce
        while c * ce < stop:
            if c == self._scratch_chunk:
                lo = c * ce
                a, b = max(start, lo), min(stop, lo + ce)
                out[a - start : b - start] = self._scratch[a - lo : b - lo]
                c += 1
                continue
            f, k = divmod(c, self._per_file)
            entry = self._file(f)
            # Inner chunks stored back to back are read with one call.
            last = min((stop - 1) // ce, (f + 1) * self._per_file - 1)
            if entry is None:
                lo, hi = max(start, c * ce), min(stop, (last + 1) * ce)
                out[lo - start : hi - start] = self.fill_value
                c = last + 1
                continue
            fd, table, file_path = entry
            if self._index_at is None:
                offsets, sizes = [0], [int(table[0, 1])]
                last = c
            else:
                rows = table[k : k + last - c + 1].tolist()
                run = 1
                while run < len(rows) and rows[run - 1][1] != _MISSING and rows[run][0] == sum(rows[run - 1]):
                    run += 1
                offsets, sizes = [r[0] for r in rows[:run]], [r[1] for r in rows[:run]]
                last = c + run - 1
            self._read_chunks(fd, file_path, c, offsets, sizes, start, stop, out)
            c = last + 1

    def _read_chunks(self, fd, path, first, offsets, sizes, start, stop, out) -> None:
        ce = self.chunk_elements
        if sizes[0] == _MISSING:
            if self.complete:
                self._missing(path, first)
            lo, hi = max(start, first * ce), min(stop, (first + 1) * ce)
            out[lo - start : hi - start] = self.fill_value
            return
        self._read_stored(fd, path, offsets[0], offsets[-1] + sizes[-1] - offsets[0])
        in_place = out.dtype == self.dtype
        out_addr = out.ctypes.data if in_place and self._native is not None else 0
        pos = 0
        for i, nbytes in enumerate(sizes):
            c = first + i
            lo, hi = c * ce, (c + 1) * ce
            a, b = max(start, lo), min(stop, hi)
            if in_place and a == lo and b == hi:  # the whole chunk is wanted: decode in place
                self._decode_stored(pos, nbytes, path, c, out, a - start, out_addr)
            else:  # a part (chunks are stored whole, the last one padded), or another dtype: decode aside
                self._scratch_chunk = -1  # overwritten now; set again once decoded
                self._decode_stored(pos, nbytes, path, c, self._scratch, 0, self._scratch_addr)
                self._scratch_chunk = c
                out[a - start : b - start] = self._scratch[a - lo : b - lo]
            pos += nbytes

    def gather(self, starts: np.ndarray, stops: np.ndarray, dests: np.ndarray, out: np.ndarray,
               wanted: bool = False) -> None:  # fmt: skip
        """Copy elements ``[starts[i], stops[i])`` to ``out[dests[i]:]`` for every ``i``, decoding each inner chunk once.

        For loads of many short ranges (rows a sampler picked): ranges may
        come in any order, repeat and overlap. Work is per inner chunk, not
        per range: the chunks are read in store order (stored neighbours
        with one system call), and each is decoded once, straight into
        ``out`` when one range wants all of it. ``wanted``: its chunks were
        wanted ahead (:meth:`prefetch_gather`).
        """
        keep = stops > starts
        starts, stops, dests = starts[keep], stops[keep], dests[keep]
        if starts.size == 0:
            return
        if starts.min() < 0 or stops.max() > self.n_elements:
            raise IndexError(f"{self.path}: elements out of range [0, {self.n_elements})")
        ce, per = self.chunk_elements, self._per_file
        first = starts // ce
        span = (stops - 1) // ce - first + 1
        # One piece per (range, chunk it touches), in chunk order.
        owner = np.repeat(np.arange(starts.size), span)
        chunk = first[owner] + np.arange(owner.size) - np.repeat(np.cumsum(span) - span, span)
        order = np.argsort(chunk, kind="stable")
        owner, chunk = owner[order], chunk[order]
        lo = np.maximum(starts[owner], chunk * ce)
        sizes = np.minimum(stops[owner], (chunk + 1) * ce) - lo
        src = lo - chunk * ce
        dst = dests[owner] + lo - starts[owner]
        chunks, at = np.unique(chunk, return_index=True)
        if not wanted:
            self._prefetch_chunks(chunks)
        self._scratch_chunk = -1  # the scratch buffer is reused below
        in_place = out.dtype == self.dtype  # a whole wanted chunk decodes straight into out
        gather_file = self._compiled(src, dst, sizes, np.append(at, src.size), out, in_place)
        src, dst, sizes = src.tolist(), dst.tolist(), sizes.tolist()
        at, chunk_ids = at.tolist() + [len(src)], chunks.tolist()
        out_addr = out.ctypes.data if in_place and self._native is not None else 0

        def fill(u: int, v: int) -> None:  # pieces of chunks u..v-1 that were never written
            for p in range(at[u], at[v]):
                out[dst[p] : dst[p] + sizes[p]] = self.fill_value

        scratch = self._scratch
        files = chunks // per
        file_list, file_at = np.unique(files, return_index=True)
        file_at = file_at.tolist() + [chunks.size]
        for n, f in enumerate(file_list.tolist()):
            u, v = file_at[n], file_at[n + 1]
            entry = self._file(f)  # per file, not held across files: descriptors are evicted
            if entry is None:
                fill(u, v)
                continue
            fd, table, path = entry
            stored = table[chunks[u:v] - f * per]
            missing = stored[:, 1] == _MISSING
            if missing.any() and self.complete:
                self._missing(path, chunk_ids[u + int(np.argmax(missing))])
            offsets = np.where(missing, 0, stored[:, 0]).astype(np.int64)
            nbytes = np.where(missing, 0, stored[:, 1]).astype(np.int64)
            # Chunks next to each other in the file, all wanted: one read.
            joined = (np.diff(chunks[u:v]) == 1) & (offsets[1:] == offsets[:-1] + nbytes[:-1]) & ~missing[1:] & ~missing[:-1]
            groups = np.flatnonzero(~joined) + 1
            m0 = 0
            if gather_file is not None and not missing.any():
                # The compiled loop does the whole file, or stops at a chunk it could not do: the loop
                # below then does that chunk and the rest one at a time, and raises naming the file.
                m0 = gather_file(fd, offsets, nbytes, np.append(groups, v - u), u, v)
                if m0 < 0:
                    continue
                groups = np.arange(m0 + 1, v - u)
            offsets, nbytes, missing = offsets.tolist(), nbytes.tolist(), missing.tolist()
            for g0, g1 in zip([m0, *groups.tolist()], [*groups.tolist(), v - u]):
                if missing[g0]:
                    fill(u + g0, u + g1)
                    continue
                self._read_stored(fd, path, offsets[g0], offsets[g1 - 1] + nbytes[g1 - 1] - offsets[g0])
                pos = 0
                for m in range(g0, g1):
                    a, b = at[u + m], at[u + m + 1]
                    if in_place and b == a + 1 and sizes[a] == ce:
                        self._decode_stored(pos, nbytes[m], path, chunk_ids[u + m], out, dst[a], out_addr)
                    else:
                        self._decode_stored(pos, nbytes[m], path, chunk_ids[u + m], scratch, 0, self._scratch_addr)
                        for p in range(a, b):
                            out[dst[p] : dst[p] + sizes[p]] = scratch[src[p] : src[p] + sizes[p]]
                    pos += nbytes[m]

    def _compiled(self, src: np.ndarray, dst: np.ndarray, sizes: np.ndarray, at: np.ndarray, out: np.ndarray,
                  in_place: bool) -> Callable[..., int] | None:  # fmt: skip
        """:mod:`arrayloaders.store.chunk_gather`'s loop over one file's chunks ``u..v-1`` of a gather, or ``None``.

        ``src``, ``dst``, ``sizes`` are the gather's pieces and ``at`` each
        wanted chunk's first piece, then their count. ``None`` without the
        native codecs (the loop calls them: blosc arrays only).
        """
        if self._native is None or out.ndim != 1 or not out.flags.c_contiguous:
            return None
        from .chunk_gather import chunk_gather  # imports numba: only gathers (a sampler's loads) pay for it

        gather = chunk_gather()
        if gather is None:
            return None

        def gather_file(fd: int, offsets: np.ndarray, nbytes: np.ndarray, group_ends: np.ndarray, u: int, v: int) -> int:
            group_starts = offsets[np.r_[0, group_ends[:-1]]]
            largest = int((offsets[group_ends - 1] + nbytes[group_ends - 1] - group_starts).max())
            if len(self._compressed) < largest:
                self._set_compressed(bytearray(largest))
            return gather(fd, offsets, nbytes, group_ends, at[u : v + 1], src, dst, sizes, out, self._scratch,
                          self._compressed_view, self.checked, in_place)  # fmt: skip

        return gather_file

    def _set_compressed(self, buf: bytearray) -> None:
        self._compressed = buf
        self._compressed_view = np.frombuffer(buf, dtype=np.uint8)  # for google_crc32c
        self._compressed_addr = self._compressed_view.ctypes.data

    def _read_stored(self, fd: int, path: Path, offset: int, nbytes: int) -> None:
        """Read ``nbytes`` stored bytes at ``offset`` of a file into ``_compressed`` (reused by the next read)."""
        if len(self._compressed) < nbytes:
            self._set_compressed(bytearray(nbytes))
        if self._remote is not None:  # ``path`` is the object's URL
            key = str(path)[len(self._remote.url) + 1 :]
            etag = self._etags.get(self._remote_files.get(key))
            self._compressed[:nbytes] = self._fetch.read(self._remote, key, offset, offset + nbytes, etag)
            return
        got = os.preadv(fd, [memoryview(self._compressed)[:nbytes]], offset)
        if got != nbytes:
            raise OSError(f"{path}: short read ({got} of {nbytes} bytes) at offset {offset}")

    def _decode_stored(self, pos: int, nbytes: int, path: Path, c: int, out: np.ndarray, at: int, out_addr: int) -> None:
        """Verify chunk ``c``, stored at ``_compressed[pos:pos + nbytes]``, and decode it into ``out[at:]``.

        Damage is never decoded as data: the checksum is checked first.
        ``out_addr`` is the address of ``out`` (used when blosc is called natively).
        """
        end = pos + nbytes
        native = self._native
        if self.checked:
            end -= 4
            if end < pos:
                self._damaged(path, c, "checksum mismatch")
            stored = _U32.unpack_from(self._compressed, end)[0]
            if native is not None:
                crc = native.crc32c(self._compressed_addr + pos, end - pos)
            else:
                crc = google_crc32c.value(self._compressed_view[pos:end])
            if crc != stored:
                self._damaged(path, c, "checksum mismatch")
        ce, itemsize = self.chunk_elements, self.dtype.itemsize
        if native is None:
            try:
                self._decode(memoryview(self._compressed)[pos:end], out[at : at + ce])
            except Exception as e:  # noqa: BLE001 - blosc and zstd raise different types
                self._damaged(path, c, f"cannot be decoded ({type(e).__name__}: {e})", e)
            return
        # blosc's C function trusts the sizes in the chunk's header: check them against what is stored.
        want = ce * itemsize
        held, length = _BLOSC_SIZES.unpack_from(self._compressed, pos) if end - pos >= 16 else (-1, -1)
        if held != want or length != end - pos:
            self._damaged(path, c, f"cannot be decoded (its blosc header says {length} bytes holding {held}; "
                                   f"stored {end - pos} bytes, {want} expected)")  # fmt: skip
        if native.blosc_decompress(self._compressed_addr + pos, int(out_addr + at * itemsize), want) != want:
            self._damaged(path, c, "cannot be decoded (blosc reports an error)")

    def _prefetch_chunks(self, chunks: np.ndarray) -> None:
        """:meth:`prefetch` for sorted inner ``chunks``: one request per stretch of the file they cover.

        Wanted chunks less than :data:`_PREFETCH_GAP` bytes apart share a
        request (the kernel reads the gap too, but a few system calls replace
        thousands: rows picked at random touch chunks a few apart).
        """
        if chunks.size and self._remote is not None:
            self._want_remote(chunks)
            return
        if chunks.size == 0 or not hasattr(os, "posix_fadvise"):
            return
        per = self._per_file
        files = chunks // per
        for f in np.unique(files).tolist():
            entry = self._file(f)
            if entry is None:
                continue
            fd, table, _ = entry
            rows = table[chunks[files == f] - f * per]
            rows = rows[rows[:, 1] != _MISSING].astype(np.int64)
            if rows.size == 0:
                continue
            begin, end = rows[:, 0], rows[:, 0] + rows[:, 1]
            order = np.argsort(begin)
            begin, end = begin[order], np.maximum.accumulate(end[order])
            breaks = np.flatnonzero(begin[1:] - end[:-1] > _PREFETCH_GAP) + 1
            for a, b in zip(begin[np.r_[0, breaks]].tolist(), end[np.r_[breaks - 1, end.size - 1]].tolist()):
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)

    def _missing(self, path: Path, c: int):
        ce = self.chunk_elements
        raise OSError(
            f"{path}: inner chunk {c % self._per_file} (elements [{c * ce}, {(c + 1) * ce}) of "
            "the array) is missing from the shard (every chunk of this store was written: damaged store)"
        )

    def _damaged(self, path: Path, c: int, problem: str, cause: BaseException | None = None):
        ce = self.chunk_elements
        where = f"inner chunk {c % self._per_file} of the shard" if self._index_at else "the chunk"
        raise OSError(
            f"{path}: {where} (elements [{c * ce}, {(c + 1) * ce}) of the array): {problem} (damaged file)"
        ) from cause

    # ------------------------------------------------------------------ completeness

    def unwritten(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Chunks holding elements of ``[start, stop)`` that are not stored: missing files, empty index entries.

        Each is described by its file (and inner chunk). Reads shard indexes
        afresh, so it sees what was written since the reader was opened.
        """
        stop = self.n_elements if stop is None else stop
        if stop <= start:
            return []
        ce, per = self.chunk_elements, self._per_file
        first, last = start // ce, (stop - 1) // ce
        found = []
        if self._remote is not None:
            return self._remote_unwritten(first, last)
        for f in range(first // per, last // per + 1):
            path = self.layout.file_path(f)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                found.append(str(path))
                continue
            try:
                if self._index_at is None:
                    continue
                table = self._chunk_table(fd, path)
            finally:
                os.close(fd)
            lo, hi = max(first - f * per, 0), min(last - f * per, per - 1)
            found += [f"{path} (inner chunk {k})" for k in range(lo, hi + 1) if table[k, 1] == _MISSING]
        return found


def _compiled_loop_warm() -> bool:
    """:func:`arrayloaders.store.chunk_gather.is_warm`, without importing that module (and numba) if nothing has yet."""
    # getattr: another thread may be importing it right now (a worker warms it in a thread)
    is_warm = getattr(sys.modules.get("arrayloaders.store.chunk_gather"), "is_warm", None)
    return is_warm is not None and is_warm()
