"""blosc decompression and crc32c checksums called in C, without a Python wrapper per chunk.

A sampled row costs one inner chunk of ``data`` and one of ``indices``
decoded, and chunked access one chunk per few cells: tens of thousands of
decode calls per second per worker. Through ``numcodecs.blosc.decompress``
and ``google_crc32c.value`` each call also pays their Python-side checks
(buffer protocol conversions, a process-id check and a lock per call in
numcodecs), which in a profile of a sampler's load cost about as much as
decompressing itself.

Neither package has a lower-level public API, but both ship the C
libraries they wrap: numcodecs' blosc extension links c-blosc and exports
its functions, and google-crc32c's extension is linked to libcrc32c. This
module finds ``blosc_decompress_ctx`` and ``crc32c_value`` there (``dlsym``
on each extension, which also searches the libraries it links; numcodecs'
is found and loaded without importing numcodecs). It is the
only place that does: if either is missing (another build of either
package), :func:`native_codecs` returns ``None`` and readers decode through
numcodecs, with the same checks and results (tests compare both paths).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.util
from dataclasses import dataclass

__all__ = ["NativeCodecs", "native_codecs"]


@dataclass(frozen=True)
class NativeCodecs:
    """Two C functions taking addresses (``int``), both safe to call from any thread.

    ``blosc_decompress(src, dest, nbytes)`` decodes the blosc chunk at ``src``
    into ``nbytes`` bytes at ``dest`` and returns the number of bytes written
    (negative on error). It trusts the sizes in the chunk's 16-byte header:
    check them against the stored size first. ``crc32c(src, nbytes)`` is the
    CRC-32C of ``nbytes`` bytes at ``src``.
    """

    blosc_decompress: object
    crc32c: object
    #: ``blosc_decompress`` is this C function with a thread count of 1; for compiled callers
    blosc_decompress_ctx: object = None


@functools.cache
def native_codecs() -> NativeCodecs | None:
    """The C functions, or ``None`` where the installed packages do not expose them."""
    try:
        import google_crc32c
        import google_crc32c._crc32c

        blosc_file = _extension_file("numcodecs", "blosc")
        if google_crc32c.implementation != "c" or blosc_file is None:
            return None
        decompress_ctx = ctypes.CDLL(blosc_file).blosc_decompress_ctx
        crc32c_value = ctypes.CDLL(google_crc32c._crc32c.__file__).crc32c_value
    except (ImportError, OSError, AttributeError):
        return None
    # int blosc_decompress_ctx(const void *src, void *dest, size_t destsize, int numinternalthreads)
    decompress_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    decompress_ctx.restype = ctypes.c_int
    # uint32_t crc32c_value(const uint8_t *data, size_t count)
    crc32c_value.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    crc32c_value.restype = ctypes.c_uint32

    def blosc_decompress(src: int, dest: int, nbytes: int) -> int:
        return decompress_ctx(src, dest, nbytes, 1)  # one thread: workers are the parallelism

    return NativeCodecs(blosc_decompress=blosc_decompress, crc32c=crc32c_value, blosc_decompress_ctx=decompress_ctx)


def _extension_file(package: str, module: str) -> str | None:
    """The file of ``package.module``, a compiled extension, found without importing ``package``.

    Importing numcodecs runs its codec registry (entry points, a dozen
    extensions): ~35 ms of a worker's ~0.15 s start, for one C function.
    Loaded with ``ctypes`` only, the extension's module is not initialised:
    ``blosc_decompress_ctx`` needs no ``blosc_init``, unlike blosc's global calls.
    """
    spec = importlib.util.find_spec(package)  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    found = importlib.machinery.PathFinder.find_spec(f"{package}.{module}", list(spec.submodule_search_locations))
    if found is None or not isinstance(found.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return found.origin
