"""create_store_from_h5ads: round trip, shuffle, joins, obs, memory bound, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import N_VARS, SIZES, assert_bit_identical, read_sources, read_store, with_compressed_indptr

from arrayloaders import ConversionWarning, InputFileError, StoreError, XLayout, create_store_from_h5ads, read_manifest
from arrayloaders.byte_sizes import parse_bytes
from arrayloaders.convert.buckets import csr_row_positions
from arrayloaders.convert.create import plan_output_files
from arrayloaders.example_data import make_example_adata, write_example_h5ads
from arrayloaders.store.disk_layout import COMPLETE_ATTRIBUTE, XSource
from arrayloaders.store.obs import read_obs
from arrayloaders.store.rows import open_rows
from arrayloaders.store.zarr_layout import missing_chunk_files, unwritten_chunks

REPO = Path(__file__).resolve().parents[2]


def convert(paths, out, **kw):
    kw.setdefault("progress", False)
    return create_store_from_h5ads(paths, out, **kw)


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(
    ("n_obs_per_file", "layout"),
    [
        (256, XLayout()),
        (1000, XLayout(compressor="zstd", level=5, chunk_elements=512, shard_elements=2048)),
        (97, XLayout(compressor="none", chunk_elements=64, shard_elements=256)),
    ],
    ids=["default-4files", "zstd-1file-small-shards", "raw-11files-tiny-shards"],
)
def test_round_trip_csr_is_exact(h5ads, tmp_path, shuffle, n_obs_per_file, layout):
    out = convert(h5ads, tmp_path / "s", shuffle=shuffle, n_obs_per_file=n_obs_per_file, layout=layout)
    store, src = read_store(out), read_sources(h5ads)
    assert store.n_obs == src.n_obs == sum(SIZES)
    assert store.obs_names.is_unique and set(store.obs_names) == set(src.obs_names)
    aligned = store[src.obs_names]
    assert_bit_identical(aligned.X, src.X)
    assert aligned.X.indices.dtype == np.int32  # what anndata/scipy expect
    pd.testing.assert_series_equal(
        aligned.obs["cell_type"].astype(str), src.obs["cell_type"].astype(str), check_names=False
    )
    np.testing.assert_array_equal(aligned.obs["batch"].to_numpy(), src.obs["batch"].to_numpy())
    expected_source = np.repeat([str(p) for p in h5ads], SIZES)
    np.testing.assert_array_equal(aligned.obs["source_file"].astype(str).to_numpy(), expected_source)
    if not shuffle:
        np.testing.assert_array_equal(store.obs_names, src.obs_names)


def test_round_trip_dense_is_exact(dense_h5ads, tmp_path):
    out = convert(dense_h5ads, tmp_path / "s", n_obs_per_file=64)
    store, src = read_store(out), read_sources(dense_h5ads)
    assert isinstance(store.X, np.ndarray)
    assert_bit_identical(store[src.obs_names].X, src.X)
    assert read_manifest(out).x_format == "dense"


def test_each_file_is_anndata_readable_with_manifest(store):
    m = read_manifest(store)
    assert m.n_obs == sum(SIZES) and m.n_vars == N_VARS and m.x_format == "csr"
    assert [f["name"] for f in m.files] == [f"chunk_{i}.zarr" for i in range(4)]
    assert sum(f["n_obs"] for f in m.files) == m.n_obs
    assert [i["n_obs"] for i in m.inputs] == list(SIZES)
    assert m.obs_schema["cell_type"]["kind"] == "categorical"
    assert m.obs_schema["batch"] == {"kind": "numeric", "dtype": "int64", "missing": False}
    assert m.layout["x"]["compressor"] == "blosc-lz4" and m.seed == 0 and m.shuffle
    for f in m.files:
        adata = ad.read_zarr(store / f["name"])
        assert adata.n_obs == f["n_obs"] and list(adata.var_names) == m.var_names
        assert isinstance(adata.X, sp.csr_matrix)
        x = ad.io.sparse_dataset(__import__("zarr").open_group(store / f["name"])["X"])
        assert x.format == "csr" and x.shape == adata.shape


# ------------------------------------------------------------------ shuffle


def test_shuffle_spreads_every_input_over_every_file_in_proportion(h5ads, store):
    st = read_store(store)
    file_of = np.repeat(np.arange(4), [f["n_obs"] for f in read_manifest(store).files])
    counts = pd.crosstab(file_of, st.obs["source_file"].astype(str).to_numpy())
    assert (counts.to_numpy() > 0).all(), counts
    expected = np.outer(counts.sum(axis=1), counts.sum(axis=0)) / counts.to_numpy().sum()
    # Hypergeometric spread: each cell within 5 standard deviations.
    assert (np.abs(counts.to_numpy() - expected) < 5 * np.sqrt(expected) + 1).all(), counts
    # Neighbours in a file come from far apart in the input order.
    src_pos = pd.Series(np.arange(sum(SIZES)), index=read_sources(h5ads).obs_names)[st.obs_names].to_numpy()
    assert np.median(np.abs(np.diff(src_pos))) > 100


def test_same_seed_same_store_other_seed_other_order(h5ads, tmp_path):
    a = read_store(convert(h5ads, tmp_path / "a", seed=7, n_obs_per_file=300))
    b = read_store(convert(h5ads, tmp_path / "b", seed=7, n_obs_per_file=300))
    c = read_store(convert(h5ads, tmp_path / "c", seed=8, n_obs_per_file=300))
    np.testing.assert_array_equal(a.obs_names, b.obs_names)
    assert_bit_identical(a.X, b.X)
    assert (a.obs_names != c.obs_names).mean() > 0.9


def test_plan_output_files_is_a_permutation_with_balanced_files():
    order, bounds = plan_output_files(1001, 250, True, 0)
    assert sorted(order) == list(range(1001))
    assert np.diff(bounds).tolist() == [200, 200, 200, 200, 201] or set(np.diff(bounds)) <= {200, 201}
    assert bounds[0] == 0 and bounds[-1] == 1001 and np.diff(bounds).max() <= 250
    order, _ = plan_output_files(10, 4, False, 0)
    assert order.tolist() == list(range(10))


def test_csr_row_positions_matches_scipy_row_gather():
    rng = np.random.default_rng(0)
    m = sp.random(50, 30, density=0.2, format="csr", random_state=1)
    rows = rng.permutation(50)[:20]
    pos = csr_row_positions(m.indptr.astype(np.int64), rows)
    np.testing.assert_array_equal(m.data[pos], m[rows].data)
    np.testing.assert_array_equal(m.indices[pos], m[rows].indices)


@pytest.mark.parametrize(("text", "expected"), [("512MB", 512_000_000), ("2GiB", 2 * 2**30), ("1.5k", 1500), (123, 123)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


# ------------------------------------------------------------------ var and obs


@pytest.fixture
def shifted_genes(tmp_path):
    """Two files whose gene sets overlap in part (genes 0-59 and 20-79)."""
    a = make_example_adata(60, 80, nnz_per_cell=20, seed=1, name_prefix="a")[:, :60].copy()
    b = make_example_adata(40, 80, nnz_per_cell=20, seed=2, name_prefix="b")[:, 20:].copy()
    pa, pb = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    a.write_h5ad(pa), b.write_h5ad(pb)
    return pa, pb, a, b


def test_different_genes_are_refused_naming_both_files(shifted_genes, tmp_path):
    pa, pb, *_ = shifted_genes
    with pytest.raises(InputFileError, match=r"b\.h5ad.*a\.h5ad.*var_join"):
        convert([pa, pb], tmp_path / "s")


def test_inner_join_keeps_shared_genes(shifted_genes, tmp_path):
    pa, pb, a, b = shifted_genes
    st = read_store(convert([pa, pb], tmp_path / "s", var_join="inner"))
    shared = [f"gene_{g}" for g in range(20, 60)]
    assert list(st.var_names) == shared
    assert_bit_identical(st[a.obs_names].X, a[:, shared].X)
    assert_bit_identical(st[b.obs_names].X, b[:, shared].X)


def test_outer_join_fills_missing_genes_with_zeros(shifted_genes, tmp_path):
    pa, pb, a, b = shifted_genes
    out = convert([pa, pb], tmp_path / "s", var_join="outer")
    st = read_store(out)
    assert list(st.var_names) == [f"gene_{g}" for g in range(80)]
    assert read_manifest(out).var_join == "outer"
    assert_bit_identical(st[a.obs_names][:, a.var_names].X, a.X)
    assert st[a.obs_names][:, [f"gene_{g}" for g in range(60, 80)]].X.nnz == 0
    assert_bit_identical(st[b.obs_names][:, b.var_names].X, b.X)
    assert st[b.obs_names][:, [f"gene_{g}" for g in range(20)]].X.nnz == 0
    assert st.X.has_sorted_indices


def test_categoricals_are_unified_not_stringified(tmp_path):
    a = make_example_adata(30, 50, nnz_per_cell=5, seed=1, name_prefix="a")
    b = make_example_adata(20, 50, nnz_per_cell=5, seed=2, name_prefix="b")
    a.obs["tissue"] = pd.Categorical(["lung", "liver"] * 15, categories=["lung", "liver"])
    b.obs["tissue"] = pd.Categorical(["brain", "liver"] * 10, categories=["liver", "brain"])
    a.obs["donor"] = ["d1"] * 30  # plain strings: stored as categorical
    b.obs["donor"] = ["d2"] * 20
    a.write_h5ad(tmp_path / "a.h5ad"), b.write_h5ad(tmp_path / "b.h5ad")
    out = convert([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "s")
    st = read_store(out)
    assert isinstance(st.obs["tissue"].dtype, pd.CategoricalDtype)
    assert list(st.obs["tissue"].cat.categories) == ["lung", "liver", "brain"]
    assert list(st[a.obs_names].obs["tissue"].astype(str)) == list(a.obs["tissue"].astype(str))
    assert list(st[b.obs_names].obs["tissue"].astype(str)) == list(b.obs["tissue"].astype(str))
    assert isinstance(st.obs["donor"].dtype, pd.CategoricalDtype)
    assert read_manifest(out).obs_schema["tissue"] == {
        "kind": "categorical", "dtype": "category", "categories": ["lung", "liver", "brain"], "missing": False
    }  # fmt: skip


def test_obs_subset_and_no_source_column(h5ads, tmp_path):
    st = read_store(convert(h5ads, tmp_path / "s", obs_columns=["batch"], source_key=None))
    assert list(st.obs.columns) == ["batch"]


def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    """Write as a user would; pandas' string dtype needs anndata 0.12's opt-in (0.13 writes it by default)."""
    with ad.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path)
    return path


def _string(values):
    return pd.array(values, dtype="string")


def obs_of_every_dtype() -> tuple[pd.DataFrame, pd.DataFrame]:
    """obs of two inputs (8 and 6 cells) with every dtype anndata writes, and columns that differ between them."""
    na = None
    a = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", "B", na, "T", "NK", "B", "T", na], categories=["T", "B", "NK"]),
            "cat_int": pd.Categorical([1, 2, na, 3, 1, 1, 2, 3]),
            "donor": _string(["d1", na, "d2", "d1", "d1", "d2", na, "d1"]),
            "tissue": _string(["lung", "liver", "lung", na, "lung", "liver", "lung", "lung"]),
            "barcode": np.array([f"AAC{i}" for i in range(8)], dtype=object),  # unique: stays a string array
            "n_genes": pd.array([100, na, 250, 2**40, 0, -1, na, 7], dtype="Int64"),
            "doublet": pd.array([True, na, False, False, True, na, False, True], dtype="boolean"),
            "is_ok": np.array([True, False, True, True, False, True, True, False]),
            "depth": np.array([1, 2, 3, 4, 5, 6, 7, 2**31 - 1], dtype=np.int32),
            "score": np.array([0.1, np.nan, -0.0, 1e30, 2.5, np.inf, -np.inf, 3], dtype=np.float32),
            "mixed": np.array([0, 3, 2, 1, 0, 3, 2, 1], dtype=np.int64),
            "widen": np.array([-128, 127, 0, 1, 2, 3, 4, 5], dtype=np.int8),
            "to_float": np.array([1, 2, 3, 4, 5, 6, 7, -32768], dtype=np.int16),
            "only_a": np.array([0.5, 1.5, 2.5, np.nan, 4.5, 5.5, 6.5, 7.5]),
        },
        index=[f"a{i}" for i in range(8)],
    )
    b = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["B", "DC", "T", "B", na, "DC"], categories=["DC", "B", "T"]),
            "cat_int": pd.Categorical([3, 4, 4, 3, na, 3]),
            "donor": pd.Categorical(["d3", "d1", "d3", "d3", "d1", na]),
            "tissue": pd.Categorical(["brain", "lung", "brain", "brain", "lung", "lung"]),
            "n_genes": np.array([5, 6, 7, 8, 9, 2**62], dtype=np.int64),
            "doublet": np.array([False, True, False, False, False, True]),
            "is_ok": np.array([True, True, False, False, True, True]),
            "depth": np.array([9, 8, 7, 6, 5, -(2**31)], dtype=np.int32),
            "score": np.array([np.nan, 1, 2, 3, 4, 5], dtype=np.float32),
            "mixed": np.array(["0", "1", "2", "3", "x", "1"], dtype=object),
            "widen": np.array([2**40, 0, 1, 2, 3, 4], dtype=np.int64),
            "to_float": np.array([0.25, 1, 2, 3, 4, np.nan], dtype=np.float32),
            "only_b": pd.array([True, False, na, True, True, False], dtype="boolean"),
        },
        index=[f"b{i}" for i in range(6)],
    )
    return a, b


# column -> the dtype the documented rule gives it
OBS_DTYPES = {
    "cell_type": "category", "cat_int": "category", "donor": "category", "tissue": "category", "barcode": "category",
    "n_genes": "Int64", "doublet": "boolean", "is_ok": "bool", "depth": "int32", "score": "float32",
    "mixed": "category", "widen": "int64", "to_float": "float32", "only_a": "float64", "only_b": "boolean",
    "source_file": "category",
}  # fmt: skip


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    """Two inputs with obs of every dtype (written by this environment's anndata), converted once."""
    root = tmp_path_factory.mktemp("every_dtype")
    frames = obs_of_every_dtype()
    paths = []
    for i, obs in enumerate(frames):
        adata = make_example_adata(len(obs), 30, nnz_per_cell=4, seed=i, name_prefix="ab"[i])
        adata.obs = obs
        paths.append(write_h5ad(adata, root / f"{'ab'[i]}.h5ad"))
    out = create_store_from_h5ads(paths, root / "store", n_obs_per_file=5, progress=False)
    return paths, frames, out


def expected_text(value) -> str | None:
    return None if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else str(value)


def assert_column_equal(got: pd.Series, source: pd.Series | None, n: int, dtype: str) -> None:
    """Output cells of one input against that input's column: equal text, same bits, missing where missing."""
    got = got.reset_index(drop=True)
    if source is None:
        assert got.isna().all()
        return
    source = source.reset_index(drop=True)
    if dtype == "category":
        want = [expected_text(v) for v in source.astype(object)]
        assert [None if pd.isna(v) else v for v in got.astype(object)] == want
        return
    np.testing.assert_array_equal(got.isna().to_numpy(), source.isna().to_numpy())
    present = ~source.isna().to_numpy()
    values = got.to_numpy(dtype=np.dtype(dtype.lower()) if dtype != "boolean" else bool, na_value=0)[present]
    wanted = source.to_numpy(dtype=values.dtype, na_value=0)[present]
    np.testing.assert_array_equal(values.view(np.uint8), wanted.view(np.uint8))


def test_every_obs_dtype_round_trips_value_for_value(every_dtype):
    paths, frames, out = every_dtype
    store = read_store(out)
    assert {c: str(store.obs[c].dtype) for c in store.obs.columns} == OBS_DTYPES
    for path, frame in zip(paths, frames):
        part = store[frame.index].obs
        for column, dtype in OBS_DTYPES.items():
            if column == "source_file":
                assert (part[column].astype(str) == str(path)).all()
                continue
            assert_column_equal(part[column], frame.get(column), len(frame), dtype)
    # The case: int64 0..3 in one file, "0".."3" in the other: one category each, no duplicates.
    assert list(store.obs["mixed"].cat.categories) == ["0", "3", "2", "1", "x"]
    # Every file opens on its own with the same dtypes (anndata.read_zarr, no settings flipped).
    for f in sorted(out.glob("chunk_*.zarr")):
        assert {c: str(t) for c, t in ad.read_zarr(f).obs.dtypes.items()} == OBS_DTYPES


def test_obs_schema_in_the_manifest(every_dtype):
    schema = read_manifest(every_dtype[2]).obs_schema
    assert schema["n_genes"] == {"kind": "numeric", "dtype": "Int64", "missing": True}
    assert schema["is_ok"] == {"kind": "numeric", "dtype": "bool", "missing": False}
    assert schema["only_b"] == {"kind": "numeric", "dtype": "boolean", "missing": True}
    assert schema["only_a"] == {"kind": "numeric", "dtype": "float64", "missing": True}
    assert schema["cell_type"] == {
        "kind": "categorical", "dtype": "category", "categories": ["T", "B", "NK", "DC"], "missing": True
    }  # fmt: skip
    assert schema["cat_int"]["categories"] == ["1", "2", "3", "4"]
    assert read_manifest(every_dtype[2]).obs_join == "outer"


@pytest.mark.parametrize(
    ("kwargs", "columns"),
    [
        ({}, list(OBS_DTYPES)),
        ({"obs_join": "inner"}, [c for c in OBS_DTYPES if c not in ("barcode", "only_a", "only_b")]),
        ({"obs_columns": ["only_b", "depth"]}, ["only_b", "depth", "source_file"]),
        ({"obs_join": "inner", "obs_columns": ["depth"], "source_key": None}, ["depth"]),
    ],
    ids=["outer", "inner", "outer-selected", "inner-selected"],
)
def test_obs_join(every_dtype, tmp_path, kwargs, columns):
    paths, frames, _ = every_dtype
    out = convert(paths, tmp_path / "s", **kwargs)
    store = read_store(out)
    assert list(store.obs.columns) == columns
    assert list(read_manifest(out).obs_schema) == columns
    if "only_b" in columns:
        assert store[frames[0].index].obs["only_b"].isna().all()
        assert_column_equal(store[frames[1].index].obs["only_b"], frames[1]["only_b"], 6, "boolean")


def test_inner_join_with_a_column_some_input_lacks_is_named(every_dtype, tmp_path):
    paths, *_ = every_dtype
    with pytest.raises(InputFileError, match=r"a\.h5ad: obs has no column 'only_b'.*obs_join='outer'"):
        convert(paths, tmp_path / "s", obs_join="inner", obs_columns=["only_b"])
    assert not (tmp_path / "s").exists()


def test_obs_column_of_a_dtype_a_store_cannot_hold_is_named(tmp_path):
    a = make_example_adata(4, 10, nnz_per_cell=2, seed=1)
    a.obs["when"] = np.array([1 + 1j, 2, 3, 4])  # complex: anndata writes it, a categorical or number cannot be
    path = tmp_path / "a.h5ad"
    try:
        a.write_h5ad(path)
    except Exception:
        pytest.skip("this anndata does not write complex obs columns")
    with pytest.raises(InputFileError, match=r"a\.h5ad: obs column 'when' has dtype complex128"):
        convert([path], tmp_path / "s")


def test_var_columns_are_harmonised(tmp_path):
    a = make_example_adata(5, 6, nnz_per_cell=2, seed=1, name_prefix="a")
    b = make_example_adata(5, 6, nnz_per_cell=2, seed=2, name_prefix="b")
    a.var["symbol"] = pd.Categorical([f"S{i}" for i in range(6)])
    b.var["symbol"] = np.arange(6)  # ints elsewhere: strings in the store
    a.var["highly_variable"] = np.array([True, False] * 3)
    b.var["mean"] = np.linspace(0, 1, 6)
    paths = [write_h5ad(a, tmp_path / "a.h5ad"), write_h5ad(b, tmp_path / "b.h5ad")]
    out = convert(paths, tmp_path / "s")
    var = ad.read_zarr(out / "chunk_0.zarr").var
    assert list(var.columns) == ["symbol", "highly_variable", "mean"]
    assert list(var["symbol"].astype(str)) == [f"S{i}" for i in range(6)]  # the first input's values
    assert str(var["highly_variable"].dtype) == "boolean" and str(var["mean"].dtype) == "float64"
    assert all(type(v) is str for v in var.index)


# ------------------------------------------------------------------ ordered categoricals

STAGES = ["early", "mid", "late"]


def staged(tmp_path: Path, name: str, n: int, categories=STAGES, ordered=True, seed=0) -> Path:
    """A small .h5ad whose obs ``stage`` and var ``level`` are categoricals (ordered unless told)."""
    adata = make_example_adata(n, 6, nnz_per_cell=2, seed=seed, name_prefix=name)
    values = np.random.default_rng(seed).choice([*categories[:2], None], n)
    adata.obs["stage"] = pd.Categorical(values, categories=list(categories), ordered=ordered)
    adata.var["level"] = pd.Categorical(["low", "high"] * 3, categories=["low", "high"], ordered=ordered)
    return write_h5ad(adata, tmp_path / f"{name}.h5ad")


def test_ordered_categoricals_round_trip_ordered(tmp_path):
    paths = [staged(tmp_path, "a", 30, seed=1), staged(tmp_path, "b", 20, seed=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        out = convert(paths, tmp_path / "s", n_obs_per_file=16)
    source = pd.concat([ad.read_h5ad(p).obs["stage"] for p in paths])
    for f in sorted(out.glob("chunk_*.zarr")):  # anndata reads each file back ordered, with the same values
        part = ad.read_zarr(f)
        pd.testing.assert_series_equal(part.obs["stage"], source[part.obs_names])
        assert part.obs["stage"].dtype == pd.CategoricalDtype(STAGES, ordered=True)
        assert part.var["level"].dtype == pd.CategoricalDtype(["low", "high"], ordered=True)
        assert not part.obs["source_file"].cat.ordered
    assert read_manifest(out).obs_schema["stage"] == {
        "kind": "categorical", "dtype": "category", "categories": STAGES, "missing": True, "ordered": True
    }  # fmt: skip


@pytest.mark.parametrize(
    ("other", "how"),
    [
        ({"categories": ["mid", "early", "late"]}, "has other categories or another order"),
        ({"ordered": False}, "is not an ordered categorical"),
    ],
    ids=["other-order", "unordered"],
)
def test_inputs_that_disagree_on_the_order_give_an_unordered_column_and_one_warning(tmp_path, other, how):
    paths = [staged(tmp_path, "a", 12, seed=1), staged(tmp_path, "b", 8, seed=2, **other)]
    with pytest.warns(ConversionWarning) as caught:
        out = convert(paths, tmp_path / "s")
    ours = [str(w.message) for w in caught if "'stage'" in str(w.message)]
    assert ours == [
        f"obs column 'stage' is an ordered categorical in {paths[0]} but {how} in {paths[1]}: the store holds it "
        "unordered; make the inputs agree to keep the order"
    ]
    assert "ordered" not in read_manifest(out).obs_schema["stage"]
    source = pd.concat([ad.read_h5ad(p).obs["stage"].astype(object) for p in paths])
    for f in sorted(out.glob("chunk_*.zarr")):
        got = ad.read_zarr(f).obs["stage"]
        assert not got.cat.ordered
        assert got.astype(object).fillna("-").tolist() == source[got.index].fillna("-").tolist()


# ------------------------------------------------------------------ files from newer anndata and pandas

FIXTURES = [REPO / "tests" / "data" / "anndata013_a.h5ad", REPO / "tests" / "data" / "anndata013_b.h5ad"]
FIXTURE_DTYPES = {
    "cell_type": "category", "donor": "category", "barcode": "category", "n_counts": "Int64",
    "doublet": "boolean", "batch": "category", "flag": "bool", "score": "float64", "only_a": "category",
    "only_b": "Int64", "source_file": "category",
}  # fmt: skip


def test_fixtures_are_from_the_newer_stack():
    """Made by tests/data/make_fixtures.py under anndata 0.13 / pandas 3: pandas' str columns and names."""
    for path in FIXTURES:
        with h5py.File(path) as f:
            assert f["obs/_index"].attrs["encoding-type"] == "nullable-string-array"
            assert f["uns/written_by"][()].decode().startswith("anndata 0.13")
    with h5py.File(FIXTURES[0]) as f:
        assert f["obs/n_counts"].attrs["encoding-type"] == "nullable-integer"
        assert f["obs/doublet"].attrs["encoding-type"] == "nullable-boolean"
        assert f["obs/barcode"].attrs["encoding-type"] == "nullable-string-array"


@pytest.mark.filterwarnings("ignore::arrayloaders.errors.ConversionWarning")
def test_files_from_newer_anndata_convert_and_round_trip(tmp_path):
    out = convert(FIXTURES, tmp_path / "s", n_obs_per_file=8)
    store = read_store(out)
    assert {c: str(store.obs[c].dtype) for c in store.obs.columns} == FIXTURE_DTYPES
    for path in FIXTURES:
        source = ad.read_h5ad(path)
        part = store[list(source.obs_names)]
        assert_bit_identical(part.X, source.X)
        for column, dtype in FIXTURE_DTYPES.items():
            if column != "source_file":
                assert_column_equal(part.obs[column], source.obs.get(column), source.n_obs, dtype)
    assert list(store.obs["batch"].cat.categories) == ["0", "1", "2", "b2"]
    var = ad.read_zarr(out / "chunk_0.zarr").var
    assert list(var.index) == [f"ENSG{g:05d}" for g in range(8)]
    assert list(var["gene_symbol"].astype(str)) == [f"SYM{g}" for g in range(8)]


@pytest.mark.filterwarnings("ignore::arrayloaders.errors.ConversionWarning")
def test_newer_and_older_files_convert_together(tmp_path):
    """A file of this environment's anndata next to one of anndata 0.13: the schemas meet by the rule."""
    older = make_example_adata(5, 8, nnz_per_cell=2, seed=3, name_prefix="c")
    older.var_names = [f"ENSG{g:05d}" for g in range(8)]
    older.obs["n_counts"] = np.arange(5, dtype=np.int32)
    older.obs["cell_type"] = pd.Categorical(["T", "Mono", "T", "B", "Mono"])
    path = write_h5ad(older, tmp_path / "c.h5ad")
    out = convert([*FIXTURES, path], tmp_path / "s")
    store = read_store(out)
    assert str(store.obs["n_counts"].dtype) == "Int64"
    assert list(store.obs["cell_type"].cat.categories) == ["T", "B", "NK", "DC", "Mono"]
    assert_column_equal(store[older.obs_names].obs["n_counts"], older.obs["n_counts"], 5, "Int64")
    assert_bit_identical(store[older.obs_names].X, older.X)


def test_dropped_elements_are_named_in_one_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(FIXTURES, tmp_path / "s")
    ours = [w for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    a, b = map(str, FIXTURES)
    assert (
        f"layers 'counts' (not in every input) from {a}; obsm 'X_pca' (not in every input) from {a}; "
        f"raw (not carried) from {b}"
    ) in message
    assert "\n" not in message


def test_no_warning_when_nothing_is_dropped(h5ads, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(h5ads[:1], tmp_path / "s")
    assert not [w for w in caught if issubclass(w.category, ConversionWarning)]


# ------------------------------------------------------------------ bad input


def _csc_file(path):
    adata = make_example_adata(10, 20, nnz_per_cell=3)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(path)


def _zero_cell_file(path):
    make_example_adata(10, 20, nnz_per_cell=3)[:0].copy().write_h5ad(path)


def _damaged(edit):
    """A small valid CSR file, then ``edit(X group)`` applied with h5py (as a damaged file would be)."""

    def make(path):
        # 10 cells x 20 genes, 3 entries each: 30 entries in all
        indices = np.array([[c % 20, (c + 5) % 20, (c + 11) % 20] for c in range(10)])
        X = sp.csr_matrix((np.ones(30, np.float32), np.sort(indices, axis=1).ravel(), np.arange(0, 31, 3)), (10, 20))
        obs = pd.DataFrame(index=[f"cell_{i}" for i in range(10)])
        ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"gene_{g}" for g in range(20)])).write_h5ad(path)
        with h5py.File(path, "r+") as f:
            edit(f["X"])

    return make


def _set(name, index, value):
    def edit(x):
        values = x[name][:]
        values[index] = value
        x[name][...] = values

    return edit


def _truncate_data(x):
    data = x["data"][:-5]
    del x["data"]
    x["data"] = data


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("cell,gene\n1,2\n"), "not an .h5ad"),
        (lambda p: p.touch(), r"empty \(0 bytes\)"),
        (_csc_file, "CSC"),
        (_zero_cell_file, "no cells"),
        (lambda p: h5py.File(p, "w").close(), "no X"),
        (_damaged(_set("indptr", 4, 1)), "indptr decreases at row 3"),
        (_damaged(_set("indptr", 0, 2)), "indptr starts at 2"),
        (_damaged(_set("indptr", -1, 29)), "indptr ends at 29 but X/data holds 30"),
        (_damaged(_truncate_data), "X/indices has 30 entries but X/data 25"),
    ],
    ids=[
        "missing", "not-h5ad", "empty-file", "csc", "zero-cells", "no-X", "indptr-decreasing", "indptr-start",
        "indptr-end", "data-truncated",
    ],
)  # fmt: skip
def test_bad_input_names_the_file_and_problem(h5ads, tmp_path, make, message):
    bad = tmp_path / "bad.h5ad"
    make(bad)
    with pytest.raises(InputFileError, match=message) as info:
        convert([h5ads[0], bad], tmp_path / "s")
    assert str(bad) in str(info.value)
    assert not (tmp_path / "s" / "arrayloaders.json").exists()


