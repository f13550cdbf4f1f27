"""Elastic resume: a checkpoint taken at one world size resumes at another.

The cells the interrupted epoch had not yet yielded on any rank are yielded
exactly once across the new ranks (each padded by at most one cell, all
with the same number of batches), and later epochs are those of a run at
the new world size. Ranks are datasets with an explicit ``rank`` (the
plan is the same as under torch.distributed), and real gloo ranks in
``test_elastic_resume_across_gloo_ranks``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_distributed import launch, rows

from arrayloaders import ZarrSparseDataset
from arrayloaders.loading.elastic import elastic_plan, rest_size, yielded_rows
from arrayloaders.loading.plan import PlanConfig, plan_epoch

SIZES = {"batch_size": 40, "chunk_size": 8, "preload_nchunks": 10}


def make(store, case: str, rank: int, world_size: int, **kw) -> ZarrSparseDataset:
    ds = ZarrSparseDataset(**SIZES, seed=7, return_index=True, num_workers=0, rank=rank, world_size=world_size, **kw)
    ds.add_store(store, obs_keys="cell_type")
    if case == "cells":
        return ds.subset(cells=np.arange(2, ds.n_obs, 3))
    if case == "sampler":
        weights = torch.linspace(1, 2, ds.n_obs, dtype=torch.float64)
        return ds.subset(sampler=torch.utils.data.WeightedRandomSampler(weights, num_samples=601))
    return ds


def indices(batches) -> list[int]:
    return [i for *_, index in batches for i in index.tolist()]


def interrupted(store, case: str, world: int, k: int, epoch: int = 1, **kw) -> tuple[list[int], list[int], dict]:
    """Every rank of ``world`` yields ``k`` batches of ``epoch``: (the rows they yielded, the rows of the whole
    epoch across ranks, rank 0's state)."""
    first, whole, states, loops = [], [], [], []
    for rank in range(world):
        ds = make(store, case, rank, world, **kw)
        ds.set_epoch(epoch)
        whole += indices(ds)
        ds.set_epoch(epoch)
        it = iter(ds)
        first += indices(next(it) for _ in range(k))
        states.append(ds.state_dict())
        loops.append(it)  # running: the state counts its k batches
    same = [{key: v for key, v in s.items() if key != "rank"} for s in states]
    assert all(s == same[0] for s in same), "the state differs between ranks"
    return first, whole, states[0]


@pytest.mark.parametrize("case", ["plain", "cells", "sampler"])
@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (2, 1), (1, 3)])
@pytest.mark.parametrize("k", [1, 2])
def test_the_rest_of_the_epoch_is_yielded_once_across_the_new_ranks(store, case, before, after, k):
    first, whole, state = interrupted(store, case, before, k)
    rest, lengths = [], []
    resumed = [make(store, case, rank, after) for rank in range(after)]
    for ds in resumed:
        ds.load_state_dict(state)
        n = len(ds)
        batches = list(ds)
        assert len(batches) == n
        lengths.append(n)
        rest += indices(batches)
    assert len(set(lengths)) == 1, lengths  # every rank yields as many batches
    want, got = Counter(whole), Counter(first + rest)
    assert not want - got, "cells of the interrupted epoch never yielded"
    padding = got - want
    assert sum(padding.values()) <= after and set(padding) <= set(rest), padding
    # later epochs: a run at the new world size
    for rank, ds in enumerate(resumed):
        fresh = make(store, case, rank, after)
        fresh.set_epoch(2)
        assert indices(ds) == indices(fresh), rank


def test_a_rest_resumed_again_at_a_third_world_size(store):
    """2 ranks -> 3 ranks (interrupted again after 2 batches) -> 1 rank: still every cell once."""
    first, whole, state = interrupted(store, "plain", 2, 3)
    middle, states, loops = [], [], []
    for rank in range(3):
        ds = make(store, "plain", rank, 3)
        ds.load_state_dict(state)
        it = iter(ds)
        middle += indices(next(it) for _ in range(2))
        states.append(ds.state_dict())
        loops.append(it)
    assert states[0]["elastic"] == [[2, 3]] and states[0]["world_size"] == 3 and states[0]["batches_yielded"] == 2
    last = make(store, "plain", 0, 1)
    last.load_state_dict(states[0])
    got = Counter(first + middle + indices(last))
    assert not Counter(whole) - got and sum((got - Counter(whole)).values()) <= 3 + 1
    assert last.epoch == 2


