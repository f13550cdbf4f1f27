"""Pinned batches as views of a page-locked ring: a slot is refilled only after the copies from it have landed.

The machines CI runs on have no GPU, so CUDA is simulated (:class:`FakeCuda`):
a ``non_blocking`` copy reads its source only when a fence recorded after it
completes, as a DMA does. A slot refilled too early shows as a copy that
lands other bytes than the batch held when it was enqueued. The last tests
use the real CUDA runtime where there is one.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest
import torch
from conftest import tensor_parts

import arrayloaders.loading.batches
import arrayloaders.loading.runtime
from arrayloaders import ZarrDenseDataset, ZarrSparseDataset
from arrayloaders.loading.engine import _grown, slot_layout
from arrayloaders.loading.pinned_slots import PinnedSlots
from arrayloaders.loading.plan import plan_epoch
from arrayloaders.loading.ring import Segment, SlotLayout, segment_names


class FakeFence:
    def __init__(self, cuda: FakeCuda, upto: int):
        self.cuda, self.upto, self.left = cuda, upto, cuda.lag

    def query(self) -> bool:
        self.left -= 1
        if self.left > 0:
            return False
        self.synchronize()
        return True

    def synchronize(self) -> None:
        self.cuda.land(self.upto)
        self.left = 0


class FakeCuda:
    """The CUDA host API of ``pinned_slots.Host``, and a stream of copies that read their source late.

    A fence completes after ``lag`` queries (or when waited on); completing
    it lands every copy enqueued before it, in order.
    """

    def __init__(self, lag: int):
        self.lag = lag
        self.registered: dict[int, int] = {}  # address -> bytes
        self.registrations = 0
        self.queue: list[tuple[int, bytes]] = []  # copies enqueued: (source address, the bytes it held then)
        self.landed = 0
        self.wrong = 0  # copies that landed other bytes than their source held when enqueued
        self.synchronized = 0

    def register(self, address: int, nbytes: int) -> None:
        assert not any(a <= address < a + n for a, n in self.registered.items()), "registered twice"
        self.registered[address] = nbytes
        self.registrations += 1

    def unregister(self, address: int) -> None:
        del self.registered[address]

    def fence(self) -> FakeFence:
        return FakeFence(self, len(self.queue))

    def synchronize(self) -> None:
        self.synchronized += 1
        self.land(len(self.queue))

    def is_registered(self, array: np.ndarray) -> bool:
        a, n = array.ctypes.data, array.nbytes
        return any(r <= a and a + n <= r + size for r, size in self.registered.items())

    def copy(self, tensor: torch.Tensor) -> None:
        """``tensor.to("cuda", non_blocking=True)``: from registered memory its bytes are read when a later
        fence completes; from pageable memory at once (CUDA waits for the stream, then stages the copy)."""
        array = tensor.numpy()
        self.queue.append((array.ctypes.data, array.tobytes()))
        if not self.is_registered(array):
            self.land(len(self.queue))

    def land(self, upto: int) -> None:
        for address, expected in self.queue[self.landed : upto]:
            self.wrong += ctypes.string_at(address, len(expected)) != expected
        self.landed = max(self.landed, upto)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Datasets made with ``pin_memory=True`` page-lock their ring with a :class:`FakeCuda` (lag set by the test)."""
    cuda = FakeCuda(lag=1)
    monkeypatch.setattr(arrayloaders.loading.runtime, "PinnedSlots", lambda: PinnedSlots(cuda))
    monkeypatch.setattr(arrayloaders.loading.batches, "pinned", lambda batch: batch)  # torch's pinning needs a GPU
    return cuda


@pytest.fixture
def slot_segments():
    """``slot_segments(n)``: ``n`` small ring segments, unlinked after the test."""
    made: list[Segment] = []

    def make(n: int) -> list[Segment]:
        layout = SlotLayout("csr", "float32", max_rows=4, max_nnz=16)
        made.extend(Segment(f"al_{os.getpid()}_test_{len(made)}_{k}", layout) for k in range(n))
        return made[-n:]

    yield make
    for segment in made:
        segment.unlink()


def pinned_dataset(cls, store, num_workers: int, slots: float, **kw):
    """A dataset with ``pin_memory`` on (as if CUDA were there) and a ring of about ``slots`` slots."""
    probe = cls(16, 8, 4, num_workers=0, return_index=True).add_store(store)
    plan = plan_epoch(probe._plan_config(), 0)
    layout = _grown(slot_layout(probe._sources[0], probe._indptrs(), plan, probe._row_format()))
    ds = cls(16, 8, 4, num_workers=num_workers, return_index=True, memory_budget=int(layout.nbytes * slots), **kw)
    ds.pin_memory = True  # the constructor turns it off where CUDA is missing
    return ds.add_store(store)


