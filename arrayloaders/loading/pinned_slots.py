"""Page-locked ring slots: pinned batches that are views of the ring, not copies of it.

With ``pin_memory=True`` every batch must lie in page-locked memory, so that
``.to("cuda", non_blocking=True)`` is a DMA that overlaps the model's work.
Copying each batch into pinned memory costs the main process a memcpy of
every value it hands out, one core for all the workers' output (on 16 cores
it bounded us at ~216k cells/s against ~300k into host memory). Instead, each
ring segment is registered with CUDA (``cudaHostRegister``) the first time
one of its loads is lent: torch then sees the views of it as pinned, and
``Tensor.pin_memory()`` returns them as they are. Registering takes ~10 ms
for a slot of 8,192 cells; a helper thread does it as soon as a slot is
filled (:meth:`PinnedSlots.prepare`), so the loop rarely waits for it.

A copy from a view may still be running after ``.to`` has returned and the
batch is gone. So a slot whose views are all gone is refilled only once an
event, recorded on the current CUDA stream when the loop found it released,
has completed: copies enqueued on that stream before are done by then. This
covers copies made on the stream current in the thread that iterates the
loader (the default stream, Lightning's transfer, a ``with
torch.cuda.stream(s)`` around the loop body; if another thread's loop takes
the workers over, its current stream is the one fenced); a copy enqueued on
another stream must be synchronized by whoever enqueued it, as with any
memory that is reused.

A segment is unregistered before it is unlinked (a slot replaced, resized,
the ring closed), while the ring still maps it: views the user holds stay
valid as ordinary memory. The device is synchronized first when views are
still alive, so no copy from them is cut short.
"""

from __future__ import annotations

import collections
import threading
import warnings
from dataclasses import dataclass, field
from typing import Protocol

from .ring import Segment

__all__ = ["CudaHost", "PinnedSlots"]


