"""Values chosen at load time: ``var_names=`` (genes, in the order given), ``layer=``, dense output from workers.

Batches are compared bit for bit with plain anndata's reading of the same
rows (``return_index``) and columns.
"""

from __future__ import annotations

import threading
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr
from conftest import assert_bit_identical, read_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.loading.genes import choose_genes, densify, pick_genes


def csr_of(X: torch.Tensor) -> sp.csr_matrix:
    return sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=tuple(X.shape))


def assert_rows_sorted(m: sp.csr_matrix) -> None:
    """Each row's column indices strictly increase (what torch and scipy expect of CSR)."""
    for r in range(m.shape[0]):
        cols = m.indices[m.indptr[r] : m.indptr[r + 1]]
        assert (np.diff(cols) > 0).all(), f"row {r}: columns {cols} not increasing"


def chosen_genes(var_names: pd.Index, how: str) -> tuple[object, np.ndarray]:
    """(what the user passes as var_names, the store columns it means, in yield order)."""
    rng = np.random.default_rng(5)
    if how == "mask":
        mask = rng.random(len(var_names)) < 0.3
        return mask, np.flatnonzero(mask)
    cols = rng.choice(len(var_names), 57, replace=False)
    if how == "sorted":
        cols = np.sort(cols)
    return list(var_names[cols]), cols


# --------------------------------------------------------------------------- pure functions


@settings(max_examples=200, deadline=None)
@given(
    n_rows=st.integers(0, 30),
    n_vars=st.integers(1, 40),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_pick_genes_and_densify_match_scipy(n_rows, n_vars, density, seed, data):
    """Any rows in any order (skipped, repeated), any genes in any order: equal to scipy's rows then columns."""
    rng = np.random.default_rng(seed)
    m = sp.random(n_rows, n_vars, density=density, format="csr", dtype=np.float32, random_state=rng)
    m.data = rng.integers(1, 100, m.data.size).astype(np.float32)
    cols = np.array(data.draw(st.permutations(range(n_vars)))[: data.draw(st.integers(1, n_vars))], dtype=np.int64)
    take = np.array(data.draw(st.lists(st.integers(0, n_rows - 1), max_size=40)) if n_rows else [], dtype=np.int64)
    genes = choose_genes(pd.Index([f"g{i}" for i in range(n_vars)]), [f"g{i}" for i in cols], "test")
    stored = m.indices.astype(np.uint16)  # the stored dtype of narrow stores
    bounds = m.indptr.astype(np.int64)
    room = int(np.diff(bounds)[take].sum())
    indptr, values, columns = np.empty(take.size + 1, np.int64), np.full(room, np.nan, np.float32), np.empty(room, np.int32)
    nnz = pick_genes(bounds, m.data, stored, take, genes, indptr, values, columns)
    got = sp.csr_matrix((values[:nnz], columns[:nnz], indptr), shape=(take.size, cols.size))
    want = m[take][:, cols].tocsr()
    assert_bit_identical(got, want)
    assert_rows_sorted(got)
    dense = np.full((take.size, cols.size), np.nan, np.float32)  # densify must write every element
    densify(bounds, m.data, stored, take, dense, genes)
    assert_bit_identical(dense, want.toarray())
    whole = np.full((take.size, n_vars), np.nan, np.float32)  # all genes (ZarrDenseDataset without var_names)
    densify(bounds, m.data, stored, take, whole, None)
    assert_bit_identical(whole, m[take].toarray())


@pytest.mark.parametrize("n_vars", [60, 100, 5000])  # the row sort takes 1, 2 and 3 radix digits
def test_pick_genes_sorts_wide_rows(n_vars):
    rng = np.random.default_rng(n_vars)
    m = sp.random(200, n_vars, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    cols = rng.permutation(n_vars)[: n_vars // 2]
    genes = choose_genes(pd.Index([f"g{i}" for i in range(n_vars)]), [f"g{i}" for i in cols], "test")
    take = rng.permutation(200)
    indptr, values, columns = np.empty(201, np.int64), np.empty(m.nnz, np.float32), np.empty(m.nnz, np.int32)
    nnz = pick_genes(m.indptr.astype(np.int64), m.data, m.indices, take, genes, indptr, values, columns)
    got = sp.csr_matrix((values[:nnz], columns[:nnz], indptr), shape=(200, cols.size))
    assert_bit_identical(got, m[take][:, cols].tocsr())
    assert_rows_sorted(got)


@pytest.mark.parametrize("bad", [7, 2**16 - 1])
def test_a_column_index_past_the_genes_is_refused_not_written(bad):
    # The compiled loops do not check bounds themselves: an index past var must stop them before
    # it is used to write (the decode's checksums or bound checks catch damage first; this is the last guard).
    m = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 3, 0, 4]], np.float32))
    genes = choose_genes(pd.Index(list("abcd")), ["d", "a"], "test")
    indices = m.indices.astype(np.uint16)
    indices[-1] = bad
    bounds, take = m.indptr.astype(np.int64), np.arange(2)
    with pytest.raises(IndexError, match="past the 4 genes"):
        pick_genes(bounds, m.data, indices, take, genes, np.empty(3, np.int64), np.empty(4, np.float32), np.empty(4, np.int32))
    for chosen in (genes, None):
        out = np.zeros((2, 2 if chosen else 4), np.float32)
        with pytest.raises(IndexError, match="past the 4 genes"):
            densify(bounds, m.data, indices, take, out, chosen)


