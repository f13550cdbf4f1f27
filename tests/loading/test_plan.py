"""The pure epoch plan (arrayloaders.loading.plan): partitions, batch layout, determinism, ranks, bad configs.

No I/O. Property tests (hypothesis) over small stores, plus a readable table of
concrete unshuffled plans whose rows can be checked by eye.

Vocabulary used below:

- *store chunks*: every file cut into runs of ``chunk_size`` rows (the last run
  of a file may be shorter), in store order, as ``(file, start, stop)``;
- *epoch chunk order*: the store chunks in this epoch's order (shuffled by seed
  and epoch when ``shuffle``). It must not depend on rank, world size, batch
  size, preload size, drop_last or equalize (every rank must agree on it), so
  it is read off a one-rank, one-load plan of the same seed and epoch;
- *epoch sequence*: the rows of the epoch chunk order, concatenated
  (``n = n_obs`` rows);
- rank ``r`` of ``W`` owns the *range* ``[r * n // W, (r + 1) * n // W)`` of the
  epoch sequence (a chunk may be split between two ranks). ``"drop"`` yields
  the first ``n // W`` rows of it, ``"pad"`` all of it plus, if it is one row
  short of ``ceil(n / W)``, its own first row again. Fewer rows than ranks
  (``W > 1``) is refused with a ValueError.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from arrayloaders.loading.plan import EpochPlan, PlanConfig, batch_rows, load_permutation, plan_epoch

PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# helpers (independent of plan.py's internals)
# ---------------------------------------------------------------------------


def store_chunks(file_n_obs, chunk_size) -> list[tuple[int, int, int]]:
    return [(f, a, min(a + chunk_size, n)) for f, n in enumerate(file_n_obs) for a in range(0, n, chunk_size)]


def global_rows(file_n_obs, pieces) -> np.ndarray:
    """Global row indices of (file, start, stop) pieces, concatenated in order."""
    offsets = np.concatenate([[0], np.cumsum(file_n_obs, dtype=np.int64)])
    parts = [np.arange(offsets[f] + a, offsets[f] + b, dtype=np.int64) for f, a, b in pieces]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def epoch_rows(plan: EpochPlan) -> np.ndarray:
    """The epoch's rows in yield order (every load's permuted rows, load after load)."""
    parts = [plan.rows_of_load(load) for load in plan.loads]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def read_rows(plan: EpochPlan) -> np.ndarray:
    """The epoch's rows in read order (loads' chunk pieces, before the in-load permutation)."""
    return global_rows(plan.config.file_n_obs, [tuple(c) for load in plan.loads for c in load.runs])


def epoch_chunk_order(config: PlanConfig, epoch: int) -> list[tuple[int, int, int]]:
    """The store chunks in this seed and epoch's order (see module docstring)."""
    chunks = store_chunks(config.file_n_obs, config.chunk_size)
    if not chunks:
        return []
    solo = dataclasses.replace(
        config, rank=0, world_size=1, batch_size=1, preload_nchunks=len(chunks), drop_last=False
    )
    plan = plan_epoch(solo, epoch)
    assert len(plan.loads) == 1  # load_rows = n_chunks * chunk_size >= n_obs
    order = [tuple(int(x) for x in c) for c in plan.loads[0].runs]
    assert sorted(order) == chunks  # whole store chunks, each exactly once
    return order


def epoch_sequence(config: PlanConfig, epoch: int) -> np.ndarray:
    """The epoch's row sequence: the rows of the epoch chunk order, concatenated."""
    seq = global_rows(config.file_n_obs, epoch_chunk_order(config, epoch))
    np.testing.assert_array_equal(np.sort(seq), np.arange(config.n_obs))
    return seq