def test_column_index_out_of_range_is_found_while_reading(tmp_path):
    _damaged(_set("indices", 7, 20))(tmp_path / "bad.h5ad")
    with pytest.raises(InputFileError, match="bad.h5ad: X/indices holds column 20 in rows 0-9, outside the 20 genes"):
        convert([tmp_path / "bad.h5ad"], tmp_path / "s", tmp_dir=tmp_path / "scratch")
    assert not (tmp_path / "s").exists() and list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.parametrize("one", [str, Path], ids=["str", "Path"])
def test_a_single_path_instead_of_a_list_is_refused(h5ads, tmp_path, one):
    with pytest.raises(InputFileError, match="list of .h5ad paths, not a single path.*" + h5ads[0].name):
        convert(one(h5ads[0]), tmp_path / "s")
    assert not (tmp_path / "s").exists()


SPELLINGS = {
    "same-spelling": lambda p, tmp: p,
    "dotdot": lambda p, tmp: p.parent / ".." / p.parent.name / p.name,
    "relative": lambda p, tmp: Path(os.path.relpath(p)),
    "symlink": lambda p, tmp: _link(tmp / "link.h5ad", p),
    "hardlink": lambda p, tmp: _hardlink(tmp / "hard.h5ad", p),
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _hardlink(link: Path, target: Path) -> Path:
    os.link(target, link)
    return link


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_same_file_twice_is_refused(h5ads, tmp_path, spelling):
    again = SPELLINGS[spelling](h5ads[0], tmp_path)
    with pytest.raises(InputFileError, match="given twice") as info:
        convert([h5ads[0], h5ads[1], again], tmp_path / "s")
    assert str(again) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "s").exists()


