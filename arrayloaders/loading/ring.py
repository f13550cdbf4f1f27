"""The shared-memory ring: slots that worker processes decode loads into.

Ownership (see ``worker.py`` for the protocol):

- The main process creates every segment (``multiprocessing.shared_memory``,
  so the resource tracker unlinks it even if the main process is killed)
  and is the only one that unlinks. Workers only map a segment by name and
  unmap it; a child forked from the main process never unlinks (every
  unlink checks the pid), so the parent's ring survives the child's exit.
- Names are ``al_<pid>_<token>_<slot>_<generation>``: :func:`segment_names`
  lists a process's segments in ``/dev/shm`` (for ``close()`` checks and tests).
- If the main process dies without unlinking (SIGKILL, ``os._exit`` in a
  forked child), its workers notice within a second and unlink its segments
  (:func:`unlink_orphans`); the resource tracker remains the last resort.
- Batches handed to the user are views into a slot (zero copy). Each view is
  counted (:meth:`Segment.lend`) until torch frees it, and a slot is given
  to a worker again only when none is alive. If the user keeps batches and
  the ring runs out of free slots, the held slot's segment is unlinked and
  replaced by a new one: the user's views stay valid (the mapping lives as
  long as they do) and no name is left in ``/dev/shm``.

Segments are mapped with ``mmap`` on the ``/dev/shm`` file, not through
``SharedMemory.buf``: a mapping with live numpy views then simply outlives
the object that made it, where ``SharedMemory.close()`` would raise.
"""

from __future__ import annotations

import mmap
import os
import secrets
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "IndptrTable",
    "Ring",
    "Segment",
    "SlotArrays",
    "SlotLayout",
    "SharedIndptrs",
    "map_indptrs",
    "map_segment",
    "segment_names",
    "unlink_orphans",
]

PREFIX = "al"
SHM_DIR = Path("/dev/shm")
_ALIGN = 64


