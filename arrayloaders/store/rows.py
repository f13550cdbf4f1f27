"""Reading runs of consecutive rows of one X, one run at a time.

A run of rows is one range of elements: ``data[indptr[a]:indptr[b]]`` for
CSR, ``X[a:b]`` for dense. :func:`open_rows` reads runs straight from the
files where :class:`~arrayloaders.store.shards.DirectArray` supports the layout
(every store this package writes), and through zarr's asynchronous API
otherwise (runs issued concurrently, the zarrs codec pipeline decoding).

A reader opened on a :class:`~arrayloaders.store.disk_layout.DirectX` (what the
main process sends a worker) needs no zarr: zarr is imported only where it
is used, so such a worker never imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..errors import StoreError
from .disk_layout import COMPLETE_ATTRIBUTE, DirectX
from .shards import DirectArray

if TYPE_CHECKING:
    from .disk_layout import XSource

__all__ = ["CsrRows", "DenseRows", "open_rows", "read_indptr"]


class _ZarrArrays:
    """zarr arrays of one X opened on a private event loop, read with concurrent ``getitem`` calls."""

    def __init__(self, source: XSource, names: tuple[str, ...]):
        import asyncio

        import zarr.api.asynchronous

        self._loop = asyncio.new_event_loop()

        async def open_all():
            return {
                n: await zarr.api.asynchronous.open_array(store=source.store, path=f"{source.path}/{n}".strip("/"), mode="r")
                for n in names
            }

        self.arrays = self._loop.run_until_complete(open_all())

    def read(self, name: str, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        import asyncio

        array = self.arrays[name]

        async def gather():
            return await asyncio.gather(*(array.getitem(slice(a, b)) for a, b in ranges))

        return self._loop.run_until_complete(gather())

    def close(self) -> None:
        self._loop.close()


class CsrRows:
    """Runs of rows of a CSR X: ``indptr`` in memory, ``data``/``indices`` read per run.

    ``indptr`` may be given (read-only, shared by several readers of one X);
    it must be for a :class:`~arrayloaders.store.disk_layout.DirectX`.
    """

    def __init__(self, source: XSource | DirectX, indptr: np.ndarray | None = None):
        self.source = source
        if isinstance(source, DirectX):
            if indptr is None:
                raise ValueError(f"{source.where}: a reader of a DirectX needs its indptr")
            layouts = source.arrays
        else:
            from .zarr_layout import array_layout, open_x

            layouts = tuple(array_layout(a) for a in open_x(source, ("data", "indices")))
        # 8 bytes per row, needed for every run: read once (or given, shared by the readers of
        # one process), and checked, since a damaged indptr would send every run to the wrong entries.
        self.indptr = read_indptr(source) if indptr is None else indptr
        self._zarr = None
        if None in layouts:
            self._direct = (None, None)
            self._zarr = _ZarrArrays(source, ("data", "indices"))
            dtypes = (self._zarr.arrays["data"].dtype, self._zarr.arrays["indices"].dtype)
        else:
            self._direct = (DirectArray(layouts[0]), DirectArray(layouts[1]))
            dtypes = (layouts[0].dtype, layouts[1].dtype)
        self._data = np.empty(0, dtypes[0])
        self._indices = np.empty(0, dtypes[1])

    @property
    def direct(self) -> bool:
        return self._zarr is None

    @property
    def compiled(self) -> bool:
        """Whether :meth:`gather` runs compiled now for both arrays (:attr:`~arrayloaders.store.shards.DirectArray.compiled`),
        with no Python after it: the store has checksums (without them, column indices are bound-checked per row)."""
        return self._zarr is None and all(d.compiled for d in self._direct) and self._direct[1].checked

    @property
    def data_dtype(self) -> np.dtype:
        """The stored dtype of the values."""
        return self._data.dtype

    @property
    def indices_dtype(self) -> np.dtype:
        """The stored dtype of the column indices."""
        return self._indices.dtype

    def where(self, name: str) -> str:
        """The path of this X's array ``name`` (``"data"``, ``"indices"``), for messages."""
        return _where(self.source, name)

    def runs(self, runs: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(data, indices)`` of each run ``(start, stop)`` of rows, in order.

        The arrays are valid until the next step of the iterator.
        """
        if self._zarr is not None:
            yield from self._zarr_runs(runs)
            return
        longest = int((self.indptr[runs[:, 1]] - self.indptr[runs[:, 0]]).max(initial=0))
        if longest > self._data.size:
            self._data = np.empty(longest, self._data.dtype)
            self._indices = np.empty(longest, self._indices.dtype)
        yield from self._direct_runs(runs, lambda i, n: (self._data[:n], self._indices[:n]))

    def read_runs(self, runs: np.ndarray, dests: np.ndarray, data: np.ndarray, indices: np.ndarray) -> None:
        """The entries of each run ``(start, stop)`` of rows into ``data``/``indices`` at its offset in ``dests``."""
        starts = dests.tolist()
        if self._zarr is not None:
            for o, (d, i) in zip(starts, self._zarr_runs(runs)):
                data[o : o + d.size], indices[o : o + d.size] = d, i
            return
        for _ in self._direct_runs(runs, lambda i, n: (data[starts[i] : starts[i] + n], indices[starts[i] : starts[i] + n])):
            pass

    def _zarr_runs(self, runs: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # zarr verifies checksums, if the store has them; bounds are checked here.
        ranges = list(zip(self.indptr[runs[:, 0]].tolist(), self.indptr[runs[:, 1]].tolist()))
        for (a, b), data, indices in zip(ranges, self._zarr.read("data", ranges), self._zarr.read("indices", ranges)):
            if indices.size and int(indices.max()) >= self.source.n_vars:
                raise OSError(f"{_where(self.source, 'indices')}: a column index in entries [{a}, {b}) is past the genes")
            yield data, indices

    def _direct_runs(self, runs: np.ndarray, into) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decode run ``i`` (``n`` entries) into the arrays ``into(i, n)`` gives; yield them."""
        starts, stops = self.indptr[runs[:, 0]].tolist(), self.indptr[runs[:, 1]].tolist()
        data_reader, indices_reader = self._direct
        data_reader.begin_load()
        ranges = _coalesced(starts, stops, data_reader.chunk_elements)
        data_reader.prefetch_ranges(ranges, indices_reader)
        # Without checksums (stores written before them), a damaged column index is the one silent
        # error a decode lets through (values past n_vars): bound-check those, one pass per run.
        check_bounds = not indices_reader.checked
        n_vars = self.source.n_vars
        for i, (a, b) in enumerate(zip(starts, stops)):
            data, indices = into(i, b - a)
            data_reader.read_into(a, b, data)
            indices_reader.read_into(a, b, indices)
            if check_bounds and indices.size and int(indices.max()) >= n_vars:
                raise _index_past(self.source, int(indices.max()), a, b)
            yield data, indices

    def gather(self, rows: np.ndarray, dests: np.ndarray, data: np.ndarray, indices: np.ndarray) -> None:
        """The entries of ``rows`` (any order, repeats allowed) into ``data``/``indices`` at offsets ``dests``.

        Direct readers only (:attr:`direct`): each inner chunk is decoded once for all the rows it holds.
        """
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        data_reader, indices_reader = self._direct
        data_reader.begin_load()
        wanted = data_reader.prefetch_gather(starts, stops, indices_reader)  # remote: both arrays in one round
        data_reader.gather(starts, stops, dests, data, wanted)
        indices_reader.gather(starts, stops, dests, indices, wanted)
        if not indices_reader.checked:  # see runs(): no checksums, so bound-check the column indices
            n_vars = self.source.n_vars
            for a, b, d in zip(starts.tolist(), stops.tolist(), dests.tolist()):
                if b > a and int(indices[d : d + b - a].max()) >= n_vars:
                    raise _index_past(self.source, int(indices[d : d + b - a].max()), a, b)

    def close(self) -> None:
        for d in self._direct:
            if d is not None:
                d.close()
        if self._zarr is not None:
            self._zarr.close()


def _coalesced(starts: list[int], stops: list[int], gap: int) -> list[tuple[int, int]]:
    """Element ranges merged where they overlap or lie within ``gap`` of each other (one prefetch each).

    A load of single rows (a sampler's, sorted) becomes a few ranges instead
    of thousands of system calls; a chunked load's runs are far apart and stay as they are.
    """
    merged: list[list[int]] = []
    for a, b in sorted(zip(starts, stops)):
        if b <= a:
            continue
        if merged and a - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _index_past(source: XSource, value: int, a: int, b: int) -> OSError:
    return OSError(
        f"{_where(source, 'indices')}: a column index of {value} in entries [{a}, {b}) is past the "
        f"{source.n_vars} genes (damaged store; it has no checksums to say where)"
    )


def _where(source: XSource | DirectX, name: str) -> str:
    """The path of an array of ``source`` for messages: its directory for a local store."""
    return f"{source.where}/{name}"


def read_indptr(source: XSource) -> np.ndarray:
    """A CSR X's ``indptr`` (int64), checked against ``data``; raise naming the file if it is damaged.

    Raises
    ------
    OSError
        A chunk file is missing (in a store that wrote every chunk) or
        fails its checksum.
    StoreError
        The values are not a row pointer over ``data``: wrong length, not
        starting at 0, decreasing, or not ending at the length of ``data``.
    """
    from .zarr_layout import map_whole_array, open_x, unwritten_chunks

    where = _where(source, "indptr")
    array, data = open_x(source, ("indptr", "data"))
    if array.attrs.get(COMPLETE_ATTRIBUTE) is True:
        missing = unwritten_chunks(array)
        if missing:
            raise OSError(
                f"{missing[0]}: chunk file of indptr is missing (every chunk of this store was written: damaged store)"
            )
    # Stores from this version on hold it raw, in one chunk: mapped, it is one copy per machine however
    # many processes (ranks, workers) read it. Older stores: a private copy read through zarr.
    indptr = map_whole_array(array) if array.dtype == np.int64 else None
    if indptr is None:
        try:
            indptr = np.asarray(array[:], dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - zarr and zarrs raise ValueError or RuntimeError for a bad checksum
            raise OSError(f"{where}: cannot be read ({type(e).__name__}: {e}); damaged file") from e
    nnz = data.shape[0]
    problem = None
    if indptr.shape != (source.n_obs + 1,):
        problem = f"has {indptr.size} entries, expected n_obs + 1 = {source.n_obs + 1}"
    elif indptr[0] != 0:
        problem = f"starts at {indptr[0]}, not 0"
    elif (row := _first_decrease(indptr)) is not None:
        problem = f"decreases at row {row} ({indptr[row]} -> {indptr[row + 1]})"
    elif indptr[-1] != nnz:
        problem = f"ends at {indptr[-1]}, but data holds {nnz} entries"
    if problem:
        raise StoreError(f"{where}: {problem} (damaged store)")
    return indptr


def _first_decrease(indptr: np.ndarray, step: int = 2**20) -> int | None:
    """The first row whose pointer is above the next one's, or None; checked in pieces, so that a mapped
    pointer is never copied whole (8 bytes per cell)."""
    for a in range(0, indptr.size - 1, step):
        bad = np.flatnonzero(np.diff(indptr[a : a + step + 1]) < 0)
        if bad.size:
            return a + int(bad[0])
    return None


class DenseRows:
    """Runs of rows of a dense 2-d X."""

    def __init__(self, source: XSource | DirectX):
        self.source = source
        if isinstance(source, DirectX):
            self._direct, self._zarr = DirectArray(source.arrays[0]), None
        else:
            from .zarr_layout import direct_array, open_x

            (array,) = open_x(source)
            self._direct = direct_array(array)
            self._zarr = _ZarrArrays(source, ("",)) if self._direct is None else None
        dtype = self._direct.dtype if self._direct is not None else self._zarr.arrays[""].dtype
        self._rows = np.empty((0, source.n_vars), dtype)

    @property
    def direct(self) -> bool:
        return self._zarr is None

    @property
    def indices_dtype(self) -> np.dtype:
        """The stored dtype of the column indices."""
        return self._indices.dtype

    def where(self, name: str) -> str:
        """The path of this X's array ``name`` (``"data"``, ``"indices"``), for messages."""
        return _where(self.source, name)

    def runs(self, runs: np.ndarray) -> Iterator[np.ndarray]:
        """The rows of each run ``(start, stop)``, as a 2-d array valid until the next step."""
        if self._zarr is not None:
            yield from self._zarr.read("", [(int(a), int(b)) for a, b in runs])
            return
        n_vars = self.source.n_vars
        longest = int((runs[:, 1] - runs[:, 0]).max(initial=0))
        if longest > self._rows.shape[0]:
            self._rows = np.empty((longest, n_vars), self._rows.dtype)
        self._direct.begin_load()
        self._direct.prefetch_ranges([(a * n_vars, b * n_vars) for a, b in runs.tolist()])
        for a, b in runs.tolist():
            rows = self._rows[: b - a]
            self._direct.read_into(a * n_vars, b * n_vars, rows.reshape(-1))
            yield rows

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self._zarr is not None:
            self._zarr.close()


def open_rows(source: XSource | DirectX, indptr: np.ndarray | None = None) -> CsrRows | DenseRows:
    """A reader of ``source`` (``indptr``: its CSR row pointer, if already read; required for a ``DirectX``)."""
    return CsrRows(source, indptr) if source.kind == "csr" else DenseRows(source)