def test_mixed_dense_and_csr_is_refused(h5ads, dense_h5ads, tmp_path):
    with pytest.raises(InputFileError, match="mix CSR and dense"):
        convert([h5ads[0], dense_h5ads[0]], tmp_path / "s", var_join="outer")


def _with_keys(path: Path) -> None:
    """A small valid .h5ad with an obs column, a var column, a CSR layer and an obsm array, each named ``x``."""
    adata = make_example_adata(12, 6, nnz_per_cell=2, seed=4, name_prefix="k")
    adata.obs["x"], adata.var["x"] = np.arange(12), np.arange(6)
    adata.layers["x"], adata.obsm["x"] = adata.X.copy(), np.ones((12, 2), np.float32)
    adata.write_h5ad(path)


def _renamed(kind: str, key: str):
    """``kind``'s ``x`` as anndata 0.12 writes it under ``key`` (0.13 refuses to): a key with '/' is nested
    in groups (``obs/a/b``); a dataframe's column order is edited by hand."""

    def make(path):
        _with_keys(path)
        with h5py.File(path, "r+") as f:
            f.move(f"{kind}/x", f"{kind}/{key or 'y'}")
            if kind in ("obs", "var"):
                order = [str(c) for c in f[kind].attrs["column-order"]]
                f[kind].attrs["column-order"] = np.array([key if c == "x" else c for c in order], dtype=object)

    return make


