"""What the engine and the loops know of where the time goes: ``ds.stats()``.

When a GPU starves, the first question is whether the loader is the cause.
Every loop times its ``next()`` calls (the training loop waiting for a
batch) and the time between them (the training step: the model's time);
the engine counts what each worker decoded and how long it took (the
worker's own clock), the loads decoded ahead for the next epoch and those
dropped, and the ring's slots. Counting costs a few clock reads per batch
and per load. :class:`StatsCounter` accumulates; :class:`LoaderStats` is a
snapshot of it, with :class:`WorkerStats` per worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["LoaderStats", "StatsCounter", "WorkerStats"]


@dataclass(frozen=True)
class WorkerStats:
    """One worker process's share of the work since the stats were reset."""

    #: Tasks it decoded: loads, and parts of a load split among idle workers.
    tasks: int
    #: Seconds it spent on the tasks it finished since the reset, by its own clock.
    busy_s: float
    #: ``busy_s`` over :attr:`LoaderStats.seconds` (at most 1): near 1, the worker never waited for work. Tasks are
    #: counted when they end, so over a short span (an epoch of a few loads) it is approximate.
    busy_fraction: float


@dataclass(frozen=True)
class LoaderStats:
    """A snapshot of ``ds.stats()``: where the time went since the stats were reset (see the Loading page)."""

    #: Wall time covered: since the dataset's first loop (or the last ``reset``).
    seconds: float
    #: Batches handed out by the dataset's loops.
    batches: int
    #: Rows in those batches.
    cells: int
    #: Loads the loops took (from the workers, or read themselves).
    loads: int
    #: Rows those loads yield.
    rows: int
    #: Seconds the loops spent inside ``next()``: the training loop waiting for batches.
    waiting_s: float
    #: Seconds between a loop's batches: the training step, what the model took.
    between_s: float
    #: One :class:`WorkerStats` per worker process (empty with ``num_workers=0``).
    workers: tuple[WorkerStats, ...]
    #: Of :attr:`loads`, those read in the main process: all of them with ``num_workers=0``, the first ones while
    #: the workers start, and those of a loop run while the workers serve another.
    loads_here: int
    #: Loads of an epoch decoded before its loop began, while the epoch before ended.
    loads_ahead: int
    #: Of those, the ones dropped because the next loop ran another epoch or other settings.
    loads_ahead_dropped: int
    #: The ring's slots.
    slots: int
    #: Slots decoding, decoded or lent now.
    slots_in_use: int

    @property
    def loader_fraction(self) -> float:
        """The share of the training loop's time spent waiting for batches (0: the loader is never the bottleneck)."""
        total = self.waiting_s + self.between_s
        return self.waiting_s / total if total > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            (f"{self.batches} batches ({self.cells} cells) in {self.seconds:.1f} s: the loop waited {self.waiting_s:.2f} s "
             f"for batches and spent {self.between_s:.2f} s between them (loader {self.loader_fraction:.0%} of its time)"),
            (f"{self.loads} loads ({self.rows} rows), {self.loads_here} of them read in the main process; decoded ahead "
             f"for the next epoch: {self.loads_ahead} ({self.loads_ahead_dropped} dropped); slots in use: "
             f"{self.slots_in_use} of {self.slots}"),
        ]
        for k, w in enumerate(self.workers):
            lines.append(f"worker {k}: {w.tasks} tasks, busy {w.busy_s:.2f} s ({w.busy_fraction:.0%})")
        return "\n".join(lines)


class StatsCounter:
    """The counts behind :class:`LoaderStats`, added to by loops (any thread) and the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._since: float | None = None
            self.batches = self.cells = self.loads = self.rows = 0
            self.waiting_s = self.between_s = 0.0
            self.loads_here = self.loads_ahead = self.loads_ahead_dropped = 0
            self._workers: dict[int, list] = {}  # worker -> [tasks, busy seconds]

    def start(self) -> None:
        """The clock starts (at the first loop or the workers' start), if it has not."""
        with self._lock:
            if self._since is None:
                self._since = time.perf_counter()

    def batch(self, cells: int, waited: float, between: float) -> None:
        with self._lock:
            self.batches += 1
            self.cells += cells
            self.waiting_s += waited
            self.between_s += between

    def load(self, rows: int, here: bool) -> None:
        """A loop took a load of ``rows`` rows (``here``: it read the load itself)."""
        with self._lock:
            self.loads += 1
            self.rows += rows
            self.loads_here += here

    def task(self, worker: int, seconds: float) -> None:
        """Worker ``worker`` finished a task that took it ``seconds``."""
        with self._lock:
            counts = self._workers.setdefault(worker, [0, 0.0])
            counts[0] += 1
            counts[1] += seconds

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n`` more of ``loads_ahead`` or ``loads_ahead_dropped``."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self, num_workers: int, slots: int, slots_in_use: int) -> LoaderStats:
        with self._lock:
            seconds = time.perf_counter() - self._since if self._since is not None else 0.0
            workers = []
            for k in range(num_workers):
                tasks, busy = self._workers.get(k, (0, 0.0))
                # a task is counted when it ends, whole: one begun before a reset can push the fraction past 1
                workers.append(WorkerStats(tasks, busy, min(1.0, busy / seconds) if seconds > 0 else 0.0))
            return LoaderStats(seconds, self.batches, self.cells, self.loads, self.rows, self.waiting_s, self.between_s,
                               tuple(workers),
                               self.loads_here, self.loads_ahead, self.loads_ahead_dropped, slots, slots_in_use)  # fmt: skip
