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
import numpy as np

from .native_codecs import native_codecs

__all__ = ["RemoteCache"]

_EVICT_TO = 0.8
_READ_GAP = 1 << 12  # cached chunks this close are read with one pread
_READ_MAX = 8 << 20  # ... up to this many bytes at once


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

    def open(self, key: str, etag: str) -> int | None:
        """A descriptor (read and write) of the cached file of ``key`` (version ``etag``), made if new; None if
        the cache cannot be written. Held for a load: a file the evictor deletes meanwhile stays usable to it."""
        path = self._path(key, etag)
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            os.utime(fd)  # recently used
        except OSError:
            pass
        return fd

    def chunks(self, fd: int, ranges: list[tuple[int, int]]) -> list[memoryview | None]:
        """The bytes of each checksummed chunk ``[start, stop)`` (sorted) of the file ``fd`` found intact, else None.

        Neighbouring chunks are read with one ``pread``; each is then checked alone.
        """
        native = native_codecs()
        out: list[memoryview | None] = []
        i = 0
        while i < len(ranges):
            j, end = i + 1, ranges[i][1]
            while j < len(ranges) and ranges[j][0] <= end + _READ_GAP and ranges[j][1] - ranges[i][0] <= _READ_MAX:
                end = max(end, ranges[j][1])
                j += 1
            begin = ranges[i][0]
            try:
                raw = os.pread(fd, end - begin, begin)
            except OSError:
                raw = b""
            span, addr = memoryview(raw), np.frombuffer(raw, np.uint8).ctypes.data if native else 0
            for start, stop in ranges[i:j]:
                data, at, n = span[start - begin : stop - begin], start - begin, stop - start - 4
                ok = len(data) == stop - start >= 4 and int.from_bytes(data[-4:], "little") == (
                    native.crc32c(addr + at, n) if native else google_crc32c.value(raw[at : at + n]))
                out.append(data if ok else None)
            i = j
        found = sum(d is not None for d in out)
        with self._lock:
            self.hits += found
            self.misses += len(out) - found
        return out

    def write(self, fd: int, start: int, data: bytes | memoryview) -> bool:
        """Keep ``data`` at ``start`` of the cached file ``fd``; False if it could not be written (no error)."""
        try:
            written = os.pwrite(fd, data, start)
        except OSError:
            return False
        with self._lock:
            self._written += written
            due = self._written >= self.limit // 10
            if due:
                self._written = 0
        if due:
            self.evict()
        return written == len(data)

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
