"""Epochs flow into each other: the next epoch's first loads are decoded while one ends; and ``ds.stats()``.

Decoding ahead must never change a batch: every case compares, batch for
batch, a dataset with workers (decoding ahead) against the same settings
read without workers (which never does), across epochs, ``set_epoch``,
``load_state_dict``, loops broken early, peeks, selections and samplers.
Every case also checks that each slot of the ring is accounted for
(free, lent, decoding for a task, or decoded for a run): a dropped load
that kept its slot would starve the ring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tensor_parts, until_workers_are_up

from arrayloaders import ZarrSparseDataset


def make(store, num_workers: int, case: str = "plain", **kw) -> ZarrSparseDataset:
    settings = {"batch_size": 48, "chunk_size": 8, "preload_nchunks": 12, "seed": 3, "return_index": True, **kw}
    ds = ZarrSparseDataset(num_workers=num_workers, **settings).add_store(store, obs_keys="cell_type")
    if case == "cells":
        ds = ds.subset(cells=np.arange(1, ds.n_obs, 3))
    elif case == "sampler":  # torch's, on the global generator the dataset seeds per epoch: known ahead
        ds = ds.subset(sampler=torch.utils.data.RandomSampler(range(ds.n_obs), num_samples=700))
    elif case == "own generator":  # draws differently at each call: never sampled ahead
        ds = ds.subset(sampler=torch.utils.data.RandomSampler(range(ds.n_obs), generator=torch.Generator().manual_seed(1)))
    return ds


def epoch_batches(ds, n: int | None = None) -> list[tuple[bytes, bytes]]:
    """The next loop's batches (its first ``n``), as bytes of X and of the index."""
    out = []
    for X, _, index in ds:
        out.append((b"".join(p.numpy().tobytes() for p in tensor_parts(X)), index.numpy().tobytes()))
        if n is not None and len(out) == n:
            break
    return out


def reference(store, case: str, epochs, **kw) -> dict[int, list]:
    ds = make(store, 0, case, **kw)
    out = {}
    for epoch in epochs:
        ds.set_epoch(epoch)
        out[epoch] = epoch_batches(ds)
    return out


def assert_slots_accounted(ds) -> None:
    """Every slot is free, lent, filling for a task in flight, or ready for the run or the loads ahead."""
    engine = ds._runtime.engine
    with engine.lock:
        flying = {f.slot for f in engine._flight.values()}
        runs = [r for r in (engine.run, engine._ahead) if r is not None and not r.ended]
        ready = [f.slot for r in runs for f in r.ready.values()]
        assert len(ready) == len(set(ready)), "a slot is ready for two loads"
        for k, slot in enumerate(engine._slots):
            if slot.state == "filling":
                assert k in flying, (k, engine._slots)
            elif slot.state == "ready":
                assert k in ready, (k, engine._slots)


@pytest.mark.parametrize("case", ["plain", "cells", "sampler", "own generator"])
@pytest.mark.parametrize("window", [1, 2])
def test_epochs_in_a_row_yield_what_they_yield_without_workers(store, case, window):
    want = reference(store, case, range(4), window=window)
    with make(store, 2, case, window=window) as ds:
        if case != "own generator":  # (more epochs would draw more from its generator than the reference did)
            until_workers_are_up(ds)
        ds.set_epoch(0)
        for epoch in range(4):
            assert ds.epoch == epoch
            assert epoch_batches(ds) == want[epoch], epoch
            assert_slots_accounted(ds)
            if epoch == 0:  # (its loop dropped what was decoded ahead for the epoch after the warm-up's)
                ds.stats(reset=True)
        stats = ds.stats()
    if case == "own generator":  # its next draw is not known before its loop asks for it
        assert stats.loads_ahead == 0
    else:
        assert stats.loads_ahead > 0 and stats.loads_ahead_dropped == 0, stats


