"""A local disk cache of a remote store's bytes (opt-in: ``add_store(url, cache_dir=..., cache_bytes=...)``).

Each remote object has a sparse file of its own size under the cache
directory (``<cache_dir>/<digest of the store's URL>/<key>@<its ETag's digest>``:
a new version of an object is a new file); a fetched
range is written at its offset, so later epochs (and the other ranks and
workers on the node) read it locally.

**Nothing in the cache is trusted.** What a reader takes from it is one inner
chunk at a time, and only if the chunk's own crc32c (its last 4 bytes, the
store's checksum) matches; a chunk never written reads as zeros and fails,
as does one torn by a crash, a concurrent writer or a flipped bit: it is
fetched again and rewritten. Writers never need a lock: they write the same
bytes at the same offsets. Arrays without checksums are not cached.

**Bounded**: once this process has written a tenth of ``cache_bytes`` since
its last look, it adds up the space the cache's files take on disk and, if
over ``cache_bytes``, deletes the least recently used files (by their
modification time, touched on every read) down to 80 % of it. One process
evicts at a time (an advisory lock); a file deleted while another process
reads it stays readable to that process, and is fetched again later.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import google_crc32c

__all__ = ["RemoteCache"]

_EVICT_TO = 0.8


class RemoteCache:
    """The cache directory of one remote store, as a process reads and writes it."""

    def __init__(self, directory: str | os.PathLike, limit: int, url: str):
        self.limit = int(limit)
        self.directory = Path(directory) / hashlib.sha1(url.encode()).hexdigest()[:16]
        self._written = 0  # bytes written since the last look at the cache's size
        self._lock = threading.Lock()
        #: what this process found and missed (chunks), for tests and the benchmark
        self.hits = self.misses = 0

    def _path(self, key: str, etag: str) -> Path:
        # one file per version of an object: a store replaced at its URL never reads the old one's bytes
        return self.directory / f"{key}@{hashlib.sha1(etag.encode()).hexdigest()[:16]}"

    def chunks(self, key: str, etag: str, ranges: list[tuple[int, int]]) -> list[bytes | None]:
        """The bytes of each checksummed chunk ``[start, stop)`` of ``key`` (version ``etag``) found intact, else None."""
        try:
            fd = os.open(self._path(key, etag), os.O_RDONLY)
        except OSError:
            self.misses += len(ranges)
            return [None] * len(ranges)
        out: list[bytes | None] = []
        try:
            for start, stop in ranges:
                data = os.pread(fd, stop - start, start)
                ok = len(data) == stop - start >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")
                out.append(data if ok else None)
            os.utime(fd)  # recently used
        except OSError:
            out += [None] * (len(ranges) - len(out))
        finally:
            os.close(fd)
        found = sum(d is not None for d in out)
        self.hits += found
        self.misses += len(out) - found
        return out

    def write(self, key: str, etag: str, start: int, data: bytes | memoryview) -> None:
        """Keep ``data``, bytes ``[start, start + len)`` of ``key`` (version ``etag``); a failure to write is no error."""
        path = self._path(key, etag)
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
        except OSError:
            return
        with self._lock:
            self._written += len(data)
            due = self._written >= self.limit // 10
            if due:
                self._written = 0
        if due:
            self.evict()

    def whole(self, key: str, etag: str, fetch) -> Path:
        """A file holding all of ``key`` (version ``etag``): the cached one if ``fetch`` need not run, else
        ``fetch()``'s bytes written whole (to a temporary name, then renamed: a reader sees all or nothing).

        For objects read whole and mapped (row pointers): every process of the machine maps one copy.
        The caller verifies the content (its checksum) and calls :meth:`discard` if it is damaged.
        """
        path = self._path(key, etag).with_name(self._path(key, etag).name + ".whole")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
            staged.write_bytes(fetch())
            os.replace(staged, path)
        os.utime(path)
        return path

    def discard(self, path: Path) -> None:
        """Remove a damaged cached file (the next reader fetches it again)."""
        try:
            path.unlink()
        except OSError:
            pass

    def size(self) -> int:
        """Bytes the cache's files take on disk (their allocated blocks: the files are sparse)."""
        total = 0
        for root, _, files in os.walk(self.directory):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
        return total

    def evict(self) -> None:
        """Delete the least recently used files while the cache takes more than ``limit`` (down to 80 %)."""
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another process is evicting
            files = []
            for root, _, names in os.walk(self.directory):
                for name in names:
                    if name == ".lock":
                        continue
                    path = os.path.join(root, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    files.append((st.st_mtime_ns, st.st_blocks * 512, path))
            total = sum(f[1] for f in files)
            if total <= self.limit:
                return
            for _, blocks, path in sorted(files):
                try:
                    os.unlink(path)
                except OSError:
                    continue
                total -= blocks
                if total <= self.limit * _EVICT_TO:
                    break
