"""ZarrSparseDataset / ZarrDenseDataset: exactly once, bit-identical, shuffle quality, bad arguments."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr
from conftest import SIZES, assert_bit_identical, read_store

from arrayloaders import StoreError, ZarrDenseDataset, ZarrSparseDataset, create_store_from_h5ads

N = sum(SIZES)


def epoch(ds):
    """All batches of one epoch as (X list, obs list, index list)."""
    xs, ys, idx = [], [], []
    for X, y, i in ds:
        xs.append(X), ys.append(y), idx.append(i)
    return xs, ys, idx


def to_scipy(X: torch.Tensor) -> sp.csr_matrix:
    assert X.layout == torch.sparse_csr
    return sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=X.shape)


@pytest.fixture(scope="module")
def truth(store):
    """The store as plain anndata sees it: X rows and labels by global row index."""
    st = read_store(store)
    return st.X, st.obs["cell_type"].astype(str).to_numpy()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(
    ("batch_size", "chunk_size", "preload_nchunks"),
    [(64, 8, 4), (100, 7, 3), (1000, 32, 256), (33, 1, 1), (4096, 32, 256)],
    ids=["even", "odd-sizes", "one-load", "tiny", "default-bigger-than-store"],
)
def test_sparse_epoch_is_exactly_once_and_bit_identical(store, truth, shuffle, drop_last, batch_size, chunk_size, preload_nchunks):
    X_true, labels = truth
    ds = ZarrSparseDataset(
        batch_size, chunk_size, preload_nchunks, shuffle=shuffle, drop_last=drop_last, return_index=True
    ).add_store(store, obs_keys="cell_type")
    xs, ys, idx = epoch(ds)
    assert len(xs) == len(ds)
    if not xs:  # drop_last with a batch bigger than the store: nothing to yield
        assert drop_last and batch_size > N
        return
    sizes = [x.shape[0] for x in xs]
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    rows = torch.cat(idx).numpy()
    expected = (N // batch_size) * batch_size if drop_last else N
    assert rows.size == expected and np.unique(rows).size == expected  # nothing twice
    if not drop_last:
        assert set(rows) == set(range(N))  # nothing lost
    if not shuffle:
        assert (rows == np.arange(expected)).all()
    got = sp.vstack([to_scipy(x) for x in xs], format="csr")
    assert_bit_identical(got, X_true[rows])
    cats = np.array(ds.categories["cell_type"], dtype=object)
    assert (cats[torch.cat(ys).numpy()] == labels[rows]).all()
    assert all(y.dtype == torch.int64 for y in ys)


@pytest.mark.parametrize("batch_size", [16, 50])
def test_dense_store_is_exactly_once_and_bit_identical(dense_h5ads, tmp_path, batch_size):
    out = create_store_from_h5ads(dense_h5ads, tmp_path / "s", n_obs_per_file=80, progress=False)
    truth = read_store(out)
    ds = ZarrDenseDataset(batch_size, 4, 3, return_index=True).add_store(out, obs_keys=["cell_type", "batch"])
    xs, ys, idx = epoch(ds)
    rows = torch.cat(idx).numpy()
    assert sorted(rows) == list(range(truth.n_obs))
    X = torch.cat(xs).numpy()
    assert_bit_identical(X, truth.X[rows])
    batch = torch.cat([y["batch"] for y in ys]).numpy()
    np.testing.assert_array_equal(batch, truth.obs["batch"].to_numpy()[rows])
    assert ys[0]["batch"].dtype == torch.int64


def test_sparse_store_densified_on_request(store, truth):
    ds = ZarrDenseDataset(128, 16, 4, return_index=True).add_store(store)
    X, obs, rows = next(iter(ds))
    assert obs is None and X.layout == torch.strided and X.shape == (128, truth[0].shape[1])
    np.testing.assert_array_equal(X.numpy(), truth[0][rows.numpy()].toarray())


def test_add_anndatas_as_in_the_readme(store, truth):
    paths = sorted(store.glob("chunk_*.zarr"), key=lambda p: int(p.stem.split("_")[1]))
    adatas = [
        ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]), obs=ad.io.read_elem(zarr.open(p)["obs"])) for p in paths
    ]
    ds = ZarrSparseDataset(batch_size=128, chunk_size=8, preload_nchunks=16, return_index=True)
    assert ds.add_anndatas(adatas, obs_keys="cell_type") is ds
    assert (ds.n_obs, ds.n_vars) == truth[0].shape
    xs, _, idx = epoch(ds)
    rows = torch.cat(idx).numpy()
    assert sorted(rows) == list(range(N))
    assert_bit_identical(sp.vstack([to_scipy(x) for x in xs], format="csr"), truth[0][rows])


def test_batches_without_index_are_pairs(store):
    X, y = next(iter(ZarrSparseDataset(64, 8, 4).add_store(store, obs_keys="batch")))
    assert X.shape[0] == 64 and y.dtype == torch.int64


# ------------------------------------------------------------------ order


def batch_rows(ds):
    return [i.numpy() for *_, i in ds]


def test_same_seed_same_batches_other_epoch_other_order(store):
    make = lambda seed=0: ZarrSparseDataset(64, 8, 8, seed=seed, return_index=True).add_store(store)  # noqa: E731
    a, b = make(), make()
    first_a, first_b = batch_rows(a), batch_rows(b)
    assert all((x == y).all() for x, y in zip(first_a, first_b))
    second_a = batch_rows(a)  # a plain second loop is the next epoch
    assert not all((x == y).all() for x, y in zip(first_a, second_a))
    b.set_epoch(1)
    assert all((x == y).all() for x, y in zip(second_a, batch_rows(b)))
    a.set_epoch(0)
    assert all((x == y).all() for x, y in zip(first_a, batch_rows(a)))
    other = batch_rows(make(seed=1))
    assert not all((x == y).all() for x, y in zip(first_a, other))


def test_batches_mix_many_chunks_and_files(store):
    ds = ZarrSparseDataset(256, 8, 32, return_index=True).add_store(store)
    file_of = np.searchsorted(np.cumsum([s.n_obs for s in ds._sources]), np.arange(N), side="right")
    for rows in batch_rows(ds)[:-1]:
        assert np.unique(rows // 8).size >= 24  # ~32 chunks shuffled together
        assert np.unique(file_of[rows]).size >= 3
        assert not (np.diff(np.sort(rows)) == 1).all()


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"chunk_size": -1}, "chunk_size must be a positive integer"),
        ({"preload_nchunks": 1.5}, "preload_nchunks must be a positive integer"),
    ],
)
def test_bad_sizes_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZarrSparseDataset(**kwargs)


def test_missing_obs_key_is_refused_when_added(store):
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]; available: .*cell_type"):
        ZarrSparseDataset().add_store(store, obs_keys="label")


def test_different_var_is_refused(store, h5ads, tmp_path):
    p = next(store.glob("chunk_0.zarr"))
    good = ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]))
    other = ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]))
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="different var"):
        ZarrSparseDataset().add_anndatas([good, other])


def test_mixed_sparse_and_dense_is_refused(store, dense_h5ads, tmp_path):
    dense = create_store_from_h5ads(dense_h5ads, tmp_path / "d", progress=False)
    ds = ZarrDenseDataset().add_store(store)
    with pytest.raises(ValueError, match=r"chunk_0\.zarr/X: X is dense, but others added are sparse \(CSR\)"):
        ds.add_store(dense)
    with pytest.raises(ValueError, match="use ZarrDenseDataset"):
        ZarrSparseDataset().add_store(dense)


def test_h5ad_backed_and_in_memory_x_are_refused(h5ads):
    backed = ad.read_h5ad(h5ads[0], backed="r")
    with pytest.raises(ValueError, match=r"\.h5ad \(HDF5\).*create_store_from_h5ads"):
        ZarrSparseDataset().add_anndatas([ad.AnnData(X=backed.X, obs=backed.obs)])
    with pytest.raises(ValueError, match="not a zarr-backed array"):
        ZarrSparseDataset().add_anndatas([ad.read_h5ad(h5ads[0])])


def test_directory_without_manifest_is_refused(tmp_path):
    (tmp_path / "x" / "chunk_0.zarr").mkdir(parents=True)
    with pytest.raises(StoreError, match="not an arrayloaders store"):
        ZarrSparseDataset().add_store(tmp_path / "x")


def test_empty_dataset_says_so():
    assert (ZarrSparseDataset().n_obs, ZarrSparseDataset().n_vars) == (0, 0)
    with pytest.raises(ValueError, match="empty"):
        len(ZarrSparseDataset())


def test_quickstart_converts_and_loads_an_epoch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "quickstart.py"
    res = subprocess.run(
        [sys.executable, str(script), "--workdir", str(tmp_path), "--n-files", "2", "--cells-per-file", "600",
         "--n-vars", "500", "--nnz-per-cell", "50"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "converted 1200 cells x 500 genes" in res.stdout
    assert "epoch 0 (starting the workers included): 1200 cells" in res.stdout
    assert "epoch 1 (workers up): 1200 cells" in res.stdout and "cells/s" in res.stdout


# ------------------------------------------------------------------ obs of every dtype, through conversion to batches


@pytest.fixture(scope="module")
def mixed_obs_store(tmp_path_factory):
    """Two inputs whose obs columns cover what anndata writes, some present in one input only."""
    import pandas as pd

    from arrayloaders.example_data import make_example_adata

    d = tmp_path_factory.mktemp("mixed_obs")
    a = make_example_adata(60, 50, nnz_per_cell=5, seed=1, name_prefix="a")
    b = make_example_adata(40, 50, nnz_per_cell=5, seed=2, name_prefix="b")
    rng = np.random.default_rng(0)
    for x in (a, b):
        n = x.n_obs
        x.obs["label"] = pd.Categorical(rng.choice(["T", "B", None], n))  # a missing label
        x.obs["donor"] = rng.choice(["d1", "d2"], n).astype(object)  # plain strings
        x.obs["count"] = pd.array(rng.integers(0, 9, n), dtype="Int64")
        x.obs.loc[x.obs.index[::7], "count"] = pd.NA
        x.obs["flag"] = rng.random(n) < 0.5
        x.obs["score"] = rng.random(n).astype(np.float32)
    a.obs["only_a"] = np.arange(60)  # missing for b's cells: nullable Int64 after the outer join
    paths = [d / "a.h5ad", d / "b.h5ad"]
    a.write_h5ad(paths[0]), b.write_h5ad(paths[1])
    source = ad.concat([a, b], join="outer")
    return create_store_from_h5ads(paths, d / "store", n_obs_per_file=64, progress=False), source


@pytest.mark.parametrize("num_workers", [0, 2])
def test_obs_of_every_dtype_reaches_the_batches(mixed_obs_store, num_workers):
    store, source = mixed_obs_store
    keys = ["label", "donor", "count", "flag", "score", "only_a"]
    names = read_store(store).obs_names
    with ZarrSparseDataset(16, 4, 4, return_index=True, num_workers=num_workers).add_store(store, obs_keys=keys) as ds:
        got = {k: [] for k in keys}
        rows = []
        for _, obs, idx in ds:
            rows.append(idx.numpy())
            for k in keys:
                got[k].append(obs[k].numpy())
    src = source.obs.loc[names[np.concatenate(rows)]]
    got = {k: np.concatenate(v) for k, v in got.items()}
    for k in ("label", "donor"):  # codes into ds.categories, -1 where the label is missing
        cats = np.array(ds.categories[k] + [None], dtype=object)
        assert got[k].dtype == np.int64
        expected = src[k].astype(object).where(src[k].notna(), None).to_numpy()
        assert (cats[got[k]] == expected).all() and (got[k] == -1).sum() == src[k].isna().sum()
    for k in ("count", "only_a"):  # nullable ints: float64, NaN where missing
        assert got[k].dtype == np.float64
        np.testing.assert_array_equal(got[k], src[k].to_numpy(dtype=np.float64, na_value=np.nan))
    assert got["flag"].dtype == np.bool_ and (got["flag"] == src["flag"].to_numpy(dtype=bool)).all()
    assert got["score"].dtype == np.float32
    np.testing.assert_array_equal(got["score"].view(np.uint32), src["score"].to_numpy().view(np.uint32))


def test_obs_codes_turn_columns_of_any_dtype_into_codes(mixed_obs_store):
    """A batch id stored as an int (or nullable int, or bool) is yielded as codes into its sorted values,
    -1 where missing, ready for an embedding: no hand encoding."""
    store, source = mixed_obs_store
    keys = ["count", "flag", "only_a", "label", "score"]
    names = read_store(store).obs_names
    ds = ZarrSparseDataset(16, 4, 4, return_index=True, num_workers=0).add_store(
        store, obs_keys=keys, obs_codes=["count", "flag", "only_a", "label"]
    )
    assert ds.categories["count"] == list(range(9)) and ds.categories["flag"] == [False, True]
    assert ds.categories["only_a"] == list(range(60))
    batches = list(ds)
    src = source.obs.loc[names[torch.cat([i for *_, i in batches]).numpy()]]
    for k in ("count", "flag", "only_a", "label"):
        got = torch.cat([obs[k] for _, obs, _ in batches]).numpy()
        assert got.dtype == np.int64
        cats = np.array(ds.categories[k] + [None], dtype=object)
        expected = src[k].astype(object).where(src[k].notna(), None).to_numpy()
        assert (cats[got] == expected).all() and (got == -1).sum() == src[k].isna().sum()
    assert torch.cat([obs["score"] for _, obs, _ in batches]).dtype == torch.float32  # not asked: kept
    with pytest.raises(ValueError, match=r"obs_codes \['batch'\] are not among obs_keys"):
        ZarrSparseDataset(num_workers=0).add_store(store, obs_keys=["count"], obs_codes=["batch"])


@pytest.mark.parametrize("n_labels, held", [(5, np.int8), (127, np.int8), (128, np.int16), (40_000, np.int32)])
def test_obs_codes_are_held_compact_and_yielded_as_int64(n_labels, held):
    # The main process holds every cell's codes: 1 byte per cell for a few labels, not 8.
    from arrayloaders.loading.batches import ObsColumns

    rng = np.random.default_rng(n_labels)
    labels = np.array([f"t{i}" for i in range(n_labels)], dtype=object)
    a = pd.Series(pd.Categorical(labels[rng.integers(0, n_labels, 500)], categories=labels[::-1]))
    b = pd.Series(labels[rng.integers(0, n_labels, 300)], dtype=object)  # strings, not a categorical
    b[::7] = None
    obs = ObsColumns(["c"])
    obs.add([pd.DataFrame({"c": a}), pd.DataFrame({"c": b})])
    assert obs.values["c"].dtype == held
    rows = rng.permutation(800)
    got = obs.gather(rows, single=True)
    assert got.dtype == torch.int64
    cats = np.array(obs.categories["c"] + [None], dtype=object)
    want = pd.concat([a.astype(object), b], ignore_index=True).to_numpy()[rows]
    assert (cats[got.numpy()] == want).all()


# ------------------------------------------------------------------ ordered categoricals


@pytest.fixture(scope="module")
def ordered_store(tmp_path_factory):
    """A store of two inputs whose obs ``stage`` is an ordered categorical (``early < mid < late``)."""
    from test_convert import staged

    d = tmp_path_factory.mktemp("ordered")
    paths = [staged(d, "a", 30, seed=1), staged(d, "b", 20, seed=2)]
    return create_store_from_h5ads(paths, d / "store", n_obs_per_file=16, progress=False)


def _stage_adatas(store: Path, reorder: bool = False) -> list[ad.AnnData]:
    """The store's files as zarr-backed AnnData objects; ``reorder``: the second one's stage in another order."""
    adatas = []
    for i, p in enumerate(sorted(store.glob("chunk_*.zarr"))):
        obs = ad.io.read_elem(zarr.open(p)["obs"])
        if reorder and i == 1:
            obs["stage"] = obs["stage"].cat.reorder_categories(["mid", "early", "late"])
        adatas.append(ad.AnnData(X=ad.io.sparse_dataset(zarr.open(p)["X"]), obs=obs))
    return adatas


def test_categories_of_an_ordered_column_are_ordered(ordered_store):
    from arrayloaders import Categories

    ds = ZarrSparseDataset(8, 4, 2, return_index=True, num_workers=0)
    ds.add_store(ordered_store, obs_keys=["stage", "source_file"])
    stage = ds.categories["stage"]
    assert isinstance(stage, Categories) and stage.ordered and not ds.categories["source_file"].ordered
    # still the list of labels it was: compared, measured and converted as one
    assert stage == ["early", "mid", "late"] and len(stage) == 3 and np.array(stage).tolist() == stage
    assert stage.dtype == pd.CategoricalDtype(["early", "mid", "late"], ordered=True)
    codes, rows = [], []
    for _, obs, idx in ds:
        codes.append(obs["stage"].numpy()), rows.append(idx.numpy())
    got = pd.Series(pd.Categorical.from_codes(np.concatenate(codes), dtype=stage.dtype))
    expected = read_store(ordered_store).obs["stage"].iloc[np.concatenate(rows)]
    assert got.astype(object).fillna("-").tolist() == expected.astype(object).fillna("-").tolist()


@pytest.mark.parametrize("reorder", [False, True], ids=["same-order", "another-order"])
def test_categories_from_add_anndatas_are_ordered_iff_every_part_agrees(ordered_store, reorder):
    ds = ZarrSparseDataset(8, 4, 2).add_anndatas(_stage_adatas(ordered_store, reorder), obs_keys="stage")
    assert ds.categories["stage"].ordered is not reorder
    assert ds.categories["stage"] == ["early", "mid", "late"]


def test_a_store_whose_manifest_has_no_ordered_entry_loads(ordered_store, store, tmp_path):
    """Manifests written before ``ordered`` existed: its files decide (ordered here), and an unordered store's
    categories are unordered."""
    import json
    import pickle
    import shutil

    copy = Path(shutil.copytree(ordered_store, tmp_path / "old"))
    manifest = json.loads((copy / "arrayloaders.json").read_text())
    del manifest["obs_schema"]["stage"]["ordered"]
    (copy / "arrayloaders.json").write_text(json.dumps(manifest))
    ds = ZarrSparseDataset(8, 4, 2, num_workers=0).add_store(copy, obs_keys="stage")
    assert ds.categories["stage"].ordered and len(list(ds)) == len(ds)
    plain = ZarrSparseDataset(8, 4, 2).add_store(store, obs_keys="cell_type").categories["cell_type"]
    assert not plain.ordered and plain.dtype == pd.CategoricalDtype(list(plain), ordered=False)
    assert pickle.loads(pickle.dumps(ds.categories))["stage"].ordered  # travels to DDP ranks and checkpoints


@pytest.mark.parametrize("sampled", [False, True], ids=["chunked", "sampler"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_damaged_column_indices_of_a_store_without_checksums_are_caught(h5ads, tmp_path, num_workers, sampled):
    # Stores written before checksums: a damaged index that still decodes must not reach a batch,
    # whether rows are read in runs (chunked access) or one by one (a sampler's).
    from arrayloaders import WorkerError, XLayout

    out = create_store_from_h5ads(h5ads, tmp_path / "s", layout=XLayout(compressor="none", checksum=False), progress=False)
    shard = sorted((out / "chunk_0.zarr" / "X" / "indices" / "c").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    raw[100:140] = b"\xff" * 40  # uint16 indices of 65,535: past the 400 genes
    shard.write_bytes(bytes(raw))
    sampler = np.random.default_rng(0).permutation(ad.read_h5ad(h5ads[0]).n_obs) if sampled else None
    ds = ZarrSparseDataset(64, 8, 4, num_workers=num_workers, sampler=sampler).add_store(out)
    with pytest.raises((OSError, WorkerError), match=r"indices: a column index of 65535 .* past the 400 genes"):
        for _ in ds:
            pass
    ds.close()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("when", ["before the first loop", "mid-epoch"])
def test_a_store_converted_again_under_a_dataset_is_refused_not_read_wrong(h5ads, tmp_path, num_workers, when):
    """The row pointers read at add_store point into the old files: with the store converted again at the same
    path (another seed: every row elsewhere, every checksum valid), reading on gave rows of neither store."""
    path = create_store_from_h5ads(h5ads, tmp_path / "s", n_obs_per_file=256, progress=False)
    old = read_store(path)
    ds = ZarrSparseDataset(50, 8, 12, num_workers=num_workers, return_index=True).add_store(path)
    loop = iter(ds)
    if when == "mid-epoch":
        X, _, index = next(loop)
        assert_bit_identical(sp.csr_matrix(X.to_dense().numpy()), old.X[index.numpy()])
    create_store_from_h5ads(h5ads, path, n_obs_per_file=256, seed=1, overwrite=True, progress=False)
    with pytest.raises(StoreError, match=f"{path}: the store was converted again"):
        for X, _, index in loop:  # batches of the load read before the conversion may still come: they are right
            assert_bit_identical(sp.csr_matrix(X.to_dense().numpy()), old.X[index.numpy()])
    with pytest.raises(StoreError, match="converted again"):
        next(iter(ds))
    ds.close()
    fresh = ZarrSparseDataset(50, 8, 12, num_workers=num_workers, return_index=True).add_store(path)
    new = read_store(path)
    for X, _, index in fresh:
        assert_bit_identical(sp.csr_matrix(X.to_dense().numpy()), new.X[index.numpy()])
    fresh.close()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("damage", ["removed", "garbled"])
def test_x_metadata_damaged_after_add_store_is_a_store_error_naming_it(store, tmp_path, num_workers, damage):
    """An X array's zarr.json removed or garbled once the store was checked: zarr's own error (KeyError: 'data',
    a JSONDecodeError) named no file."""
    import shutil

    path = Path(shutil.copytree(store, tmp_path / "s"))
    ds = ZarrSparseDataset(50, 8, 12, num_workers=num_workers).add_store(path)
    meta = path / "chunk_1.zarr" / "X" / "data" / "zarr.json"
    meta.unlink() if damage == "removed" else meta.write_text("{not json")
    ds.close()  # the next loop opens the store again (new workers, or new readers)
    with pytest.raises(StoreError, match=f"{path / 'chunk_1.zarr' / 'X'}: cannot be opened .*damaged or changed store"):
        next(iter(ds))
    ds.close()