def _overwritten(kind: str):
    """``kind`` as anndata 0.12 writes it for a key '': the element's value written over the whole group."""

    def make(path):
        _with_keys(path)
        with h5py.File(path, "r+") as f:
            del f[kind]
            f[kind] = np.ones((12, 6) if kind != "var" else 6, np.float32)

    return make


# id -> (makes the file, the key's description in the message, how to leave it out: extra arguments, or None)
BAD_KEYS = {
    **{f"{kind}-slash": (_renamed(kind, "a/b"), f"{what} 'a/b' has a '/' in its name", leave)
       for kind, what, leave in (("obs", "obs column", {"obs_columns": []}), ("var", "var column", None),
                                 ("layers", "layers key", {"layers": []}), ("obsm", "obsm key", {"obsm_keys": []}))},
    "obs-nested-slashes": (_renamed("obs", "a/b/c"), "obs column 'a/b/c' has a '/'", {"obs_columns": []}),
    "obs-empty": (_renamed("obs", ""), "obs column '' has an empty name", {"obs_columns": []}),
    "var-empty": (_renamed("var", ""), "var column '' has an empty name", None),
    "var-overwritten": (_overwritten("var"), "not an AnnData file (no obs/var groups)", None),
    **{f"{kind}-overwritten": (_overwritten(kind), f"{kind} is not a group (a damaged file, or one written with an "
                                f"empty {kind} key)", None) for kind in ("layers", "obsm")},
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_a_key_zarr_cannot_hold_is_refused_before_any_output_naming_file_and_key(tmp_path, case):
    make, text, leave_out = BAD_KEYS[case]
    bad = tmp_path / "bad.h5ad"
    make(bad)
    with pytest.raises(InputFileError) as info:
        convert([bad], tmp_path / "s")
    message = str(info.value)
    assert message.startswith(f"{bad}: {text}") and "\n" not in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]  # no output, no staging directory
    if leave_out is not None:  # what the message suggests works
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            assert read_manifest(convert([bad], tmp_path / "s", **leave_out)).n_obs == 12


