"""What a dataset's loops share in one process: the worker engine, idle readers, row pointers; its lifecycle.

A dataset holds settings and sources; its :class:`Runtime` holds the
resources its loops share, made anew after a fork or unpickling. The engine
(``engine.py``) is made for the current sources and settings when a loop
(or ``add_store``) needs it, and closed by :meth:`WorkerLifecycleMixin.close`.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import psutil

from ..store.disk_layout import XSource
from ..store.rows import CsrRows, DenseRows, open_rows, read_indptr
from .distributed import local_world_size
from .engine import Engine, EpochRun, slot_layout
from .pinned_slots import PinnedSlots
from .plan import EpochPlan, PlanConfig, plan_epoch
from .ring import SlotLayout
from .stats import LoaderStats, StatsCounter

__all__ = ["ReaderSet", "Readers", "Runtime", "WorkerLifecycleMixin", "default_memory_budget", "default_num_workers"]


class Readers:
    """Idle reader sets (one reader per added X) for loops that read in their own thread.

    A set serves one loop at a time. Loops give sets back when they end, also
    from a finalizer, so giving back is a lock-free ``deque`` append.
    """

    def __init__(self):
        self._idle: deque[ReaderSet] = deque()
        self._finalizer = weakref.finalize(self, Readers._close_all, self._idle)

    def take(self, open_set: Callable[[], ReaderSet]) -> ReaderSet:
        try:
            return self._idle.pop()
        except IndexError:
            return open_set()

    def give_back(self, readers: ReaderSet) -> None:
        self._idle.append(readers)

    def close(self) -> None:
        Readers._close_all(self._idle)

    @staticmethod
    def _close_all(idle: deque) -> None:
        while idle:
            idle.pop().close()


@dataclass
class ReaderSet:
    """Readers of every added X (``x``), and of every file's array of each obsm key."""

    x: list[CsrRows] | list[DenseRows]
    obsm: dict[str, list[DenseRows]]

    def close(self) -> None:
        for reader in [*self.x, *(r for readers in self.obsm.values() for r in readers)]:
            reader.close()


@dataclass(frozen=True)
class PlannedAhead:
    """The plan of an epoch made before its loop began, for the engine to decode its first loads while the
    epoch before ends: the loop of that epoch runs it (the same object) if nothing it depends on changed."""

    epoch: int
    config: PlanConfig
    cells: np.ndarray | None
    sequence: np.ndarray | None
    plan: EpochPlan

    def serves(self, epoch: int, config: PlanConfig, cells: np.ndarray | None) -> bool:
        """Whether a loop of ``epoch`` with ``config`` over ``cells`` would plan just this."""
        if (self.epoch, self.config) != (epoch, config):
            return False
        return self.cells is cells or (self.cells is not None and cells is not None and np.array_equal(self.cells, cells))


@dataclass
class Runtime:
    """What the loops over one dataset share in one process; made anew after a fork or unpickling."""

    owner: int = field(default_factory=os.getpid)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the epoch cursor and the engine slot
    engine: Engine | None = None
    readers: Readers = field(default_factory=Readers)
    indptrs: list[np.ndarray | None] | None = None  # each CSR file's row pointer, read once, shared read-only
    loops: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    seq: Iterator[int] = field(default_factory=itertools.count)
    stats: StatsCounter = field(default_factory=StatsCounter)  # what ds.stats() reports
    ahead: PlannedAhead | None = None  # the next epoch's plan, made for the loads decoded ahead


