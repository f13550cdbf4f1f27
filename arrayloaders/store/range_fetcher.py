"""Byte ranges of objects in object storage, fetched many at a time: what a reader of a remote store waits on.

A reader of a remote array says which byte ranges a load will need
(:meth:`RangeFetcher.want`, from its prefetch), then reads them one inner
chunk at a time (:meth:`RangeFetcher.read`). The first read fetches every
range wanted so far, of every array, at once: neighbours less than
:data:`GAP` bytes apart are merged into one request, and up to
:data:`DEPTH` requests are in flight together. A load's 20-50 ms round
trips then overlap instead of adding up. The bytes are kept until the next
fetch (a load's, a few MB), and a range nobody wanted ahead is fetched on
its own.

Each thread has a fetcher of its own (:func:`range_fetcher`): two loops in
two threads never fetch, or fail on, each other's ranges. A reader starts
each load with :meth:`RangeFetcher.begin`, which forgets what an abandoned
load (a loop broken off, an error) wanted and never read.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .remote import RemoteRoot, remote_error

__all__ = ["DEPTH", "GAP", "RangeFetcher", "range_fetcher"]

#: Requests in flight at once per process. obstore's calls release the GIL, so threads overlap their waits.
DEPTH = int(os.environ.get("ARRAYLOADERS_REMOTE_DEPTH", "32"))
#: Wanted ranges at most this many bytes apart are fetched with one request: fewer round trips for a few
#: bytes more (an inner chunk of a store is ~10-30 KB compressed).
GAP = 1 << 12


class RangeFetcher:
    """Ranges of remote objects fetched together; one per process (:func:`range_fetcher`)."""

    def __init__(self, depth: int = DEPTH, gap: int = GAP):
        self.depth, self.gap = max(1, depth), gap
        self._wanted: dict[tuple[RemoteRoot, str], list[tuple[int, int]]] = {}
        self._fetched: dict[tuple[RemoteRoot, str], tuple[list[int], list[memoryview]]] = {}
        self._lock = threading.Lock()  # the counts below are added to from the pool's threads
        #: what this thread has asked for: requests made and bytes received (for the benchmark and tests)
        self.requests = 0
        self.bytes = 0

    def begin(self) -> None:
        """A load starts: forget ranges wanted and never read (an earlier load abandoned midway)."""
        self._wanted = {}

    def want(self, root: RemoteRoot, key: str, start: int, stop: int) -> None:
        """Note that bytes ``[start, stop)`` of ``key`` will be read soon: fetched with the next batch."""
        if stop > start and self._lookup(root, key, start, stop) is None:
            self._wanted.setdefault((root, key), []).append((start, stop))

    def read(self, root: RemoteRoot, key: str, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of ``key``: from the last fetch, else after fetching all that is wanted."""
        got = self._lookup(root, key, start, stop)
        if got is None and self._wanted:
            self.fetch_wanted()
            got = self._lookup(root, key, start, stop)
        if got is None:
            got = memoryview(self._get(root, key, start, stop))
        return got

    def _lookup(self, root: RemoteRoot, key: str, start: int, stop: int) -> memoryview | None:
        entry = self._fetched.get((root, key))
        if entry is None:
            return None
        starts, pieces = entry
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or starts[i] + len(pieces[i]) < stop:
            return None
        return pieces[i][start - starts[i] : stop - starts[i]]

    def fetch_wanted(self) -> None:
        """Fetch every range wanted so far, merged with neighbours, :attr:`depth` requests at a time."""
        wanted, self._wanted = self._wanted, {}
        requests: list[tuple[RemoteRoot, str, int, int]] = []
        for (root, key), ranges in wanted.items():
            merged: list[list[int]] = []
            for a, b in sorted(ranges):
                if merged and a <= merged[-1][1] + self.gap:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            requests += [(root, key, a, b) for a, b in merged]
        fetched = self.run(lambda r: self._get(*r), requests)
        table: dict[tuple[RemoteRoot, str], tuple[list[int], list[memoryview]]] = {}
        for (root, key, a, _), data in zip(requests, fetched):
            starts, pieces = table.setdefault((root, key), ([], []))
            starts.append(a)
            pieces.append(memoryview(data))
        self._fetched = table  # the last load's bytes are no longer needed

    def run(self, fetch: Callable, items: list) -> list:
        """``fetch(item)`` for every item, :attr:`depth` at a time; the first error raised once all are done."""
        if len(items) <= 1:
            return [fetch(item) for item in items]
        futures = [_executor(self.depth).submit(fetch, item) for item in items]
        results, error = [], None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as e:  # noqa: BLE001 - every request waited for, the first error raised
                error = error or e
                results.append(None)
        if error is not None:
            raise error
        return results

    def _get(self, root: RemoteRoot, key: str, start: int, stop: int):
        import obstore

        try:
            data = obstore.get_range(root.store(), key, start=start, end=stop)
        except Exception as e:  # noqa: BLE001 - obstore's errors, made one line naming the object
            raise remote_error(root.child(key), e) from None
        with self._lock:
            self.requests += 1
            self.bytes += len(data)
        if len(data) != stop - start:
            raise OSError(f"{root.child(key)}: short read ({len(data)} of {stop - start} bytes at {start}; truncated object)")
        return data

    def head_or_tail(self, root: RemoteRoot, key: str, nbytes: int, tail: bool) -> tuple[int, bytes] | None:
        """(size, the first or last ``nbytes`` bytes) of ``key`` in one request; ``None`` if it does not exist.

        An object shorter than ``nbytes`` gives all its bytes.
        """
        import obstore

        span = {"suffix": nbytes} if tail else (0, nbytes)
        try:
            result = obstore.get(root.store(), key, options={"range": span})
            data = bytes(result.bytes())
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise remote_error(root.child(key), e) from None
        with self._lock:
            self.requests += 1
            self.bytes += len(data)
        return int(result.meta["size"]), data

    def size(self, root: RemoteRoot, key: str) -> int | None:
        """The size of ``key`` in bytes; ``None`` if it does not exist."""
        import obstore

        try:
            meta = obstore.head(root.store(), key)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise remote_error(root.child(key), e) from None
        with self._lock:
            self.requests += 1
        return int(meta["size"])



_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def range_fetcher() -> RangeFetcher:
    """This thread's fetcher."""
    fetcher = getattr(_local, "fetcher", None)
    if fetcher is None:
        fetcher = _local.fetcher = RangeFetcher()
    return fetcher


def _executor(depth: int) -> ThreadPoolExecutor:
    """The process's threads that make requests (shared by every thread's fetcher)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(depth, thread_name_prefix="arrayloaders-fetch")
        return _pool


def _after_fork() -> None:  # the pool's threads do not survive a fork: a fresh one in the child
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