@pytest.mark.parametrize("key", ["a/b", ""])
def test_a_source_key_zarr_cannot_hold_is_refused(h5ads, tmp_path, key):
    with pytest.raises(ValueError, match=rf"source_key must be a non-empty name without '/' \(or None\), got {key!r}"):
        convert(h5ads[:1], tmp_path / "s", source_key=key)
    assert not (tmp_path / "s").exists() and not siblings(tmp_path)


# ------------------------------------------------------------------ the output directory


def siblings(directory: Path) -> list[Path]:
    """Hidden directories a conversion builds in (``.NAME.arrayloaders-…``) or keeps scratch in."""
    return sorted(p for p in directory.iterdir() if ".arrayloaders-" in p.name)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its contents (to prove that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_existing_output_is_refused_unless_overwrite(h5ads, tmp_path):
    out = convert(h5ads[:1], tmp_path / "s")
    with pytest.raises(StoreError, match="already exists.*overwrite=True"):
        convert(h5ads[:1], out)
    convert(h5ads[1:2], out, overwrite=True)
    assert read_manifest(out).n_obs == SIZES[1]
    assert read_store(out).n_obs == SIZES[1]
    assert siblings(tmp_path) == []  # the old store and the staging directory are gone


@pytest.fixture
def inputs_in_a_tree(h5ads, tmp_path):
    """Two inputs copied to tmp_path/data/raw/{a,b}.h5ad, and a symlink to their directory."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    paths = [raw / "a.h5ad", raw / "b.h5ad"]
    for src, dst in zip(h5ads[:2], paths):
        shutil.copy(src, dst)
    (tmp_path / "link").symlink_to(raw, target_is_directory=True)
    return paths


OUTPUT_AT_INPUTS = {
    "input-directory": lambda root: root / "data" / "raw",
    "input-parent": lambda root: root / "data",
    "input-grandparent": lambda root: root,
    "symlink-to-input-directory": lambda root: root / "link",
    "dotdot-spelling": lambda root: root / "data" / "raw" / ".." / "raw",
    "input-file": lambda root: root / "data" / "raw" / "a.h5ad",
    "input-through-symlink": lambda root: root / "link" / "b.h5ad",
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["no-overwrite", "overwrite"])
@pytest.mark.parametrize("where", list(OUTPUT_AT_INPUTS))
def test_output_at_or_above_an_input_is_refused(inputs_in_a_tree, tmp_path, where, overwrite):
    before = tree(tmp_path / "data")
    with pytest.raises(StoreError, match="input") as info:
        convert(inputs_in_a_tree, OUTPUT_AT_INPUTS[where](tmp_path), overwrite=overwrite)
    assert "\n" not in str(info.value)
    assert tree(tmp_path / "data") == before  # nothing deleted, nothing added
    assert siblings(tmp_path) == [] and siblings(tmp_path / "data") == []


def test_input_given_through_a_symlinked_directory_is_protected(inputs_in_a_tree, tmp_path):
    with pytest.raises(StoreError, match="contains the input"):
        convert([tmp_path / "link" / "a.h5ad"], tmp_path / "data", overwrite=True)
    assert (tmp_path / "data" / "raw" / "a.h5ad").exists()


@pytest.mark.parametrize("overwrite", [False, True], ids=["no-overwrite", "overwrite"])
def test_foreign_directory_is_never_replaced(h5ads, tmp_path, overwrite):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Results}")
    message = "not an arrayloaders store.*thesis.tex" if overwrite else "already exists"
    with pytest.raises(StoreError, match=message):
        convert(h5ads[:1], thesis, overwrite=overwrite)
    assert tree(thesis) == {"thesis.tex": b"\\chapter{Results}"}
    assert siblings(tmp_path) == []


@pytest.mark.parametrize("where", ["arrayloaders.notes", "chunk_0.zarr/obs/notes.txt", "chunk_0.zarr/X/data/c/0.bak"])
def test_store_holding_a_foreign_file_is_not_replaced(h5ads, tmp_path, where):
    out = convert(h5ads[:1], tmp_path / "s")
    (out / where).write_text("mine")
    before = tree(out)
    with pytest.raises(StoreError, match="not part of it.*" + where.split("/")[-1].replace(".", r"\.")):
        convert(h5ads[1:2], out, overwrite=True)
    assert tree(out) == before
    assert siblings(tmp_path) == []


def test_empty_directory_and_missing_parents_are_fine(h5ads, tmp_path):
    (tmp_path / "empty").mkdir()
    convert(h5ads[:1], tmp_path / "empty")
    assert read_manifest(tmp_path / "empty").n_obs == SIZES[0]
    convert(h5ads[:1], tmp_path / "new" / "deeper" / "s")
    assert read_manifest(tmp_path / "new" / "deeper" / "s").n_obs == SIZES[0]


def test_output_that_is_a_file_is_refused(h5ads, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        convert(h5ads[:1], tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("stage", ["scan", "write"])
def test_failed_conversion_leaves_nothing(h5ads, tmp_path, monkeypatch, stage):
    """A failure before or during the passes: no output, no staging directory, no scratch, no new parents."""
    import arrayloaders.convert.create as convert_module

    if stage == "write":
        real = convert_module.write_output_file

        def fail_on_second_file(path, *args):
            if path.name == "chunk_1.zarr":
                raise RuntimeError("disk full")
            real(path, *args)

        monkeypatch.setattr(convert_module, "write_output_file", fail_on_second_file)
        paths, error = h5ads, RuntimeError
    else:
        (tmp_path / "bad.h5ad").write_text("not hdf5")
        paths, error = [h5ads[0], tmp_path / "bad.h5ad"], InputFileError
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(error):
        convert(paths, tmp_path / "new" / "s", n_obs_per_file=300, tmp_dir=scratch)
    assert not (tmp_path / "new").exists()
    assert siblings(tmp_path) == [] and list(scratch.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_swaps_in_the_new_store(h5ads, tmp_path, monkeypatch, exchange):
    import arrayloaders.convert.output as output_module

    calls = []
    real = output_module.exchange_paths

    def spy(a, b):
        calls.append((a, b))
        return real(a, b) if exchange else False

    monkeypatch.setattr(output_module, "exchange_paths", spy)
    out = convert(h5ads[:1], tmp_path / "s")
    convert(h5ads[2:3], out, overwrite=True)
    assert len(calls) == 1
    assert read_manifest(out).n_obs == SIZES[2]
    src = read_sources(h5ads[2:3])
    assert_bit_identical(read_store(out)[src.obs_names].X, src.X)
    assert siblings(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_paths_swaps_two_directories(tmp_path):
    from arrayloaders.convert.output import exchange_paths

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a"), (tmp_path / "b" / "y").write_text("b")
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "y").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    with pytest.raises(OSError):
        exchange_paths(tmp_path / "a", tmp_path / "missing")


def test_tmp_dir_holds_the_buckets_and_is_left_clean(h5ads, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "other.txt").write_text("keep")
    out = convert(h5ads, tmp_path / "s", tmp_dir=scratch)
    assert read_manifest(out).n_obs == sum(SIZES)
    assert sorted(p.name for p in scratch.iterdir()) == ["other.txt"]
    with pytest.raises(StoreError, match="tmp_dir.*inside the output"):
        convert(h5ads, out, overwrite=True, tmp_dir=out / "tmp")


def test_directory_without_manifest_is_not_a_store(tmp_path):
    (tmp_path / "half" / "chunk_0.zarr").mkdir(parents=True)
    with pytest.raises(StoreError, match="not an arrayloaders store"):
        read_manifest(tmp_path / "half")
    with pytest.raises(StoreError, match="no such store"):
        read_manifest(tmp_path / "nothing")


def start_and_kill_conversion(paths, out: Path, **kwargs) -> None:
    """Run a conversion in a subprocess (a process group of its own) and, once its staging directory has an X
    chunk file, freeze the group (SIGSTOP), check that it had not finished, and SIGKILL the group."""
    import psutil

    script = f"""
        from arrayloaders import create_store_from_h5ads
        create_store_from_h5ads({[str(p) for p in paths]!r}, {str(out)!r}, progress=False, **{kwargs!r})
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], start_new_session=True)
    pattern = f".{out.name}.arrayloaders-*/chunk_*.zarr/X/data/c/*"
    children = []
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "conversion finished before it could be killed"
        # Frozen first, so that it cannot finish between the check that it has not and the kill.
        os.killpg(proc.pid, signal.SIGSTOP)
        main = psutil.Process(proc.pid)
        children = main.children(recursive=True)
        deadline = time.monotonic() + 60  # a runnable process stops only once it next gets a core
        while main.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
            assert time.monotonic() < deadline, main.status()
            time.sleep(0.005)
        assert main.status() == psutil.STATUS_STOPPED, "conversion finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        psutil.wait_procs(children, timeout=30)
    assert proc.returncode == -signal.SIGKILL, "conversion finished before it could be killed"


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    """Inputs large enough (6,000 cells x 300 non-zeros) that a conversion can be killed half-way."""
    return write_example_h5ads(tmp_path_factory.mktemp("slow"), (3000, 3000), 2000, nnz_per_cell=300)


