"""The plan over a selection: a subset of cells (chunked access over it) and a sampled sequence (its order).

Pure (no I/O), property tests over small stores and every rank of 1-3.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from test_plan import PROPS, configs, epoch_rows, epochs, global_rows

from arrayloaders.loading.plan import EpochPlan, PlanConfig, batch_rows, plan_epoch, runs_of_rows


def check_loads(plan: EpochPlan) -> None:
    """Loads hold ``load_rows`` yielded rows (the last may hold fewer), batches lie inside one load,
    runs lie inside files and are read in order, the take picks read rows."""
    cfg = plan.config
    assert plan.n_rows == sum(load.n_rows for load in plan.loads)
    for i, load in enumerate(plan.loads):
        assert load.index == i and load.start == i * cfg.load_rows
        assert load.n_rows == (cfg.load_rows if i < len(plan.loads) - 1 else plan.n_rows - load.start) > 0
        f, a, b = load.runs.T
        assert ((a >= 0) & (a < b) & (b <= np.asarray(cfg.file_n_obs)[f])).all()
        take = plan.take(load)
        assert take.shape == (load.n_rows,) and ((take >= 0) & (take < load.n_read)).all()
        np.testing.assert_array_equal(plan.rows_of_load(load), plan.read_rows(load)[take])
    for b in range(plan.n_batches):
        li, lo, hi = batch_rows(plan, b)
        assert hi - lo == cfg.batch_size or b == plan.n_batches - 1


@st.composite
def subsets(draw, world_sizes=st.integers(1, 3)):
    """A config over a random subset of its cells (``n_selected`` set), and the subset."""
    config = draw(configs(world_sizes=world_sizes))
    assume(config.n_obs > 0)
    mask = np.array(draw(st.lists(st.booleans(), min_size=config.n_obs, max_size=config.n_obs)))
    cells = np.flatnonzero(mask).astype(np.int64)
    assume(cells.size >= config.world_size)
    return dataclasses.replace(config, n_selected=cells.size), cells


def rank_plans(config: PlanConfig, epoch: int, **selection) -> list[EpochPlan]:
    return [plan_epoch(dataclasses.replace(config, rank=r), epoch, **selection) for r in range(config.world_size)]


def rows_per_rank(config: PlanConfig, n: int) -> tuple[int, int]:
    """Rows each rank takes of ``n`` (``equalize``), and keeps (whole batches with ``drop_last``)."""
    per_rank = n // config.world_size if config.equalize == "drop" else -(-n // config.world_size)
    return per_rank, per_rank // config.batch_size * config.batch_size if config.drop_last else per_rank


@PROPS
@given(subset=subsets(), epoch=epochs)
def test_a_subset_is_yielded_once_split_between_ranks_with_equal_batches(subset, epoch):
    config, cells = subset
    plans = rank_plans(config, epoch, cells=cells)
    m, world, bs = cells.size, config.world_size, config.batch_size
    _, kept = rows_per_rank(config, m)
    assert {p.n_batches for p in plans} == {-(-kept // bs)}
    rows = [epoch_rows(p) for p in plans]
    for plan, r in zip(plans, rows):
        check_loads(plan)
        assert r.size == kept and np.isin(r, cells).all()
        if config.equalize == "drop":
            assert np.unique(r).size == r.size
    everything = np.concatenate(rows)
    if config.equalize == "drop":
        assert np.unique(everything).size == everything.size  # ranks are disjoint
        if not config.drop_last:
            assert m - everything.size < world  # fewer than W cells dropped
    elif not config.drop_last:
        np.testing.assert_array_equal(np.unique(everything), cells)  # pad: every cell, some twice


@PROPS
@given(config=configs(world_sizes=st.integers(1, 3)), epoch=epochs)
def test_a_subset_of_every_cell_is_the_plain_plan(config, epoch):
    assume(config.n_obs >= config.world_size and config.n_obs > 0)
    cells = np.arange(config.n_obs, dtype=np.int64)
    plain = plan_epoch(config, epoch)
    subset = plan_epoch(dataclasses.replace(config, n_selected=cells.size), epoch, cells=cells)
    np.testing.assert_array_equal(epoch_rows(plain), epoch_rows(subset))


@PROPS
@given(subset=subsets(world_sizes=st.just(1)), epoch=epochs)
def test_a_subset_reads_whole_chunks_as_the_full_store_does(subset, epoch):
    # Rows outside the subset are read with their chunk and skipped: runs stay within chunks.
    config, cells = subset
    plan = plan_epoch(config, epoch, cells=cells)
    for load in plan.loads:
        f, a, b = load.runs.T
        assert (a // config.chunk_size == (b - 1) // config.chunk_size).all()
        read = global_rows(config.file_n_obs, load.runs.tolist())
        assert np.isin(read, cells).sum() == load.n_rows  # every selected read row is yielded


@st.composite
def sequences(draw):
    config = draw(configs(world_sizes=st.integers(1, 3)))
    assume(config.n_obs > 0)
    seq = np.array(draw(st.lists(st.integers(0, config.n_obs - 1), min_size=config.world_size, max_size=80)), dtype=np.int64)
    return dataclasses.replace(config, n_selected=seq.size), seq


@PROPS
@given(sampled=sequences(), epoch=epochs)
def test_a_sequence_is_yielded_in_its_order_repeats_included_in_equal_rank_shares(sampled, epoch):
    config, seq = sampled
    plans = rank_plans(config, epoch, sequence=seq)
    n, world = seq.size, config.world_size
    per_rank, kept = rows_per_rank(config, n)
    for r, plan in enumerate(plans):
        check_loads(plan)
        share = seq[r * n // world : (r + 1) * n // world]
        if share.size < per_rank:  # pad: the rank's own first index again
            share = np.concatenate([share, share[:1]])
        np.testing.assert_array_equal(epoch_rows(plan), share[:per_rank][:kept])
        for load in plan.loads:  # runs: distinct rows, sorted, never merged across files
            read = plan.read_rows(load)
            assert (np.diff(read) > 0).all()


@given(rows=st.lists(st.integers(0, 99), unique=True).map(sorted), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4))
def test_runs_of_rows_are_maximal_runs_within_files(rows, sizes):
    config = PlanConfig(tuple(sizes) + (100,), 1, 1, 1)  # a last file big enough for every row
    rows = np.array(rows, dtype=np.int64)
    runs = runs_of_rows(config, rows)
    np.testing.assert_array_equal(global_rows(config.file_n_obs, runs.tolist()), rows)
    offsets = config.file_offsets
    for (f0, _, b0), (f1, a1, _) in zip(runs[:-1], runs[1:]):
        assert f0 != f1 or a1 > b0  # adjacent runs are not mergeable
    assert all(0 <= a < b <= config.file_n_obs[f] for f, a, b in runs) and offsets.size == len(sizes) + 2