def test_the_same_world_size_resumes_the_rest_where_it_stood(store):
    """A state taken during an elastic rest, loaded at the same world size: exactly the rest of the rest."""
    _, _, state = interrupted(store, "plain", 2, 2)
    for rank in range(3):
        ds = make(store, "plain", rank, 3)
        ds.load_state_dict(state)
        whole = indices(ds)
        ds = make(store, "plain", rank, 3)
        ds.load_state_dict(state)
        it = iter(ds)
        head = indices(next(it) for _ in range(2))
        again = make(store, "plain", rank, 3)
        again.load_state_dict(ds.state_dict())
        assert head + indices(again) == whole


def test_a_rest_smaller_than_the_new_world_is_refused(store):
    ds = make(store, "plain", 0, 1)
    ds.set_epoch(1)
    it = iter(ds)
    for _ in range(len(ds) - 1):
        next(it)
    state = ds.state_dict()
    with pytest.raises(ValueError, match="fewer than the ranks"):
        make(store, "plain", 0, 999).load_state_dict(state)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(st.integers(0, 60), min_size=1, max_size=4).filter(lambda f: sum(f) >= 12),
    batch=st.integers(1, 9), chunk=st.integers(1, 7), preload=st.integers(1, 4),
    before=st.integers(1, 4), after=st.integers(1, 4), done=st.integers(0, 20),
    equalize=st.sampled_from(["drop", "pad"]), drop_last=st.booleans(), window=st.integers(1, 3),
)  # fmt: skip
def test_the_rest_plans_every_cell_once_over_any_shapes(files, batch, chunk, preload, before, after, done, equalize,
                                                       drop_last, window):  # fmt: skip
    """The planning alone, over many shapes: rows yielded before + rows of the rest plans = the epoch's rows."""
    base = PlanConfig(tuple(files), batch, chunk, preload, True, 3, drop_last, 0, before, equalize, None, window)
    if sum(files) < before:
        return
    n_batches = base.n_batches
    done = min(done, n_batches)
    whole, head = [], []
    for rank in range(before):
        plan = plan_epoch(PlanConfig(**{**base.__dict__, "rank": rank}), 4)
        rows_ = yielded_rows(plan)
        assert rows_.size == plan.n_rows
        whole += rows_.tolist()
        head += rows_[: done * batch].tolist()
    n = rest_size(base, ((before, done),))
    assert n == len(whole) - len(head)
    if n == 0 or n < after:
        return
    rest = []
    for rank in range(after):
        config = PlanConfig(**{**base.__dict__, "rank": rank, "world_size": after})
        plan = elastic_plan(config, 4, None, None, ((before, done),))
        rest.append(yielded_rows(plan).tolist())
    assert len({len(r) for r in rest}) == 1  # equal rows, so equal batches
    got, want = Counter(head + [row for r in rest for row in r]), Counter(whole)
    assert not want - got and sum((got - want).values()) <= after - 1


def test_elastic_resume_across_gloo_ranks(store, tmp_path):
    """Real torch.distributed ranks (gloo): a state saved on rank 0 of 2 resumes on 3 and on 1 ranks, and one
    saved on rank 0 of 3 resumes on 2; every cell of the epoch once (padding aside), equal batch counts, and
    the next epoch that of a run at the new world size; every cell, cells=, and a sampler."""
    cases = ["plain", "cells", "sampler"]
    saved = {w: launch("elastic_save", store, tmp_path / f"save{w}", w, timeout=90, k=2, cases=cases) for w in (2, 3)}
    for before, after in [(2, 3), (3, 2), (2, 1)]:
        pattern = str(tmp_path / f"save{before}" / "state-{case}-0.json")
        loaded = launch("elastic_load", store, tmp_path / f"load{before}to{after}", after, timeout=90, cases=cases,
                        states=pattern)  # fmt: skip
        for case in cases:
            whole = Counter(rows([b for r in saved[before] for b in r[case]["full"]]))
            first = Counter(rows([b for r in saved[before] for b in r[case]["first"]]))
            rest = Counter(rows([b for r in loaded for b in r[case]["rest"]]))
            assert not whole - (first + rest), (before, after, case)
            assert sum(((first + rest) - whole).values()) <= after, (before, after, case)
            assert len({r[case]["len"] for r in loaded}) == 1 and all(r[case]["len"] == len(r[case]["rest"]) for r in loaded)
            assert all(r[case]["next"] == r[case]["fresh_next"] for r in loaded), (before, after, case)