def test_killed_conversion_leaves_no_output_and_the_next_run_cleans_up(slow_inputs, tmp_path):
    out = tmp_path / "s"
    start_and_kill_conversion(slow_inputs, out, n_obs_per_file=500)
    assert not out.exists()  # never a partial store at the output
    assert len(siblings(tmp_path)) == 1  # the dead conversion's staging directory
    convert(slow_inputs[:1], out, n_obs_per_file=500)
    assert read_manifest(out).n_obs == 3000
    assert siblings(tmp_path) == []


def test_killed_overwrite_keeps_the_old_store(h5ads, slow_inputs, tmp_path):
    out = convert(h5ads[:1], tmp_path / "s")
    old = read_store(out)
    before = tree(out)
    start_and_kill_conversion(slow_inputs, out, n_obs_per_file=500, overwrite=True)
    assert tree(out) == before
    still = read_store(out)
    assert_bit_identical(still.X, old.X)
    np.testing.assert_array_equal(still.obs_names, old.obs_names)
    assert len(siblings(tmp_path)) == 1
    convert(h5ads[1:2], out, overwrite=True)
    assert read_manifest(out).n_obs == SIZES[1]
    assert siblings(tmp_path) == []


# ------------------------------------------------------------------ damaged stores


def damaged_copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    return copy


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x04
    path.write_bytes(bytes(raw))


def x_source(store: Path, name: str = "chunk_0.zarr") -> XSource:
    m = read_manifest(store, verify=False)
    n_obs = next(f["n_obs"] for f in m.files if f["name"] == name)
    path = "X"
    return XSource(zarr.storage.LocalStore(store / name, read_only=True), path, m.x_format, n_obs, m.n_vars, m.dtype)


def read_all_rows(store: Path) -> None:
    """Every row of chunk_0.zarr through the loader's reader (straight from the shard files)."""
    rows = open_rows(x_source(store))
    try:
        assert rows.direct
        list(rows.runs(np.array([[0, rows.source.n_obs]], dtype=np.int64)))
    finally:
        rows.close()


@pytest.mark.parametrize("kind", ["csr", "dense", "csr-all-empty"])
def test_chunks_holding_only_zeros_are_written(tmp_path, kind):
    """zarr leaves out chunks of fill values (zarrs even when told not to): our stores must hold every chunk."""
    n_obs, n_vars = 40, 16
    if kind == "dense":
        X = np.zeros((n_obs, n_vars), np.float32)
        X[30:] = 1.0  # rows 0-29 all zero: whole chunks of zeros
    else:
        X = sp.random(n_obs, n_vars, density=0.3, format="csr", dtype=np.float32, random_state=0)
        X.data[: X.indptr[25]] = 0.0  # explicit zeros: stored entries whose value is the fill value
        X.indices[: X.indptr[25]] = 0  # ... and column 0, so indices chunks are all zero too
        if kind == "csr-all-empty":
            X = sp.csr_matrix((n_obs, n_vars), dtype=np.float32)  # indptr all zero
    adata = ad.AnnData(X, obs=pd.DataFrame({"flag": np.zeros(n_obs, bool)}, index=[f"c{i}" for i in range(n_obs)]))
    path = write_h5ad(adata, tmp_path / "zeros.h5ad")
    layout = XLayout(chunk_elements=16, shard_elements=64, dense_chunk_bytes=4 * n_vars * 4, dense_shard_bytes=16 * n_vars * 4)
    out = convert([path], tmp_path / "s", shuffle=False, layout=layout, source_key=None)
    group = zarr.open_group(out / "chunk_0.zarr", mode="r")
    arrays = [node for _, node in group.members(max_depth=None) if isinstance(node, zarr.Array) and node.ndim]
    assert len(arrays) >= 3
    for array in arrays:
        assert array.attrs[COMPLETE_ATTRIBUTE] is True
        assert missing_chunk_files(array) == [], array.path
        assert unwritten_chunks(array) in ([], None), array.path
    read_manifest(out)
    assert_bit_identical(read_store(out).X, ad.read_h5ad(path).X)


PER_SHARD = XLayout().shard_elements // XLayout().chunk_elements  # shard index entries

# id -> byte to flip in a shard file of X/data or X/indices, from its first chunk's (offset, nbytes) and the file size
X_FLIPS = {
    "blosc-header": lambda at, n, size: at + 2,
    "blosc-payload": lambda at, n, size: at + n // 2,
    "chunk-crc32c": lambda at, n, size: at + n - 2,
    "shard-index": lambda at, n, size: size - 4 - 16 * PER_SHARD + 9,
    "shard-index-crc32c": lambda at, n, size: size - 2,
}


@pytest.mark.parametrize("array", ["data", "indices"])
@pytest.mark.parametrize("damage", [*X_FLIPS, "deleted"])
def test_damaged_x_is_detected_naming_the_file(store, tmp_path, array, damage):
    copy = damaged_copy(store, tmp_path)
    shard = copy / "chunk_0.zarr" / "X" / array / "c" / "0"
    read_all_rows(copy)  # intact: reads
    if damage == "deleted":
        shard.unlink()
        with pytest.raises(StoreError, match=f"{shard}: chunk file of chunk_0.zarr/X/{array} is missing"):
            read_manifest(copy)
    else:
        size = shard.stat().st_size
        at, n = np.frombuffer(shard.read_bytes()[size - 4 - 16 * PER_SHARD :][:16], "<u8").tolist()
        flip_byte(shard, X_FLIPS[damage](at, n, size))
    with pytest.raises(OSError, match=str(shard)) as info:
        read_all_rows(copy)
    assert any(word in str(info.value) for word in ("checksum mismatch", "shard index", "missing"))


@pytest.mark.parametrize("damage", ["flip-payload", "flip-crc32c", "deleted"])
def test_damaged_indptr_is_detected_naming_the_file(store, tmp_path, damage):
    copy = damaged_copy(store, tmp_path)
    chunk = copy / "chunk_0.zarr" / "X" / "indptr" / "c" / "0"
    if damage == "deleted":
        chunk.unlink()
        with pytest.raises(StoreError, match=f"{chunk}: chunk file of chunk_0.zarr/X/indptr is missing"):
            read_manifest(copy)
    else:
        flip_byte(chunk, 20 if damage == "flip-payload" else chunk.stat().st_size - 1)
    with pytest.raises(OSError, match=str(chunk.parent.parent if damage != "deleted" else chunk)):
        read_all_rows(copy)