def test_choose_genes_errors():
    var = pd.Index(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"/s: 2 of the 3 genes in var_names are not in var, e.g. \['x', 'y'\]"):
        choose_genes(var, ["a", "x", "y"], "/s")
    with pytest.raises(ValueError, match="lists genes twice: \\['b'\\]"):
        choose_genes(var, ["b", "a", "b"], "/s")
    with pytest.raises(ValueError, match="mask has 3 entries, but var has 4 genes"):
        choose_genes(var, [True, False, True], "/s")
    with pytest.raises(ValueError, match="chooses no gene"):
        choose_genes(var, [False] * 4, "/s")
    with pytest.raises(ValueError, match="not unique"):
        choose_genes(pd.Index(["a", "a", "b"]), ["b"], "/s")
    genes = choose_genes(var, ["d", "b"], "/s")
    assert genes.columns.tolist() == [3, 1] and genes.position.tolist() == [-1, 1, -1, 0] and not genes.ordered


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("how", ["shuffled", "sorted", "mask"])
@pytest.mark.parametrize("mode", ["chunked", "sampler"])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_var_names_batches_equal_source_columns(store, num_workers, dense, mode, how):
    full = read_store(store)
    given, cols = chosen_genes(full.var_names, how)
    rng = np.random.default_rng(1)
    sampler = rng.integers(0, full.n_obs, 700).tolist() if mode == "sampler" else None  # repeats included
    cls = ZarrDenseDataset if dense else ZarrSparseDataset
    ds = cls(64, 8, 4, num_workers=num_workers, return_index=True, var_names=given, sampler=sampler).add_store(store)
    assert ds.n_vars == cols.size and list(ds.var_names) == list(full.var_names[cols])
    rows = []
    for X, _, index in ds:
        assert X.shape == (index.numel(), cols.size)
        want = full.X[index.numpy()][:, cols]
        if dense:
            assert X.layout == torch.strided
            assert_bit_identical(X.numpy(), want.toarray())
        else:
            got = csr_of(X)
            assert_rows_sorted(got)
            assert_bit_identical(got, want)
        rows.append(index.numpy())
    rows = np.concatenate(rows)
    if sampler is None:
        assert np.array_equal(np.sort(rows), np.arange(full.n_obs))  # exactly once
    else:
        assert rows.tolist() == sampler  # the sampler's order, repeats kept
    ds.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), dense=st.booleans(), chunk_size=st.sampled_from([8, 256]))
