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
#: Measured at 20 ms per request (scripts/measure/remote_depth.py, 2 workers, 2 cores): steady 4.5k cells/s at
#: 4, 12k at 16, 15.8k at 32, 20.3k at 64, 21.6k at 128, 23.5k at 256; past 128 the gain is small.
DEPTH = int(os.environ.get("ARRAYLOADERS_REMOTE_DEPTH", "128"))
#: Wanted ranges at most this many bytes apart are fetched with one request: fewer round trips for a few
#: bytes more (an inner chunk of a store is ~10-30 KB compressed). Measured wider (2 workers, 2 cores, chunk 32):
#: 64 KiB, 256 KiB and 1 MiB cut requests per epoch from 2,765 to 2,563, 1,722 and 710 but fetched 1.13, 1.65 and
#: 3.83 times the bytes needed (4 KiB: 1.09), for no more cells/s: per byte, the server and client cost as much.
GAP = 1 << 12


class RangeFetcher:
    """Ranges of remote objects fetched together; one per process (:func:`range_fetcher`)."""

    def __init__(self, depth: int = DEPTH, gap: int = GAP):
        self.depth, self.gap = max(1, depth), gap
        self._wanted: dict[tuple[RemoteRoot, str], list[tuple[int, int]]] = {}
        self._fetched: dict[tuple[RemoteRoot, str], tuple[list[int], list[memoryview]]] = {}
        self._fds: dict[tuple[RemoteRoot, str], int] = {}  # in-memory files of the pieces fetched last (fd_of)
        self._lock = threading.Lock()  # the counts below are added to from the pool's threads
        #: what this thread has asked for: requests made and bytes received (for the benchmark and tests)
        self.requests = 0
        self.bytes = 0

    def begin(self) -> None:
        """A load starts: forget ranges wanted and never read (an earlier load abandoned midway)."""
        self._wanted = {}

    def __del__(self) -> None:
        try:
            self._close_fds()
        except (OSError, AttributeError, TypeError):
            pass

    def want(self, root: RemoteRoot, key: str, start: int, stop: int, chunk: bool = False, etag: str | None = None) -> None:
        """Note that bytes ``[start, stop)`` of ``key`` will be read soon: fetched with the next batch.

        ``chunk``: the range is one inner chunk ending in its crc32c, which the
        root's local cache (if it has one) may serve. ``etag``: the version of
        the object the reader knows (its index was read from it): a request
        for another version fails instead of mixing two versions' bytes.
        """
        # Wanted again even if the last fetch holds it: the next fetch carries it over instead of fetching it.
        if stop > start:
            self._wanted.setdefault((root, key, etag), []).append((start, stop, chunk))

    def fd_of(self, root: RemoteRoot, key: str) -> int | None:
        """A file descriptor holding the bytes of ``key`` fetched last at their offsets (an in-memory file; holes
        read as zeros), after fetching what is wanted; None if nothing of it was fetched.

        The compiled gather (:mod:`~arrayloaders.store.chunk_gather`) reads it as it reads a shard file: a chunk
        it finds a hole in fails its checksum, and the caller's Python path fetches it. Valid until the next fetch.
        """
        if self._wanted:
            self.fetch_wanted()
        fd = self._fds.get((root, key))
        if fd is None and (root, key) in self._fetched and hasattr(os, "memfd_create"):
            fd = os.memfd_create(f"arrayloaders-{key.rsplit('/', 1)[-1]}", os.MFD_CLOEXEC)
            for start, piece in zip(*self._fetched[(root, key)]):
                os.pwrite(fd, piece, start)
            self._fds[(root, key)] = fd
        return fd

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def read(self, root: RemoteRoot, key: str, start: int, stop: int, etag: str | None = None) -> memoryview:
        """Bytes ``[start, stop)`` of ``key``: from the last fetch, else after fetching all that is wanted."""
        got = self._lookup(root, key, start, stop)
        if got is None and self._wanted:
            self.fetch_wanted()
            got = self._lookup(root, key, start, stop)
        if got is None:
            got = memoryview(self._get(root, key, start, stop, etag))
        return got

    def _lookup(self, root: RemoteRoot, key: str, start: int, stop: int) -> memoryview | None:
        """``[start, stop)`` from the pieces fetched last (joined when it spans pieces that touch), or None."""
        entry = self._fetched.get((root, key))
        if entry is None:
            return None
        starts, pieces = entry
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or starts[i] + len(pieces[i]) <= start:
            return None
        if starts[i] + len(pieces[i]) >= stop:
            return pieces[i][start - starts[i] : stop - starts[i]]
        parts, at = [pieces[i][start - starts[i] :]], starts[i] + len(pieces[i])
        while at < stop:  # e.g. chunks read together, some from the cache and some fetched
            i += 1
            if i == len(starts) or starts[i] != at:
                return None
            parts.append(pieces[i][: stop - at])
            at += len(pieces[i])
        return memoryview(b"".join(parts))

    def fetch_wanted(self) -> None:
        """Fetch every range wanted so far (those the cache holds intact from it), the rest merged with neighbours,
        :attr:`depth` requests at a time; what was fetched is written to the cache.

        An object whose wanted ranges are all checksummed chunks and all now in its cached file is read by the
        compiled loop from that file (:meth:`fd_of`): no in-memory copy of what the cache already holds.
        """
        wanted, self._wanted = self._wanted, {}
        table: dict[tuple[RemoteRoot, str], list[tuple[int, memoryview]]] = {}
        requests: list[tuple[RemoteRoot, str, int, int, str | None]] = []
        cache_fds: dict[tuple[RemoteRoot, str], int] = {}  # the cached file of each object, for this load
        whole: set[tuple[RemoteRoot, str]] = set()  # objects all of whose wanted ranges are checked chunks
        for (root, key, etag), ranges in wanted.items():
            ranges = sorted(set(ranges))
            cache = root.cache() if etag is not None else None  # a cached file is one version's
            fd = cache.open(key, etag) if cache is not None and (root, key) not in cache_fds else None
            if fd is not None:
                cache_fds[(root, key)] = fd
            if all(r[2] for r in ranges):
                whole.add((root, key))
            fd = cache_fds.get((root, key))
            held = [self._lookup(root, key, a, b) for a, b, _ in ranges]  # the last fetch's: carried over
            cached = [r[2] and fd is not None and h is None for r, h in zip(ranges, held)]
            found = cache.chunks(fd, [r[:2] for r, c in zip(ranges, cached) if c]) if any(cached) else []
            found_at = iter(found)
            merged: list[list[int]] = []
            joinable = False  # the last range was fetched too: the next may join its request
            for (a, b, _), c, h in zip(ranges, cached, held):
                data = next(found_at) if c else h
                if data is not None:
                    table.setdefault((root, key), []).append((a, memoryview(data)))
                    if h is not None and fd is not None and not cache.write(fd, a, h):
                        whole.discard((root, key))  # carried over, and not (or no longer) in the cached file
                    joinable = False
                    continue
                if joinable and a <= merged[-1][1] + self.gap:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
                joinable = True
            requests += [(root, key, a, b, etag) for a, b in merged]
        try:
            fetched = self.run(lambda r: self._get(*r), requests)
            for (root, key, a, _, etag), data in zip(requests, fetched):
                table.setdefault((root, key), []).append((a, memoryview(data)))
                fd = cache_fds.get((root, key))
                if fd is not None and not root.cache().write(fd, a, data):
                    whole.discard((root, key))
        except BaseException:
            for fd in cache_fds.values():
                os.close(fd)
            raise
        self._fetched = {}  # the last load's bytes are no longer needed (what is still wanted was carried over)
        self._close_fds()
        for where, fd in cache_fds.items():
            if where in whole:
                self._fds[where] = fd  # closed at the next fetch, as an in-memory file is
            else:
                os.close(fd)
        for where, pieces in table.items():
            pieces.sort(key=lambda p: p[0])
            self._fetched[where] = ([p[0] for p in pieces], [p[1] for p in pieces])

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

    def _get(self, root: RemoteRoot, key: str, start: int, stop: int, etag: str | None = None):
        import obstore

        try:
            if etag is None:
                data = obstore.get_range(root.store(), key, start=start, end=stop)
            else:
                data = obstore.get(root.store(), key, options={"range": (start, stop), "if_match": etag}).bytes()
        except Exception as e:  # noqa: BLE001 - obstore's errors, made one line naming the object
            if type(e).__name__ == "PreconditionError":
                raise OSError(f"{root.child(key)}: the object was replaced while it was read (its ETag is no longer "
                              f"{etag}): the store was converted again or copied over") from None  # fmt: skip
            raise remote_error(root.child(key), e) from None
        with self._lock:
            self.requests += 1
            self.bytes += len(data)
        if len(data) != stop - start:
            raise OSError(f"{root.child(key)}: short read ({len(data)} of {stop - start} bytes at {start}; truncated object)")
        return data

    def head_or_tail(self, root: RemoteRoot, key: str, nbytes: int, tail: bool) -> tuple[int, bytes, str | None] | None:
        """(size, the first or last ``nbytes`` bytes, ETag) of ``key`` in one request; ``None`` if it does not exist.

        An object shorter than ``nbytes`` gives all its bytes.
        """
        import obstore

        def get():
            result = obstore.get(root.store(), key, options={"range": {"suffix": nbytes} if tail else (0, nbytes)})
            data = bytes(result.bytes())
            return (int(result.meta["size"]), data, result.meta.get("e_tag")), len(data)

        return self._asked(root, key, get)

    def size(self, root: RemoteRoot, key: str) -> tuple[int, str | None] | None:
        """(size in bytes, ETag) of ``key``; ``None`` if it does not exist."""
        import obstore

        def head():
            meta = obstore.head(root.store(), key)
            return (int(meta["size"]), meta.get("e_tag")), 0

        return self._asked(root, key, head)

    def _asked(self, root: RemoteRoot, key: str, request: Callable):
        """``request()``'s answer (it returns it and the bytes received), counted; ``None`` for a missing object;
        obstore's other errors made one line naming the object."""
        try:
            answer, received = request()
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise remote_error(root.child(key), e) from None
        with self._lock:
            self.requests += 1
            self.bytes += received
        return answer


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
