"""ClassRunSampler (arrayloaders.loading.class_runs): class-balanced runs of one class, alone and through a dataset's workers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_bit_identical, read_sources

from arrayloaders import ClassRunSampler, ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.example_data import make_example_adata

# Class-runs of five classes, cut by unlabelled cells (-1): class 4 has only 10 cells, fewer than a run.
GROUPS = [(0, 700), (-1, 5), (0, 300), (1, 300), (2, 50), (-1, 40), (3, 2000), (1, 120), (4, 10), (2, 75)]
LABELS = np.concatenate([np.full(n, c) for c, n in GROUPS])


def draw(sampler: ClassRunSampler, seed: int) -> np.ndarray:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.fromiter(iter(sampler), dtype=np.int64)


@pytest.mark.parametrize("run_size", [1, 8, 32])
def test_runs_are_consecutive_cells_of_one_class_and_windows_mix_whole_runs(run_size):
    window = 4
    sampler = ClassRunSampler(LABELS, run_size, num_samples=3001, window=window)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rows, sizes = sampler.draw_runs()
        mixed = sampler.mix(rows.copy(), sizes)
    assert rows.size == mixed.size == len(sampler) == 3001 and sizes.sum() >= 3001
    ends = np.cumsum(sizes)
    class_run = np.repeat([n for _, n in GROUPS], [n for _, n in GROUPS])  # length of each cell's class-run
    for run in np.split(rows, ends[ends < rows.size]):
        assert (np.diff(run) == 1).all() and (LABELS[run] == LABELS[run[0]]).all() and LABELS[run[0]] >= 0
    for size, run in zip(sizes, np.split(rows, ends[ends < rows.size])):
        assert size == min(run_size, class_run[run[0]])  # shorter only where the class-run is
    # Each window of `window` whole runs is shuffled within itself, and only within.
    bounds = np.concatenate([[0], ends])[::window].tolist() + [rows.size]
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert sorted(mixed[a:b]) == sorted(rows[a:b])
    if run_size > 1:
        assert not np.array_equal(mixed, rows)


def test_each_class_gets_an_equal_share_of_cells_within_sampling_error():
    run_size, n = 32, 400_000
    sampler = ClassRunSampler(LABELS, run_size, num_samples=n)
    counts = np.bincount(LABELS[draw(sampler, 1)], minlength=5)
    share = counts / n
    runs = n / run_size  # shares vary by whole runs: bound by the runs' count, not the cells'
    assert np.abs(share - 0.2).max() < 5 * np.sqrt(0.2 * 0.8 / runs), share
    # Without correcting for short class-runs, class 4 (10 cells a draw) would get ~10/32 of its share.


def test_class_weights_set_the_shares_and_zero_excludes():
    sampler = ClassRunSampler(LABELS, 16, num_samples=200_000, class_weights=[1, 2, 0, 1, 0])
    counts = np.bincount(LABELS[draw(sampler, 2)], minlength=5)
    assert counts[2] == counts[4] == 0
    share = counts / counts.sum()
    assert np.abs(share - [0.25, 0.5, 0, 0.25, 0]).max() < 0.02, share


def test_the_same_seed_gives_the_same_sequence_and_another_seed_another():
    sampler = ClassRunSampler(LABELS, 8, window=3)
    assert np.array_equal(draw(sampler, 5), draw(sampler, 5))
    assert not np.array_equal(draw(sampler, 5), draw(sampler, 6))
    assert len(sampler) == (LABELS >= 0).sum()  # default: as many cells as can be drawn


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.array([0.5, 1.0])}, "integer class code"),
        ({"run_size": 0}, "run_size and window must be at least 1"),
        ({"class_weights": [1, 1]}, "5 or more finite weights"),
        ({"class_weights": [1, 1, 1, 1, 1, 1]}, "class code 5, which has no cells"),
        ({"labels": np.full(10, -1)}, "no cells to draw"),
        ({"labels": np.array([], dtype=np.int64)}, "labels is empty"),
        ({"num_samples": 0}, "num_samples must be at least 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    kwargs = {"labels": LABELS, "run_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        ClassRunSampler(**kwargs)


def test_labels_not_grouped_by_class_warn():
    labels = np.random.default_rng(0).integers(0, 5, 1000)
    with pytest.warns(UserWarning, match="not grouped by class"):
        ClassRunSampler(labels, 32)


# --------------------------------------------------------------------------- through a dataset


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A store converted without shuffling from an .h5ad sorted by cell type, and that .h5ad."""
    root = tmp_path_factory.mktemp("grouped")
    adata = make_example_adata(1500, 300, seed=11, nnz_per_cell=30)
    adata = adata[np.argsort(adata.obs["cell_type"].to_numpy(), kind="stable")].copy()
    adata.write_h5ad(root / "by_type.h5ad")
    store = create_store_from_h5ads([root / "by_type.h5ad"], root / "store", shuffle=False, n_obs_per_file=600,
                                    progress=False)  # fmt: skip
    return store, root / "by_type.h5ad"


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_balanced_runs_through_workers_and_ranks_with_source_values(grouped, num_workers, world_size):
    store, h5ad = grouped
    source = read_sources([h5ad])
    kw = dict(batch_size=64, chunk_size=16, preload_nchunks=8, return_index=True)
    per_rank = []
    for rank in range(world_size):
        with ZarrSparseDataset(**kw, num_workers=num_workers, rank=rank, world_size=world_size) as ds:
            ds.add_store(store, obs_keys="cell_type")
            balanced = ds.subset(sampler=ds.class_run_sampler("cell_type", num_samples=6000))
            rows, labels = [], []
            for X, y, i in balanced:
                rows.append(i.numpy())
                labels.append(y.numpy())
                got = sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=X.shape)
                assert_bit_identical(got, source.X[i.numpy()])
            per_rank.append(np.concatenate(rows))
            codes = np.concatenate(labels)
            names = np.array(ds.categories["cell_type"], dtype=object)
            assert (names[codes] == source.obs["cell_type"].astype(str).to_numpy()[per_rank[-1]]).all()
    sequence = np.concatenate(per_rank)
    assert sequence.size == 6000 - 6000 % world_size
    counts = np.unique(source.obs["cell_type"].to_numpy()[sequence], return_counts=True)[1]
    k = counts.size
    # 6000 cells in runs of 16: 375 runs; each class's share within 5 sd of 1/k.
    assert np.abs(counts / sequence.size - 1 / k).max() < 5 * np.sqrt((1 / k) * (1 - 1 / k) / 375), counts