def test_any_gene_subset_in_any_order(store, data, dense, chunk_size):
    # Hypothesis over subsets and orders (num_workers=0: the same read_load the workers run), with
    # loads of many short runs and of a few long ones.
    full = read_store(store)
    cols = np.array(data.draw(st.permutations(range(full.n_vars)))[: data.draw(st.integers(1, full.n_vars))])
    cls = ZarrDenseDataset if dense else ZarrSparseDataset
    genes = list(full.var_names[cols])
    ds = cls(250, chunk_size, 4, num_workers=0, return_index=True, var_names=genes).add_store(store)
    X, _, index = next(iter(ds))
    want = full.X[index.numpy()][:, cols]
    assert_bit_identical(X.numpy() if dense else csr_of(X), want.toarray() if dense else want)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_var_names_of_a_dense_store(dense_h5ads, tmp_path, num_workers):
    out = create_store_from_h5ads(dense_h5ads, tmp_path / "s", n_obs_per_file=100, progress=False)
    full = read_store(out)
    given, cols = chosen_genes(full.var_names, "shuffled")
    ds = ZarrDenseDataset(32, 4, 4, num_workers=num_workers, return_index=True, var_names=given).add_store(out)
    seen = 0
    for X, _, index in ds:
        assert_bit_identical(X.numpy(), np.ascontiguousarray(np.asarray(full.X)[index.numpy()][:, cols]))
        seen += index.numel()
    assert seen == full.n_obs
    ds.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dense_output_of_all_genes_is_built_by_the_workers(store, num_workers):
    full = read_store(store)
    ds = ZarrDenseDataset(100, 8, 4, num_workers=num_workers, return_index=True).add_store(store)
    for X, _, index in ds:
        assert X.layout == torch.strided and X.shape == (index.numel(), full.n_vars)
        assert_bit_identical(X.numpy(), full.X[index.numpy()].toarray())
    ds.close()


def test_held_dense_batches_keep_their_values_across_epochs(store):
    # Dense batches are views of worker-filled slots now: the slot must not be refilled while one is held.
    ds = ZarrDenseDataset(100, 8, 4, num_workers=2, return_index=True).add_store(store)
    held = [(X, X.clone(), index) for X, _, index in ds]
    for _ in range(2):
        for _ in ds:
            pass
    for X, copy, _ in held:
        assert torch.equal(X, copy)
    ds.close()


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_two_threads_choosing_genes_at_once(store, dense):
    # Loops read in their own threads (num_workers=0) through a decode buffer kept per thread:
    # two at once must not see each other's rows.
    full = read_store(store)
    given, cols = chosen_genes(full.var_names, "shuffled")
    cls = ZarrDenseDataset if dense else ZarrSparseDataset
    ds = cls(50, 8, 4, num_workers=0, return_index=True, var_names=given).add_store(store)
    errors, seen = [], []

    def loop():
        try:
            for _ in range(3):
                for X, _, index in ds:
                    want = full.X[index.numpy()][:, cols]
                    assert_bit_identical(X.numpy() if dense else csr_of(X), want.toarray() if dense else want)
                    seen.append(index.numel())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(seen) == 6 * full.n_obs
    ds.close()


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_a_damaged_column_index_names_the_file(store, monkeypatch, dense):
    from arrayloaders.store.rows import CsrRows

    read_runs = CsrRows.read_runs

    def damaged(self, runs, dests, data, indices):
        read_runs(self, runs, dests, data, indices)
        indices[int(dests[0])] = self.source.n_vars  # as if the decode had let a bad index through

    monkeypatch.setattr(CsrRows, "read_runs", damaged)
    cls = ZarrDenseDataset if dense else ZarrSparseDataset
    ds = cls(64, 8, 4, num_workers=0, var_names=["gene_3", "gene_1"]).add_store(store)
    with pytest.raises(OSError, match=r"chunk_\d+\.zarr/X/indices.*: a column index is past the \d+ genes \(damaged store\)"):
        next(iter(ds))


def test_var_names_errors_name_the_store(store):
    with pytest.raises(
        ValueError, match=rf"{store}: 1 of the 2 genes in var_names are not in var, e.g. \['no_such_gene'\]"
    ):
        ZarrSparseDataset(64, var_names=["gene_0", "no_such_gene"]).add_store(store)
    with pytest.raises(ValueError, match="mask has 3 entries"):
        ZarrSparseDataset(64, var_names=[True, False, True]).add_store(store)
    with pytest.raises(ValueError, match="not the string"):
        ZarrSparseDataset(64, var_names="gene_0")


def test_subset_and_split_keep_the_genes(store):
    full = read_store(store)
    given, cols = chosen_genes(full.var_names, "shuffled")
    ds = ZarrSparseDataset(64, 8, 4, num_workers=0, return_index=True, var_names=given).add_store(store)
    train, val = ds.split(0.8, seed=0)
    for part in (train, val):
        assert list(part.var_names) == list(full.var_names[cols])
        X, _, index = next(iter(part))
        assert_bit_identical(csr_of(X), full.X[index.numpy()][:, cols])