@pytest.mark.parametrize("row", [0, 2, 3, 5, 8])
def test_a_decreasing_row_pointer_is_found_in_any_piece(row):
    from arrayloaders.store.rows import _first_decrease

    pointer = np.arange(10) * 2
    pointer[row + 1] = pointer[row] - 1
    assert _first_decrease(pointer, step=3) == row  # pieces of 3 steps: at, before and past piece ends
    assert _first_decrease(np.arange(10), step=3) is None


@pytest.mark.parametrize("damage", ["flip-payload", "flip-crc32c"])
def test_damaged_compressed_indptr_of_an_older_store_is_detected_naming_the_file(store, tmp_path, damage):
    copy = with_compressed_indptr(store, tmp_path / "older")
    chunk = copy / "chunk_0.zarr" / "X" / "indptr" / "c" / "1"
    flip_byte(chunk, 20 if damage == "flip-payload" else chunk.stat().st_size - 1)
    with pytest.raises(OSError, match=str(chunk.parent.parent)):
        read_all_rows(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.__setitem__(5, p[4] - 1), "decreases at row 4"),
        (lambda p: p.__setitem__(0, 1), "starts at 1, not 0"),
        (lambda p: p.__setitem__(-1, p[-1] + 1), "ends at .* but data holds"),
    ],
    ids=["decreasing", "first", "last"],
)
def test_inconsistent_indptr_with_a_valid_checksum_is_refused(store, tmp_path, edit, message):
    copy = damaged_copy(store, tmp_path)
    array = zarr.open_array(copy / "chunk_0.zarr" / "X" / "indptr", mode="r+")
    values = array[:]
    edit(values)
    array[:] = values  # written through zarr: the checksum matches the wrong values
    with pytest.raises(StoreError, match=f"{copy / 'chunk_0.zarr' / 'X' / 'indptr'}: {message}"):
        read_all_rows(copy)