def test_the_sequence_is_the_same_for_any_num_workers_and_differs_by_epoch(grouped):
    store, _ = grouped
    epochs = {}
    for w in (0, 2):
        with ZarrSparseDataset(64, 16, 8, num_workers=w, return_index=True).add_store(store, obs_keys="cell_type") as ds:
            balanced = ds.subset(sampler=ds.class_run_sampler("cell_type"))
            epochs[w] = []
            for e in range(2):
                balanced.set_epoch(e)
                epochs[w].append(np.concatenate([i.numpy() for _, _, i in balanced]))
    assert all(np.array_equal(a, b) for a, b in zip(epochs[0], epochs[2]))
    assert not np.array_equal(epochs[0][0], epochs[0][1])


def test_a_subset_draws_only_its_cells(grouped):
    store, _ = grouped
    with ZarrSparseDataset(64, 16, 8, return_index=True).add_store(store, obs_keys="cell_type") as ds:
        train, _ = ds.split(0.7, seed=3)
        with pytest.warns(UserWarning, match="hold 5.8 cells on average"):  # a random 70 %: class-runs are cut
            sampler = train.class_run_sampler("cell_type")
        rows = np.concatenate([i.numpy() for _, _, i in train.subset(sampler=sampler)])
        assert np.isin(rows, train.cells).all()
        with pytest.raises(ValueError, match="'batch' is not among the obs_keys"):
            ds.class_run_sampler("batch")
