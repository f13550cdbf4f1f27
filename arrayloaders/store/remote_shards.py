"""The remote half of :class:`~arrayloaders.store.shards.DirectArray`: a zarr v3 array's shards as objects.

Where a local reader opens a shard file and reads its index with ``pread``,
a remote one fetches each shard's index once (a suffix request; the
ETag it came with is the version every later range of the object must
match), tells the thread's :class:`~arrayloaders.store.range_fetcher.RangeFetcher`
which chunk ranges a load needs, and reads them from what it fetched: through
an in-memory file per object (the compiled loop) or by URL (the Python path).
"""

from __future__ import annotations

import numpy as np

from .disk_layout import MAX_TABLES as _MAX_TABLES
from .disk_layout import MISSING as _MISSING
from .range_fetcher import range_fetcher

__all__ = ["RemoteShards"]


class RemoteShards:
    """Methods of :class:`~arrayloaders.store.shards.DirectArray` for an array in object storage (``layout.root``)."""

    @property
    def _fetch(self):
        """The calling thread's fetcher of remote byte ranges."""
        return range_fetcher()

    def begin_load(self) -> None:
        """A load's reading starts: ranges an abandoned load wanted are forgotten (remote arrays)."""
        if self._remote is not None:
            range_fetcher().begin()

    def _remote_file(self, f: int) -> tuple[int, np.ndarray, str] | None:
        """(descriptor, chunk table, URL) of file ``f`` of a remote array, its index fetched once; None if never
        written. The descriptor is an in-memory file of the bytes fetched for the load (what is wanted is fetched
        first), -1 if none were: the compiled loop reads it as a shard file, the Python path fetches by URL."""
        if f not in self._tables:
            self._remote_tables([f])
        table = self._tables[f]
        if table is None:
            return None
        key = str(self.layout.file_path(f))
        self._remote_files[key] = f
        fd = self._fetch.fd_of(self._remote, key)
        return -1 if fd is None else fd, table, self._remote.child(key)

    def _remote_tables(self, files: list[int], missing_ok: bool = False) -> None:
        """Fetch the indexes of the shards ``files`` not known yet, all at once (one request each).

        A missing object is damage in a complete array (raises), else all fill
        values; with ``missing_ok`` it is noted as missing (``None``) either way.
        """
        todo = [f for f in dict.fromkeys(files) if f not in self._tables]
        if todo:
            self._apply_tables(todo, self._fetch.run(self._index_request, todo), missing_ok)

    def _index_request(self, f: int):
        """(size, index bytes, ETag) of file ``f`` (one request), None if the object does not exist."""
        root, fetch, key = self._remote, self._fetch, str(self.layout.file_path(f))
        if self._index_at is None:
            got = fetch.size(root, key)
            return None if got is None else (got[0], b"", got[1])
        where, checksum = self._index_at
        return fetch.head_or_tail(root, key, 16 * self._per_file + checksum, where == "end")

    def _apply_tables(self, todo: list[int], found: list, missing_ok: bool = False) -> None:
        root = self._remote
        for f, got in zip(todo, found):
            key = str(self.layout.file_path(f))
            if got is None:
                if self.complete and not missing_ok:
                    lo, hi = f * self.file_elements, min((f + 1) * self.file_elements, self.n_elements)
                    raise OSError(f"{root.child(key)}: the object is missing, but the array holds elements [{lo}, {hi}) "
                                  "there (every chunk of this store was written: damaged store)")  # fmt: skip
                table = None
            elif self._index_at is None:
                table = np.array([[0, got[0]]], dtype=np.uint64)
            else:
                table = self._parse_index(got[1], got[0], root.child(key))
            if got is not None:
                self._etags[f] = got[2]  # every later range of this object must be of this version
            if len(self._tables) >= _MAX_TABLES:
                self._tables.pop(next(iter(self._tables)))
            self._tables[f] = table

    def _want_remote(self, chunks: np.ndarray) -> None:
        """Tell the fetcher which stored bytes the inner ``chunks`` (sorted) are: fetched together at the next read."""
        per = self._per_file
        files = chunks // per
        unique = np.unique(files).tolist()
        self._remote_tables(unique)
        for f in unique:
            table = self._tables[f]
            if table is None:
                continue
            rows = table[chunks[files == f] - f * per]
            rows = rows[rows[:, 1] != _MISSING]
            key = str(self.layout.file_path(f))
            etag = self._etags.get(f)
            for offset, nbytes in rows.tolist():
                self._fetch.want(self._remote, key, offset, offset + nbytes, chunk=self.checked, etag=etag)

    def prefetch_ranges(self, ranges: list[tuple[int, int]], *others: RemoteShards) -> None:
        """:meth:`prefetch` of every element range ``(start, stop)``, of this array and ``others`` (the other
        arrays of the rows: ``indices`` beside ``data``); remote, with one round of requests for the indexes of
        all the shards they touch (not one per range or array)."""
        if self._remote is None:
            for reader in (self, *others):
                for a, b in ranges:
                    reader.prefetch(a, b)
            return
        starts = np.array([a for a, _ in ranges], dtype=np.int64)
        stops = np.array([b for _, b in ranges], dtype=np.int64)
        self._want_all((self, *others), starts, stops)

    def prefetch_gather(self, starts: np.ndarray, stops: np.ndarray, *others: RemoteShards) -> bool:
        """Before :meth:`gather` of ``[starts[i], stops[i])`` from this array and ``others``: remote, what they
        all need is wanted now (one round for the shard indexes), so that the first gather fetches the others'
        ranges with its own, in one round of requests. False for a local array (nothing done)."""
        if self._remote is None:
            return False
        self._want_all((self, *others), np.asarray(starts, np.int64), np.asarray(stops, np.int64))
        return True

    def _want_all(self, readers: tuple[RemoteShards, ...], starts: np.ndarray, stops: np.ndarray) -> None:
        """Want the inner chunks holding elements ``[starts[i], stops[i])`` of every reader; the indexes of the
        shards they touch, where not known yet, fetched first in one round."""
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        wanted = []
        for reader in readers:
            ce = reader.chunk_elements
            first, last = starts // ce, (stops - 1) // ce
            span = last - first + 1
            offsets = np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
            wanted.append(np.unique(np.repeat(first, span) + offsets))
        todo = [(r, f) for r, chunks in zip(readers, wanted)
                for f in np.unique(chunks // r._per_file).tolist() if f not in r._tables]  # fmt: skip
        found = self._fetch.run(lambda item: item[0]._index_request(item[1]), todo)
        for reader in readers:
            mine = [(f, got) for (r, f), got in zip(todo, found) if r is reader]
            if mine:
                reader._apply_tables([f for f, _ in mine], [got for _, got in mine])
        for reader, chunks in zip(readers, wanted):
            if chunks.size:
                reader._want_remote(chunks)

    def _remote_unwritten(self, first: int, last: int) -> list[str]:
        """:meth:`~arrayloaders.store.shards.DirectArray.unwritten` of inner chunks ``first..last``, remote."""
        per = self._per_file
        found: list[str] = []
        files = list(range(first // per, last // per + 1))
        for f in files:
            self._tables.pop(f, None)  # read afresh
        self._remote_tables(files, missing_ok=True)
        for f in files:
            url, table = self._remote.child(str(self.layout.file_path(f))), self._tables[f]
            if table is None:
                found.append(url)
                del self._tables[f]  # a read finds it missing again, and says so
            elif self._index_at is not None:
                lo, hi = max(first - f * per, 0), min(last - f * per, per - 1)
                found += [f"{url} (inner chunk {k})" for k in range(lo, hi + 1) if table[k, 1] == _MISSING]
        return found
