"""Selecting cells: subsets (cells=), samplers (sampler=), split(), class_weights(), with real workers.

Values are compared bit for bit with the store read by plain anndata.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import SIZES, assert_bit_identical, in_the_ring, read_store, worker_pids
from scipy.stats import chi2 as chi2_dist

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset

N = sum(SIZES)
KW = {"batch_size": 50, "chunk_size": 8, "preload_nchunks": 12, "return_index": True}


def make(store, num_workers=0, cls=ZarrSparseDataset, **kw):
    return cls(**{**KW, "num_workers": num_workers, **kw}).add_store(store, obs_keys="cell_type")


@pytest.fixture(scope="module")
def truth(store):
    st = read_store(store)
    return st.X, st.obs["cell_type"].astype(str).to_numpy()


def epoch(ds):
    """(X rows as one CSR matrix, labels, global rows) of one loop."""
    xs, ys, rows = [], [], []
    for X, y, i in ds:
        xs.append(sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=X.shape)
                  if X.layout == torch.sparse_csr else sp.csr_matrix(X.numpy()))  # fmt: skip
        ys.append(y.numpy())
        rows.append(i.numpy())
    return sp.vstack(xs, format="csr"), np.concatenate(ys), np.concatenate(rows)


def check_values(ds, X, y, rows, truth):
    X_true, labels = truth
    assert_bit_identical(X, X_true[rows])
    assert (np.array(ds.categories["cell_type"], dtype=object)[y] == labels[rows]).all()


# --------------------------------------------------------------------------- cells=


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("kind", ["mask", "indices"])
def test_a_subset_is_yielded_exactly_once_with_source_values(store, truth, num_workers, world_size, kind):
    rng = np.random.default_rng(world_size)
    mask = rng.random(N) < 0.6
    cells = mask if kind == "mask" else rng.permutation(np.flatnonzero(mask))  # any order
    per_rank = []
    for rank in range(world_size):
        with make(store, num_workers, cells=cells, rank=rank, world_size=world_size) as ds:
            X, y, rows = epoch(ds)
            check_values(ds, X, y, rows, truth)
            assert rows.size == mask.sum() // world_size and len(ds) == -(-rows.size // 50)
            per_rank.append(rows)
    everything = np.concatenate(per_rank)
    assert np.unique(everything).size == everything.size  # once, and ranks disjoint
    assert mask[everything].all() and mask.sum() - everything.size < world_size


def test_a_subset_epoch_differs_by_epoch_and_is_the_same_for_any_num_workers(store):
    cells = np.arange(0, N, 3)
    runs = {}
    for w in (0, 2):
        with make(store, w, cells=cells) as ds:
            runs[w] = [epoch(ds)[2] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(runs[2], runs[0]))
    assert not np.array_equal(runs[0][0], runs[0][1])


def test_a_dense_subset(store, truth):
    with make(store, 2, cls=ZarrDenseDataset, cells=np.arange(100, 700)) as ds:
        X, y, rows = epoch(ds)
    assert np.array_equal(np.sort(rows), np.arange(100, 700))
    check_values(ds, X, y, rows, truth)


@pytest.mark.parametrize(
    ("cells", "error", "message"),
    [
        (np.ones(N - 1, dtype=bool), ValueError, "boolean mask of shape .999,.; the dataset has 1000 cells"),
        (np.array([0, 5, N]), IndexError, "row 1000, outside the dataset's 1000 cells"),
        (np.array([-1, 5]), IndexError, "row -1, outside"),
        (np.array([3, 3]), ValueError, "repeats rows; .* use sampler="),
        (np.zeros(N, dtype=bool), ValueError, "selects no cells"),
        (np.array([0.5, 1.5]), ValueError, "boolean mask or a 1-d array of row indices"),
    ],
    ids=["short-mask", "too-big", "negative", "repeats", "empty", "floats"],
)
def test_bad_cells_are_refused_with_what_is_wrong(store, cells, error, message):
    with pytest.raises(error, match=message):
        len(make(store, cells=cells))


def test_cells_and_sampler_together_are_refused():
    with pytest.raises(ValueError, match="cells= .* or sampler= .* not both"):
        ZarrSparseDataset(cells=[1, 2], sampler=[1, 2])


# --------------------------------------------------------------------------- sampler=


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sampler_sequence_is_yielded_in_its_order_repeats_included(store, truth, num_workers):
    rng = np.random.default_rng(0)
    sequence = np.concatenate([rng.integers(0, N, 300), [7] * 40, rng.integers(0, 20, 160)])  # repeats
    with make(store, num_workers, sampler=sequence.tolist()) as ds:
        assert len(ds) == 10
        for _ in range(2):  # a list gives the same sequence every epoch
            X, y, rows = epoch(ds)
            np.testing.assert_array_equal(rows, sequence)
            check_values(ds, X, y, rows, truth)


def test_torch_samplers_are_deterministic_per_epoch_and_resume_exactly(store):
    weights = torch.rand(N, generator=torch.Generator().manual_seed(0))

    def sampler():
        return torch.utils.data.WeightedRandomSampler(weights, num_samples=700)  # draws from torch's global RNG

    with make(store, 2, sampler=sampler()) as a, make(store, 0, sampler=sampler()) as b:
        first, second = epoch(a)[2], epoch(a)[2]
        torch.manual_seed(12345)  # the user's own RNG use does not change the epochs
        np.testing.assert_array_equal(epoch(b)[2], first)
        assert not np.array_equal(first, second)
        it = iter(b)  # epoch 1, stopped after 5 batches
        head = np.concatenate([next(it)[2].numpy() for _ in range(5)])
        state = b.state_dict()
    with make(store, 2, sampler=sampler()) as c:
        c.load_state_dict(state)
        np.testing.assert_array_equal(np.concatenate([head, epoch(c)[2]]), second)


def test_sampler_indices_out_of_range_are_refused(store):
    with pytest.raises(IndexError, match="sampler yielded index 1000 in epoch 0, outside the dataset's 1000 cells"):
        next(iter(make(store, sampler=[1, 2, N])))


def test_a_sampler_whose_length_lies_is_refused(store):
    class Liar(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(range(10))

        def __len__(self):
            return 20

    with pytest.raises(ValueError, match="yielded 10 indices in epoch 0, but len.sampler. is 20"):
        next(iter(make(store, sampler=Liar())))


def test_a_sampler_without_a_length_or_that_is_an_iterator_is_refused():
    with pytest.raises(ValueError, match="sampler must have a length"):
        ZarrSparseDataset(sampler=(i for i in range(3)))

    class OneShot:  # an iterator with a length: a second epoch would get nothing
        def __len__(self):
            return 2

        def __iter__(self):
            return self

        def __next__(self):
            raise StopIteration

    with pytest.raises(ValueError, match="re-iterable"):
        ZarrSparseDataset(sampler=OneShot())


# --------------------------------------------------------------------------- class balance, split


def test_class_weights_balance_the_classes(store, truth):
    _, labels = truth
    ds = make(store)
    weights = ds.class_weights("cell_type")
    assert weights.dtype == torch.float64 and weights.shape == (N,)
    classes = np.unique(labels)
    totals = [weights.numpy()[labels == c].sum() for c in classes]
    np.testing.assert_allclose(totals, 1.0)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=6000)
    balanced = ds.subset(sampler=sampler)
    _, y, rows = epoch(balanced)
    counts = np.array([(labels[rows] == c).sum() for c in classes])
    # Each class is drawn with probability 1/k: a chi-square test at p = 0.001 (the seed is fixed).
    expected = rows.size / classes.size
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < chi2_dist.ppf(0.999, classes.size - 1), counts
    natural = np.array([(labels == c).sum() for c in classes])
    assert natural.max() > 1.5 * natural.min()  # the store is unbalanced, so balancing did something


def test_class_weights_of_a_subset_are_zero_outside_it(store):
    ds = make(store, cells=np.arange(0, N, 2))
    w = ds.class_weights("cell_type").numpy()
    assert (w[1::2] == 0).all() and (w[::2] > 0).all()
    with pytest.raises(ValueError, match="'batch' is not among the obs_keys"):
        ds.class_weights("batch")


def test_split_gives_disjoint_subsets_covering_the_cells_and_shares_the_workers(store, truth):
    ds = make(store, 2)
    train, val = ds.split(0.8, seed=1)
    assert train.n_cells == 800 and val.n_cells == 200
    assert np.intersect1d(train.cells, val.cells).size == 0
    np.testing.assert_array_equal(np.union1d(train.cells, val.cells), np.arange(N))
    a, b = ds.split(0.8, seed=1)
    np.testing.assert_array_equal(a.cells, train.cells)
    X, y, rows = epoch(train)
    pids = worker_pids()
    assert sorted(rows) == list(train.cells)
    check_values(train, X, y, rows, truth)
    X, y, rows = epoch(val)
    assert sorted(rows) == list(val.cells) and worker_pids() == pids  # the same workers
    check_values(val, X, y, rows, truth)
    train.close()
    assert worker_pids() == []


# --------------------------------------------------------------------------- stores not shuffled at conversion


@pytest.fixture(scope="module")
def sorted_store(h5ads, tmp_path_factory):
    """The same cells, converted without shuffling: each input file's cells are contiguous."""
    from arrayloaders import create_store_from_h5ads

    out = tmp_path_factory.mktemp("sorted") / "store"
    return create_store_from_h5ads(h5ads, out, shuffle=False, n_obs_per_file=256, progress=False)


