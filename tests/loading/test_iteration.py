"""The iteration rules: one iterator per loop, held batches never change, when the epoch advances.

Every test runs real worker processes where ``num_workers`` > 0 and compares
batches bit for bit with a reference epoch read in-process by a fresh dataset.
"""

from __future__ import annotations

import functools
import threading
import warnings

import pytest
import torch
from conftest import batch_bytes, worker_pids

from arrayloaders import ZarrSparseDataset

KW = {"batch_size": 50, "chunk_size": 8, "preload_nchunks": 12, "return_index": True}  # 20 batches in 10 loads
WORKERS = [0, 1, 2]


def make(store, num_workers: int, **kw) -> ZarrSparseDataset:
    return ZarrSparseDataset(**{**KW, "num_workers": num_workers, **kw}).add_store(store, obs_keys="cell_type")


@functools.cache
def _reference(store, epoch: int) -> tuple[bytes, ...]:
    with make(store, 0) as ds:
        ds.set_epoch(epoch)
        return tuple(batch_bytes(b) for b in ds)


def reference(store, epoch: int) -> list[bytes]:
    """Every batch of ``epoch``, as bytes, from a fresh dataset reading in-process."""
    return list(_reference(store, epoch))


def loop(ds_or_iter) -> list[bytes]:
    return [batch_bytes(b) for b in ds_or_iter]


@pytest.fixture(params=WORKERS, ids=lambda w: f"w{w}")
def num_workers(request) -> int:
    return request.param


# --------------------------------------------------------------------------- held batches


def _two_more_epochs(ds):
    for _ in range(2):
        loop(ds)


def _peeks(ds):
    for _ in range(5):
        next(iter(ds))
    loop(ds)


def _two_loops_at_once(ds):
    for _ in zip(ds, ds):
        pass
    loop(ds)


def _close_and_more(ds):
    ds.close()
    loop(ds)
    ds.close()
    loop(ds)


