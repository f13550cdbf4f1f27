"""Independent tasks of the conversion on ``n`` processes of our own, results in submission order.

The processes are fresh interpreters (``python -m arrayloaders.convert.jobs``), as
the loader's workers are, not ``multiprocessing`` children: ``spawn`` and
``forkserver`` run the user's main script again in every child (a script
without an ``if __name__ == "__main__":`` guard would convert again,
recursively), and ``fork`` copies a parent that holds zarrs' threads.

A task that raises stops the run: the other processes are killed at once
(their work only ever goes into the staged store, which is then removed)
and the error is raised in the parent as the task raised it. So is Ctrl-C,
which only the parent receives. A process that dies (killed, out of memory)
raises :class:`JobFailed` naming its task. On Linux the processes die with
the parent, even a killed one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from tqdm.auto import tqdm

from ..errors import ArrayloadersError

__all__ = ["JobFailed", "Jobs", "available_cores"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class JobFailed(ArrayloadersError, RuntimeError):
    """A conversion process died, or raised an error that could not be sent back."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class _Process:
    """One task process and its two pipes."""

    def __init__(self):
        task_r, self.tasks = Pipe(duplex=False)
        self.replies, reply_w = Pipe(duplex=False)
        fds = (task_r.fileno(), reply_w.fileno(), os.getpid())
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "arrayloaders.convert.jobs", *map(str, fds)],
                pass_fds=fds[:2],
                stdin=subprocess.DEVNULL,
                process_group=0,  # out of the terminal's foreground group: Ctrl-C is the parent's to handle
            )
        finally:
            task_r.close()
            reply_w.close()
        self.task: int | None = None  # index of the task it runs

    def kill(self) -> None:
        self.tasks.close()
        self.replies.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Jobs:
    """``n`` processes for one conversion, started at the first task that needs them and kept until closed."""

    def __init__(self, n: int):
        self.n = max(1, int(n))
        self._processes: list[_Process] = []

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the processes (idempotent)."""
        processes, self._processes = self._processes, []
        for p in processes:
            try:
                p.tasks.send(None)
            except OSError:
                pass
        for p in processes:
            try:
                p.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            p.kill()

    def _kill(self) -> None:
        processes, self._processes = self._processes, []
        for p in processes:
            p.kill()

    def run(
        self,
        fn: Callable[..., Any],
        tasks: Sequence[tuple],
        *,
        progress: bool = False,
        desc: str = "",
        weights: Sequence[int] | None = None,
    ) -> list[Any]:
        """``[fn(*t) for t in tasks]``, on the processes when ``n > 1`` (``fn`` must be importable by name).

        ``weights`` (cells per task) drive the progress bar.
        """
        weights = list(weights) if weights is not None else [1] * len(tasks)
        results: list[Any] = [None] * len(tasks)
        with tqdm(total=sum(weights), unit="cells", unit_scale=True, desc=desc, disable=not progress) as bar:
            if self.n == 1 or len(tasks) <= 1:
                for i, t in enumerate(tasks):
                    results[i] = fn(*t)
                    bar.update(weights[i])
                return results
            try:
                while len(self._processes) < min(self.n, len(tasks)):
                    self._processes.append(_Process())
                waiting = list(range(len(tasks)))[::-1]
                idle = list(self._processes)
                running: dict[Connection, _Process] = {}
                while waiting or running:
                    while waiting and idle:
                        p = idle.pop()
                        p.task = waiting.pop()
                        try:
                            p.tasks.send((fn, tasks[p.task]))
                        except OSError:
                            raise _died(p, fn, len(tasks)) from None
                        running[p.replies] = p
                    for conn in wait(list(running)):
                        p = running.pop(conn)
                        try:
                            ok, value = conn.recv()
                        except (EOFError, OSError):
                            raise _died(p, fn, len(tasks)) from None
                        if not ok:
                            raise value
                        results[p.task] = value
                        bar.update(weights[p.task])
                        idle.append(p)
                return results
            except BaseException:  # a task failed, or Ctrl-C: the other tasks' work is discarded anyway
                self._kill()
                raise


def _died(p: _Process, fn: Callable, n_tasks: int) -> JobFailed:
    code = p.process.wait()
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return JobFailed(
        f"a conversion process (pid {p.process.pid}) {how} while running {fn.__name__} (task {p.task + 1} of "
        f"{n_tasks})"
    )


# --------------------------------------------------------------------------- the task process


def _die_with(parent: int) -> None:
    """This process dies with the one that started it (Linux), even a killed one."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above ran
        os._exit(1)


def _sendable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (the parent raises it as the task did), else its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any error of pickling
        return JobFailed("".join(traceback.format_exception(error)))


def main(task_fd: int, reply_fd: int, parent: int) -> None:
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    tasks, replies = Connection(task_fd, writable=False), Connection(reply_fd, readable=False)
    import pickle

    while True:
        try:
            message = tasks.recv_bytes()
        except EOFError:
            break
        try:
            task = pickle.loads(message)  # imports the task's module
            if task is None:
                break
            fn, args = task
            reply = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - every error goes back to the parent
            reply = (False, _sendable(e))
        replies.send(reply)
    os._exit(0)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
