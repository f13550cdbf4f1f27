"""The main process's side of the worker engine: loads decoded by worker processes into a shared-memory ring.

A dataset keeps one :class:`Engine` across epochs and loops: the worker pool
(``worker.py``) and the ring (``ring.py``). A loop asks it for an
:class:`EpochRun`, the loads of one epoch from some load on. The run hands
load ``i`` to worker ``i % W`` together with a free slot, keeps as many loads
in flight as there are free slots, and returns loads in plan order (a
reorder buffer), so the batches never depend on the number of workers.

Slots
-----
A slot is *free*, *filling* (a task in flight), *ready* (decoded, waiting for
its turn) or *lent* (handed to a loop). A lent slot is free again only when
no view of it is alive, the loop's own or any batch's, whatever epoch or loop
made them (``ring.Segment.lent``), and, for pinned batches, once the copies
to the GPU enqueued from it have completed (``pinned_slots.py``). If every
slot is lent and nothing is in flight, the engine waits for such copies, or
else the oldest lent slot gets a fresh segment rather than wait for the user
to drop batches.

Loads while the workers start
-----------------------------
Workers start when the dataset is filled, without waiting (~0.3 s: an
interpreter, numpy, the stores' layouts this process learnt from zarr and
sent them), and get tasks only once they have reported. Until one has, this process decodes the loads the loop asks
for itself, one at a time, into their slots: the first batch waits for
one load's decoding, not for the workers too. Once workers are up, the
run's first load is split among the idle ones instead.

One run at a time
-----------------
The workers serve one run. A loop that finds them busy reads its loads in
its own thread (``dataset.py``); it takes them over when they are free at
one of its load boundaries, or at once if the run holding them has handed
out at most one batch (a peek) and is older. A run that ends (its loop is
complete, abandoned or garbage collected) only sets a flag: the engine
forgets it at its next step, so a finalizer never touches engine state.
Tasks of a forgotten run still in flight are *stale*: their replies (matched
by ticket) just free their slots.

Epochs flow into each other
---------------------------
Once a run has handed all its loads to the workers, the slots its tail
frees take the *next* epoch's first loads: the run's ``ahead`` gives the
plan the next loop will run (``(seed, epoch + 1)``, the sampler's next
sequence), and those loads are decoded into free slots while the loop
consumes the last ones. The next loop adopts them if it runs that very plan
(the same object: ``dataset.py`` hands it on), from its first load or any
later one (a resumed epoch: loads before it are freed as they land);
otherwise they are dropped: their slots freed, their tasks in flight stale.
A worker is never idle at an epoch's end for want of a task, and nothing a
loop yields changes.

Failures
--------
Any error while waiting for the workers (a dead or stuck worker, a worker
exception, Ctrl-C) closes the engine: workers stopped, every segment
unlinked, and the next loop starts a fresh one. A worker with work that
makes no progress for ``timeout`` seconds (default: 60 s more than the
slowest load seen) is reported with its id, pid, state and loads. Only the
process that created an engine closes it: a forked child leaves it alone.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import WorkerError
from ..interrupts import sigint_deferred
from ..store.disk_layout import DirectX, XSource
from ..store.remote import RemoteRoot, secrets_of
from ..store.zarr_layout import direct_sources
from .epoch_run import EpochRun, split_points
from .load import ALL_GENES, LoadedRows, RowFormat, load_nnz, splittable
from .pinned_slots import PinnedSlots
from .plan import EpochPlan
from .ring import Ring, SharedIndptrs, SlotLayout, map_indptrs
from .stats import StatsCounter
from .worker import POLL_S, Failed, Filled, SlotDecoder, Task, WorkerConfig, WorkerPool

__all__ = ["DEFAULT_TIMEOUT_MARGIN_S", "Engine", "EpochRun", "slot_layout"]

_HEADROOM = 1.1  # slots are sized 10 % above the epoch's largest load, so later epochs rarely resize
# Tasks given to one worker at a time: one it decodes and one ready for when it is done.
TASKS_PER_WORKER = 2
# Ring slots per worker (plus one, plus the window a loop holds): its tasks in flight and the loads
# decoded ahead of their turn, which wait in the reorder buffer.
SLOTS_PER_WORKER = 2
DEFAULT_TIMEOUT_MARGIN_S = 60.0  # default timeout: the slowest load seen so far plus this


def slot_layout(
    source: XSource,
    indptrs: list[np.ndarray] | None,
    plan: EpochPlan,
    fmt: RowFormat = ALL_GENES,
    obsm: tuple[tuple[str, tuple[XSource, ...]], ...] = (),
) -> SlotLayout:
    """The smallest slot that holds every load of ``plan`` (``indptrs``: each CSR file's, ``None`` if dense).

    A CSR slot holds a load's entries of all genes: workers decode them
    there and then keep those of ``fmt.genes`` in place. Each obsm key
    (its arrays, one per file) adds rows of its width.
    """
    max_rows = max((load.n_rows for load in plan.loads), default=1)
    widths = tuple((key, sources[0].n_vars, sources[0].dtype) for key, sources in obsm)
    if source.kind == "dense" or fmt.dense:
        return SlotLayout("dense", source.dtype, max_rows, n_vars=fmt.n_vars(source.n_vars), obsm=widths)
    max_nnz = max((load_nnz(indptrs, load.runs, plan.selected_take(load)) for load in plan.loads), default=1)
    return SlotLayout("csr", source.dtype, max_rows, max_nnz=max_nnz, obsm=widths)


def _grown(layout: SlotLayout) -> SlotLayout:
    return dataclasses.replace(layout, max_nnz=int(layout.max_nnz * _HEADROOM) + 1)


_live: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines with workers or segments, for _close_at_exit
_exit_hook_registered = False


def _close_at_exit() -> None:
    """Close every live engine at interpreter exit, with Ctrl-C deferred until it is done.

    Registered after ``weakref.finalize``'s own exit hook, so it runs first:
    a second Ctrl-C can then no longer cut the cleanup short inside the
    finalizers. Ctrl-C works again afterwards (a hang elsewhere in the exit
    stays interruptible).
    """
    with sigint_deferred():
        for engine in list(_live):
            Engine._shutdown(engine._parts, engine.owner)


@dataclass
class _Slot:
    state: Literal["free", "filling", "ready", "lent"] = "free"
    ticket: int = -1  # of the task that filled it last: the oldest lent slot is replaced first


@dataclass(frozen=True)
class _Flight:
    run: weakref.ref  # to the EpochRun (weak: a loop dropped mid-epoch must not be kept by its tasks)
    epoch: int
    load: int
    worker: int
    slot: int
    first: int | None = None  # a part of a split load: the ticket of its first part (the load's ticket)


class Engine:
    """Worker processes decoding loads into a shared-memory ring, kept across epochs and loops.

    Parameters
    ----------
    sources
        The X of every added AnnData, in order.
    num_workers
        Worker processes (started by :meth:`start_workers`, or at the first run).
    memory_budget
        Bytes the ring may use; sets the number of slots (at most ``2 *
        num_workers + 2``, at least 2).
    timeout
        Seconds a worker with work may go without progress before it is
        reported; ``None``: 60 s more than the slowest load seen.
    window
        Loads a loop holds at once (batches mixing a window of loads): the
        ring gets that many slots on top of ``2 * num_workers + 1``.
    fmt
        What the workers make of the rows: the genes kept, dense or CSR.
    obsm
        (key, its array in every file) of each obsm array the workers read
        along with X.
    indptrs
        Each file's row pointer (``None`` for dense files), as the main
        process read and checked them: put in one shared segment that every
        worker maps, instead of each reading its own copy.
    pins
        For pinned batches: the ring's segments are page-locked for CUDA as
        they are lent, and a released slot is refilled only once the copies
        from it are done (``pinned_slots.py``).
    """

    def __init__(
        self,
        sources: tuple[XSource, ...],
        num_workers: int,
        memory_budget: int,
        timeout: float | None = None,
        window: int = 1,
        fmt: RowFormat = ALL_GENES,
        obsm: tuple[tuple[str, tuple[XSource, ...]], ...] = (),
        indptrs: list[np.ndarray | None] | None = None,
        pins: PinnedSlots | None = None,
        stats: StatsCounter | None = None,
    ):
        self.sources, self.fmt, self.obsm, self.pins = sources, fmt, obsm, pins
        self.stats = stats if stats is not None else StatsCounter()
        self._indptrs = indptrs
        self._shared_indptrs: list[np.ndarray | None] | None = None
        self.num_workers, self.memory_budget, self.timeout, self.window = num_workers, memory_budget, timeout, window
        self.owner = os.getpid()
        self.lock = threading.RLock()
        self.ring: Ring | None = None
        self.pool: WorkerPool | None = None
        self._run: weakref.ref | None = None  # the run using the workers (weak: see run)
        self._ahead: EpochRun | None = None  # the next epoch's loads decoded ahead (see "Epochs flow into each other")
        self._slots: list[_Slot] = []
        self._flight: dict[int, _Flight] = {}  # ticket -> where it went
        self._parts_left: dict[int, int] = {}  # a split load's first ticket -> its parts still in flight
        self._tickets = 0
        self._busy_since: dict[int, float] = {}  # worker -> its last reply, or when it was given work while idle
        self._here: SlotDecoder | None = None  # this process's, for the loads it decodes while the workers start
        self._here_config: WorkerConfig | None = None
        self._slowest = 0.0  # seconds of the slowest load a worker reported
        self._closed = False
        # (pool, ring, shared row pointers), shared with the finalizer, which must not hold self
        self._parts: list = [None, None, None]
        self._finalizer = weakref.finalize(self, Engine._shutdown, self._parts, self.owner)
        _live.add(self)
        global _exit_hook_registered
        if not _exit_hook_registered:
            atexit.register(_close_at_exit)
            _exit_hook_registered = True

    @staticmethod
    def _shutdown(parts: list, owner: int) -> None:
        """Unlink the segments, then stop the workers; what is done is dropped from ``parts``, so a retry finishes the rest."""
        if os.getpid() != owner:
            return  # a forked child: the parent's workers and segments are not ours
        with sigint_deferred():
            try:
                if parts[1] is not None:
                    parts[1].close()  # unlinking first: it cannot hang, and views stay valid
                    parts[1] = None
                if parts[2] is not None:
                    parts[2].unlink()
                    parts[2] = None
            finally:
                if parts[0] is not None:
                    parts[0].close()
                    parts[0] = None

    def close(self) -> None:
        """Stop the workers and unlink the ring (idempotent). Batches already yielded stay valid."""
        with self.lock:
            self._closed = True
            self.pool = self.ring = None
            run = self.run
            if run is not None:
                run.ended = True
            self.run = None
            if self._ahead is not None:
                self._ahead.ended = True
                self._ahead = None
            self._flight.clear()
            self._parts_left.clear()
            self._slots = []
            self._here = None  # its readers and mapped slots
            # Called directly (the finalizer runs once only): if a second Ctrl-C cuts this short,
            # the exit hook or the finalizer finishes what is left in _parts.
            Engine._shutdown(self._parts, self.owner)

    @property
    def run(self) -> EpochRun | None:
        """The run using the workers. Held weakly: runs hold the engine, and a cycle would keep
        the workers of a dropped dataset up until the garbage collector ran."""
        return self._run() if self._run is not None else None

    @run.setter
    def run(self, run: EpochRun | None) -> None:
        self._run = weakref.ref(run) if run is not None else None

    def row_pointers(self) -> list[np.ndarray | None]:
        """Each file's row pointer (``None`` for a dense file): once the workers run, the copy they share,
        mapped read-only, so that the main process holds no private copy (8 bytes per cell)."""
        if self._shared_indptrs is not None:
            return self._shared_indptrs
        return self._indptrs if self._indptrs is not None else [None] * len(self.sources)

    @property
    def closed(self) -> bool:
        return self._closed

    def matches(
        self,
        sources: tuple[XSource, ...],
        fmt: RowFormat = ALL_GENES,
        obsm: tuple = (),
        num_workers: int | None = None,
        pinned: bool = False,
    ) -> bool:
        same = self.sources == sources and self.fmt == fmt and self.obsm == obsm and (self.pins is not None) == pinned
        return same and (num_workers is None or num_workers == self.num_workers)

    @property
    def in_use(self) -> bool:
        """Whether a loop is using the workers now."""
        run = self.run
        return run is not None and not run.released and not run.ended

    # ------------------------------------------------------------------ runs

    def start(self, plan: EpochPlan, loads: list[int], seq: int, layout: Callable[[], SlotLayout]) -> EpochRun | None:
        """A run over ``loads`` of ``plan`` for the loop numbered ``seq``, or ``None`` if the workers are busy.

        ``layout()`` gives the slot size the plan needs (called only when
        the workers are taken).
        """
        if os.getpid() != self.owner:
            return None  # a forked child: the parent's workers are not ours to drive
        if not self.lock.acquire(blocking=False):
            return None  # another thread is waiting on the workers right now
        try:
            if self.closed:
                return None
            current = self.run
            if current is not None and not current.released and not current.ended:
                if current.delivered > 1 or seq <= current.seq:
                    return None
            ahead, self._ahead = self._ahead, None
            if current is not None:
                self._forget(current)
            else:  # the last run was garbage collected with its loop: what it had decoded is nobody's
                held = {f.slot for f in ahead.ready.values()} if ahead is not None else set()
                for k, slot in enumerate(self._slots):
                    if slot.state == "ready" and k not in held:
                        slot.state = "free"
            needed = layout()
            if ahead is not None and ahead.plan is plan and self.ring is not None and self.ring.layout.holds(needed):
                run = self._adopt(ahead, loads, seq)
            else:
                if ahead is not None:
                    self.stats.add("loads_ahead_dropped", ahead.submitted)
                    self._forget(ahead)
                self._prepare(needed)
                run = EpochRun(self, plan, loads, seq)
            self.run = run
            return run
        except BaseException:
            self.close()
            raise
        finally:
            self.lock.release()

    def _adopt(self, ahead: EpochRun, loads: list[int], seq: int) -> EpochRun:
        """The loads decoded ahead, taken by the loop that runs their plan from load ``loads[0]`` on."""
        first = loads[0] if loads else len(ahead.plan.loads)
        for load in [k for k in ahead.ready if k < first]:  # a resumed epoch: loads before its position
            self._slots[ahead.ready.pop(load).slot].state = "free"
        self.stats.add("loads_ahead_dropped", min(ahead.submitted, first))
        ahead.submitted = max(0, ahead.submitted - first)
        ahead.engine, ahead.loads, ahead.seq, ahead.speculative = self, loads, seq, False
        return ahead

    def _forget(self, run: EpochRun) -> None:
        """End ``run``: its decoded loads free their slots, its tasks in flight become stale."""
        run.ended = True
        for filled in run.ready.values():
            self._slots[filled.slot].state = "free"
        run.ready.clear()
        if self.run is run:
            self.run = None

    def _n_slots(self, layout: SlotLayout) -> int:
        fits = self.memory_budget // layout.nbytes
        if fits < 2:
            raise ValueError(
                f"memory_budget={self.memory_budget / 2**20:.1f} MiB holds fewer than 2 ring slots of "
                f"{layout.nbytes / 2**20:.1f} MiB (one load: {layout.max_rows} rows); raise memory_budget "
                "or lower preload_nchunks"
            )
        return int(min(fits, SLOTS_PER_WORKER * self.num_workers + 1 + self.window))

    def _prepare(self, needed: SlotLayout) -> None:
        if self.ring is not None and self.ring.layout.holds(needed):
            return
        layout = _grown(needed)
        if self.ring is None:
            retire = self.pins.retire if self.pins is not None else None
            self.ring = self._parts[1] = Ring(layout, self._n_slots(layout), retire)
            self._slots = [_Slot() for _ in range(len(self.ring))]
        else:
            # New segments for every slot: batches keep the old ones alive; a stale task still
            # writes into its old segment, and its slot stays busy until the reply comes.
            self.ring.resize(layout)
            for slot in self._slots:
                if slot.state == "lent":
                    slot.state = "free"
        if self.pool is None:
            self._start_pool()

    def start_workers(self) -> None:
        """Start the worker processes now, without waiting for them: they import and open the stores
        while the caller goes on (building a model, say), instead of at the first batch."""
        with self.lock:
            if self.pool is not None or self.closed or os.getpid() != self.owner:
                return
            try:
                self._start_pool()
            except BaseException:
                self.close()
                raise

    def _start_pool(self) -> None:
        table = None
        if self._indptrs is not None and any(s.kind == "csr" for s in self.sources):
            # One copy of the row pointers for all the workers, mapped by each (8 bytes per cell each otherwise).
            shared = self._parts[2] = SharedIndptrs(self._indptrs)
            table = shared.table
            self._shared_indptrs = map_indptrs(table)  # what row_pointers() gives from now on
        self._indptrs = None  # the dataset's copy: not ours to keep
        sources = direct_sources(self.sources, table is not None)
        obsm = tuple((key, direct_sources(arrays, True)) for key, arrays in self.obsm)
        secrets = secrets_of(remote_roots((*sources, *(a for _, arrays in obsm for a in arrays))))
        configs = [WorkerConfig(k, sources, self.fmt, obsm, table, secrets) for k in range(self.num_workers)]
        self.pool = self._parts[0] = WorkerPool(configs)
        self._here, self._here_config = None, dataclasses.replace(configs[0], worker=-1)

    # ------------------------------------------------------------------ the loop's next load

    def _next(self, run: EpochRun, load: int) -> tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]]:
        while True:
            # Top the workers' queues up at every load, ready or not: each holds at most TASKS_PER_WORKER.
            self._reclaim()
            self._submit(run)
            if load in run.ready:
                break
            if not self._flight:
                # ``load`` was not submitted for want of a slot, and no task will free one: a copy
                # to the GPU from a released slot is still running, or the user holds batches of every slot.
                copying = self._copying()
                if copying is not None:
                    self.pins.wait(self.ring.segments[copying])
                else:
                    self._replace_oldest_lent()
                continue
            busy = sorted({f.worker for f in self._flight.values()})
            self._receive(self.pool.wait_any(busy, self._doing, POLL_S))
            self._check_progress()
        filled = run.ready.pop(load)
        self.stats.load(filled.n_rows, here=filled.worker < 0)
        slot = self._slots[filled.slot]
        slot.state = "lent"
        segment = self.ring.segments[filled.slot]
        expected = (filled.ticket, load, filled.n_rows, filled.nnz)
        arrays = segment.arrays
        if tuple(arrays.header.tolist()) != expected:
            raise WorkerError(f"slot {filled.slot} holds {tuple(arrays.header.tolist())}, expected {expected}")
        if self.pins is not None:
            self.pins.lent(segment)
        lend, n, nnz = segment.lend, filled.n_rows, filled.nnz
        if arrays.dense is not None:
            loaded = LoadedRows(run.plan.loads[load], dense=lend(arrays.dense[:n]))
        else:
            loaded = LoadedRows(
                run.plan.loads[load],
                indptr=lend(arrays.indptr[: n + 1]),
                data=lend(arrays.data[:nnz]),
                indices=lend(arrays.indices[:nnz]),
            )
        loaded.obsm = {key: lend(rows[:n]) for key, rows in arrays.obsm.items()}
        return loaded, lend

    def _reclaim(self) -> None:
        """Lent slots whose views are all gone (and, pinned, whose copies to the GPU are done) are free again."""
        for k, slot in enumerate(self._slots):
            segment = self.ring.segments[k]
            if slot.state == "lent" and segment.lent == 0 and (self.pins is None or self.pins.refillable(segment)):
                slot.state = "free"

    def _copying(self) -> int | None:
        """The oldest lent slot whose views are gone but whose copies to the GPU may still run, if any."""
        if self.pins is None:
            return None
        waiting = [k for k, s in enumerate(self._slots) if s.state == "lent" and self.pins.waiting(self.ring.segments[k])]
        return min(waiting, key=lambda k: self._slots[k].ticket) if waiting else None

    def _submit(self, run: EpochRun) -> None:
        """Hand ``run``'s next loads to workers while slots are free; once all are handed out, the next epoch's."""
        self._submit_loads(run)
        if run.submitted == len(run.loads) and not self._flight_full():
            ahead = self._ahead_of(run)
            if ahead is not None:
                before = ahead.submitted
                self._submit_loads(ahead)
                self.stats.add("loads_ahead", ahead.submitted - before)

    def _flight_full(self) -> bool:
        """Whether no slot is free or every worker that is up has its tasks: nothing more can be handed out now."""
        if all(s.state != "free" for s in self._slots):
            return True
        up = self.pool.started()
        queued = collections.Counter(f.worker for f in self._flight.values())
        return not up or all(queued[w] >= TASKS_PER_WORKER for w in up)

    def _ahead_of(self, run: EpochRun) -> EpochRun | None:
        """The run of the next epoch's loads, made from ``run.ahead`` the first time; None if there is none to make."""
        if self._ahead is not None and not self._ahead.ended:
            return self._ahead
        if run.ahead is None or run.released or run.ended:
            return None
        ahead, run.ahead = run.ahead, None
        try:
            got = ahead()
        except Exception:  # noqa: BLE001 - e.g. a sampler that fails: the next loop meets the error itself
            return None
        if got is None or not self.ring.layout.holds(got[1]):
            return None  # (a next epoch with larger loads: its own loop resizes the ring)
        nxt = EpochRun(self, got[0], list(range(len(got[0].loads))), run.seq)
        # Held by the engine until a loop adopts it: no reference back, or the cycle would keep the workers of a
        # dropped dataset up until the garbage collector ran.
        nxt.engine, nxt.speculative = None, True
        self._ahead = nxt
        return nxt

    def _submit_loads(self, run: EpochRun) -> None:
        pool, ring = self.pool, self.ring
        up = pool.started()
        while run.submitted < len(run.loads):
            free = next((k for k, s in enumerate(self._slots) if s.state == "free"), None)
            if free is None:
                return
            load = run.loads[run.submitted]
            spec = run.plan.loads[load]
            take = run.plan.take(spec)
            if not up and run.speculative:
                return  # the loop's own thread decodes only loads it waits for
            if not up:
                # No worker is up yet (each starts an interpreter, imports numpy, opens the stores:
                # ~0.3 s), and they get tasks only once up: decode this load here, one at a time.
                self._tickets += 1
                task = Task(self._tickets, run.plan.epoch, load, free, ring.name(free), ring.layout, spec.runs, take)
                self._slots[free] = _Slot("filling", task.ticket)
                run.submitted += 1
                self._decode_here(run, task)
                return
            # A run's first load is what the first batch waits for: when every worker is idle, each
            # decodes a part of it, so it is ready in about 1/W of the time.
            parts = [None]
            if run.submitted == 0 and not self._flight and len(up) > 1 and splittable(self.fmt, self.sources[0].kind):
                parts = split_points(spec.runs, len(up))
            # Otherwise the least busy worker that is up, with at most TASKS_PER_WORKER waiting: the
            # first worker up must not be given every free slot's load while the others still import.
            queued = collections.Counter(f.worker for f in self._flight.values())
            least = min(up, key=lambda w: (queued[w], w))
            if len(parts) == 1 and queued[least] >= TASKS_PER_WORKER:
                return
            first = self._tickets + 1 if len(parts) > 1 else None
            for k, part in enumerate(parts):
                worker = up[k] if first is not None else least
                ticket = self._tickets = self._tickets + 1
                task = Task(
                    ticket, run.plan.epoch, load, free, ring.name(free), ring.layout, spec.runs, take, part, first
                )
                pool.submit(worker, task, f"being given load {load} of epoch {run.plan.epoch}")
                if not any(f.worker == worker for f in self._flight.values()):
                    self._busy_since[worker] = time.monotonic()
                self._flight[ticket] = _Flight(weakref.ref(run), run.plan.epoch, load, worker, free, first)
            if first is not None:
                self._parts_left[first] = len(parts)
            self._slots[free] = _Slot("filling", first if first is not None else ticket)
            run.submitted += 1

    def _decode_here(self, run: EpochRun, task: Task) -> None:
        """Decode ``task`` in this process into its slot (a :class:`WorkerError` if it fails, as in a worker)."""
        try:
            if self._here is None:
                self._here = SlotDecoder(self._here_config)
            filled = self._here.run(task)
        except Exception:
            where = f"decoding load {task.load} of epoch {task.epoch} while the workers were starting"
            raise WorkerError(f"the main process failed {where}:\n{traceback.format_exc()}") from None
        self._slowest = max(self._slowest, filled.seconds)
        self._slots[task.slot].state = "ready"
        run.ready[task.load] = filled

    def _replace_oldest_lent(self) -> None:
        lent = [k for k, s in enumerate(self._slots) if s.state == "lent"]
        if not lent:
            raise RuntimeError(f"internal error: no slot is free, filling or lent ({self._slots})")
        k = min(lent, key=lambda i: self._slots[i].ticket)
        self.ring.replace(k)
        self._slots[k] = _Slot()

    def _receive(self, messages: list[tuple[int, object]]) -> None:
        now = time.monotonic()
        for worker, message in messages:
            flight = self._flight.pop(message.ticket, None)
            if flight is None:
                raise WorkerError(f"worker {worker} answered a task it was never given ({message})")
            self._busy_since[worker] = now
            if isinstance(message, Filled):
                self.stats.task(worker, message.seconds)
            if flight.first is not None:  # a part of a split load: the load is done with its last part
                left = self._parts_left[flight.first] - 1
                run = flight.run()
                failed_live = isinstance(message, Failed) and run is not None and not run.ended
                if left and not failed_live:  # (a stale load's slot is free only once no part writes to it)
                    self._parts_left[flight.first] = left
                    continue
                del self._parts_left[flight.first]
                if isinstance(message, Filled):
                    message = dataclasses.replace(message, ticket=flight.first)
            slot = self._slots[flight.slot]
            run = flight.run()
            if run is None or run.ended:  # a stale task: nobody reads what it wrote
                slot.state = "free"
                continue
            if isinstance(message, Failed):
                raise WorkerError(
                    f"worker {worker} (pid {self.pool.processes[worker].pid}) failed {message.traceback}"
                )
            self._slowest = max(self._slowest, message.seconds)
            if flight.load < (run.loads[0] if run.loads else len(run.plan.loads)):
                slot.state = "free"  # decoded ahead for an epoch resumed past it
                continue
            slot.state = "ready"
            run.ready[flight.load] = message
            if self.pins is not None:
                self.pins.prepare(self.ring.segments[flight.slot])

    def slot_counts(self) -> tuple[int, int]:
        """(slots, slots decoding, decoded or lent now)."""
        with self.lock:
            return len(self._slots), sum(s.state != "free" for s in self._slots)

    def _limit(self) -> float:
        return self.timeout if self.timeout is not None else DEFAULT_TIMEOUT_MARGIN_S + self._slowest

    def _check_progress(self) -> None:
        limit, now = self._limit(), time.monotonic()
        for worker in sorted({f.worker for f in self._flight.values()}):  # only workers that started get tasks
            silent = now - max(self._busy_since[worker], self.pool.started_at[worker])
            if silent > limit:
                how = f"timeout={self.timeout:g}" if self.timeout is not None else (
                    f"the default: the slowest load so far ({self._slowest:.1f} s) plus {DEFAULT_TIMEOUT_MARGIN_S:.0f} s"
                )  # fmt: skip
                raise WorkerError(
                    f"worker {worker} (pid {self.pool.processes[worker].pid}, {self.pool.state(worker)}) has made no "
                    f"progress for {silent:.0f} s while {self._doing(worker)}; the limit is {limit:.0f} s ({how}; "
                    "pass timeout= to the dataset to change it)"
                )

    def _doing(self, worker: int) -> str:
        mine = [f for f in self._flight.values() if f.worker == worker]
        if not mine:
            return "idle"
        epochs = sorted({f.epoch for f in mine})
        return f"decoding load(s) {sorted(f.load for f in mine)} of epoch {', '.join(map(str, epochs))}"


def remote_roots(sources) -> set:
    """The remote roots that ``sources`` (direct or not) read from: whose options the workers need."""
    roots = set()
    for source in sources:
        if isinstance(source, DirectX):
            roots.update(a.root for a in source.arrays if a.root is not None)
        elif isinstance(getattr(getattr(source, "store", None), "root", None), RemoteRoot):
            roots.add(source.store.root)
    return roots
