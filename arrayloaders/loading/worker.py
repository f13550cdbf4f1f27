"""Worker processes: each decodes its share of an epoch's loads into ring slots.

Protocol
--------
Each worker is a fresh interpreter (``python -m arrayloaders.loading.worker``): it
does not re-run the user's ``__main__`` (as ``multiprocessing``'s spawn
does) and never imports torch, nor zarr for the stores this package writes
(it reads their files with the layouts the main process sends), so it starts
in ~0.15 s. It talks to the main process over two pipes of its own, one
message at a time:

- main -> worker: one :class:`WorkerConfig`, then :class:`Task` values;
  ``None`` asks the worker to exit.
- worker -> main: :class:`Started` once the stores are open, then for each
  task :class:`Filled` or :class:`Failed` (the formatted traceback; the
  worker goes on serving). A failure while starting is a :class:`Failed`
  with ``load=-1``, after which the worker exits.

Only small values cross: the decoded rows go through the slot named in the
task. Every task carries a *ticket* (a number unique within the engine) that
its reply echoes, so the engine can tell replies of an abandoned loop from
those of the current one. A worker exits when told, when its task pipe
reaches EOF (the main process is gone or closed it), or when its parent
changes (checked every second), always quietly.

Ctrl-C is the main process's to handle, and it stops the workers itself: a
worker runs in a process group of its own (a terminal's Ctrl-C reaches only
the foreground group) and ignores SIGINT from its first line on. The main
side (:class:`WorkerPool`) never blocks without a deadline: a dead worker
shows up as EOF on its reply pipe, or at the latest on the next liveness
check, as a :class:`~arrayloaders.errors.WorkerError` that names the worker,
its pid and how it ended. Only the process that started the pool stops it:
a child forked from it leaves the parent's workers alone.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # a worker: ignore Ctrl-C before the slow imports below
    signal.signal(signal.SIGINT, signal.SIG_IGN)

import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import WorkerError
from ..store.disk_layout import DirectX
from .load import RowFormat, load_nnz
from .plan import Load
from .ring import IndptrTable, SlotLayout, map_indptrs, map_segment, populate

if TYPE_CHECKING:
    from ..store.disk_layout import XSource

__all__ = ["Failed", "Filled", "SlotDecoder", "Started", "Task", "WorkerConfig", "WorkerPool", "exit_description"]

START_TIMEOUT_S = 60.0  # importing numpy (and zarr, for stores it reads) on a cold disk can take a while
POLL_S = 1.0  # how often a waiting side checks that the other is alive
STOP_TIMEOUT_S = 2.0  # how long close() waits for a worker to exit before killing it


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker reads: each file's X, and obsm arrays, as a :class:`~arrayloaders.store.disk_layout.DirectX` where
    it can be read directly (the worker then needs no zarr: :func:`~arrayloaders.store.zarr_layout.direct_sources`), else
    as its store."""

    worker: int
    sources: tuple[XSource | DirectX, ...]
    fmt: RowFormat  # the genes to keep, dense or CSR
    obsm: tuple[tuple[str, tuple[XSource | DirectX, ...]], ...] = ()  # (key, its array in every file) of each obsm yielded
    indptrs: IndptrTable | None = None  # the files' row pointers, shared: mapped, not read again
    # storage_options of remote stores, by their roots' tokens: through the pipe, never argv or environ
    secrets: dict = field(default_factory=dict, repr=False)

    @property
    def needs_zarr(self) -> bool:
        return not all(isinstance(s, DirectX) for s in (*self.sources, *(s for _, ss in self.obsm for s in ss)))


@dataclass(frozen=True, eq=False)
class Task:
    """Decode ``load`` (its ``runs``, yielding the rows ``take`` picks) into ``slot``.

    The arrays are the plan's (``plan.Load``): a few tens of KB for a load of
    8,192 rows, so workers need neither the plan nor the selection.
    """

    ticket: int
    epoch: int  # for messages only
    load: int
    slot: int
    segment: str  # the slot's current segment name
    layout: SlotLayout
    runs: np.ndarray  # (k, 3) int64 (file, start, stop)
    take: np.ndarray  # int64, one entry per yielded row
    # A load split among workers: each decodes runs[i:j] into the same slot, and all record the
    # first part's ticket in the slot's header (identical bytes, whichever writes last).
    part: tuple[int, int] | None = None
    header_ticket: int | None = None


@dataclass(frozen=True)
class Started:
    worker: int
    pid: int


@dataclass(frozen=True)
class Filled:
    worker: int
    ticket: int
    load: int
    slot: int
    n_rows: int
    nnz: int
    seconds: float  # the worker's time on the task


@dataclass(frozen=True)
class Failed:
    worker: int
    ticket: int  # -1 when starting failed
    load: int
    traceback: str


def exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


# --------------------------------------------------------------------------- main-process side


class WorkerPool:
    """Starts ``len(configs)`` workers and exchanges messages with them; owned by the main process.

    Starting does not wait: the workers import and open the stores while
    the caller goes on; tasks may be sent at once (they queue in the pipe).
    Each worker's :class:`Started` (or its failure to start) is taken from
    the reply pipe by whichever call reads it next.
    """

    def __init__(self, configs: list[WorkerConfig]):
        self.owner = os.getpid()
        self.processes: list[subprocess.Popen] = []
        self._tasks: list[Connection] = []
        self._replies: list[Connection] = []
        self.started_at: list[float | None] = []  # when each worker reported it had started (None: not yet)
        self.spawned_at: list[float] = []
        self._senders: list[threading.Thread] = []  # each worker's config, sent while it imports
        self._closed = False
        try:
            for config in configs:
                self._start(config)
        except BaseException:
            self.close()
            raise

    def _start(self, config: WorkerConfig) -> None:
        task_r, task_w = Pipe(duplex=False)
        reply_r, reply_w = Pipe(duplex=False)
        env = dict(os.environ)
        # One decoding thread per worker: W workers share the cores.
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", BLOSC_NTHREADS="1")
        fds = (task_r.fileno(), reply_w.fileno())
        try:
            process = subprocess.Popen(
                # Our pid too: a worker compares its parent with it, so it notices our death even
                # if it came while the worker was still importing (it is then reparented already).
                [sys.executable, "-m", "arrayloaders.loading.worker", *map(str, fds), str(os.getpid())],
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
                process_group=0,  # out of the terminal's foreground group: Ctrl-C is for the main process
            )
        finally:
            task_r.close()
            reply_w.close()
        self.processes.append(process)
        self._tasks.append(task_w)
        self._replies.append(reply_r)
        self.started_at.append(None)
        self.spawned_at.append(time.monotonic())
        # From a thread: a config over the pipe's buffer (64 KiB: ~100 files) would block here until the
        # worker had imported and read it, worker after worker (16 workers: ~2.5 s in add_store).
        sender = threading.Thread(target=_send_quietly, args=(task_w, config), name="arrayloaders-config", daemon=True)
        self._senders.append(sender)
        sender.start()

    def _message(self, k: int, message):
        """``message`` of worker ``k``, or ``None`` for its :class:`Started` (consumed here: starting does not block)."""
        if isinstance(message, Started):
            self.started_at[k] = time.monotonic()
            return None
        if isinstance(message, Failed) and message.ticket == -1:
            raise WorkerError(f"worker {k} (pid {self.processes[k].pid}) failed to start:\n{message.traceback}")
        return message

    def __len__(self) -> int:
        return len(self.processes)

    def started(self) -> list[int]:
        """The workers that have reported they started, reading start-up messages without waiting.

        Give tasks to these only: a worker still importing does not read its
        pipe, so a task sent to it would wait there, and fill it (a task
        carries its load's order, 8 bytes a row) so that the next send blocks.
        Its pipe therefore holds nothing but start-up messages. Raises a
        :class:`WorkerError` for a worker that failed to start, died, or has
        not started within :data:`START_TIMEOUT_S`.
        """
        now = time.monotonic()
        for k in range(len(self.processes)):
            try:
                self._read_startup(k)
            except (EOFError, OSError) as e:
                raise self._dead(k, "starting") from e
            if self.started_at[k] is None and now - self.spawned_at[k] > START_TIMEOUT_S:
                raise WorkerError(
                    f"worker {k} (pid {self.processes[k].pid}, {self.state(k)}) did not start within {START_TIMEOUT_S:.0f} s"
                )
        return [k for k, t in enumerate(self.started_at) if t is not None]

    def _read_startup(self, k: int) -> None:
        """Read worker ``k``'s start-up messages waiting in its pipe, if it has not started: raises its start failure."""
        conn = self._replies[k]
        while self.started_at[k] is None and conn.poll(0):
            message = self._message(k, conn.recv())
            if message is not None:
                raise WorkerError(f"worker {k} sent {message} before it was given a task")

    def _dead(self, k: int, doing: str) -> WorkerError:
        process = self.processes[k]
        try:
            process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        try:  # a worker that failed to start said why before exiting: that is the news, not its exit
            self._read_startup(k)
        except (EOFError, OSError):
            pass
        return WorkerError(f"worker {k} (pid {process.pid}) {exit_description(process.poll())} while {doing}")

    def state(self, k: int) -> str:
        """How the OS sees worker ``k`` right now (``running``, ``sleeping``, ``stopped``...), for messages."""
        try:
            fields = Path(f"/proc/{self.processes[k].pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return "state unknown"
        return _PROC_STATES.get(fields[0], f"state {fields[0]}")

    def submit(self, k: int, task: Task, doing: str) -> None:
        try:
            self._tasks[k].send(task)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise self._dead(k, doing) from e

    def wait_any(self, workers: list[int], doing: Callable[[int], str], timeout: float = POLL_S) -> list[tuple[int, object]]:
        """Messages from any of ``workers`` that arrive within ``timeout`` seconds (maybe none).

        Raises a :class:`WorkerError` if one of them has died; ``doing(k)``
        describes what worker ``k`` was doing, for the message. Deciding that
        a live worker is stuck is the caller's (it knows what it waits for).
        """
        ready = wait([self._replies[k] for k in workers], timeout=timeout)
        out = []
        for k in workers:
            conn = self._replies[k]
            if conn in ready:
                try:
                    message = self._message(k, conn.recv())
                except (EOFError, OSError) as e:
                    raise self._dead(k, doing(k)) from e
                if message is not None:
                    out.append((k, message))
        if not out:
            for k in workers:
                if self.processes[k].poll() is not None:
                    raise self._dead(k, doing(k))
        return out

    def close(self) -> None:
        """Stop every worker: ask, wait briefly, then kill (idempotent; a no-op in a forked child)."""
        if self._closed or os.getpid() != self.owner:
            return
        for process, sender in zip(self.processes, self._senders):
            if sender.is_alive():  # it has not read its config: nothing to wait for, and no other write to its pipe
                process.kill()
                sender.join(STOP_TIMEOUT_S)  # the pipe's reader is gone: the send fails at once
        for conn, sender in zip(self._tasks, self._senders):
            if sender.is_alive():
                continue  # (never seen) a write still under way: another would interleave with it
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        try:
            for k, process in enumerate(self.processes):
                if self.started_at[k] is None and not self._replies[k].poll():
                    # Still importing (workers start when a store is added: a second add_store comes
                    # at once): it holds nothing yet, so it is not worth waiting for.
                    process.kill()
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for process in self.processes:  # stopped (SIGSTOP) or stuck ones too: SIGKILL works on both
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for conn in self._tasks + self._replies:
                conn.close()
            self._closed = True  # only now: a close cut short by Ctrl-C is retried


def _send_quietly(conn: Connection, message) -> None:
    """Send ``message``; a worker that died first is the pool's to report (EOF on its reply pipe)."""
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass


_PROC_STATES = {"R": "running", "S": "sleeping", "D": "waiting for the disk", "T": "stopped", "t": "stopped by a debugger",
                "Z": "a zombie"}  # fmt: skip


# --------------------------------------------------------------------------- worker side


class SlotDecoder:
    """Open stores and mapped slots: what decodes a :class:`Task` into its slot.

    A worker's; the main process has one too, for the loads it decodes
    while the workers are still starting.
    """

    def __init__(self, config: WorkerConfig):
        from ..store.rows import open_rows

        self.config = config
        shared = map_indptrs(config.indptrs) if config.indptrs is not None else [None] * len(config.sources)
        self.readers = [open_rows(s, indptr) for s, indptr in zip(config.sources, shared)]
        self.obsm = {key: [open_rows(s) for s in sources] for key, sources in config.obsm}
        self._slots: dict[int, tuple[str, object, object]] = {}  # slot -> (segment, mapping, arrays)

    def slot(self, task: Task):
        held = self._slots.get(task.slot)
        if held is None or held[0] != task.segment:
            mapping = map_segment(task.segment, task.layout.nbytes)
            # A new segment: the pages this load writes at once, not a fault at a time while decoding.
            nnz = load_nnz([r.indptr for r in self.readers], task.runs, task.take) if task.layout.kind == "csr" else 0
            populate(mapping, task.layout.written(task.take.size, nnz))
            self._slots[task.slot] = held = (task.segment, mapping, task.layout.arrays(mapping))
        return held[2]

    def gather_dtypes(self) -> list[tuple[np.dtype, np.dtype]]:
        """(output dtype, stored dtype) of every gather a chunked CSR load makes here (values, column indices)."""
        from ..store.rows import CsrRows
        from .load import INDEX_DTYPE

        csr = [r for r in self.readers if isinstance(r, CsrRows) and r.direct]
        pairs = {(np.dtype(r.source.dtype), r.data_dtype) for r in csr} | {(INDEX_DTYPE, r.indices_dtype) for r in csr}
        return sorted(pairs, key=str)

    def run(self, task: Task) -> Filled:
        from .load import LoadedRows, read_load

        start = time.monotonic()
        load = Load(task.load, task.runs, 0, task.take.size, task.take)
        arrays = self.slot(task)
        out = LoadedRows(load, arrays.indptr, arrays.data, arrays.indices, arrays.dense, obsm=arrays.obsm)
        rows = read_load(self.readers, load, task.take, out, self.config.fmt, self.obsm, task.part)
        nnz = int(rows.indptr[-1]) if rows.indptr is not None else 0
        ticket = task.ticket if task.header_ticket is None else task.header_ticket
        arrays.header[:] = (ticket, task.load, load.n_rows, nnz)
        return Filled(self.config.worker, task.ticket, task.load, task.slot, load.n_rows, nnz, time.monotonic() - start)


def main(task_fd: int, reply_fd: int, parent: int) -> None:
    tasks = Connection(task_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    try:
        told = _serve(tasks, replies, parent)
    except (EOFError, OSError):
        told = False  # the main process is gone: nothing to report to
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if not told:
        # It died without closing us (SIGKILL, os._exit in a forked child): unlink its ring,
        # which it can no longer do and its resource tracker may only do much later.
        from .ring import unlink_orphans

        unlink_orphans(parent)
    # Nothing to flush or release (the OS unmaps and closes): skipping the interpreter's
    # teardown (~0.2 s with numpy and numba loaded) makes close() quick.
    os._exit(0)


def _serve(tasks: Connection, replies: Connection, parent: int) -> bool:
    """Serve tasks until told to stop (returns True) or the parent is gone (False)."""
    if os.getppid() != parent:
        return False  # it died while we imported
    message = tasks.recv_bytes()
    config: WorkerConfig | None = None
    try:
        config = pickle.loads(message)  # here: unpickling imports what the sources need, which may fail
        if config.secrets:
            from ..store.remote import register_secrets

            register_secrets(config.secrets)
        from ..store.native_codecs import native_codecs

        if config.needs_zarr or native_codecs() is None:  # numcodecs decodes blosc here: one thread
            import numcodecs.blosc

            numcodecs.blosc.set_nthreads(1)
            numcodecs.blosc.use_threads = False
        if config.needs_zarr:
            from ..store.format import use_zarrs

            use_zarrs(threads=1)
        decoder = SlotDecoder(config)
    except Exception:
        replies.send(Failed(-1 if config is None else config.worker, -1, -1, traceback.format_exc()))
        return True  # the main process reads the failure and closes the pool
    replies.send(Started(config.worker, os.getpid()))
    # A thread takes tasks off the pipe as soon as they come: a task carries its load's take (8 bytes
    # a row), so a few queued ones fill the pipe, and the main process would block sending the next
    # until this worker had finished decoding, instead of handing out the batches it already has.
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_take_tasks, args=(tasks, inbox), name="tasks", daemon=True).start()
    # Chunked loads switch to the compiled loop once it is loaded: ~0.3 s of numba, in a thread from the
    # start, so that no load waits for it (~15 % less time per load from then on). Loaded later (at 1 s of
    # decoding), the loads before it ran on the slower Python loop: the first epoch took 5 % longer.
    dtypes = decoder.gather_dtypes()
    if dtypes:
        threading.Thread(target=_warm_compiled_loop, args=(dtypes,), name="arrayloaders-warm", daemon=True).start()
    while True:
        try:
            task = inbox.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return False
            continue
        if isinstance(task, BaseException):
            raise task  # EOF: the main process is gone
        if task is None:
            return True
        try:
            reply = decoder.run(task)
        except Exception:
            where = f"decoding load {task.load} of epoch {task.epoch}"
            reply = Failed(config.worker, task.ticket, task.load, f"{where}:\n{traceback.format_exc()}")
        replies.send(reply)


def _warm_compiled_loop(dtypes: list[tuple[np.dtype, np.dtype]]) -> None:
    """Load :mod:`~arrayloaders.store.chunk_gather`'s loop for ``dtypes``; until it is, loads are read on the Python path."""
    try:
        from ..store.chunk_gather import warm

        warm(dtypes, without_blas=True)  # a worker only decodes
    except Exception:  # noqa: BLE001 - the Python path reads the same values: only speed is lost
        pass


def _take_tasks(tasks: Connection, inbox: queue.SimpleQueue) -> None:
    """Move tasks from the pipe to ``inbox`` until ``None`` (stop) or the pipe fails (its error is queued)."""
    try:
        while True:
            task = tasks.recv()
            inbox.put(task)
            if task is None:
                return
    except BaseException as e:  # noqa: BLE001 - handed to the serving thread, which decides
        inbox.put(e)


if __name__ == "__main__":
    # Run the imported module's main, so messages pickle as arrayloaders.loading.worker.*, not __main__.*.
    from arrayloaders.loading.worker import main as _main

    _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