@pytest.mark.parametrize("then", [_two_more_epochs, _peeks, _two_loops_at_once, _close_and_more],
                         ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_held_batches_never_change(store, num_workers, then):
    with make(store, num_workers) as ds:
        held = list(ds)  # every batch of epoch 0, kept
        snapshot = [batch_bytes(b) for b in held]
        then(ds)
        assert [batch_bytes(b) for b in held] == snapshot == reference(store, 0)


# --------------------------------------------------------------------------- when the epoch advances


def test_a_peek_does_not_change_the_next_loop(store, num_workers):
    with make(store, num_workers) as ds:
        peeked = batch_bytes(next(iter(ds)))
        assert peeked == reference(store, 0)[0]
        assert loop(ds) == reference(store, 0)
        assert loop(ds) == reference(store, 1)


def test_a_kept_peek_iterator_gives_the_workers_to_the_next_loop_and_goes_on(store, num_workers):
    with make(store, num_workers) as ds:
        kept = iter(ds)
        first = batch_bytes(next(kept))
        full = iter(ds)
        got = [batch_bytes(next(full))]
        if num_workers:  # the loop that has only peeked gave the workers to the newer loop
            assert full._state.run is not None and ds._runtime.engine.run is full._state.run
        got += loop(full)
        assert got == reference(store, 0)
        assert [first, *loop(kept)] == reference(store, 0)  # the peek goes on with its own epoch


def test_break_repeats_the_epoch_and_the_state_says_so(store, num_workers):
    with make(store, num_workers) as ds:
        for k, _ in enumerate(ds):
            if k == 6:
                assert ds.state_dict()["batches_yielded"] == 7  # while the loop runs: where it stands
                break
        # Left early, the loop no longer counts: the next loop starts the epoch again, and so
        # does a dataset restored from the state.
        assert (ds.state_dict()["epoch"], ds.state_dict()["batches_yielded"]) == (0, 0)
        assert loop(ds) == reference(store, 0)
        assert (ds.state_dict()["epoch"], ds.state_dict()["batches_yielded"]) == (1, 0)
        assert loop(ds) == reference(store, 1)


def _peek(ds):
    next(iter(ds))


def _break_at_3(ds):
    for k, _ in enumerate(ds):
        if k == 2:
            break


def _two_epochs(ds):
    loop(ds)
    loop(ds)


@pytest.mark.parametrize("before", [_peek, _break_at_3, _two_epochs], ids=lambda f: f.__name__.strip("_"))
def test_a_restored_state_gives_the_same_next_loop(store, before):
    with make(store, 2) as ds, make(store, 0) as restored:
        before(ds)
        restored.load_state_dict(ds.state_dict())
        assert loop(restored) == loop(ds)


def test_a_loop_stopped_at_len_completes_the_epoch_and_keeps_the_workers(store):
    # Lightning takes exactly len(ds) batches and never exhausts the loop.
    with make(store, 2) as ds:
        pids = None
        for epoch in range(3):
            it = iter(ds)
            got = [batch_bytes(next(it)) for _ in range(len(ds))]
            assert got == reference(store, epoch)
            assert ds.epoch == epoch + 1 and ds.state_dict()["batches_yielded"] == 0
            pids = pids or worker_pids()
            assert worker_pids() == pids and len(pids) == 2  # the same workers, every epoch
            del it
        assert worker_pids() == pids


def test_set_epoch_during_a_loop_changes_only_the_next_loop(store, num_workers):
    with make(store, num_workers) as ds:
        it = iter(ds)
        got = [batch_bytes(next(it))]
        ds.set_epoch(5)
        assert got + loop(it) == reference(store, 0)
        assert ds.epoch == 5  # the loop of epoch 0 completing does not move the epoch set meanwhile
        assert loop(ds) == reference(store, 5)


def test_state_dict_follows_the_furthest_running_loop_not_a_peek(store, num_workers):
    with make(store, num_workers) as ds:
        it = iter(ds)
        for _ in range(5):
            next(it)
        next(iter(ds))  # a callback peeks mid-epoch
        assert ds.state_dict()["batches_yielded"] == 5
        state = ds.state_dict()
        rest = loop(it)
    with make(store, num_workers) as resumed:
        resumed.load_state_dict(state)
        assert loop(resumed) == rest == reference(store, 0)[5:]


def test_a_closed_iterator_stops(store, num_workers):
    with make(store, num_workers) as ds:
        it = iter(ds)
        next(it)
        it.close()
        assert list(it) == []
        assert loop(ds) == reference(store, 0)


# --------------------------------------------------------------------------- several loops at once


def test_two_loops_in_one_thread_each_get_the_whole_epoch(store, num_workers):
    with make(store, num_workers) as ds:
        pairs = list(zip(ds, ds))
        a = [batch_bytes(x) for x, _ in pairs]
        b = [batch_bytes(y) for _, y in pairs]
        assert a == b == reference(store, 0)
        assert loop(ds) == reference(store, 1)


@pytest.mark.parametrize("n_threads", [2, 3])
def test_loops_in_several_threads_each_get_the_whole_epoch(store, num_workers, n_threads):
    with make(store, num_workers) as ds:
        loops = [iter(ds) for _ in range(n_threads)]  # all made before any completes: all epoch 0
        start = threading.Barrier(n_threads)
        held: list[list | BaseException] = [[] for _ in range(n_threads)]

        def run(k: int) -> None:
            try:
                start.wait()
                held[k] = list(loops[k])
            except BaseException as e:  # noqa: BLE001 - checked below
                held[k] = e

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        for batches in held:
            assert not isinstance(batches, BaseException), batches
            assert [batch_bytes(b) for b in batches] == reference(store, 0)


def test_closing_the_dataset_during_a_loop_lets_the_loop_finish(store):
    with make(store, 2) as ds:
        it = iter(ds)
        got = [batch_bytes(next(it)) for _ in range(3)]
        ds.close()
        assert worker_pids() == []
        assert got + loop(it) == reference(store, 0)


# --------------------------------------------------------------------------- torch DataLoader


def test_dataloader_workers_are_refused_with_what_to_do(store):
    ds = make(store, 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    it = iter(loader)
    with pytest.raises(RuntimeError, match=r"DataLoader worker process.*num_workers=0.*ZarrSparseDataset\(num_workers"):
        next(it)
    it._shutdown_workers()  # now, not when collected during a later test (torch then reports the failed workers)


def test_dataloader_in_the_main_process_advances_epochs_without_warnings(store, num_workers):
    with make(store, num_workers) as ds, warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's sparse invariant warning
        loader = torch.utils.data.DataLoader(ds, batch_size=None)
        assert loop(loader) == reference(store, 0)
        assert loop(loader) == reference(store, 1)


# --------------------------------------------------------------------------- adding data


@pytest.mark.parametrize("pattern", ["loops", "zip"])
def test_adding_a_store_after_iterating_gives_the_combined_dataset(store, tmp_path, num_workers, pattern):
    from arrayloaders import create_store_from_h5ads
    from arrayloaders.example_data import write_example_h5ads

    more = create_store_from_h5ads(write_example_h5ads(tmp_path / "h5", (120,), 400, nnz_per_cell=40, seed=7),
                                   tmp_path / "more", progress=False)  # fmt: skip
    with make(store, num_workers) as ds, make(store, 0) as both:
        kept = iter(ds)
        next(kept)  # a peek kept from before the change
        for _ in zip(ds, ds) if pattern == "zip" else ds:
            pass
        ds.add_store(more, obs_keys="cell_type")
        both.add_store(more, obs_keys="cell_type")
        both.set_epoch(ds.epoch)
        assert ds.n_obs == 1120 and loop(ds) == loop(both)


def test_a_dropped_dataset_stops_its_workers_without_the_garbage_collector(store):
    # Nothing may hold a dataset's workers in a reference cycle: dropping the last reference to a
    # dataset and its suspended loop stops them at once, as in CPython's usual refcounting.
    import gc
    import time

    gc.disable()
    try:
        ds = make(store, 2)
        it = iter(ds)
        next(it)
        assert len(worker_pids()) == 2
        del ds, it
        deadline = time.monotonic() + 10
        while worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker_pids() == []
    finally:
        gc.enable()