@pytest.mark.parametrize("case", ["plain", "sampler"])
def test_another_epoch_next_drops_the_loads_decoded_ahead(store, case):
    """set_epoch to another epoch, or load_state_dict of another epoch, after an epoch whose successor was decoded
    ahead: that epoch's batches, the loads ahead dropped with their slots, again and again on a small ring."""
    epochs = [0, 5, 2, 3, 9, 1]
    want = reference(store, case, set(epochs))
    with make(store, 2, case, memory_budget=2**20) as ds:
        until_workers_are_up(ds)
        ds.stats(reset=True)
        for epoch in epochs:
            ds.set_epoch(epoch)
            assert epoch_batches(ds) == want[epoch], epoch
            assert_slots_accounted(ds)
        assert ds.stats().loads_ahead_dropped > 0
        state = make(store, 0, case).state_dict()
        state["epoch"] = 7
        ds.load_state_dict(state)
        assert epoch_batches(ds) == reference(store, case, [7])[7]
        assert_slots_accounted(ds)


@pytest.mark.parametrize("position", [1, 4])
def test_a_resumed_epoch_takes_the_loads_decoded_ahead_from_its_position(store, position):
    """A checkpoint of epoch 1 at batch ``position`` loaded right after epoch 0 ended (its first loads decoded
    ahead): the rest of epoch 1 exactly, the loads before the position freed."""
    want = reference(store, "plain", [1])[1]
    saved = make(store, 0)
    saved.set_epoch(1)
    it = iter(saved)
    for _ in range(position):
        next(it)
    state = saved.state_dict()
    with make(store, 2) as ds:
        until_workers_are_up(ds)
        ds.set_epoch(0)
        epoch_batches(ds)
        ds.load_state_dict(state)
        assert epoch_batches(ds) == want[position:]
        assert_slots_accounted(ds)
        ds.set_epoch(2)
        assert epoch_batches(ds) == reference(store, "plain", [2])[2]


def test_peeks_and_broken_loops_between_epochs(store):
    """A peek at the next epoch, a loop broken early, then whole epochs: what a loader without workers yields."""
    want = reference(store, "plain", range(3))
    with make(store, 2) as ds:
        until_workers_are_up(ds)
        ds.set_epoch(0)
        assert epoch_batches(ds) == want[0]
        assert epoch_batches(ds, 1) == want[1][:1]  # a peek of epoch 1 (decoded ahead)
        assert epoch_batches(ds, 3) == want[1][:3]  # broken early: epoch 1 starts again
        assert epoch_batches(ds) == want[1]
        assert_slots_accounted(ds)
        assert epoch_batches(ds) == want[2]
        assert_slots_accounted(ds)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stats_count_what_was_yielded(store, num_workers):
    with make(store, num_workers) as ds:
        if num_workers:
            until_workers_are_up(ds)
        ds.set_epoch(0)
        ds.stats(reset=True)
        batches = cells = 0
        for _ in range(2):
            for X, _, index in ds:
                batches, cells = batches + 1, cells + len(index)
        stats = ds.stats()
        assert (stats.batches, stats.cells, stats.rows) == (batches, cells, cells) == (2 * len(ds), 2 * ds.n_obs, 2 * ds.n_obs)
        assert stats.loads >= 2 * -(-ds.n_obs // 96) and stats.waiting_s > 0 and stats.between_s >= 0
        assert 0 <= stats.loader_fraction <= 1 and stats.seconds > 0
        if num_workers:
            assert len(stats.workers) == 2 and stats.loads_here == 0
            assert sum(w.tasks for w in stats.workers) >= stats.loads - stats.loads_here
            assert all(0 <= w.busy_fraction <= 1 and w.busy_s > 0 for w in stats.workers), stats.workers
            assert 0 < stats.slots_in_use <= stats.slots
        else:
            assert stats.workers == () and stats.loads_here == stats.loads and stats.loads_ahead == 0
        assert "batches" in str(stats) and str(batches) in str(stats)
        again = ds.stats(reset=True)
        assert again.batches == batches and ds.stats().batches == 0
