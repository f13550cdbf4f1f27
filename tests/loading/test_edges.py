"""Trust at the edges: missing labels, checkpoints and store identity, sampler output, size changes before a
checkpoint, selections in derived datasets and the data module, and messages that say what is wrong.

Each test here failed on the code before it (the issue "Trust III" lists what each one covers).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import read_store

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset, create_store_from_h5ads, read_manifest
from arrayloaders.example_data import make_example_adata

N_CELLS = 240


@pytest.fixture(scope="module")
def labelled_h5ads(tmp_path_factory) -> list[Path]:
    """Two inputs whose obs has numeric labels with missing values: a float with NaN, and an Int64 (nullable)
    column with pd.NA, which the converter writes as it is."""
    d = tmp_path_factory.mktemp("labelled")
    paths = []
    for i, n in enumerate((130, 110)):
        a = make_example_adata(n, 30, nnz_per_cell=6, seed=i, name_prefix=f"l{i}")
        rng = np.random.default_rng(i)
        donor = pd.array(rng.integers(0, 3, n), dtype="Int64")
        donor[rng.random(n) < 0.25] = pd.NA
        a.obs["donor"] = donor
        score = rng.integers(0, 4, n).astype(np.float64)
        score[rng.random(n) < 0.2] = np.nan
        a.obs["score"] = score
        a.layers["counts"] = a.X.copy()
        a.obsm["X_pca"] = rng.random((n, 3)).astype(np.float32)
        paths.append(d / f"in_{i}.h5ad")
        a.write_h5ad(paths[-1])
    return paths


@pytest.fixture(scope="module")
def labelled(labelled_h5ads, tmp_path_factory) -> Path:
    return create_store_from_h5ads(labelled_h5ads, tmp_path_factory.mktemp("ls") / "s", n_obs_per_file=100, progress=False)


def make(store, **kw) -> ZarrSparseDataset:
    kw = {"batch_size": 16, "chunk_size": 4, "preload_nchunks": 5, "num_workers": 0, "return_index": True, **kw}
    add = {k: kw.pop(k) for k in ("obs_keys", "obs_codes", "obsm_keys") if k in kw}
    return ZarrSparseDataset(**kw).add_store(store, **add)


def rows_of(batches) -> np.ndarray:
    return np.concatenate([b[-1].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- 1. missing numeric labels are missing


def _truth_labels(store: Path, key: str) -> pd.Series:
    return read_store(store).obs[key].reset_index(drop=True)


@pytest.mark.parametrize("key", ["donor", "score"])  # Int64 with pd.NA; float64 with NaN
@pytest.mark.parametrize("codes", [False, True])
def test_missing_numeric_labels_weigh_nothing_and_are_never_drawn(labelled, key, codes):
    truth = _truth_labels(labelled, key)
    missing = truth.isna().to_numpy()
    assert 0 < missing.sum() < len(truth)
    ds = make(labelled, obs_keys=[key], obs_codes=[key] if codes else None)
    weights = ds.class_weights(key).numpy()
    assert (weights[missing] == 0).all()
    present = truth[~missing].to_numpy()
    for value in np.unique(present):  # every class weighs 1 in all, none more
        assert weights[~missing][present == value].sum() == pytest.approx(1.0)
    assert weights.sum() == pytest.approx(len(np.unique(present)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a shuffled store: runs are single cells
        sampler = ds.class_run_sampler(key, num_samples=500)
    torch.manual_seed(0)
    drawn = np.fromiter(iter(sampler), dtype=np.int64)
    assert drawn.size == 500 and not missing[drawn].any()
    assert set(truth[drawn].astype(float)) == set(present.astype(float))


# --------------------------------------------------------------------------- 2. a checkpoint resumes only its store


@pytest.fixture(scope="module")
def reconverted(labelled_h5ads, tmp_path_factory) -> Path:
    """The same inputs converted again, with another seed: the same file sizes, other cells in each."""
    return create_store_from_h5ads(
        labelled_h5ads, tmp_path_factory.mktemp("ls2") / "s", n_obs_per_file=100, seed=1, progress=False
    )


def test_every_conversion_gets_its_own_store_id(labelled, reconverted):
    a, b = read_manifest(labelled), read_manifest(reconverted)
    assert a.store_id and b.store_id and a.store_id != b.store_id
    assert [f["n_obs"] for f in a.files] == [f["n_obs"] for f in b.files]


def _mid_epoch_state(ds, k=3) -> dict:
    it = iter(ds)
    for _ in range(k):
        next(it)
    state = ds.state_dict()
    it.close()
    return state


def test_a_checkpoint_of_another_store_is_refused(labelled, reconverted):
    state = _mid_epoch_state(make(labelled))
    assert json.loads(json.dumps(state)) == state  # plain JSON
    other = make(reconverted)
    with pytest.raises(ValueError, match=r"saved on other data \(store [0-9a-f]{32}\).*a state resumes only the stores"):
        other.load_state_dict(state)
    same = make(labelled)
    same.load_state_dict(state)  # the same store, at another path too, is accepted
    assert same.state_dict()["batches_yielded"] == 3


def test_a_store_moved_elsewhere_keeps_its_identity(labelled, tmp_path):
    import shutil

    state = _mid_epoch_state(make(labelled))
    moved = Path(shutil.copytree(labelled, tmp_path / "moved"))
    ds = make(moved)
    ds.load_state_dict(state)
    rest = rows_of(list(ds))
    whole = make(labelled)
    np.testing.assert_array_equal(rest, rows_of(list(whole))[3 * 16 :])


def test_a_checkpoint_of_other_anndata_objects_of_the_same_sizes_is_refused(labelled, reconverted):
    def added(store):
        files = [store / f["name"] for f in read_manifest(store).files]
        adatas = [ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]), obs=ad.io.read_elem(zarr.open(p)["obs"]),
                             var=ad.io.read_elem(zarr.open(p)["var"])) for p in files]  # fmt: skip
        return ZarrSparseDataset(16, 4, 5, num_workers=0).add_anndatas(adatas)

    state = _mid_epoch_state(added(labelled))
    with pytest.raises(ValueError, match=r"saved on other data \(3 AnnData objects sha1"):
        added(reconverted).load_state_dict(state)
    added(labelled).load_state_dict(state)


def test_a_state_saved_before_store_identities_warns_and_resumes(labelled):
    state = _mid_epoch_state(make(labelled))
    del state["settings"]["data"]
    ds = make(labelled)
    with pytest.warns(UserWarning, match="records no identity of its data"):
        ds.load_state_dict(state)
    assert ds.state_dict()["batches_yielded"] == 3


@pytest.mark.parametrize("state", [{}, {"epoch": 0}, None, {"train": {}}])
def test_what_is_not_a_state_is_refused_in_one_line(labelled, state):
    with pytest.raises(ValueError, match=r"cannot resume: not a state_dict\(\) of a ZarrSparseDataset \(it lacks"):
        make(labelled).load_state_dict(state)


# --------------------------------------------------------------------------- 3. a sampler yields row indices


class _Yielding(torch.utils.data.Sampler):
    def __init__(self, values):
        self.values = values

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


@pytest.mark.parametrize(
    ("sampler", "message"),
    [
        (np.array([0.5, 3.7, 9.0]), r"float64 values such as 0\.5"),
        (torch.tensor([1.0, 2.0, 3.0]), r"float32 values such as 1\.0"),
        ([1.0, 2.0], r"1\.0 \(float\)"),
        (np.zeros(N_CELLS, dtype=bool), r"a boolean mask \(240 entries\)"),
        (torch.ones(N_CELLS, dtype=torch.bool), r"a boolean mask \(240 entries\)"),
        ([True, False, True], r"a boolean mask \(3 entries\)"),
        (_Yielding([3, 4.5]), r"4\.5 \(float\)"),
        (_Yielding([torch.tensor(1.5)]), r"tensor\(1\.5000\) \(Tensor\)"),
        (_Yielding([np.True_]), r"a boolean mask \(1 entries\)"),
        (_Yielding([True, False]), r"a boolean mask \(2 entries\)"),
        (_Yielding([4, np.True_, "x"]), r"the boolean (np\.)?True"),
    ],
)
def test_sampler_output_that_is_not_row_indices_is_refused(labelled, sampler, message):
    ds = make(labelled, sampler=sampler)
    with pytest.raises(ValueError, match=r"the sampler yielded .*" + message + r".* in epoch 0; a sampler yields row"):
        next(iter(ds))


@pytest.mark.parametrize("sampler", [np.zeros((4, 2), np.int64), torch.zeros((3, 3), dtype=torch.int64)])
def test_a_2d_sampler_is_refused_at_construction(sampler):
    with pytest.raises(ValueError, match=r"sampler is an array of shape \(\d, \d\); a sampler of row indices is 1-d"):
        ZarrSparseDataset(16, sampler=sampler)


@pytest.mark.parametrize("make_sampler", [
    lambda: np.array([1, 2**64 - 1], dtype=np.uint64), lambda: _Yielding([1, 2**64 - 1]), lambda: _Yielding([2**70]),
    lambda: _Yielding([-1, 2**64 - 1]),
])  # fmt: skip
def test_sampler_indices_beyond_int64_are_refused_not_wrapped(labelled, make_sampler):
    with pytest.raises(IndexError, match=r"the sampler yielded index \d{19,}.* outside the dataset's 240 cells"):
        next(iter(make(labelled, sampler=make_sampler())))


@pytest.mark.parametrize("sampler", [
    np.array([5, 1, 1, 7], dtype=np.uint32), torch.tensor([5, 1, 1, 7]), _Yielding([np.int16(5), 1, torch.tensor(1), 7]),
])  # fmt: skip
def test_integer_samplers_of_any_kind_are_read_as_rows(labelled, sampler):
    assert rows_of(list(make(labelled, sampler=sampler))).tolist() == [5, 1, 1, 7]


# --------------------------------------------------------------------------- 4. a size changed before a checkpoint


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("change", [{"batch_size": 40}, {"batch_size": 7}, {"chunk_size": 9, "drop_last": True}])
def test_a_size_changed_while_a_loop_runs_resumes_exactly(labelled, num_workers, change):
    # The uninterrupted run: the loop keeps its sizes to its epoch's end, the next epoch takes the new ones.
    with make(labelled, num_workers=num_workers) as ds:
        it = iter(ds)
        head = [next(it) for _ in range(3)]
        for k, v in change.items():
            setattr(ds, k, v)
        state = ds.state_dict()
        assert state["settings"]["batch_size"] == 16  # the running loop's
        rest = list(it)
        assert len(head) + len(rest) == -(-N_CELLS // 16)
        following = list(ds)
    # Resumed in a fresh dataset made with the new sizes.
    with make(labelled, num_workers=2 - num_workers, **change) as resumed:
        resumed.load_state_dict(state)
        assert len(resumed) == len(head) + len(rest)  # the restored epoch's batches
        got = list(resumed)
        np.testing.assert_array_equal(rows_of(got), rows_of(rest))
        for a, b in zip(got, rest):
            assert torch.equal(a[0].to_dense(), b[0].to_dense())
        np.testing.assert_array_equal(rows_of(list(resumed)), rows_of(following))  # then the new sizes
    np.testing.assert_array_equal(np.sort(np.r_[rows_of(head), rows_of(rest)]), np.arange(N_CELLS))


def test_a_state_taken_at_an_epoch_start_after_a_change_uses_the_new_sizes(labelled):
    ds = make(labelled)
    list(ds)
    ds.batch_size = 40
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["batches_yielded"] == 0 and state["settings"]["batch_size"] == 40
    other = make(labelled, batch_size=40)
    other.load_state_dict(state)
    np.testing.assert_array_equal(rows_of(list(other)), rows_of(list(ds)))


def test_a_peek_after_load_state_dict_keeps_the_restored_sizes(labelled):
    ds = make(labelled)
    state = _mid_epoch_state(ds, 2)
    new = make(labelled, batch_size=50)
    new.load_state_dict(state)
    peek = next(iter(new))  # a peek: the next loop starts at the restored position again
    assert peek[0].shape[0] == 16
    assert new.state_dict()["settings"]["batch_size"] == 16
    assert len(list(new)) == -(-N_CELLS // 16) - 2


# --------------------------------------------------------------------------- 7. subsets narrow


def test_a_subset_of_a_split_stays_within_it(labelled):
    train, val = make(labelled, obs_keys="donor").split(0.75, seed=3)
    inside = train.cells[:10]
    assert train.subset(cells=inside).cells.tolist() == inside.tolist()
    assert train.subset().cells.tolist() == train.cells.tolist()  # no argument: the parent's selection
    with pytest.raises(ValueError, match=rf"cells holds row {val.cells[0]}, outside the selection of the dataset"):
        train.subset(cells=[inside[0], val.cells[0]])
    mask = np.zeros(N_CELLS, bool)
    mask[val.cells] = True
    with pytest.raises(ValueError, match="outside the selection"):
        train.subset(cells=mask)
    # a sampler of a subset draws from it too, checked each epoch
    leaking = train.subset(sampler=[int(inside[0]), int(val.cells[0])])
    with pytest.raises(ValueError, match=rf"the sampler yielded index {val.cells[0]} in epoch 0, outside the selection"):
        next(iter(leaking))
    ok = train.subset(sampler=[int(inside[1]), int(inside[0])])
    assert rows_of(list(ok)).tolist() == [inside[1], inside[0]]
    # and a split of a subset stays in it
    a, b = train.split(0.5)
    assert set(a.cells) | set(b.cells) == set(train.cells)
    assert set(ok.class_weights("donor").numpy().nonzero()[0]) <= set(train.cells)  # weights: 0 outside


def test_a_dataset_with_a_sampler_cannot_be_narrowed(labelled):
    ds = make(labelled, sampler=[1, 2, 3])
    with pytest.raises(ValueError, match="subset\\(\\) narrows a selection of cells; this dataset draws with a sampler"):
        ds.subset(cells=[1])
    with pytest.raises(ValueError, match="split\\(\\) divides cells"):
        ds.split(0.5)


# --------------------------------------------------------------------------- 11. split as random_split


def test_split_with_a_list_of_fractions_gives_disjoint_parts_as_random_split_sizes_them(labelled):
    parts = make(labelled).split([0.8, 0.1, 0.1], seed=1)
    assert [p.n_cells for p in parts] == [192, 24, 24]
    assert sorted(np.concatenate([p.cells for p in parts]).tolist()) == list(range(N_CELLS))
    uneven = make(labelled).split([0.33, 0.33, 0.34])  # floors 79, 79, 81: one left, to the first
    assert [p.n_cells for p in uneven] == [80, 79, 81]
    again = make(labelled).split([0.8, 0.1, 0.1], seed=1)
    assert all((a.cells == b.cells).all() for a, b in zip(parts, again))
    nested = parts[0].split([0.5, 0.5])
    assert set(np.concatenate([p.cells for p in nested])) == set(parts[0].cells)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        (0.0001, r"split\(0\.0001\): part 0 \(fraction 0\.0001\) gets no cell of the 240"),
        (0.9999, r"split\(0\.9999\): part 1 \(fraction 0\.0001\) gets no cell"),
        ([0.5, 0.6], r"the fractions sum to 1\.1, not 1"),
        ([0.999, 0.001], r"part 1 \(fraction 0\.001\) gets no cell"),
        ([1.0], r"give a fraction, or a list of two or more fractions"),
        (1.0, r"split\(1\.0\): the fraction must be between 0 and 1"),
        ([0.5, "a"], r"give a fraction, or a list"),
    ],
)
def test_bad_splits_are_refused_naming_the_split(labelled, fractions, message):
    with pytest.raises(ValueError, match=message):
        make(labelled).split(fractions)


# --------------------------------------------------------------------------- 11. messages that say what is wrong


def test_cells_beyond_int64_are_refused_not_wrapped(labelled):
    with pytest.raises(IndexError, match=r"cells holds row 18446744073709551615, outside the dataset's 240 cells"):
        make(labelled, cells=np.array([3, 2**64 - 1], dtype=np.uint64)).cells


def test_a_dense_layer_on_a_sparse_dataset_is_named(tmp_path):
    a = make_example_adata(40, 12, nnz_per_cell=4)
    a.layers["scaled"] = a.X.toarray()
    a.write_h5ad(tmp_path / "in.h5ad")
    store = create_store_from_h5ads([tmp_path / "in.h5ad"], tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"chunk_0\.zarr/layers/scaled: layers\['scaled'\] is dense; ZarrSparseDataset "
                                         r"yields CSR batches: use ZarrDenseDataset"):  # fmt: skip
        ZarrSparseDataset(16, layer="scaled").add_store(store)
    ZarrDenseDataset(16, layer="scaled", num_workers=0).add_store(store)


def test_gene_choices_that_are_not_names_are_refused_naming_the_store(labelled):
    with pytest.raises(ValueError, match=rf"{labelled}: var_names holds int64 numbers \(\[0, 1, 1\] \.\.\.\), not gene names"):
        make(labelled, var_names=np.array([0, 1, 1, 0] + [0] * 26))
    with pytest.raises(ValueError, match=rf"{labelled}: var_names lists genes twice: \['gene_2'\]"):
        make(labelled, var_names=["gene_2", "gene_1", "gene_2"])


def test_anndata_without_gene_names_is_named_when_genes_are_chosen(labelled):
    p = labelled / read_manifest(labelled).files[0]["name"]
    bare = ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]))  # no var: genes are '0', '1', ...
    with pytest.raises(ValueError, match=r"AnnData #0 has no gene names \(its var_names are '0'\.\.\.'29'"):
        ZarrSparseDataset(16, var_names=["gene_1"], num_workers=0).add_anndatas([bare])
    ZarrSparseDataset(16, var_names=np.arange(30) < 5, num_workers=0).add_anndatas([bare])  # a mask needs no names


# --------------------------------------------------------------------------- 4, 5, 6. the data module


def module(store, **kw):
    from arrayloaders.lightning import StoreDataModule

    return StoreDataModule(store, **{"batch_size": 16, "chunk_size": 4, "preload_nchunks": 5, "num_workers": 0, **kw})


def index_of(batches) -> np.ndarray:
    return np.concatenate([b[-1].numpy() for b in batches])


def test_the_module_splits_within_the_cells_it_is_given(labelled):
    selection = np.flatnonzero(np.arange(N_CELLS) % 3 != 0)
    dm = module(labelled, cells=selection, train_size=0.75, labels_key="donor")
    assert dm.n_train == 120 and dm.n_val == 40
    assert sorted(np.r_[dm.train_idx, dm.val_idx, dm.test_idx].tolist()) == selection.tolist()
    assert sorted(index_of(list(dm.train_dataloader())).tolist()) == dm.train_idx.tolist()
    assert sorted(index_of(list(dm.val_dataloader())).tolist()) == dm.val_idx.tolist()
    dm.set_split(train_size=1.0)
    assert sorted(index_of(list(dm.train_dataloader())).tolist()) == selection.tolist()
    assert dm.val_dataloader() == []


def test_the_module_refuses_a_split_a_sampler_would_ignore(labelled):
    order = [7, 3, 3, 200, 5]
    with pytest.raises(ValueError, match=r"train_size=0\.9: sampler= draws the training cells itself"):
        module(labelled, sampler=order)
    dm = module(labelled, sampler=order, train_size=1.0)
    assert index_of(list(dm.train_dataloader())).tolist() == order
    with pytest.raises(ValueError, match="would ignore a split"):
        dm.set_split(train_size=0.8)
    with pytest.raises(ValueError, match="not both"):
        module(labelled, sampler=order, cells=[1, 2], train_size=1.0)


@pytest.mark.parametrize("kw", [
    {"drop_last": True}, {"cells": np.arange(0, N_CELLS, 2)}, {"sampler": [4, 4, 1], "train_size": 1.0},
    {"rank": 1, "world_size": 2, "drop_last": True},
])  # fmt: skip
def test_inference_gives_every_cell_once_in_store_order_whatever_the_training_settings(labelled, kw):
    dm = module(labelled, batch_size=50, **kw)
    loader = dm.inference_dataloader()
    batches = list(loader)
    assert torch.cat([b["ind_x"].ravel() for b in batches]).tolist() == list(range(N_CELLS))
    assert len(loader) == len(batches) == -(-N_CELLS // 50) and len(loader.obs_names) == N_CELLS
    assert list(loader.obs_names) == list(read_store(labelled).obs_names)
    some = [9, 3, 100]
    assert torch.cat([b["ind_x"].ravel() for b in dm.inference_dataloader(cells=some)]).tolist() == [3, 9, 100]


def test_the_module_resumes_exactly_after_a_batch_size_change(labelled):
    dm = module(labelled, train_size=1.0)
    it = iter(dm.train_dataloader())
    [next(it) for _ in range(4)]
    dm.set_batch_size(48)  # e.g. from a callback: the running epoch keeps its 16
    state = dm.state_dict()
    rest = list(it)
    following = list(dm.train_dataloader())
    assert all(b[0].shape[0] == 48 for b in following[:-1])
    resumed = module(labelled, train_size=1.0, batch_size=48)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(index_of(list(resumed.train_dataloader())), index_of(rest))
    np.testing.assert_array_equal(index_of(list(resumed.train_dataloader())), index_of(following))


# --------------------------------------------------------------------------- 12. ranks agree on what batches hold


def test_ranks_that_would_yield_other_values_fail_on_every_rank(labelled, tmp_path):
    from test_distributed import launch

    cases = {"genes": ({"var_names": ["gene_3", "gene_1"]}, {}), "layer": ({"layer": "counts"}, {}),
             "obsm_keys": ({}, {"obsm_keys": "X_pca"})}  # fmt: skip
    results = launch("values_mismatch", labelled, tmp_path, 2, timeout=90, cases=list(cases.values()))
    for r in results:
        for setting, error in zip(cases, r["errors"]):
            assert f"the ranks disagree on ['{setting}']" in error, f"rank {r['rank']}: {error}"


# --------------------------------------------------------------------------- 9. the README's add_anndatas example


def test_add_anndatas_in_manifest_order_numbers_rows_as_add_store_does(h5ads, tmp_path):
    store = create_store_from_h5ads(h5ads, tmp_path / "s", n_obs_per_file=80, progress=False)  # 13 files
    files = [f"{store}/{f['name']}" for f in read_manifest(store).files]
    assert [Path(f).name for f in sorted(files)] != [Path(f).name for f in files]  # chunk_10 sorts before chunk_2
    adatas = [
        ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]), obs=ad.io.read_elem(zarr.open(p)["obs"]),
                   var=ad.io.read_elem(zarr.open(p)["var"]))
        for p in files
    ]  # fmt: skip
    kw = {"batch_size": 64, "chunk_size": 8, "preload_nchunks": 4, "num_workers": 0, "return_index": True,
          "var_names": ["gene_7", "gene_2"]}  # fmt: skip
    mine = list(ZarrSparseDataset(**kw).add_anndatas(adatas, obs_keys="cell_type"))
    theirs = list(ZarrSparseDataset(**kw).add_store(store, obs_keys="cell_type"))
    assert len(mine) == len(theirs)
    for (x, y, i), (x2, y2, i2) in zip(mine, theirs):
        assert torch.equal(i, i2) and torch.equal(y, y2) and torch.equal(x.to_dense(), x2.to_dense())