def batch_label_tv(rows_per_batch: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each batch's label mix and the whole store's."""
    k = labels.max() + 1
    p = np.bincount(labels, minlength=k) / labels.size
    return float(np.mean([0.5 * np.abs(np.bincount(labels[r], minlength=k) / r.size - p).sum() for r in rows_per_batch]))


def test_batches_of_a_sorted_store_mix_as_well_as_random_ones_at_the_defaults():
    # 200,000 cells from 8 samples stored one after the other, the default sizes: the labels of a batch
    # (its sample) must mix within 1.5x of random batches' (one load per batch: ~3.9x).
    from arrayloaders.loading.plan import PlanConfig, plan_epoch

    labels = np.repeat(np.arange(8), 25_000)
    tv = {}
    for window in (1, 8):
        plan = plan_epoch(PlanConfig((25_000,) * 8, 4096, 32, 256, window=window), 0)
        batches = []
        for w in range((len(plan.loads) + window - 1) // window):
            rows = np.concatenate([plan.rows_of_load(plan.loads[i]) for i in plan.window_loads(w)])
            order = plan.window_order(w)
            rows = rows if order is None else rows[order]
            batches += [rows[b : b + 4096] for b in range(0, rows.size - 4095, 4096)]
        tv[window] = batch_label_tv(batches, labels)
    random = np.mean([batch_label_tv(np.split(np.random.default_rng(s).permutation(labels.size)[:196_608], 48), labels)
                      for s in range(5)])  # fmt: skip
    assert tv[8] < 1.5 * random < tv[1] / 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sorted_store_mixes_a_window_of_loads_exactly_once_with_source_values(sorted_store, num_workers):
    truth = read_store(sorted_store)
    truth = (truth.X, truth.obs["cell_type"].astype(str).to_numpy())
    with make(sorted_store, num_workers) as ds:
        assert ds._plan_config().window == 8  # not shuffled at conversion: batches mix 8 loads
        first = epoch(ds)
        X, y, rows = first
        assert np.array_equal(np.sort(rows), np.arange(N))
        check_values(ds, X, y, rows, truth)
        second = epoch(ds)
    with make(sorted_store, 0) as ref:
        np.testing.assert_array_equal(epoch(ref)[2], rows)  # the same batches for any num_workers
        np.testing.assert_array_equal(epoch(ref)[2], second[2])
    assert not np.array_equal(rows, second[2])


def test_stores_shuffled_at_conversion_keep_zero_copy_batches(store, sorted_store):
    assert make(store)._plan_config().window == 1
    assert make(sorted_store, window=1)._plan_config().window == 1
    import anndata as ad
    import zarr

    adatas = [ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"])) for p in sorted(store.glob("chunk_*.zarr"))]
    assert ZarrSparseDataset().add_anndatas(adatas)._plan_config().window == 1  # its manifest says shuffled
    with pytest.raises(ValueError, match="window must be a positive integer"):
        ZarrSparseDataset(window=0)
    # zero copy: a shuffled store's batches are views of the ring; a window of loads gathers its rows (a copy)
    for path, viewed in ((store, True), (sorted_store, False)):
        with make(path, 1) as ds:
            X, _, _ = next(iter(ds))
            assert [in_the_ring(X.values()), in_the_ring(X.col_indices())] == [viewed, viewed]