def reference(cls, store, epoch: int) -> list[bytes]:
    ds = cls(16, 8, 4, num_workers=0, return_index=True).add_store(store)
    ds.set_epoch(epoch)
    return [b"".join(p.numpy().tobytes() for p in tensor_parts(X)) for X, _, _ in ds]


@pytest.mark.parametrize("lag", [1, 4, 1000])
@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize("cls", [ZarrSparseDataset, ZarrDenseDataset])
def test_a_slot_is_refilled_only_after_the_copies_from_it_have_landed(store, fake_cuda, cls, num_workers, lag):
    fake_cuda.lag = lag  # 1000: no fence completes by being asked; the engine must wait for one
    before = set(segment_names(os.getpid()))  # other tests' datasets may still be alive in this process
    ds = pinned_dataset(cls, store, num_workers, slots=3)
    n = 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for X, _, idx in ds:
            held = list(tensor_parts(X))[1:] if X.layout == torch.sparse_csr else [X]  # the ring's views
            assert all(fake_cuda.is_registered(t.numpy()) for t in held)  # pinned where they lie, not copied
            for t in held:
                fake_cuda.copy(t)
            n += len(held)
            del X, held, t  # the user drops the batch right after .to("cuda", non_blocking=True)
    assert len(ds._runtime.engine.ring) == 3
    assert fake_cuda.registrations <= 3  # waited for the copies: no slot was given a new segment instead
    ds.close()
    assert fake_cuda.landed == len(fake_cuda.queue) == n
    assert fake_cuda.wrong == 0
    assert fake_cuda.registered == {}  # unregistered before the ring let go of them
    assert set(segment_names(os.getpid())) <= before


def test_without_the_fence_a_copy_lands_refilled_bytes(store, fake_cuda, monkeypatch):
    """The test above can fail: refilling a released slot at once makes late copies read a later load."""
    monkeypatch.setattr(PinnedSlots, "refillable", lambda self, segment: True)
    fake_cuda.lag = 1000
    ds = pinned_dataset(ZarrSparseDataset, store, 1, slots=3)
    for X, _, _ in ds:
        fake_cuda.copy(X.values())
        del X
    ds.close()
    assert fake_cuda.wrong > 0


@pytest.mark.parametrize("num_workers", [1, 2])
def test_held_pinned_batches_stay_valid_when_their_slots_are_replaced(store, fake_cuda, num_workers):
    fake_cuda.lag = 1000
    ds = pinned_dataset(ZarrSparseDataset, store, num_workers, slots=2.5)
    ds.set_epoch(1)
    held = []
    for X, _, _ in ds:  # every batch kept: the engine replaces slots the user holds
        fake_cuda.copy(X.values())
        held.append(X)
    assert fake_cuda.registrations > len(ds._runtime.engine.ring)  # replaced segments were registered anew
    ds.close()
    assert fake_cuda.registered == {} and fake_cuda.wrong == 0 and fake_cuda.landed == len(held)
    got = [b"".join(p.numpy().tobytes() for p in tensor_parts(X)) for X in held]
    assert got == reference(ZarrSparseDataset, store, 1)


def test_retiring_a_segment_waits_for_what_may_still_read_it(slot_segments):
    cuda = FakeCuda(lag=1000)
    pins = PinnedSlots(cuda)
    segments = slot_segments(3)
    for s in segments:
        pins.lent(s)
        pins.lent(s)  # once per segment
    assert cuda.registrations == 3
    view = segments[0].lend(segments[0].arrays.data[:4])
    assert not pins.refillable(segments[1])  # released, its fence pending
    assert pins.waiting(segments[1]) and not pins.waiting(segments[2])
    cuda.lag = 0
    assert pins.refillable(segments[2]) and pins.refillable(segments[2])  # quiet: no new fence
    pins.retire(segments[2])  # quiet: nothing to wait for
    assert cuda.synchronized == 0
    pins.retire(segments[1])  # its fence is waited for, not the device
    assert cuda.synchronized == 0 and not pins.waiting(segments[1])
    pins.retire(segments[0])  # views alive: the whole device is waited for
    assert cuda.synchronized == 1 and cuda.registered == {}
    pins.retire(segments[0])  # idempotent
    del view


def test_a_filled_slot_is_registered_by_the_helper_thread_and_a_failure_raised_at_lend(slot_segments):
    cuda = FakeCuda(lag=1)
    threads = []
    register = cuda.register

    def register_in(address, nbytes):
        threads.append(threading.current_thread().name)
        if address == segments[1].arrays.header.ctypes.data:
            raise RuntimeError("cudaHostRegister failed: out of memory")
        register(address, nbytes)

    cuda.register = register_in
    pins = PinnedSlots(cuda)
    segments = slot_segments(2)
    pins.prepare(segments[0])
    pins.prepare(segments[0])  # once
    pins.lent(segments[0])  # waits for the helper
    assert threads == ["arrayloaders-pin"] and cuda.registrations == 1
    pins.prepare(segments[1])
    with pytest.raises(RuntimeError, match="out of memory"):
        pins.lent(segments[1])
    pins.retire(segments[1])  # its registration failed: nothing to undo
    pins.retire(segments[0])
    assert cuda.registered == {}


