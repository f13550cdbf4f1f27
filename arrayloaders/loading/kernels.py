"""Compiled loops over a load's decoded entries (numba): the passes numpy cannot fuse.

Choosing genes touches every decoded entry of a load (~16M for 8,192
cells of 2,000 non-zeros) and keeps a few percent; in numpy that is six
passes over the load (a table lookup, a mask, its positions, gathers, a
sort, a scatter), in one compiled loop it is one, and the kept entries go
straight to their row of the slot. Workers import this module only when a
dataset chooses genes or densifies, so loaders of whole CSR rows pay
neither numba's import nor its compilation. Compiled code is cached on
disk (``cache=True``), so each later process only loads it; where numba
has no directory it may write that cache to (``NUMBA_CACHE_DIR`` and every
other place it looks read-only), each process compiles the loops itself
(a second or two, once) instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

__all__ = ["densify_rows", "pick_rows"]


def _compiled(function: Callable) -> Callable:
    """``function`` compiled with numba, cached on disk; compiled without the cache where numba cannot write one."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available for file ..."
        if "cannot cache" not in str(e):
            raise
        return numba.njit(cache=False, nogil=True)(function)


@_compiled
def densify_rows(bounds, data, indices, take, position, out):  # pragma: no cover - compiled
    """Dense row ``p`` of ``out`` from read row ``take[p]``; its entry of store column ``j`` goes to column ``position[j]``.

    Read row ``r`` holds ``data``/``indices[bounds[r]:bounds[r + 1]]``;
    entries whose ``position`` is negative (genes not chosen) are dropped.
    Every element of ``out[:take.size]`` is written. Returns 0, or -1 if a
    column index is past ``position`` (nothing is written out of bounds).
    """
    n_genes = position.size
    for p in range(take.size):
        r = take[p]
        row = out[p]
        row[:] = 0
        for e in range(bounds[r], bounds[r + 1]):
            j = indices[e]
            if j < 0 or j >= n_genes:  # compiled code does not check bounds: a bad index would write anywhere
                return -1
            c = position[j]
            if c >= 0:
                row[c] = data[e]
    return 0


@_compiled
def pick_rows(bounds, data, indices, take, position, n_columns, ordered, indptr, data_out, indices_out):  # pragma: no cover
    """CSR row ``p`` (``indptr``, ``data_out``, ``indices_out``) from read row ``take[p]``, renumbered by ``position``.

    As :func:`densify_rows`, but sparse: each row's kept entries in
    increasing output column (``n_columns`` of them). Unless ``ordered``
    (``position`` increases over the kept store columns, so store order is
    output order) they are sorted. Returns the entries written, or -1 if a
    column index is past ``position``.
    """
    n_genes = position.size
    o = 0
    indptr[0] = 0
    for p in range(take.size):
        r = take[p]
        for e in range(bounds[r], bounds[r + 1]):
            j = indices[e]
            if j < 0 or j >= n_genes:
                return -1
            c = position[j]
            if c >= 0:
                data_out[o] = data[e]
                indices_out[o] = c
                o += 1
        indptr[p + 1] = o
    if not ordered:
        _sort_rows(indptr, data_out, indices_out, n_columns)
    return o


@_compiled
def _sort_rows(indptr, data, columns, n_columns):  # pragma: no cover - compiled
    # Each row's entries by column: a least-significant-digit radix sort of 6-bit digits per
    # row, in place through two row-sized buffers. Linear in a row's ~100 entries and cache
    # resident, where a comparison sort per row costs 2-4x more.
    longest = 0
    for p in range(indptr.size - 1):
        longest = max(longest, indptr[p + 1] - indptr[p])
    spare_data, spare_columns = np.empty(longest, data.dtype), np.empty(longest, columns.dtype)
    count = np.empty(65, np.int64)
    digits = 1
    while (1 << (6 * digits)) < n_columns:
        digits += 1
    for p in range(indptr.size - 1):
        first, stop = indptr[p], indptr[p + 1]
        k = stop - first
        if k < 2:
            continue
        src_d, src_c, dst_d, dst_c = data[first:stop], columns[first:stop], spare_data[:k], spare_columns[:k]
        for d in range(digits):
            shift = 6 * d
            count[:] = 0
            for i in range(k):
                count[((src_c[i] >> shift) & 63) + 1] += 1
            for b in range(64):
                count[b + 1] += count[b]
            for i in range(k):
                b = (src_c[i] >> shift) & 63
                dst_d[count[b]], dst_c[count[b]] = src_d[i], src_c[i]
                count[b] += 1
            src_d, src_c, dst_d, dst_c = dst_d, dst_c, src_d, src_c
        if digits % 2:  # the sorted row is in the spare buffers
            data[first:stop], columns[first:stop] = src_d, src_c