@dataclass(frozen=True)
class SlotArrays:
    """numpy views of one slot. ``header`` is (ticket, load index, rows, stored entries); ``obsm``: rows per key."""

    header: np.ndarray
    indptr: np.ndarray | None = None
    data: np.ndarray | None = None
    indices: np.ndarray | None = None
    dense: np.ndarray | None = None
    obsm: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class SlotLayout:
    """Sizes of a slot: enough for the largest load of an epoch. Picklable; every process builds the same views."""

    kind: Literal["csr", "dense"]
    dtype: str
    max_rows: int
    max_nnz: int = 0  # CSR only
    n_vars: int = 0  # dense only
    obsm: tuple[tuple[str, int, str], ...] = ()  # (key, columns, dtype) of each obsm array yielded

    def _parts(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        parts = [("header", np.dtype(np.int64), (4,))]
        if self.kind == "csr":
            parts += [
                ("indptr", np.dtype(np.int64), (self.max_rows + 1,)),
                ("data", np.dtype(self.dtype), (self.max_nnz,)),
                ("indices", np.dtype(np.int32), (self.max_nnz,)),
            ]
        else:
            parts += [("dense", np.dtype(self.dtype), (self.max_rows, self.n_vars))]
        parts += [(f"obsm/{key}", np.dtype(dtype), (self.max_rows, width)) for key, width, dtype in self.obsm]
        return parts

    @property
    def nbytes(self) -> int:
        return sum(-(-dt.itemsize * int(np.prod(shape)) // _ALIGN) * _ALIGN for _, dt, shape in self._parts())

    def written(self, n_rows: int, nnz: int = 0) -> list[tuple[int, int]]:
        """(offset, bytes) of each part a load of ``n_rows`` rows (``nnz`` stored entries, CSR) writes."""
        used = {"header": 4, "indptr": n_rows + 1, "data": nnz, "indices": nnz}
        out, offset = [], 0
        for name, dt, shape in self._parts():
            count = used.get(name, n_rows * int(np.prod(shape[1:])))  # dense X and obsm: whole rows
            out.append((offset, min(count, int(np.prod(shape))) * dt.itemsize))
            offset += -(-dt.itemsize * int(np.prod(shape)) // _ALIGN) * _ALIGN
        return out

    def arrays(self, buffer) -> SlotArrays:
        views, offset = {}, 0
        for name, dt, shape in self._parts():
            count = int(np.prod(shape))
            views[name] = np.frombuffer(buffer, dtype=dt, count=count, offset=offset).reshape(shape)
            offset += -(-dt.itemsize * count // _ALIGN) * _ALIGN
        obsm = {name.removeprefix("obsm/"): views.pop(name) for name in list(views) if name.startswith("obsm/")}
        return SlotArrays(**views, obsm=obsm)

    def holds(self, other: SlotLayout) -> bool:
        """Whether a slot of this layout has room for a load that needs ``other``."""
        return (
            (self.kind, self.dtype, self.n_vars, self.obsm) == (other.kind, other.dtype, other.n_vars, other.obsm)
            and self.max_rows >= other.max_rows
            and self.max_nnz >= other.max_nnz
        )


def map_segment(name: str, nbytes: int) -> mmap.mmap:
    """Map an existing segment (worker side: attach only, never unlink)."""
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def populate(mapping: mmap.mmap, ranges: list[tuple[int, int]]) -> bool:
    """Fault the pages of ``ranges`` ((offset, bytes) of ``mapping``) in now, with one system call each
    (``MADV_POPULATE_WRITE``, Linux 5.14+).

    A worker filling a fresh slot of ~180 MB otherwise takes ~45,000 page
    faults one by one while it decodes (measured: 90-120 ms, against 65 ms
    here). Only the parts a load writes: the rest of the slot (room for
    larger loads) takes no memory until used. Returns False where the
    kernel does not support it (nothing is done: the pages fault in on
    first touch, as before).
    """
    advice = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)
    if advice is None or not hasattr(mapping, "madvise"):
        return False
    try:
        for offset, nbytes in ranges:
            start = offset - offset % mmap.PAGESIZE
            if nbytes > 0:
                mapping.madvise(advice, start, offset + nbytes - start)
    except OSError:  # EINVAL: an older kernel; ENOMEM/EFAULT: /dev/shm is full (the decode's own touch says so)
        return False
    return True


def unlink_orphans(pid: int) -> None:
    """Unlink every segment process ``pid`` created: its workers call this when it died without doing so.

    The names carry the creator's pid (:func:`segment_names`). The resource
    tracker would unlink them too, but only when the last process sharing it
    exits, which for a child forked from a long-running parent is too late.
    """
    for name in segment_names(pid):
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass  # another worker of the same process was quicker


def segment_names(pid: int | None = None) -> list[str]:
    """Names of this package's segments in ``/dev/shm`` (of process ``pid``, or all)."""
    prefix = f"{PREFIX}_{pid}_" if pid is not None else f"{PREFIX}_"
    return sorted(p.name for p in SHM_DIR.glob(prefix + "*")) if SHM_DIR.is_dir() else []


_MORE_SHM = "give the machine (or container: docker run --shm-size) more shared memory"


def _free() -> int:
    stat = os.statvfs(SHM_DIR)
    return stat.f_bavail * stat.f_frsize


def _check_room(n_slots: int, layout: SlotLayout) -> None:
    free = _free()
    if n_slots * layout.nbytes > free:
        # tmpfs accepts the segment and then kills the writer with SIGBUS: refuse now.
        raise RuntimeError(
            f"the ring needs {n_slots} x {layout.nbytes / 2**20:.0f} MiB of shared memory but {SHM_DIR} has "
            f"{free / 2**20:.0f} MiB free; lower memory_budget or preload_nchunks, or {_MORE_SHM}"
        )


def _unwritten(segment: Segment) -> int:
    """Bytes of ``segment`` not yet in memory: what it may still take of ``/dev/shm`` (tmpfs allocates a page
    when it is first written)."""
    try:
        return max(0, segment.layout.nbytes - os.stat(SHM_DIR / segment.name).st_blocks * 512)
    except FileNotFoundError:
        return 0


class Segment:
    """One shared-memory segment, created and unlinked by the main process.

    :meth:`lend` counts views handed to the user; :attr:`lent` says how many
    are still alive.
    """

    def __init__(self, name: str, layout: SlotLayout):
        self.name, self.layout = name, layout
        self.owner = os.getpid()
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=layout.nbytes)
        try:
            self.mapping = map_segment(name, layout.nbytes)
        except BaseException:
            self.unlink()
            raise
        self._shm.close()  # our own mapping above is the one views refer to
        self.arrays = layout.arrays(self.mapping)
        self._views: list[weakref.ref] = []
        self._views_lock = threading.Lock()  # a loop in one thread lends while another counts
        self._unlinked = False

    def lend(self, view: np.ndarray) -> np.ndarray:
        """Count ``view`` as held by the user until it is garbage collected."""
        # A plain weak reference, no callback: a Python callback run when a view dies is where
        # a Ctrl-C can land, and the interpreter swallows exceptions raised in such callbacks.
        ref = weakref.ref(view)
        with self._views_lock:
            self._views.append(ref)
        return view

    @property
    def lent(self) -> int:
        """Views handed out that are still alive."""
        with self._views_lock:
            self._views = [v for v in self._views if v() is not None]
            return len(self._views)

    def unlink(self) -> None:
        """Remove the name (idempotent; a no-op in a forked child). The memory is freed when the last mapping goes."""
        if not getattr(self, "_unlinked", False) and os.getpid() == self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            self._unlinked = True  # only now: an unlink cut short by Ctrl-C is retried


class Ring:
    """``n_slots`` segments of one :class:`SlotLayout`, owned by this process.

    Slot ``k``'s current segment name is :meth:`name`; it changes when the
    slot is resized or replaced, and tasks carry it so workers re-map.
    ``retire`` is called with each segment the ring lets go of, after its
    name is unlinked and while the ring still maps it (pinned rings undo
    their CUDA registration there: ``pinned_slots.py``).
    """

    def __init__(self, layout: SlotLayout, n_slots: int, retire: Callable[[Segment], None] | None = None):
        if not SHM_DIR.is_dir():
            raise RuntimeError(f"the worker engine needs POSIX shared memory in {SHM_DIR}; use num_workers=0")
        _check_room(n_slots, layout)
        self.layout = layout
        self._retire = retire
        self._token = secrets.token_hex(3)
        self._generation = 0
        self.segments: list[Segment] = []
        try:
            for k in range(n_slots):
                self.segments.append(self._new(k))
        except BaseException:
            self.close()
            raise
        # A backstop if the owner forgets close(): unlink when the ring is collected.
        self._finalizer = weakref.finalize(self, Ring._unlink_all, self.segments, retire)

    def _new(self, k: int) -> Segment:
        self._generation += 1
        return Segment(f"{PREFIX}_{os.getpid()}_{self._token}_{k}_{self._generation}", self.layout)

    def __len__(self) -> int:
        return len(self.segments)

    def name(self, k: int) -> str:
        return self.segments[k].name

    def replace(self, k: int) -> None:
        """Give slot ``k`` a new segment; the old one is unlinked and lives on only in the user's views.

        The batches the user holds keep their old segments' memory in
        ``/dev/shm``: if the new segment, and what the ring's other slots may
        still fill, do not fit beside them, raise (a ``RuntimeError`` saying
        so) rather than let the worker that fills it die of SIGBUS.
        """
        # What the other slots may still take first: a worker filling one meanwhile only lowers the free space.
        pending = sum(_unwritten(s) for i, s in enumerate(self.segments) if i != k)
        free = _free()
        if self.layout.nbytes + pending > free:
            raise RuntimeError(
                f"the ring needs another slot of {self.layout.nbytes / 2**20:.0f} MiB of shared memory, because "
                f"batches you still hold keep their slots' memory, but {SHM_DIR} has {free / 2**20:.0f} MiB free "
                f"(and the ring's other slots may still fill {pending / 2**20:.0f} MiB of that); hold fewer batches "
                f"(copy those you keep: X.clone()), lower memory_budget or preload_nchunks, or {_MORE_SHM}"
            )
        self._swap(k)

    def _swap(self, k: int) -> None:
        old = self.segments[k]
        self.segments[k] = self._new(k)
        Ring._unlink_all([old], self._retire)

    def resize(self, layout: SlotLayout) -> None:
        """Make every slot hold ``layout`` (new segments; old views stay valid)."""
        _check_room(len(self.segments), layout)
        self.layout = layout
        for k in range(len(self.segments)):
            self._swap(k)

    @property
    def nbytes(self) -> int:
        return len(self.segments) * self.layout.nbytes

    @staticmethod
    def _unlink_all(segments: list[Segment], retire: Callable[[Segment], None] | None) -> None:
        for s in segments:
            s.unlink()
        # Then (the ring still maps them) whatever else must end with them: CUDA's registration.
        for s in segments:
            if retire is not None and os.getpid() == s.owner:
                retire(s)

    def close(self) -> None:
        """Unlink every segment (idempotent). Views the user holds stay valid."""
        Ring._unlink_all(self.segments, self._retire)


@dataclass(frozen=True)
class IndptrTable:
    """Where every CSR file's row pointer lies: what a worker needs to map them.

    A store written by this version holds each row pointer raw, in one
    chunk file: ``files[f]`` is ``(path, entries)`` and every process maps
    that file, one copy per machine (the page cache) however many ranks and
    workers read it. Otherwise ``bounds[f]:bounds[f + 1]`` are file ``f``'s
    int64 entries in one shared segment (empty for a dense or mapped file):
    one copy for a main process and its workers. Either way not one per
    process: 8 bytes per cell, 0.8 GB for 100M cells, which 16 private
    copies would make 13 GB.
    """

    segment: str
    bounds: tuple[int, ...]
    files: tuple[tuple[str, int] | None, ...] = ()

    @property
    def nbytes(self) -> int:
        return max(8, 8 * self.bounds[-1])  # an empty segment cannot be mapped


class SharedIndptrs:
    """The row pointers of a dataset's files in one shared segment, created and unlinked by the main process.

    Like a ring slot: the name carries the creator's pid (orphans are
    unlinked by its workers), and :meth:`unlink` is idempotent and a no-op
    in a forked child.
    """

    def __init__(self, indptrs: list[np.ndarray | None]):
        if not SHM_DIR.is_dir():
            raise RuntimeError(f"the worker engine needs POSIX shared memory in {SHM_DIR}; use num_workers=0")
        files = tuple(_raw_file(p) for p in indptrs)
        indptrs = [None if f is not None else p for p, f in zip(indptrs, files)]
        sizes = [0 if p is None else p.size for p in indptrs]
        bounds = tuple(int(b) for b in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        self.table = IndptrTable(f"{PREFIX}_{os.getpid()}_{secrets.token_hex(3)}_indptr", bounds, files)
        self.owner = os.getpid()
        self._unlinked = False
        self._shm = shared_memory.SharedMemory(name=self.table.segment, create=True, size=self.table.nbytes)
        try:
            mapping = map_segment(self.table.segment, self.table.nbytes)
            whole = np.frombuffer(mapping, dtype=np.int64)
            for p, a, b in zip(indptrs, bounds[:-1], bounds[1:]):
                if p is not None:
                    whole[a:b] = p
            del whole
            mapping.close()
        except BaseException:
            self.unlink()
            raise
        self._shm.close()
        self._finalizer = weakref.finalize(self, SharedIndptrs._unlink, self._shm, self.owner)

    @staticmethod
    def _unlink(shm: shared_memory.SharedMemory, owner: int) -> None:
        if os.getpid() == owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

    def unlink(self) -> None:
        """Remove the name (idempotent; a no-op in a forked child). Workers' mappings stay valid."""
        if not self._unlinked and os.getpid() == self.owner:
            SharedIndptrs._unlink(self._shm, self.owner)
            self._unlinked = True


def _raw_file(indptr: np.ndarray | None) -> tuple[str, int] | None:
    """``(path, entries)`` of a row pointer that is a map of a whole raw file (a store's own), else None."""
    if isinstance(indptr, np.memmap) and indptr.offset == 0 and indptr.dtype == np.dtype("<i8") and indptr.filename:
        return str(indptr.filename), int(indptr.size)
    return None


def map_indptrs(table: IndptrTable) -> list[np.ndarray | None]:
    """Read-only views of each file's row pointer (``None`` for a dense file), no private copy."""
    fd = os.open(SHM_DIR / table.segment, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, table.nbytes, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    whole = np.frombuffer(mapping, dtype=np.int64)
    out = [whole[a:b] if b > a else None for a, b in zip(table.bounds[:-1], table.bounds[1:])]
    for f, raw in enumerate(table.files):
        if raw is not None:
            out[f] = np.memmap(raw[0], dtype="<i8", mode="r", shape=(raw[1],))
    return out