@pytest.mark.parametrize("damage", ["flip-payload", "flip-crc32c", "deleted"])
@pytest.mark.parametrize("array", ["cell_type/codes", "cell_type/categories", "batch", "_index"])
def test_damaged_obs_is_detected_naming_the_array(store, tmp_path, array, damage):
    copy = damaged_copy(store, tmp_path)
    chunk = copy / "chunk_0.zarr" / "obs" / array / "c" / "0"
    assert read_obs(copy, "chunk_0.zarr").shape[0] == read_manifest(copy).files[0]["n_obs"]
    if damage == "deleted":
        chunk.unlink()
        with pytest.raises(StoreError, match=f"{chunk}: chunk file of chunk_0.zarr/obs/{array} is missing"):
            read_manifest(copy)
        return
    flip_byte(chunk, chunk.stat().st_size // 2 if damage == "flip-payload" else chunk.stat().st_size - 1)
    read_manifest(copy)  # metadata and files are fine: the damage is inside a chunk
    for columns in (None, ["cell_type", "batch"]):
        with pytest.raises(StoreError, match=f"{copy / 'chunk_0.zarr'}/obs/{array}: cannot be read"):
            read_obs(copy, "chunk_0.zarr", columns)


def test_read_obs_reads_the_columns_asked_for(store):
    full = read_obs(store, "chunk_1.zarr")
    some = read_obs(store, "chunk_1.zarr", ["batch", "cell_type"])
    assert list(some.columns) == ["batch", "cell_type"]
    pd.testing.assert_frame_equal(some, full[["batch", "cell_type"]])
    unnamed = read_obs(store, "chunk_1.zarr", ["batch"], index=False)  # what the loader reads: no obs_names
    assert isinstance(unnamed.index, pd.RangeIndex)
    pd.testing.assert_frame_equal(unnamed, full[["batch"]].reset_index(drop=True))
    with pytest.raises(StoreError, match="chunk_1.zarr/obs: has no column"):
        read_obs(store, "chunk_1.zarr", ["nope"])


@pytest.mark.parametrize("damage", ["flip-payload", "deleted"])
def test_damaged_dense_x_is_detected_naming_the_file(dense_h5ads, tmp_path, damage):
    out = convert(dense_h5ads, tmp_path / "s", n_obs_per_file=64)
    shard = out / "chunk_0.zarr" / "X" / "c" / "0" / "0"
    if damage == "deleted":
        shard.unlink()
        with pytest.raises(StoreError, match=f"{shard}: chunk file of chunk_0.zarr/X is missing"):
            read_manifest(out)
    else:
        flip_byte(shard, 30)
    rows = open_rows(x_source(out))
    with pytest.raises(OSError, match=str(shard)):
        list(rows.runs(np.array([[0, rows.source.n_obs]], dtype=np.int64)))
    rows.close()


def edit_manifest(store: Path, change) -> None:
    path = store / "arrayloaders.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


MANIFEST_EDITS = {
    "n_obs": (lambda m: m.__setitem__("n_obs", m["n_obs"] + 1), "'n_obs' .* is not the sum"),
    "file-n_obs": (
        lambda m: (m["files"][0].__setitem__("n_obs", m["files"][0]["n_obs"] + 1), m.__setitem__("n_obs", m["n_obs"] + 1)),
        "'files' entry of chunk_0.zarr says",
    ),
    "dtype": (lambda m: m.__setitem__("dtype", "float64"), "'dtype' \\(float64\\) differs from X of chunk_0.zarr"),
    "n_vars": (lambda m: m.__setitem__("n_vars", m["n_vars"] - 1), "'n_vars'"),
    "var_names": (lambda m: m["var_names"].pop(), "'n_vars'"),
    "duplicate-file": (lambda m: m["files"].append(dict(m["files"][0])), "'files' list chunk_0.zarr more than once"),
    "missing-file": (lambda m: m["files"][1].__setitem__("name", "chunk_9.zarr"), "missing: chunk_9.zarr"),
    "obs_schema": (lambda m: m["obs_schema"].pop("batch"), "'obs_schema' lists columns"),
    "format_version": (lambda m: m.__setitem__("format_version", 99), "format version 99 is not supported"),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_an_edited_manifest_is_refused_naming_store_and_field(store, tmp_path, edit):
    copy = damaged_copy(store, tmp_path)
    change, message = MANIFEST_EDITS[edit]
    edit_manifest(copy, change)
    with pytest.raises(StoreError, match=message) as info:
        read_manifest(copy)
    assert str(copy) in str(info.value) and "\\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_stores_of_format_1_without_checksums_still_load(h5ads, tmp_path):
    """A store as written before checksums: no crc32c, no completeness mark, chunks of fill values left out."""
    out = convert(h5ads[:1], tmp_path / "s", layout=XLayout(checksum=False), n_obs_per_file=200)
    for f in sorted(out.glob("chunk_*.zarr")):
        group = zarr.open_group(f, mode="r+")
        for _, node in group.members(max_depth=None):
            if isinstance(node, zarr.Array) and COMPLETE_ATTRIBUTE in node.attrs:
                del node.attrs[COMPLETE_ATTRIBUTE]
        (f / "obs" / "source_file" / "codes" / "c" / "0").unlink()  # all 0: zarr left such chunks out
        zarr.consolidate_metadata(f)

    def as_version_1(m):
        m["format_version"] = 1
        del m["obs_join"]
        m["obs_schema"] = {
            c: {"kind": s["kind"], "categories": s["categories"]} if s["kind"] == "categorical" else {"kind": "numeric", "dtype": s["dtype"]}
            for c, s in m["obs_schema"].items()
        }

    edit_manifest(out, as_version_1)
    m = read_manifest(out)
    assert m.format_version == 1 and m.obs_join is None
    for f in m.files:
        obs = read_obs(out, f["name"])
        assert (obs["source_file"].astype(str) == str(h5ads[0])).all()
    read_all_rows(out)
    src = read_sources(h5ads[:1])
    assert_bit_identical(read_store(out)[src.obs_names].X, src.X)


# ------------------------------------------------------------------ memory bound


def test_peak_memory_stays_within_budget(tmp_path):
    """Inputs over 4x the budget: the conversion's peak RSS grows by less than the budget.

    RSS is sampled (psutil) in the converting subprocess from just before the
    conversion; a tiny warm-up conversion first loads the libraries and
    starts their thread pools, a fixed cost that does not grow with the input.
    """
    budget = 112 * 2**20
    layout = "XLayout(shard_elements=2**19)"
    paths = write_example_h5ads(tmp_path / "in", (22_000, 22_000, 22_000), 4000, nnz_per_cell=1000)
    warm = write_example_h5ads(tmp_path / "warm", (50,), 4000, nnz_per_cell=1000)
    input_bytes = 0
    for p in paths:
        with h5py.File(p) as f:
            input_bytes += f["X/data"].shape[0] * 8
    assert input_bytes > 4 * budget, "the input must be several times the budget"
    script = f"""
        import json, threading, time, psutil
        from arrayloaders import XLayout, create_store_from_h5ads
        kw = dict(memory_budget={budget}, layout={layout}, progress=False)
        create_store_from_h5ads({[str(p) for p in warm]!r}, {str(tmp_path / "w")!r}, **kw)
        me = psutil.Process()
        base = me.memory_info().rss
        peak, done = [base], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], me.memory_info().rss)
                time.sleep(0.002)
        sampler = threading.Thread(target=sample)
        sampler.start()
        create_store_from_h5ads({[str(p) for p in paths]!r}, {str(tmp_path / "s")!r}, n_obs_per_file=20000, **kw)
        done.set()
        sampler.join()
        print(json.dumps({{"base": base, "peak": peak[0]}}))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    grown = figures["peak"] - figures["base"]
    assert 0 < grown < budget, (
        f"peak RSS grew {grown / 2**20:.0f} MiB over a {budget / 2**20:.0f} MiB budget "
        f"converting {input_bytes / 2**20:.0f} MiB of X"
    )
    assert read_manifest(tmp_path / "s").n_obs == 66_000


def test_budget_too_small_for_the_shards_is_refused(h5ads, tmp_path):
    with pytest.raises(ValueError, match="too small for X shards"):
        convert(h5ads, tmp_path / "s", memory_budget="96MB")


# ------------------------------------------------------------------ command line


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert.py"), *map(str, args)], capture_output=True, text=True
    )


def test_cli_help_documents_every_option():
    res = run_cli("--help")
    assert res.returncode == 0
    for option in (
        "--output", "--no-shuffle", "--seed", "--n-obs-per-file", "--var-join", "--obs-join", "--obs-columns", "--layers", "--obsm-keys", "--source-key",
        "--memory-budget", "--compressor", "--level", "--chunk-elements", "--shard-elements", "--tmp-dir",
        "--overwrite", "--quiet", "--debug", "--n-jobs",
    ):  # fmt: skip
        assert option in res.stdout


def test_cli_converts(h5ads, tmp_path):
    res = run_cli(
        *h5ads, "-o", tmp_path / "s", "--seed", "3", "--n-obs-per-file", "600", "-q", "--obs-join", "inner", "--n-jobs", "2"
    )
    assert res.returncode == 0, res.stderr
    m = read_manifest(tmp_path / "s")
    assert m.seed == 3 and len(m.files) == 2 and m.n_obs == sum(SIZES) and m.obs_join == "inner"


@pytest.fixture(scope="module")
def cli_main():
    """``scripts/convert.py``'s ``main``, imported (in-process runs are faster than a subprocess each)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_script", REPO / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _damaged_indptr(tmp_path, h5ads):
    _damaged(_set("indptr", 4, 1))(tmp_path / "damaged.h5ad")
    return [tmp_path / "damaged.h5ad"]


def _foreign_output(tmp_path, h5ads):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "thesis.tex").write_text("x")
    return [h5ads[0], "--overwrite"]


# id -> (arguments after the inputs, a function making the inputs, text the one line must hold)
CLI_ERRORS = {
    "missing-file": (lambda tmp, h: [tmp / "missing.h5ad"], "missing.h5ad: no such file"),
    "not-h5ad": (lambda tmp, h: [_text_file(tmp / "cells.h5ad")], "cells.h5ad: not an .h5ad"),
    "same-file-twice": (lambda tmp, h: [h[0], h[0]], "given twice"),
    "same-file-other-spelling": (lambda tmp, h: [h[0], h[0].parent / ".." / h[0].parent.name / h[0].name], "given twice"),
    "damaged-indptr": (_damaged_indptr, "damaged.h5ad: X/indptr decreases"),
    "output-is-input-directory": (lambda tmp, h: [_copy(h[0], tmp / "a.h5ad"), "-o", tmp], "contains the input"),
    "foreign-output-directory": (_foreign_output, "not an arrayloaders store"),
    "memory-budget-unparsable": (lambda tmp, h: [h[0], "--memory-budget", "lots"], "cannot parse a size from 'lots'"),
    "memory-budget-too-small": (lambda tmp, h: [h[0], "--memory-budget", "1MB"], "too small for X shards"),
}


def _text_file(path):
    path.write_text("cell,gene\n")
    return path


def _copy(src, dst):
    shutil.copy(src, dst)
    return dst


def _one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_reports_each_error_in_one_line(cli_main, h5ads, tmp_path, capsys, case):
    make, text = CLI_ERRORS[case]
    args = [str(a) for a in make(tmp_path, h5ads)]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "s")]
    assert cli_main.main([*args, "-q"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("convert.py: error: ") and text in line, line
    assert "internal error" not in line


@pytest.mark.parametrize("case", [*BAD_KEYS, "source-key"])
def test_cli_refuses_a_key_zarr_cannot_hold_in_one_line(cli_main, h5ads, tmp_path, capsys, case):
    if case == "source-key":
        args = [str(h5ads[0]), "--source-key", "a/b"]
        text = "source_key must be a non-empty name without '/' (or None), got 'a/b'"
    else:
        make, what, _ = BAD_KEYS[case]
        make(tmp_path / "bad.h5ad")
        args, text = [str(tmp_path / "bad.h5ad")], f"{tmp_path / 'bad.h5ad'}: {what}"
    assert cli_main.main([*args, "-o", str(tmp_path / "s"), "-q"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"convert.py: error: {text}") and "internal error" not in line, line
    assert not (tmp_path / "s").exists() and not siblings(tmp_path)


def test_cli_prints_the_warning_in_one_line(cli_main, tmp_path, capsys):
    assert cli_main.main([*map(str, FIXTURES), "-o", str(tmp_path / "s"), "-q"]) == 0
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("convert.py: warning: the store does not hold these elements") and "raw (not carried) from" in line


def test_cli_reports_an_unexpected_error_as_internal(cli_main, h5ads, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(cli_main, "create_store_from_h5ads", broken)
    assert cli_main.main([str(h5ads[0]), "-o", str(tmp_path / "s"), "-q"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line == "convert.py: error: internal error: KeyError: 'surprise' (run with --debug to see the traceback)"
    with pytest.raises(KeyError, match="surprise"):
        cli_main.main([str(h5ads[0]), "-o", str(tmp_path / "s"), "-q", "--debug"])


def test_cli_bad_arguments_are_one_line_too(cli_main, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main.main(["x.h5ad", "-o", "s", "--no-such-option"])
    assert info.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("convert.py: error: unrecognized arguments: --no-such-option")


def test_cli_process_prints_one_line_and_no_traceback(h5ads, tmp_path):
    """The real process, without -q: the same file twice (19 lines of traceback before) and a missing file."""
    res = run_cli(h5ads[0], h5ads[0], "-o", tmp_path / "s")
    assert res.returncode == 1
    assert _one_line(res.stderr).startswith("convert.py: error: ") and "given twice" in res.stderr
    res = run_cli(tmp_path / "missing.h5ad", "-o", tmp_path / "t")
    assert res.returncode == 1 and _one_line(res.stderr) == f"convert.py: error: {tmp_path / 'missing.h5ad'}: no such file"
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_a_second_ctrl_c_while_a_failed_conversion_cleans_up_leaves_nothing(h5ads, tmp_path, monkeypatch):
    """Ctrl-C twice: the second lands while the first one's cleanup removes the staged store (a flaky CI run
    caught it there, leaving the hidden staging directory). Cleanup ignores it and finishes."""
    import os
    import signal

    import arrayloaders.convert.output as output

    removing = output.remove_tree
    interrupted = []

    def remove_tree_interrupted(path):
        interrupted.append(path)
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, delivered in the middle of the cleanup
        removing(path)

    def first_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "remove_tree", remove_tree_interrupted)
    monkeypatch.setattr("arrayloaders.convert.create.write_manifest", first_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if run in the background
    try:
        with pytest.raises(KeyboardInterrupt):
            create_store_from_h5ads(h5ads, tmp_path / "s", progress=False, n_obs_per_file=256)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted and list(tmp_path.iterdir()) == []

