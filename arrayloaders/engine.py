"""The main process's side of the worker engine: an epoch's loads, in plan order, from ring slots.

:class:`Engine` owns the ring (``ring.py``) and the worker pool
(``worker.py``). For each epoch it hands load ``i`` to worker ``i % W``
together with a free slot, keeps at most one load per slot in flight, and
yields the loads back in plan order (a reorder buffer), so the batch
sequence never depends on the number of workers. A slot is reused only once
the user holds no view of it (see ``ring.py``).

Any failure, and any early exit from the loop (``break``, an exception in
the consumer, Ctrl-C, garbage collection), stops the workers and unlinks
every segment; the next epoch starts a fresh engine. After a complete epoch
the workers stay up for the next one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import WorkerError
from .load import LoadedRows, load_nnz
from .plan import EpochPlan, PlanConfig
from .ring import Ring, Segment, SlotLayout
from .rows import CsrRows, DenseRows
from .store import XSource
from .worker import Failed, Filled, Task, WorkerConfig, WorkerPool

__all__ = ["Engine", "slot_layout"]

_HEADROOM = 1.1  # slots are sized 10 % above the epoch's largest load, so later epochs rarely resize


def slot_layout(readers: list[CsrRows] | list[DenseRows], plan: EpochPlan) -> SlotLayout:
    """The smallest slot that holds every load of ``plan``."""
    max_rows = max((load.n_rows for load in plan.loads), default=1)
    source = readers[0].source
    if source.kind == "dense":
        return SlotLayout("dense", source.dtype, max_rows, n_vars=source.n_vars)
    max_nnz = max((load_nnz(readers, load) for load in plan.loads), default=1)
    return SlotLayout("csr", source.dtype, max_rows, max_nnz=max_nnz)


def _grown(layout: SlotLayout) -> SlotLayout:
    return SlotLayout(
        layout.kind, layout.dtype, layout.max_rows, int(layout.max_nnz * _HEADROOM) + 1, layout.n_vars
    )


@dataclass
class _Slot:
    load: int | None = None  # load in flight or yielded from this slot; None when free
    yielded: bool = False


class Engine:
    """Worker processes decoding an epoch's loads into a shared-memory ring.

    Parameters
    ----------
    sources
        The X of every added AnnData, in order.
    plan
        The plan settings (without the epoch).
    num_workers
        Worker processes.
    memory_budget
        Bytes the ring may use; sets the number of slots (at most ``2 *
        num_workers + 2``, at least 2).
    """

    def __init__(self, sources: tuple[XSource, ...], plan: PlanConfig, num_workers: int, memory_budget: int):
        self.sources, self.plan_config = sources, plan
        self.num_workers, self.memory_budget = num_workers, memory_budget
        self.ring: Ring | None = None
        self.pool: WorkerPool | None = None
        self._parts: list = [None, None]  # (pool, ring), shared with the finalizer, which must not hold self
        self._finalizer = weakref.finalize(self, Engine._shutdown, self._parts)

    @staticmethod
    def _shutdown(parts: list) -> None:
        pool, ring = parts
        if pool is not None:
            pool.close()
        if ring is not None:
            ring.close()

    def close(self) -> None:
        """Stop the workers and unlink the ring (idempotent)."""
        self._finalizer()
        self.pool = self.ring = None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _n_slots(self, layout: SlotLayout) -> int:
        fits = self.memory_budget // layout.nbytes
        if fits < 2:
            raise ValueError(
                f"memory_budget={self.memory_budget / 2**20:.1f} MiB holds fewer than 2 ring slots of "
                f"{layout.nbytes / 2**20:.1f} MiB (one load: {layout.max_rows} rows); raise memory_budget "
                "or lower preload_nchunks"
            )
        return int(min(fits, 2 * self.num_workers + 2))

    def _prepare(self, needed: SlotLayout) -> None:
        if self.ring is not None and self.ring.layout.holds(needed):
            return
        layout = _grown(needed)
        if self.ring is None:
            self.ring = self._parts[1] = Ring(layout, self._n_slots(layout))
        else:
            self.ring.resize(layout)
        if self.pool is None:
            configs = [WorkerConfig(k, self.sources, self.plan_config) for k in range(self.num_workers)]
            self.pool = self._parts[0] = WorkerPool(configs)

    def loads(
        self, plan: EpochPlan, readers: list[CsrRows] | list[DenseRows], wanted: list[int]
    ) -> Iterator[tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]]]:
        """Loads ``wanted`` (increasing) of ``plan``, in order, each with the function that lends its views."""
        if self.closed:
            raise RuntimeError("this engine was closed")
        try:
            self._prepare(slot_layout(readers, plan))
            yield from self._run(plan, wanted)
        except BaseException:
            self.close()
            raise

    def _run(self, plan: EpochPlan, wanted: list[int]):
        ring, pool = self.ring, self.pool
        slots = [_Slot() for _ in range(len(ring))]
        results: dict[int, Filled | Failed] = {}
        in_flight: dict[int, int] = {}  # load -> worker
        submitted = 0  # loads of ``wanted`` submitted so far

        def doing(k: int) -> str:
            mine = sorted(load for load, w in in_flight.items() if w == k)
            return f"decoding load(s) {mine} of epoch {plan.epoch}"

        for position, load in enumerate(wanted):
            # Slots whose views the user has dropped are free again.
            for k, slot in enumerate(slots):
                if slot.yielded and ring.segments[k].lent == 0:
                    slots[k] = _Slot()
            if submitted == position and all(s.load is not None for s in slots):
                # Nothing in flight and every slot held by the user's batches: give
                # the oldest-held slot a fresh segment rather than wait for them.
                k = min((i for i, s in enumerate(slots) if s.yielded), key=lambda i: slots[i].load)
                ring.replace(k)
                slots[k] = _Slot()
            while submitted < len(wanted):
                free = [i for i, s in enumerate(slots) if s.load is None]
                if not free:
                    break
                k, next_load = free[0], wanted[submitted]
                worker = next_load % len(pool)
                slots[k].load = next_load
                pool.submit(worker, Task(plan.epoch, next_load, k, ring.name(k), ring.layout), doing(worker))
                in_flight[next_load] = worker
                submitted += 1
            while load not in results:
                if not in_flight:  # cannot happen: the slot logic above always submits the next load
                    raise RuntimeError(f"load {load} of epoch {plan.epoch} was never submitted")
                for _, message in pool.wait_any(sorted(set(in_flight.values())), doing):
                    results[message.load] = message
                    in_flight.pop(message.load, None)
            result = results.pop(load)
            if isinstance(result, Failed):
                raise WorkerError(
                    f"worker {result.worker} (pid {pool.processes[result.worker].pid}) failed {result.traceback}"
                )
            k = result.slot
            segment = ring.segments[k]
            yield self._view(segment, plan, load, result), segment.lend
            slots[k].yielded = True

    @staticmethod
    def _view(segment: Segment, plan: EpochPlan, load: int, result: Filled) -> LoadedRows:
        arrays = segment.arrays
        expected = (plan.epoch, load, result.n_rows, result.nnz)
        if tuple(arrays.header.tolist()) != expected:
            raise WorkerError(f"slot {result.slot} holds {tuple(arrays.header.tolist())}, expected {expected}")
        n, nnz = result.n_rows, result.nnz
        if arrays.dense is not None:
            return LoadedRows(plan.loads[load], dense=arrays.dense[:n])
        return LoadedRows(
            plan.loads[load], indptr=arrays.indptr[: n + 1], data=arrays.data[:nnz], indices=arrays.indices[:nnz]
        )
