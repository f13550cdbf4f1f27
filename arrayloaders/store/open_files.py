"""The shard files a process keeps open, one budget for all its readers.

A store's X has two arrays per ``chunk_{i}.zarr`` file (more with layers and
obsm), each of hundreds of shard files. Kept open per array, 64 each, the
readers of a 10-file store held 1,280 descriptors and a worker failed with
"Too many open files" where the soft limit is the usual 1,024. Here one
least-recently-used set per process holds at most :func:`budget` of them,
whatever the number of arrays; a file closed to make room is reopened when
next read (its shard index stays cached by its reader).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict

__all__ = ["OpenFiles", "budget", "shard_files"]


def budget() -> int:
    """Descriptors this process may hold open for shard files: a quarter of its soft limit, 16 to 1,024."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


class OpenFiles:
    """Open descriptors keyed by (owner, file), least recently used closed first when over ``limit``.

    Owners are tokens from :meth:`owner` (never reused). Thread-safe. The
    file an owner used last is never closed by another owner making room:
    a reader reads one file at a time, between :meth:`get` (or :meth:`put`)
    and its next call, possibly in another thread than the one evicting.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._open: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._using: dict[int, int] = {}  # owner -> the file it used last
        self._lock = threading.Lock()
        self._owners = itertools.count()
        if hasattr(os, "register_at_fork"):  # a lock held by another thread at fork is held forever in the child
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def owner(self) -> int:
        with self._lock:
            return next(self._owners)

    def get(self, owner: int, f: int) -> int | None:
        """The open descriptor of ``owner``'s file ``f``, or ``None``."""
        with self._lock:
            fd = self._open.get((owner, f))
            if fd is not None:
                self._open.move_to_end((owner, f))
                self._using[owner] = f
            return fd

    def put(self, owner: int, f: int, fd: int) -> None:
        """Keep ``fd``, just opened, as ``owner``'s file ``f``; close the least recently used beyond the limit."""
        closing = []
        with self._lock:
            self._open[(owner, f)] = fd
            self._using[owner] = f
            excess = len(self._open) - self.limit
            if excess > 0:
                victims = []
                for key in self._open:  # oldest first
                    if self._using.get(key[0]) != key[1]:
                        victims.append(key)
                        if len(victims) == excess:
                            break
                closing = [self._open.pop(key) for key in victims]
        for old in closing:
            os.close(old)

    def close(self, owner: int, f: int) -> None:
        """Close ``owner``'s file ``f`` if it is open."""
        with self._lock:
            fd = self._open.pop((owner, f), None)
        if fd is not None:
            os.close(fd)

    def close_all(self, owner: int) -> None:
        """Close every file of ``owner``."""
        with self._lock:
            mine = [key for key in self._open if key[0] == owner]
            fds = [self._open.pop(key) for key in mine]
            self._using.pop(owner, None)
        for fd in fds:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._open)


_shared = OpenFiles(budget())


def shard_files() -> OpenFiles:
    """This process's set of open shard files, sized by :func:`budget` when first imported."""
    return _shared