# --------------------------------------------------------------------------- layer=


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """A zarr AnnData (written by anndata) whose X is normalised and layers["counts"] the raw counts."""
    rng = np.random.default_rng(2)
    counts = sp.random(300, 50, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    counts.data = rng.integers(1, 30, counts.data.size).astype(np.float32)
    X = counts.multiply(1 / np.maximum(counts.sum(axis=1), 1)).tocsr().astype(np.float32)
    path = tmp_path_factory.mktemp("layered") / "a.zarr"
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on zarr v3 defaults
        ad.AnnData(X=X, layers={"counts": counts}, var=pd.DataFrame(index=[f"g{i}" for i in range(50)])).write_zarr(
            path
        )
    return path, counts


def _open(path) -> zarr.Group:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note that consolidated metadata is not in the v3 spec
        return zarr.open_group(path, mode="r")


def _backed(path) -> ad.AnnData:
    g = _open(path)
    return ad.AnnData(
        X=ad.io.sparse_dataset(g["X"]),
        layers={"counts": ad.io.sparse_dataset(g["layers/counts"])},
        var=pd.DataFrame(index=[f"g{i}" for i in range(50)]),
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_layer_is_read_instead_of_x(layered, num_workers):
    path, counts = layered
    genes = ["g7", "g3", "g40"]
    ds = ZarrSparseDataset(32, 4, 4, num_workers=num_workers, return_index=True, layer="counts", var_names=genes)
    ds.add_anndatas([_backed(path)])
    seen = 0
    for X, _, index in ds:
        assert_bit_identical(csr_of(X), counts[index.numpy()][:, [7, 3, 40]])
        seen += index.numel()
    assert seen == 300
    ds.close()


def test_missing_layer_is_named(layered, store):
    path, _ = layered
    with pytest.raises(ValueError, match=r"AnnData #0 has no layer 'spliced'; its layers: \['counts'\]"):
        ZarrSparseDataset(32, layer="spliced").add_anndatas([_backed(path)])
    with pytest.raises(ValueError, match=rf"{store}/chunk_0.zarr: has no layer 'counts'; its layers: \[\]"):
        ZarrSparseDataset(32, layer="counts").add_store(store)


# --------------------------------------------------------------------------- obsm_keys=


@pytest.fixture(scope="module")
def with_obsm(tmp_path_factory):
    """A zarr AnnData with a float32 embedding and an int32 obsm (written by anndata)."""
    rng = np.random.default_rng(4)
    X = sp.random(300, 30, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    obsm = {"X_pca": rng.standard_normal((300, 8)).astype(np.float32), "codes": rng.integers(-5, 5, (300, 3), np.int32)}
    path = tmp_path_factory.mktemp("obsm") / "a.zarr"
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on zarr v3 defaults
        ad.AnnData(
            X=X, obsm=obsm, obs=pd.DataFrame({"label": rng.integers(0, 4, 300)}, index=[str(i) for i in range(300)])
        ).write_zarr(path)
    return path, X, obsm


def _backed_obsm(path) -> ad.AnnData:
    g = _open(path)
    obs = ad.io.read_elem(g["obs"])
    return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=obs, obsm={k: g["obsm"][k] for k in ("X_pca", "codes")})


@pytest.mark.parametrize("window", [1, 3], ids=["one-load", "mixed-window"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_obsm_rows_are_aligned_with_x(with_obsm, num_workers, window):
    path, X, obsm = with_obsm
    ds = ZarrSparseDataset(32, 4, 4, num_workers=num_workers, return_index=True, window=window)
    ds.add_anndatas([_backed_obsm(path), _backed_obsm(path)], obs_keys="label", obsm_keys=["X_pca", "codes"])
    seen = []
    for batch_x, obs, index in ds:
        rows = index.numpy() % 300  # the same file added twice
        assert set(obs) == {"label", "X_pca", "codes"}
        assert_bit_identical(csr_of(batch_x), X[rows])
        assert obs["X_pca"].dtype == torch.float32 and obs["X_pca"].shape == (rows.size, 8)
        assert_bit_identical(obs["X_pca"].numpy(), obsm["X_pca"][rows])
        assert obs["codes"].dtype == torch.float32  # non-float obsm arrays are yielded as float32
        np.testing.assert_array_equal(obs["codes"].numpy(), obsm["codes"][rows].astype(np.float32))
        seen.append(index.numpy())
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(600))
    ds.close()


def test_held_obsm_rows_keep_their_values(with_obsm):
    path, _, obsm = with_obsm
    ds = ZarrSparseDataset(32, 4, 4, num_workers=2, return_index=True).add_anndatas(
        [_backed_obsm(path)], obsm_keys="X_pca"
    )
    held = [(obs["X_pca"], index) for _, obs, index in ds]
    for _ in range(2):
        for _ in ds:
            pass
    for pca, index in held:
        assert_bit_identical(pca.numpy(), obsm["X_pca"][index.numpy()])
    ds.close()


def test_missing_obsm_is_named(with_obsm, store):
    path, _, _ = with_obsm
    with pytest.raises(ValueError, match=r"AnnData #0 has no obsm 'X_umap'; its obsm: \['X_pca', 'codes'\]"):
        ZarrSparseDataset(32).add_anndatas([_backed_obsm(path)], obsm_keys="X_umap")
    with pytest.raises(ValueError, match=rf"{store}/chunk_0.zarr: has no obsm 'X_pca'; its obsm: \[\]"):
        ZarrSparseDataset(32).add_store(store, obsm_keys="X_pca")
    a = _backed_obsm(path)
    a.obsm["X_pca"] = np.asarray(a.obsm["X_pca"])
    with pytest.raises(ValueError, match=r"AnnData #0 obsm\['X_pca'\]: is ndarray, not a 2-d zarr array"):
        ZarrSparseDataset(32).add_anndatas([a], obsm_keys="X_pca")


# --------------------------------------------------------------------------- from .h5ad to batches


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """.h5ad inputs with layers and obsm (see test_convert_values), their store, and the sources concatenated."""
    from test_convert_values import make_adata, write

    d = tmp_path_factory.mktemp("values_e2e")
    adatas = [make_adata(n, i) for i, n in enumerate((90, 70, 60))]
    paths = [write(a, d / f"{i}.h5ad") for i, a in enumerate(adatas)]
    store = create_store_from_h5ads(paths, d / "s", n_obs_per_file=100, progress=False)
    return store, ad.concat([ad.read_h5ad(p) for p in paths])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("layer", [None, "counts", "scaled"])
def test_layer_genes_and_obsm_from_h5ad_to_batches(converted, layer, num_workers):
    store, source = converted
    names = read_store(store).obs_names
    genes = ["g17", "g2", "g29", "g5", "g11"]
    dense = layer == "scaled"  # a dense layer of a CSR store: ZarrDenseDataset
    cls = ZarrDenseDataset if dense else ZarrSparseDataset
    ds = cls(16, 4, 4, num_workers=num_workers, return_index=True, layer=layer, var_names=genes, sampler=None)
    ds.add_store(store, obsm_keys=["X_pca", "id"])
    assert list(ds.var_names) == genes
    cols = source.var_names.get_indexer(genes)
    matrix = source.X if layer is None else source.layers[layer]
    seen = 0
    for X, obs, index in ds:
        rows = source.obs_names.get_indexer(names[index.numpy()])  # each store row's .h5ad row
        want = matrix[rows][:, cols]
        if dense:
            assert_bit_identical(X.numpy(), np.ascontiguousarray(want))
        else:
            assert_bit_identical(csr_of(X), sp.csr_matrix(want))
        assert_bit_identical(obs["X_pca"].numpy(), source.obsm["X_pca"][rows])
        np.testing.assert_array_equal(obs["id"].numpy(), source.obsm["id"][rows].astype(np.float32))
        seen += index.numel()
    assert seen == source.n_obs
    ds.close()


def test_sparse_dataset_refuses_a_dense_layer(converted):
    store, _ = converted
    with pytest.raises(ValueError, match=r"layers/scaled: layers\[.scaled.\] is dense; ZarrSparseDataset yields CSR batches: use ZarrDenseDataset"):
        ZarrSparseDataset(16, layer="scaled").add_store(store)
