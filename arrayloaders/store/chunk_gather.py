"""The inner chunks of one shard file that sampled rows need: read, verified, decoded and scattered in one compiled loop.

A sampler's rows (``sampler=``) each want a few kilobytes out of an inner
chunk of ``data`` and one of ``indices``, so a load decodes about one
inner chunk of each per row. Measured on the default layout (8,192
elements per inner chunk): blosc's decompression takes 27 µs of a data
chunk's 40 µs and 9.5 µs of an indices chunk's 24 µs; the rest was the
Python around it (a ``preadv``, the checksum and header checks, the copies
of the rows' pieces, uint16 column indices widened to int32). Here that
loop is compiled (numba) and calls the same C functions
(:mod:`arrayloaders.store.native_codecs`) and libc's ``pread`` directly.

The loop only reports *where* it stopped; the caller reads and decodes
that chunk again on its Python path, which raises the error naming the
file and the chunk (short read, checksum mismatch, a header that lies,
a blosc error), so both paths fail with the same message.

The loop also serves chunked access (runs of rows), where it saves the
Python around each chunk and each row (a load of 8,192 cells: 139 ms on
the Python path, 119 ms here; ``scripts/measure/load_paths.py``). But importing
this module imports numba (~0.13 s after numpy), and the first
call in a process loads the compiled code from numba's disk cache (~0.3 s,
0.14 s in a worker: :func:`warm`). A sampler's loads need the loop and
pay that at their first gather; chunked access uses it only once
:func:`warm` has run (a worker of a CSR store calls it in a thread of
its own as it starts), so no load waits for it.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable

import numba
import numpy as np

from .native_codecs import native_codecs

__all__ = ["ChunkGather", "chunk_gather", "is_warm", "warm"]

DONE = -1  # returned by the loop when every chunk was done


def _compiled(function: Callable) -> Callable:
    """``function`` compiled with numba, its machine code cached on disk; ``function`` itself where numba has
    no directory it may write the cache to (``NUMBA_CACHE_DIR`` and every other place numba looks read-only):
    :func:`chunk_gather` then gives ``None``, and every load takes the Python path, with the same values."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available for file ..."
        if "cannot cache" not in str(e):
            raise
        return function


@_compiled
def _u32(buf, at):  # pragma: no cover - compiled
    return np.uint32(buf[at]) | np.uint32(buf[at + 1]) << 8 | np.uint32(buf[at + 2]) << 16 | np.uint32(buf[at + 3]) << 24


@_compiled
def _gather_chunks(pread, crc32c, blosc, fd, offsets, nbytes, group_ends, at, src, dst, sizes, out, scratch, compressed,
                   checked, in_place):  # fmt: skip  # pragma: no cover - compiled
    """Chunks ``0..offsets.size - 1`` of one file, read group by group (``group_ends``: one past each group's last chunk).

    Chunk ``k`` is stored at ``offsets[k]`` (``nbytes[k]`` bytes, then its
    crc32c if ``checked``); its pieces are ``at[k]..at[k + 1] - 1``: piece
    ``p`` copies elements ``src[p]:src[p] + sizes[p]`` of the decoded chunk
    to ``out[dst[p]:]``. A chunk wanted whole by one piece is decoded
    straight into ``out`` if ``in_place`` (same dtype as ``scratch``).
    Returns :data:`DONE`, or the first chunk that could not be read,
    verified or decoded (chunks before it are written; nothing of it or
    after it is).
    """
    base = compressed.ctypes.data
    chunk_elements = scratch.size
    chunk_bytes = chunk_elements * scratch.itemsize
    m = 0
    for g in range(group_ends.size):
        end = group_ends[g]
        first = offsets[m]
        total = offsets[end - 1] + nbytes[end - 1] - first
        if total > compressed.size or pread(fd, base, total, first) != total:
            return m
        pos = 0
        for k in range(m, end):
            stop = pos + nbytes[k]
            if checked:
                stop -= 4
                if stop < pos or crc32c(base + pos, stop - pos) != _u32(compressed, stop):
                    return k
            # blosc trusts its header: the decoded size (bytes 4-8) and the stored size (12-16)
            if stop - pos < 16 or _u32(compressed, pos + 4) != chunk_bytes or _u32(compressed, pos + 12) != stop - pos:
                return k
            a, b = at[k], at[k + 1]
            if in_place and b == a + 1 and sizes[a] == chunk_elements and dst[a] + chunk_elements <= out.size:
                if blosc(base + pos, out.ctypes.data + dst[a] * out.itemsize, chunk_bytes, 1) != chunk_bytes:
                    return k
            else:
                if blosc(base + pos, scratch.ctypes.data, chunk_bytes, 1) != chunk_bytes:
                    return k
                for p in range(a, b):
                    if dst[p] + sizes[p] > out.size or src[p] + sizes[p] > chunk_elements:
                        return k
                    out[dst[p] : dst[p] + sizes[p]] = scratch[src[p] : src[p] + sizes[p]]
            pos += nbytes[k]
        m = end
    return DONE