class Fence(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Host(Protocol):
    """What :class:`PinnedSlots` needs of CUDA (a fake one in the tests, which have no GPU)."""

    def register(self, address: int, nbytes: int) -> None: ...

    def unregister(self, address: int) -> None: ...

    def fence(self) -> Fence: ...

    def synchronize(self) -> None: ...


class CudaHost:
    """The CUDA runtime as torch exposes it (``torch.cuda.cudart()``, the stream and event API)."""

    def __init__(self):
        import torch

        self._torch = torch
        self._cudart = torch.cuda.cudart()

    def register(self, address: int, nbytes: int) -> None:
        # cudaHostRegisterPortable: pinned for every CUDA context, whichever thread registers it.
        self._check(self._cudart.cudaHostRegister(address, nbytes, 1), f"cudaHostRegister of {nbytes} bytes")

    def unregister(self, address: int) -> None:
        self._check(self._cudart.cudaHostUnregister(address), "cudaHostUnregister")

    def fence(self) -> Fence:
        event = self._torch.cuda.Event()
        event.record()  # on the current stream of the current device
        return event

    def synchronize(self) -> None:
        self._torch.cuda.synchronize()

    def _check(self, error, what: str) -> None:
        code = int(getattr(error, "value", error))
        if code != 0:
            name = self._torch.cuda.cudart().cudaGetErrorString(error)
            raise RuntimeError(f"{what} failed: {name} (CUDA error {code})")


@dataclass
class _Pending:
    """A registration handed to the helper thread."""

    segment: Segment
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class PinnedSlots:
    """Registers ring segments with CUDA before they are lent, and says when a released one may be refilled.

    The engine calls :meth:`prepare` when a slot has been filled,
    :meth:`lent` when it hands a slot's load to a loop, :meth:`refillable`
    for a lent slot whose views are all gone, :meth:`wait` when it has
    nothing else to wait for, and the ring calls :meth:`retire` before it
    unlinks a segment. All but the helper thread's work run under the
    engine's lock.
    """

    def __init__(self, host: Host | None = None):
        self._host = host
        # The registry, shared with the helper thread. Reentrant: a garbage collection in the helper
        # thread can run a dropped engine's finalizer, and so retire(), while the helper holds it.
        self._lock = threading.RLock()
        self._registered: dict[str, int] = {}  # segment name -> the address registered
        self._pending: dict[str, _Pending] = {}  # handed to the helper thread, not done yet
        self._todo: collections.deque[str] = collections.deque()
        self._helper: threading.Thread | None = None  # running while there is something to register
        self._retired: set[str] = set()  # retired while the helper registers them: it undoes that when done
        self._fences: dict[str, Fence] = {}  # segment name -> recorded when its views were found gone
        self._quiet: set[str] = set()  # registered segments no copy can be reading: released and fenced since lent

    @property
    def host(self) -> Host:
        if self._host is None:
            self._host = CudaHost()  # made at the first lend: a dataset is built before CUDA may be touched
        return self._host

    def prepare(self, segment: Segment) -> None:
        """``segment`` has been filled and will be lent: register it now, in the helper thread."""
        host = self.host  # made here, in the engine's thread
        with self._lock:
            if segment.name in self._registered or segment.name in self._pending:
                return
            self._pending[segment.name] = _Pending(segment)
            self._todo.append(segment.name)
            if self._helper is not None:
                return
            try:
                self._helper = threading.Thread(target=self._help, args=(host,), name="arrayloaders-pin", daemon=True)
                self._helper.start()
            except BaseException as e:  # no thread (or Ctrl-C while starting it): nobody will register these
                self._helper = None
                failed = [self._pending.pop(name) for name in self._todo]
                self._todo.clear()
                for pending in failed:
                    pending.error = e
                    pending.done.set()
                raise

    def _help(self, host: Host) -> None:
        while True:
            with self._lock:
                if not self._todo:
                    self._helper = None
                    return
                pending = self._pending[self._todo.popleft()]
            name = pending.segment.name
            try:
                address = _register(host, pending.segment)
            except BaseException as e:  # raised in the engine's thread, by lent() or retire()
                pending.error = e
            with self._lock:
                retired = name in self._retired
                self._retired.discard(name)
                if pending.error is None and not retired:
                    self._registered[name] = address
                del self._pending[name]
            if retired and pending.error is None:
                self._unregister(name, address)  # never lent: no copy can read it
            pending.done.set()

    def _settled(self, segment: Segment) -> None:
        """Wait for the helper's registration of ``segment``, if it has one; raise what it raised."""
        with self._lock:
            pending = self._pending.get(segment.name)
        if pending is not None:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error

    def lent(self, segment: Segment) -> None:
        """A load of ``segment`` is about to be handed out: it must be page-locked (registered once)."""
        self._fences.pop(segment.name, None)
        self._quiet.discard(segment.name)
        self._settled(segment)
        with self._lock:
            registered = segment.name in self._registered
        if not registered:
            address = _register(self.host, segment)
            with self._lock:
                self._registered[segment.name] = address

    def refillable(self, segment: Segment) -> bool:
        """Whether ``segment``, whose views are all gone, may be refilled: no copy from it is still running."""
        if segment.name in self._quiet or segment.name not in self._registered:
            return True
        fence = self._fences.get(segment.name)
        if fence is None:
            fence = self._fences[segment.name] = self.host.fence()
        if not fence.query():
            return False
        del self._fences[segment.name]
        self._quiet.add(segment.name)
        return True

    def wait(self, segment: Segment) -> None:
        """Block until :meth:`refillable` holds for ``segment``."""
        fence = self._fences.get(segment.name)
        if fence is not None:
            fence.synchronize()

    def waiting(self, segment: Segment) -> bool:
        """Whether ``segment`` was found released and waits for its copies to finish."""
        return segment.name in self._fences

    def retire(self, segment: Segment) -> None:
        """Unregister ``segment`` before it is unlinked; views of it stay valid, as ordinary memory."""
        with self._lock:
            if segment.name in self._pending and threading.current_thread() is self._helper:
                # A finalizer run by a garbage collection in the helper, which is registering this
                # very segment: waiting for it would wait forever. The helper undoes it when done.
                self._retired.add(segment.name)
                return
        try:
            self._settled(segment)
        except Exception:
            pass  # its registration failed: nothing to undo
        with self._lock:
            address = self._registered.pop(segment.name, None)
        fence = self._fences.pop(segment.name, None)
        quiet = segment.name in self._quiet
        self._quiet.discard(segment.name)
        if address is None:
            return
        try:
            if fence is not None:
                fence.synchronize()
            elif not quiet:
                # Views may be alive, or gone unnoticed since: a copy from the segment may be in flight.
                self.host.synchronize()
        except Exception:
            pass  # a CUDA error is sticky: unregistering fails too, and says so
        finally:
            # Even if Ctrl-C cut the wait short: a mapping freed while still registered would make
            # the next segment mapped at its address fail to register.
            self._unregister(segment.name, address)

    def _unregister(self, name: str, address: int) -> None:
        try:
            self.host.unregister(address)
        except Exception as e:  # a CUDA error (often an earlier one, sticky): it must not hide what is being raised
            self._warn(name, e)

    @staticmethod
    def _warn(name: str, error: Exception) -> None:
        warnings.warn(
            f"{name}: could not unregister it from CUDA ({error}); it stays page-locked until the process exits",
            RuntimeWarning,
            stacklevel=3,
        )


def _register(host: Host, segment: Segment) -> int:
    address = segment.arrays.header.ctypes.data  # the header is at offset 0 of the mapping
    host.register(address, segment.layout.nbytes)
    return address