class WorkerLifecycleMixin:
    """The methods of a dataset that start, serve and stop its workers and readers."""

    def _rt(self) -> Runtime:
        """This process's runtime; a forked child gets its own and leaves the parent's workers alone."""
        if self._runtime.owner != os.getpid():
            self._runtime = Runtime()
        return self._runtime

    def _indptrs(self) -> list[np.ndarray | None]:
        rt = self._rt()
        if rt.indptrs is None or len(rt.indptrs) != len(self._sources):
            rt.indptrs = [read_indptr(s) if s.kind == "csr" else None for s in self._sources]
        return rt.indptrs

    def _open_readers(self) -> ReaderSet:
        x = [open_rows(s, indptr) for s, indptr in zip(self._sources, self._indptrs())]
        return ReaderSet(x, {key: [open_rows(s) for s in sources] for key, sources in (self._obsm or {}).items()})

    def _obsm_sources(self) -> tuple[tuple[str, tuple[XSource, ...]], ...]:
        return tuple((key, tuple(sources)) for key, sources in (self._obsm or {}).items())

    def _engine(self, window: int) -> Engine | None:
        """This process's engine for the current sources and settings, made if needed (workers not yet
        started); ``None`` while a loop still uses one made for other sources or settings."""
        rt, sources, fmt, obsm = self._rt(), tuple(self._sources), self._row_format(), self._obsm_sources()
        with rt.lock:
            engine = rt.engine
            pinned = self.pin_memory
            if engine is None or engine.closed or not engine.matches(sources, fmt, obsm, self.num_workers, pinned):
                if engine is not None and engine.in_use:
                    return None  # the sources or settings changed under a running loop: let it finish
                if engine is not None:
                    engine.close()
                pins = PinnedSlots() if pinned else None
                engine = rt.engine = Engine(
                    sources, self.num_workers, self.memory_budget, self.timeout, window, fmt, obsm, self._indptrs(), pins,
                    rt.stats,
                )
                # The engine shares them with its workers; a loop reading in its own thread reads them again.
                rt.indptrs = None
            elif not engine.in_use:
                # Made when the data was added: settings changed since apply from the next run on.
                engine.memory_budget, engine.timeout, engine.window = self.memory_budget, self.timeout, window
        return engine

    def _start_run(self, plan: EpochPlan, loads: list[int], seq: int, cells: np.ndarray | None = None) -> EpochRun | None:
        """The workers for ``loads`` of ``plan`` (over ``cells``), or ``None`` while they serve another loop.

        Once the run has handed out its loads, the engine decodes the next epoch's first ones
        (:meth:`_plan_ahead`), which the next loop takes if it runs that epoch with the same settings.
        """
        engine = self._engine(plan.window)
        if engine is None:
            return None
        source, fmt, obsm = self._sources[0], self._row_format(), self._obsm_sources()
        run = engine.start(plan, loads, seq, lambda: slot_layout(source, engine.row_pointers(), plan, fmt, obsm))
        if run is not None:
            run.ahead = functools.partial(self._plan_ahead, plan.epoch + 1, cells, engine)
        return run

    def _plan_ahead(self, epoch: int, cells: np.ndarray | None, engine: Engine) -> tuple[EpochPlan, SlotLayout] | None:
        """The plan (and the slot it needs) that the next loop, of ``epoch``, will run if nothing changes;
        None if it cannot be known ahead (a sampler whose draws depend on more than the epoch)."""
        from .selection import draws_by_epoch

        if self.sampler is not None and not draws_by_epoch(self.sampler):
            return None
        config = self._plan_config()
        sequence = self._sample(epoch) if self.sampler is not None else None
        plan = plan_epoch(config, epoch, cells=cells, sequence=sequence)
        self._rt().ahead = PlannedAhead(epoch, config, cells, sequence, plan)
        source, fmt, obsm = self._sources[0], self._row_format(), self._obsm_sources()
        return plan, slot_layout(source, engine.row_pointers(), plan, fmt, obsm)

    def stats(self, reset: bool = False) -> LoaderStats:
        """Where the time went, since the first loop (or the last ``reset``): is the loader what the model waits for?

        Counts kept by the loops (time in ``next()`` and between batches) and
        the engine (each worker's tasks and busy time, loads decoded ahead
        for the next epoch, slots); a few clock reads per batch. Datasets that
        share workers (a dataset's subsets and splits) share these counts. See
        :class:`~arrayloaders.LoaderStats` and the Loading page.

        Parameters
        ----------
        reset
            Start counting afresh after this snapshot (e.g. once per epoch, or after warm-up).
        """
        rt = self._rt()
        engine = rt.engine
        slots, in_use = engine.slot_counts() if engine is not None and not engine.closed else (0, 0)
        snapshot = rt.stats.snapshot(self.num_workers, slots, in_use)
        if reset:
            rt.stats.reset()
            rt.stats.start()
        return snapshot

    def close(self) -> None:
        """Stop the worker processes and free the shared memory (idempotent).

        Batches already yielded stay valid. A loop still running goes on
        (it reads in its own thread, or starts new workers at its next load),
        and the next loop starts new workers.
        """
        rt = self._rt()
        with rt.lock:
            engine, rt.engine = rt.engine, None
        if engine is not None:
            engine.close()
        rt.readers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_num_workers() -> int:
    """The cores this process may run on, shared with the other ranks of its node; at most 16.

    The main process mostly waits, so it gets no core of its own. Under
    DDP, ``LOCAL_WORLD_SIZE`` ranks share the node: 8 ranks on 64 cores
    start 8 workers each, not 8 x 16.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    # 16: measured to scale up to there (a 16-core machine: 8 workers 205k, 16 workers 451k cells/s).
    return max(1, min(cores // local_world_size(), 16)) if os.path.isdir("/dev/shm") else 0


def default_memory_budget() -> int:
    """Ring memory: a quarter of the available RAM, shared with the other ranks of the node.

    The ring takes only what its ``2 * num_workers + 2`` slots need; a fixed
    cap (1 GiB, five loads of 8,192 typical cells) starved workers beyond
    four of free slots. Under DDP each of the ``LOCAL_WORLD_SIZE`` ranks
    gets its share, so 8 ranks do not reserve 8 quarters of the RAM.
    """
    return int(psutil.virtual_memory().available // 4 // local_world_size())