def rank_ranges(config: PlanConfig, epoch: int) -> list[np.ndarray]:
    """Each rank's range of the epoch sequence: rows ``[r * n // W, (r + 1) * n // W)``."""
    seq, w = epoch_sequence(config, epoch), config.world_size
    n = seq.size
    return [seq[r * n // w : (r + 1) * n // w] for r in range(w)]


def rank_plans(config: PlanConfig, epoch: int) -> list[EpochPlan]:
    return [plan_epoch(dataclasses.replace(config, rank=r), epoch) for r in range(config.world_size)]


def equal_rank_plans(config: PlanConfig, epoch: int, per_rank: int) -> tuple[list[EpochPlan], list[np.ndarray], int]:
    """Every rank's plan and range, and the rows each keeps: ``per_rank``, cut to whole batches with drop_last.

    Asserts that every rank has the same number of batches.
    """
    assume(config.n_obs >= config.world_size)  # else refused, see test_fewer_rows_than_ranks_is_refused
    plans, bs = rank_plans(config, epoch), config.batch_size
    kept = per_rank // bs * bs if config.drop_last else per_rank
    assert {p.n_batches for p in plans} == {-(-kept // bs)}
    return plans, rank_ranges(config, epoch), kept


def check_layout(plan: EpochPlan) -> None:
    """Invariant 2: loads and batches are laid out as documented, pieces lie inside files."""
    cfg = plan.config
    bs, sizes = cfg.batch_size, np.asarray(cfg.file_n_obs, dtype=np.int64)
    assert cfg.load_rows % bs == 0 and cfg.load_rows >= cfg.preload_nchunks * cfg.chunk_size
    assert cfg.load_rows < cfg.preload_nchunks * cfg.chunk_size + bs
    assert plan.n_rows == sum(load.n_rows for load in plan.loads)
    if cfg.drop_last:
        assert plan.n_rows == plan.n_batches * bs
    else:
        assert plan.n_batches == -(-plan.n_rows // bs)
    for i, load in enumerate(plan.loads):
        assert load.index == i
        assert load.start == i * cfg.load_rows
        ch = load.runs
        assert ch.dtype == np.int64 and ch.ndim == 2 and ch.shape[1] == 3 and len(ch) >= 1
        f, a, b = ch.T
        assert ((f >= 0) & (f < len(sizes))).all()
        assert ((a >= 0) & (a < b) & (b <= sizes[f])).all(), ch
        assert (a // cfg.chunk_size == (b - 1) // cfg.chunk_size).all()  # a piece never crosses a chunk
        assert int((b - a).sum()) == load.n_rows
        if i < len(plan.loads) - 1:
            assert load.n_rows == cfg.load_rows
        else:
            assert 0 < load.n_rows <= cfg.load_rows
        rows = plan.rows_of_load(load)
        assert rows.shape == (load.n_rows,)
        np.testing.assert_array_equal(np.sort(rows), np.sort(global_rows(cfg.file_n_obs, ch.tolist())))

    # batches tile the loads contiguously, in order; batch b is epoch positions b*bs:(b+1)*bs
    rows = epoch_rows(plan)
    cur_load, cur = 0, 0
    for b in range(plan.n_batches):
        li, lo, hi = batch_rows(plan, b)
        assert 0 <= li < len(plan.loads)
        assert 0 <= lo < hi <= plan.loads[li].n_rows
        if li != cur_load:
            assert li == cur_load + 1 and cur == plan.loads[cur_load].n_rows, (b, li, cur_load, cur)
            cur_load, cur = li, 0
        assert lo == cur, (b, lo, cur)
        cur = hi
        if b < plan.n_batches - 1:
            assert hi - lo == bs
        np.testing.assert_array_equal(plan.rows_of_load(plan.loads[li])[lo:hi], rows[b * bs : (b + 1) * bs])
    if plan.n_batches:
        assert cur_load == len(plan.loads) - 1 and cur == plan.loads[-1].n_rows
    else:
        assert plan.loads == () and plan.n_rows == 0
    for bad in (-1, plan.n_batches):
        with pytest.raises(IndexError):
            batch_rows(plan, bad)


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

file_sizes = st.lists(st.integers(0, 60), min_size=1, max_size=5).map(tuple)  # empty files included
epochs = st.integers(0, 1000)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def configs(draw, *, sizes=file_sizes, world_sizes=st.just(1), equalize=st.sampled_from(["drop", "pad"]),
            shuffle=st.booleans(), drop_last=st.booleans()) -> PlanConfig:
    world_size = draw(world_sizes)
    return PlanConfig(
        file_n_obs=draw(sizes),
        batch_size=draw(st.integers(1, 16)),
        chunk_size=draw(st.integers(1, 20)),
        preload_nchunks=draw(st.integers(1, 6)),
        shuffle=draw(shuffle),
        seed=draw(seeds),
        drop_last=draw(drop_last),
        rank=draw(st.integers(0, world_size - 1)),
        world_size=world_size,
        equalize=draw(equalize),
    )


# ---------------------------------------------------------------------------
# 1 + 2: one rank: the epoch is a permutation of the store, laid out in loads and batches
# ---------------------------------------------------------------------------


@PROPS
@given(config=configs(), epoch=epochs)
def test_single_rank_epoch_is_a_permutation_of_the_store(config, epoch):
    plan = plan_epoch(config, epoch)
    check_layout(plan)
    n, bs = config.n_obs, config.batch_size
    rows = epoch_rows(plan)
    if config.drop_last:
        assert plan.n_batches == n // bs
        assert rows.size == plan.n_rows == plan.n_batches * bs
        assert np.unique(rows).size == rows.size
        assert ((rows >= 0) & (rows < n)).all()
    else:
        assert plan.n_batches == -(-n // bs)
        assert plan.n_rows == n
        np.testing.assert_array_equal(np.sort(rows), np.arange(n))


@PROPS
@given(config=configs(world_sizes=st.integers(1, 4), equalize=st.just("drop")), epoch=epochs)
def test_layout_on_every_rank(config, epoch):
    assume(config.world_size == 1 or config.n_obs >= config.world_size)  # else refused, tested below
    for plan in rank_plans(config, epoch):
        check_layout(plan)


# ---------------------------------------------------------------------------
# 3: determinism
# ---------------------------------------------------------------------------


@PROPS
@given(config=configs(world_sizes=st.integers(1, 4), equalize=st.just("drop")), epoch=epochs)
def test_same_config_and_epoch_give_the_same_plan(config, epoch):
    assume(config.world_size == 1 or config.n_obs >= config.world_size)
    a = plan_epoch(config, epoch)
    b = plan_epoch(dataclasses.replace(config), epoch)  # an equal, distinct config object
    assert (a.n_rows, a.n_batches, len(a.loads)) == (b.n_rows, b.n_batches, len(b.loads))
    for la, lb in zip(a.loads, b.loads):
        assert (la.index, la.start) == (lb.index, lb.start)
        np.testing.assert_array_equal(la.runs, lb.runs)
        np.testing.assert_array_equal(
            load_permutation(config, epoch, la.index, la.n_rows), load_permutation(config, epoch, lb.index, lb.n_rows)
        )
        np.testing.assert_array_equal(a.rows_of_load(la), b.rows_of_load(lb))


# At least 40 rows: two shuffled epochs coincide only if both the chunk order and the
# first load's permutation do, chance <= 1 / (n_chunks! * chunk_size!) < 1e-6.
big_shuffled = configs(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=5).map(tuple).filter(
    lambda s: sum(s) >= 40), shuffle=st.just(True), drop_last=st.just(False))


@PROPS
@given(config=big_shuffled, epoch=epochs, other=epochs)
def test_another_epoch_gives_another_order(config, epoch, other):
    assume(epoch != other)
    a, b = epoch_rows(plan_epoch(config, epoch)), epoch_rows(plan_epoch(config, other))
    np.testing.assert_array_equal(np.sort(a), np.sort(b))
    assert not np.array_equal(a, b)


@PROPS
@given(config=big_shuffled, epoch=epochs, seed=seeds)
def test_another_seed_gives_another_order(config, epoch, seed):
    assume(seed != config.seed)
    a = epoch_rows(plan_epoch(config, epoch))
    b = epoch_rows(plan_epoch(dataclasses.replace(config, seed=seed), epoch))
    np.testing.assert_array_equal(np.sort(a), np.sort(b))
    assert not np.array_equal(a, b)


@PROPS
@given(config=configs(shuffle=st.just(False), world_sizes=st.integers(1, 4), equalize=st.just("drop")),
       epoch=epochs)
def test_no_shuffle_reads_in_store_order(config, epoch):
    assume(config.world_size == 1 or config.n_obs >= config.world_size)
    assert epoch_chunk_order(config, epoch) == store_chunks(config.file_n_obs, config.chunk_size)
    plan = plan_epoch(config, epoch)
    np.testing.assert_array_equal(epoch_rows(plan), read_rows(plan))  # no permutation inside loads
    if config.world_size == 1:
        np.testing.assert_array_equal(epoch_rows(plan), np.arange(plan.n_rows))


# ---------------------------------------------------------------------------
# 4: ranks
# ---------------------------------------------------------------------------


@PROPS
@given(config=configs(world_sizes=st.integers(2, 4), equalize=st.just("drop")), epoch=epochs)
@example(  # 7 rows on 2 ranks: ranges of 3 and 4 rows, the chunk [2, 4) split between them
    config=PlanConfig((7,), batch_size=2, chunk_size=2, preload_nchunks=2, shuffle=False, world_size=2),
    epoch=0,
)
def test_drop_ranks_are_disjoint_equal_prefixes_of_their_ranges(config, epoch):
    w = config.world_size
    per_rank = config.n_obs // w  # every rank is cut to the shortest range (then to whole batches)
    plans, ranges, kept = equal_rank_plans(config, epoch, per_rank)
    for p, own in zip(plans, ranges):
        check_layout(p)
        assert p.n_rows == kept
        # the first rows of its own range, contiguous in the epoch sequence, in order
        np.testing.assert_array_equal(read_rows(p), own[:kept])
        np.testing.assert_array_equal(np.sort(epoch_rows(p)), np.sort(own[:kept]))
    everything = np.concatenate([epoch_rows(p) for p in plans])
    assert np.unique(everything).size == everything.size  # ranks pairwise disjoint
    assert everything.size == w * kept


@PROPS
@given(sizes=file_sizes, chunk_size=st.integers(1, 20), world_size=st.integers(2, 8), batch_size=st.integers(1, 8),
       drop_last=st.booleans(), seed=seeds, epoch=epochs, shuffle=st.booleans())
def test_drop_loses_fewer_rows_than_ranks(sizes, chunk_size, world_size, batch_size, drop_last, seed, epoch,
                                          shuffle):
    """Before drop_last, "drop" misses exactly n mod W rows: the last row of each longer range.

    drop_last then cuts every rank to whole batches, the same number of rows on each.
    """
    n = sum(sizes)
    assume(n >= world_size)
    config = PlanConfig(sizes, batch_size=batch_size, chunk_size=chunk_size, preload_nchunks=1, shuffle=shuffle,
                        seed=seed, drop_last=drop_last, world_size=world_size, equalize="drop")
    plans = rank_plans(config, epoch)
    kept = np.concatenate([epoch_rows(p) for p in plans])
    missing = set(range(n)) - set(kept.tolist())
    per_rank = n // world_size
    if not drop_last:
        assert len(missing) == n % world_size < world_size
        longer = [own for own in rank_ranges(config, epoch) if own.size > per_rank]
        assert missing == {int(own[-1]) for own in longer}
    else:
        assert len(missing) == n % world_size + world_size * (per_rank % batch_size)
    assert kept.size == n - len(missing)


@PROPS
@given(config=configs(world_sizes=st.integers(2, 4), equalize=st.just("pad")), epoch=epochs)
@example(  # rank 1's range [5, 11) crosses from file 0 into file 1; rank 0 pads [0, 5) with row 0
    config=PlanConfig((10, 1), batch_size=5, chunk_size=10, preload_nchunks=1, shuffle=False, rank=1,
                      world_size=2, equalize="pad"),
    epoch=0,
)
@example(  # ranges of 2, 3, 2, 3 rows: ranks 0 and 2 repeat their first row
    config=PlanConfig((10,), batch_size=1, chunk_size=4, preload_nchunks=1, shuffle=True, world_size=4,
                      equalize="pad"),
    epoch=1,
)
def test_pad_ranks_cover_their_ranges_and_repeat_only_their_first_row(config, epoch):
    n = config.n_obs
    per_rank = -(-n // config.world_size)  # every rank is brought up to the longest range (then to whole batches)
    plans, ranges, kept = equal_rank_plans(config, epoch, per_rank)
    distinct = []
    for p, own in zip(plans, ranges):
        check_layout(p)
        assert p.n_rows == kept
        assert per_rank - own.size in (0, 1)
        padded = np.concatenate([own, own[: per_rank - own.size]])  # its range, then its own first row again
        read = read_rows(p)
        np.testing.assert_array_equal(read, padded[:kept])
        np.testing.assert_array_equal(np.sort(epoch_rows(p)), np.sort(padded[:kept]))
        assert set(read.tolist()) <= set(own.tolist())  # repeats come only from the rank's own rows
        values, counts = np.unique(read, return_counts=True)
        assert counts.max(initial=0) <= 2 and set(values[counts > 1].tolist()) <= {int(own[0])}
        if not config.drop_last:
            assert set(read.tolist()) == set(own.tolist())  # covers all of its own range
        distinct.append(set(read.tolist()))
    union = set().union(*distinct)
    assert sum(len(s) for s in distinct) == len(union)  # ranks' rows pairwise disjoint
    if not config.drop_last:
        assert union == set(range(n))  # the ranks together cover the store


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), world_size=st.integers(2, 8),
       rank=st.integers(0, 7), equalize=st.sampled_from(["drop", "pad"]), shuffle=st.booleans(),
       drop_last=st.booleans(), epoch=epochs)
def test_fewer_rows_than_ranks_is_refused(sizes, world_size, rank, equalize, shuffle, drop_last, epoch):
    """Fewer rows than ranks (some rank would get none) raises; as many rows as ranks gives one each."""
    config = PlanConfig(sizes, batch_size=2, chunk_size=3, preload_nchunks=1, shuffle=shuffle, drop_last=drop_last,
                        rank=rank % world_size, world_size=world_size, equalize=equalize)
    n = config.n_obs
    if n < world_size:
        with pytest.raises(ValueError, match="fewer than world_size"):
            plan_epoch(config, epoch)
    else:  # no error, and every rank gets at least one row before drop_last
        per_rank = n // world_size if equalize == "drop" else -(-n // world_size)
        assert per_rank >= 1
        assert plan_epoch(config, epoch).n_rows == (per_rank // 2 * 2 if drop_last else per_rank)


@pytest.mark.parametrize("equalize", ["drop", "pad"])
def test_exactly_as_many_rows_as_ranks_gives_one_row_each(equalize):
    config = PlanConfig((1, 0, 2), batch_size=2, chunk_size=2, preload_nchunks=1, world_size=3, equalize=equalize)
    rows = [epoch_rows(p).tolist() for p in rank_plans(config, 0)]
    assert sorted(rows) == [[0], [1], [2]]


def test_pad_with_fewer_chunks_than_ranks_splits_the_chunk():
    """One chunk of 5 rows on 2 ranks: ranges [0, 2) and [2, 5); rank 0 pads with its first row."""
    config = PlanConfig((5,), batch_size=2, chunk_size=10, preload_nchunks=2, shuffle=False, world_size=2,
                        equalize="pad")
    plans = rank_plans(config, 0)
    assert [epoch_rows(p).tolist() for p in plans] == [[0, 1, 0], [2, 3, 4]]
    assert [p.n_batches for p in plans] == [2, 2]
    assert [p.loads[0].runs.tolist() for p in plans] == [[[0, 0, 2], [0, 0, 1]], [[0, 2, 5]]]


def test_drop_with_fewer_chunks_than_ranks_splits_the_chunk():
    """One chunk of 5 rows on 2 ranks: ranges [0, 2) and [2, 5); rank 1 is cut to 2 rows, row 4 is lost."""
    config = PlanConfig((5,), batch_size=2, chunk_size=10, preload_nchunks=2, shuffle=False, world_size=2,
                        equalize="drop")
    plans = rank_plans(config, 0)
    assert [epoch_rows(p).tolist() for p in plans] == [[0, 1], [2, 3]]
    assert [p.n_batches for p in plans] == [1, 1]
    assert [p.loads[0].runs.tolist() for p in plans] == [[[0, 0, 2]], [[0, 2, 4]]]


# ---------------------------------------------------------------------------
# concrete unshuffled plans, readable by eye: rows of each load in yield order
# ---------------------------------------------------------------------------

R = lambda a, b: list(range(a, b))  # noqa: E731

CASES = [
    pytest.param(dict(file_n_obs=(10,), batch_size=5, chunk_size=5, preload_nchunks=1),
                 [R(0, 5), R(5, 10)], 2, id="one-file-whole-batches"),
    pytest.param(dict(file_n_obs=(10,), batch_size=4, chunk_size=3, preload_nchunks=1),
                 [R(0, 4), R(4, 8), R(8, 10)], 3, id="load-rows-rounded-up-to-whole-batches"),
    pytest.param(dict(file_n_obs=(10,), batch_size=4, chunk_size=5, preload_nchunks=2, drop_last=True),
                 [R(0, 8)], 2, id="drop-last-floors"),
    pytest.param(dict(file_n_obs=(0, 3, 0, 4, 0), batch_size=2, chunk_size=2, preload_nchunks=1),
                 [[0, 1], [2, 3], [4, 5], [6]], 4, id="empty-files-among-others-load-spans-files"),
    pytest.param(dict(file_n_obs=(0, 0), batch_size=2, chunk_size=2, preload_nchunks=1),
                 [], 0, id="only-empty-files"),
    # 7 rows on 2 ranks: ranges [0, 3) and [3, 7); the chunk [2, 4) is split between the ranks
    pytest.param(dict(file_n_obs=(7,), batch_size=2, chunk_size=2, preload_nchunks=2, world_size=2, rank=0),
                 [[0, 1, 2]], 2, id="two-ranks-drop-rank0-whole-short-range"),
    pytest.param(dict(file_n_obs=(7,), batch_size=2, chunk_size=2, preload_nchunks=2, world_size=2, rank=1),
                 [[3, 4, 5]], 2, id="two-ranks-drop-rank1-cut-to-n-floordiv-w"),
    pytest.param(dict(file_n_obs=(7,), batch_size=2, chunk_size=2, preload_nchunks=2, world_size=2, rank=1,
                      drop_last=True),
                 [[3, 4]], 1, id="two-ranks-drop-then-drop-last"),
    pytest.param(dict(file_n_obs=(7,), batch_size=2, chunk_size=2, preload_nchunks=2, world_size=2, rank=0,
                      equalize="pad"),
                 [[0, 1, 2, 0]], 2, id="two-ranks-pad-rank0-repeats-own-first-row"),
    pytest.param(dict(file_n_obs=(7,), batch_size=2, chunk_size=2, preload_nchunks=2, world_size=2, rank=1,
                      equalize="pad"),
                 [[3, 4, 5, 6]], 2, id="two-ranks-pad-rank1-long-range-unpadded"),
    # 25 rows on 3 ranks: ranges [0, 8), [8, 16), [16, 25); load_rows 10
    pytest.param(dict(file_n_obs=(25,), batch_size=5, chunk_size=10, preload_nchunks=1, world_size=3, rank=1,
                      equalize="pad"),
                 [R(8, 16) + [8]], 2, id="three-ranks-pad-middle-rank-splits-two-chunks"),
    pytest.param(dict(file_n_obs=(25,), batch_size=5, chunk_size=10, preload_nchunks=1, world_size=3, rank=2,
                      equalize="pad"),
                 [R(16, 25)], 2, id="three-ranks-pad-last-rank-unpadded"),
    pytest.param(dict(file_n_obs=(25,), batch_size=5, chunk_size=10, preload_nchunks=1, world_size=3, rank=2),
                 [R(16, 24)], 2, id="three-ranks-drop-last-rank-loses-its-last-row"),
    # 11 rows in 2 files on 2 ranks: ranges [0, 5) and [5, 11), the second crossing into file 1 (row 10)
    pytest.param(dict(file_n_obs=(10, 1), batch_size=5, chunk_size=10, preload_nchunks=1, world_size=2, rank=1,
                      equalize="pad"),
                 [R(5, 11)], 2, id="pad-range-spans-files"),
    pytest.param(dict(file_n_obs=(10, 1), batch_size=5, chunk_size=10, preload_nchunks=1, world_size=2, rank=0,
                      equalize="pad"),
                 [R(0, 5) + [0]], 2, id="pad-range-inside-one-chunk"),
    pytest.param(dict(file_n_obs=(1, 0, 2), batch_size=2, chunk_size=2, preload_nchunks=1, world_size=3, rank=1),
                 [[1]], 1, id="as-many-rows-as-ranks"),
]


@pytest.mark.parametrize(("kwargs", "loads", "n_batches"), CASES)
def test_concrete_plans(kwargs, loads, n_batches):
    plan = plan_epoch(PlanConfig(shuffle=False, **kwargs), epoch=3)
    check_layout(plan)
    assert [plan.rows_of_load(load).tolist() for load in plan.loads] == loads
    assert plan.n_batches == n_batches


# ---------------------------------------------------------------------------
# 5: bad configs
# ---------------------------------------------------------------------------

GOOD = dict(file_n_obs=(10, 5), batch_size=4, chunk_size=3, preload_nchunks=2)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        pytest.param(dict(batch_size=0), "batch_size", id="batch_size-zero"),
        pytest.param(dict(batch_size=True), "batch_size", id="batch_size-bool"),
        pytest.param(dict(chunk_size=-1), "chunk_size", id="chunk_size-negative"),
        pytest.param(dict(preload_nchunks=1.5), "preload_nchunks", id="preload_nchunks-float"),
        pytest.param(dict(world_size=0), "world_size", id="world_size-zero"),
        pytest.param(dict(rank=2, world_size=2), "rank", id="rank-equals-world_size"),
        pytest.param(dict(rank=-1), "rank", id="rank-negative"),
        pytest.param(dict(equalize="x"), "equalize", id="equalize-unknown"),
        pytest.param(dict(file_n_obs=(10, -1)), "file_n_obs|file sizes", id="file-size-negative"),
    ],
)
def test_bad_config_raises_value_error_naming_the_argument(change, name):
    with pytest.raises(ValueError, match=name):
        PlanConfig(**{**GOOD, **change})


def test_numpy_integers_are_accepted():
    config = PlanConfig((np.int64(10),), batch_size=np.int32(4), chunk_size=np.int64(3), preload_nchunks=np.int8(2))
    check_layout(plan_epoch(config, 0))


# ---------------------------------------------------------------------------
# 6: load_permutation
# ---------------------------------------------------------------------------


@PROPS
@given(seed=seeds, epoch=epochs, load_index=st.integers(0, 10_000), n=st.integers(0, 300), shuffle=st.booleans())
def test_load_permutation_is_a_deterministic_permutation(seed, epoch, load_index, n, shuffle):
    config = PlanConfig((n,), batch_size=1, chunk_size=1, preload_nchunks=1, shuffle=shuffle, seed=seed)
    perm = load_permutation(config, epoch, load_index, n)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    np.testing.assert_array_equal(perm, load_permutation(config, epoch, load_index, n))
    if not shuffle:
        np.testing.assert_array_equal(perm, np.arange(n))
    elif n >= 20:  # another load of the same epoch is permuted independently (chance 1/20!)
        assert not np.array_equal(perm, load_permutation(config, epoch, load_index + 1, n))


# ------------------------------------------------------------------ at scale


@pytest.mark.parametrize("subset", [False, True])
def test_planning_work_and_memory_grow_with_the_chunks_not_loads_times_chunks(monkeypatch, subset):
    # Measured as work and bytes, not time: a cumulative sum over every chunk for every load made an
    # epoch of 100M cells (3M chunks, 12k loads) take 148 s to plan.
    import tracemalloc

    from arrayloaders.loading import plan as plan_module

    config = PlanConfig(tuple([50_000] * 20), batch_size=256, chunk_size=32, preload_nchunks=8)  # 1M cells
    n_chunks = 20 * -(-50_000 // 32)
    cells = np.arange(0, 1_000_000, 3) if subset else None
    if subset:
        config = dataclasses.replace(config, n_selected=cells.size)
    summed = []
    cumsum = np.cumsum
    monkeypatch.setattr(plan_module.np, "cumsum", lambda a, *args, **kw: summed.append(np.size(a)) or cumsum(a, *args, **kw))
    tracemalloc.start()
    try:
        plan = plan_epoch(config, 0, cells)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan.loads) > 1000
    assert sum(summed) <= 4 * n_chunks, f"{sum(summed)} elements summed for {n_chunks} chunks"
    assert peak <= 200 * n_chunks + (8 * cells.size if subset else 0) + 2**20, f"peak {peak} B for {n_chunks} chunks"