class ChunkGather:
    """The compiled loop bound to the C functions it calls (arguments: :func:`_gather_chunks`'s after them)."""

    def __init__(self, crc32c: Callable, blosc_decompress_ctx: Callable, pread: Callable):
        self._functions = (pread, crc32c, blosc_decompress_ctx)

    def __call__(self, fd: int, offsets, nbytes, group_ends, at, src, dst, sizes, out: np.ndarray, scratch: np.ndarray,
                 compressed: np.ndarray, checked: bool, in_place: bool) -> int:  # fmt: skip
        return _gather_chunks(*self._functions, fd, offsets, nbytes, group_ends, at, src, dst, sizes, out, scratch,
                              compressed, checked, in_place)  # fmt: skip


@functools.cache
def chunk_gather() -> ChunkGather | None:
    """The compiled gather, or ``None`` where the native codecs or libc's ``pread`` cannot be found, or where
    numba compiles nothing (``NUMBA_DISABLE_JIT=1``, or no writable cache directory, leaves plain Python
    functions, which cannot call them)."""
    native = native_codecs()
    if native is None or not all(hasattr(f, "signatures") for f in (_u32, _gather_chunks)):
        return None
    try:
        pread = ctypes.CDLL(None).pread
    except (OSError, AttributeError):
        return None
    # ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
    pread.restype = ctypes.c_ssize_t
    return ChunkGather(native.crc32c, native.blosc_decompress_ctx, pread)


#: (output dtype, stored dtype) of the usual loads: float32 values; uint16 column indices widened to int32
USUAL_DTYPES = ((np.dtype(np.float32), np.dtype(np.float32)), (np.dtype(np.int32), np.dtype(np.uint16)))
_warmed = False


def warm(dtypes=USUAL_DTYPES, without_blas: bool = False) -> None:
    """Load the loop's machine code for gathers of ``dtypes`` ((output dtype, stored dtype) pairs) now.

    Gathers no chunk: it only makes numba load (or, in a fresh install,
    compile: ~3 s) the loop for each pair, so that chunked access can use
    it from then on (:func:`is_warm`) without a load waiting for numba.

    ``without_blas``: for a process that never computes with numba's
    linear algebra (a worker). numba's first compilation or cache load in
    a process looks for BLAS by importing ``scipy.linalg`` (0.2 s of the
    0.3 s it takes here); the import is made to fail instead, and numba
    then has no BLAS in this process. Any other thread's import of
    ``scipy.linalg`` during the call fails too.
    """
    global _warmed
    gather = chunk_gather()
    if gather is None:
        return
    skip = without_blas and "scipy.linalg" not in sys.modules
    if skip:
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import fails: python's documented way
    try:
        none = np.zeros(0, np.int64)
        for out, stored in dtypes:
            gather(-1, none, none, none, np.zeros(1, np.int64), none, none, none, np.zeros(0, out),
                   np.zeros(1, stored), np.zeros(1, np.uint8), True, np.dtype(out) == np.dtype(stored))  # fmt: skip
        _warmed = True
    finally:
        if skip and sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]


def is_warm() -> bool:
    """Whether :func:`warm` has loaded the loop in this process: calling it is then cheap."""
    # NUMBA_DISABLE_JIT=1 leaves the plain Python function, which has no compiled signatures: never warm
    return _warmed and bool(getattr(_gather_chunks, "signatures", ()))