def test_a_cuda_error_while_retiring_warns_instead_of_hiding_the_error_being_raised(slot_segments):
    cuda = FakeCuda(lag=1)
    pins = PinnedSlots(cuda)
    (segment,) = slot_segments(1)
    pins.lent(segment)

    def sticky(*args):
        raise RuntimeError("CUDA error: device-side assert triggered")

    cuda.synchronize = cuda.unregister = sticky
    with pytest.warns(RuntimeWarning, match="could not unregister it from CUDA.*device-side assert"):
        pins.retire(segment)


def finishes(call, *args, timeout: float = 30) -> None:
    """Run ``call(*args)`` in a thread and fail (instead of hanging the suite) if it does not return."""
    t = threading.Thread(target=call, args=args, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{call.__name__} did not return within {timeout} s"


@pytest.mark.parametrize("where", ["__init__", "start"])  # also Ctrl-C landing there
def test_a_helper_thread_that_cannot_start_fails_its_registrations_instead_of_hanging(
    slot_segments, monkeypatch, where
):
    cuda = FakeCuda(lag=1)
    pins = PinnedSlots(cuda)
    (segment,) = slot_segments(1)

    def no_thread(self, *args, **kwargs):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, where, no_thread)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pins.prepare(segment)
    finishes(pins.retire, segment)  # nothing was registered, and nothing waits for a thread that never ran
    pins.lent(segment)  # registered in this thread instead
    pins.prepare(segment)  # registered already: not again
    assert cuda.registrations == 1
    pins.retire(segment)
    assert cuda.registered == {}


def test_ctrl_c_while_retiring_still_unregisters(slot_segments):
    cuda = FakeCuda(lag=1)
    pins = PinnedSlots(cuda)
    (segment,) = slot_segments(1)
    pins.lent(segment)
    view = segment.lend(segment.arrays.data[:4])  # held: retiring waits for the device

    def interrupted():
        raise KeyboardInterrupt

    cuda.synchronize = interrupted
    with pytest.raises(KeyboardInterrupt):
        pins.retire(segment)
    assert cuda.registered == {}  # else its mapping, freed with the view, stays registered
    del view


def test_a_finalizer_run_in_the_helper_thread_retires_without_waiting_for_itself(slot_segments):
    """A garbage collection in the helper thread can run a dropped engine's finalizer, which retires
    the very segment the helper is registering."""
    cuda = FakeCuda(lag=1)
    pins = PinnedSlots(cuda)
    (segment,) = slot_segments(1)
    register = cuda.register

    def register_then_collected(address, nbytes):
        register(address, nbytes)
        with pins._lock:  # the collection may come while the helper holds the lock, too
            pins.retire(segment)

    cuda.register = register_then_collected
    pins.prepare(segment)
    finishes(pins._settled, segment)
    assert cuda.registrations == 1 and cuda.registered == {}  # undone by the helper once it was done
    finishes(pins.retire, segment)  # the finalizer's own retire, later: nothing left to do


# ---------------------------------------------------------------------------- the real CUDA runtime

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (simulated above)")


@cuda_only
@pytest.mark.parametrize("cls", [ZarrSparseDataset, ZarrDenseDataset])
def test_pinned_batches_are_the_ring_itself_and_reach_the_gpu_unchanged(store, cls):
    """Dropped right after a non_blocking copy, over a three-slot ring: the GPU still gets every batch's bytes."""
    before = set(segment_names(os.getpid()))
    ds = pinned_dataset(cls, store, 2, slots=3)
    engine = ds._runtime.engine  # made when the store is added (the workers start then)
    for epoch in range(3):
        ds.set_epoch(epoch)
        on_gpu = []
        for X, obs, idx in ds:
            parts = list(tensor_parts(X))
            assert all(t.is_pinned() for t in parts) and idx.is_pinned()
            ring = engine.ring.segments
            inside = [
                any(
                    s.arrays.header.ctypes.data <= t.data_ptr() < s.arrays.header.ctypes.data + s.layout.nbytes
                    for s in ring
                )
                for t in parts
            ]
            assert inside[-1]  # values (or dense X): a view of the ring, pinned without a copy
            on_gpu.append([t.to("cuda", non_blocking=True) for t in parts])
            del X, parts
        torch.cuda.synchronize()
        got = [b"".join(t.cpu().numpy().tobytes() for t in parts) for parts in on_gpu]
        assert got == reference(cls, store, epoch)
    ds.close()
    assert set(segment_names(os.getpid())) <= before
