"""Conversion carries layers and obsm: round trip, selection, errors, damage, the manifest (issue #14)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import assert_bit_identical
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convert import damaged_copy, flip_byte

from arrayloaders import ConversionWarning, InputFileError, StoreError, XLayout, create_store_from_h5ads, read_manifest
from arrayloaders.store.disk_layout import COMPLETE_ATTRIBUTE, XSource
from arrayloaders.store.rows import open_rows
from arrayloaders.store.zarr_layout import direct_array, missing_chunk_files

N_VARS = 30
SIZES = (37, 61, 25)
K = 5
# Small chunks and shards, so every element spans several of each.
LAYOUT = XLayout(
    chunk_elements=64, shard_elements=256, dense_chunk_bytes=4 * N_VARS * 8, dense_shard_bytes=16 * N_VARS * 8
)


def layer_names(adata: ad.AnnData) -> list:
    """The layers of an AnnData, in order; anndata 0.13 also lists X among them, as None."""
    return [k for k in adata.layers if k is not None]


def convert(paths, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("layout", LAYOUT)
    return create_store_from_h5ads(paths, out, **kw)


def make_adata(n_obs: int, seed: int, *, dense_x: bool = False, prefix: str = "", genes=None) -> ad.AnnData:
    """X, layers "counts" (CSR, integer-valued float32) and "scaled" (dense float64), obsm "X_pca" (float32) and "id" (int32)."""
    rng = np.random.default_rng(seed)
    genes = list(genes) if genes is not None else [f"g{g}" for g in range(N_VARS)]
    n_vars = len(genes)
    X = sp.random(n_obs, n_vars, density=0.2, format="csr", dtype=np.float32, random_state=seed)
    counts = sp.random(n_obs, n_vars, density=0.3, format="csr", dtype=np.float32, random_state=seed + 100)
    counts.data = rng.integers(1, 50, counts.nnz).astype(np.float32)
    counts.data[counts.indptr[0] : counts.indptr[1]] = 0  # an empty row
    counts.eliminate_zeros()
    adata = ad.AnnData(
        X.toarray() if dense_x else X,
        obs=pd.DataFrame({"n": np.arange(n_obs)}, index=[f"{prefix}{seed}_c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=genes),
    )
    adata.layers["counts"] = counts
    adata.layers["scaled"] = rng.standard_normal((n_obs, n_vars))  # float64
    adata.obsm["X_pca"] = rng.standard_normal((n_obs, K)).astype(np.float32)
    adata.obsm["id"] = np.stack([np.full(n_obs, seed, np.int32), np.arange(n_obs, dtype=np.int32)], axis=1)
    return adata


def write(adata: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def write_inputs(directory: Path, dense_x: bool) -> list[Path]:
    return [write(make_adata(n, i, dense_x=dense_x), directory / f"{i}.h5ad") for i, n in enumerate(SIZES)]


@pytest.fixture(scope="module", params=["csr", "dense"])
def each_x(request, tmp_path_factory) -> tuple[list[Path], Path]:
    """Inputs with sparse X, then with dense X, and their store (four files)."""
    d = tmp_path_factory.mktemp(f"values_{request.param}")
    paths = write_inputs(d, request.param == "dense")
    return paths, convert(paths, d / "s", n_obs_per_file=40)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    return write_inputs(tmp_path_factory.mktemp("values"), dense_x=False)


@pytest.fixture(scope="module")
def store(inputs, tmp_path_factory) -> Path:
    return convert(inputs, tmp_path_factory.mktemp("values_store") / "s", n_obs_per_file=40)


def chunk_files(store: Path) -> list[Path]:
    return [store / f["name"] for f in read_manifest(store).files]


def sources(paths) -> ad.AnnData:
    return ad.concat([ad.read_h5ad(p) for p in paths], merge="same")


def element_source(store: Path, name: str, path: str) -> XSource:
    """What the loader passes to ``open_rows`` for a layer (or X) of one file of a store."""
    m = read_manifest(store, verify=False)
    n_obs = next(f["n_obs"] for f in m.files if f["name"] == name)
    spec = {"format": m.x_format, "dtype": m.dtype} if path == "X" else m.layers[path.split("/")[1]]
    kind, dtype = spec["format"], spec["dtype"]
    return XSource(zarr.storage.LocalStore(store / name, read_only=True), path, kind, n_obs, m.n_vars, dtype)


def read_rows(source: XSource, runs=None):
    """Every row of a layer through the loader's reader, straight from the shard files: scipy CSR or dense."""
    rows = open_rows(source)
    try:
        assert rows.direct
        runs = np.array(runs or [[0, source.n_obs]], dtype=np.int64)
        # each run's arrays are valid until the next step: copied as they come
        if source.kind == "csr":
            blocks = []
            for (a, b), (data, indices) in zip(runs.tolist(), rows.runs(runs)):
                indptr = rows.indptr[a : b + 1] - rows.indptr[a]
                blocks.append(
                    sp.csr_matrix((data.copy(), indices.astype(np.int32), indptr), shape=(b - a, source.n_vars))
                )
            return sp.vstack(blocks, format="csr")
        return np.concatenate([block.copy() for block in rows.runs(runs)])
    finally:
        rows.close()


def read_obsm(store: Path, name: str, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of an obsm array through ``DirectArray`` (as the loader reads obsm rows)."""
    array = zarr.open_array(store / name / "obsm" / key, mode="r")
    direct = direct_array(array)
    assert direct is not None and direct.complete and direct.checked
    stop = array.shape[0] if stop is None else stop
    k = array.shape[1]
    out = np.empty((stop - start, k), array.dtype)
    try:
        direct.read_into(start * k, stop * k, out.reshape(-1))
    finally:
        direct.close()
    return out


# ------------------------------------------------------------------ round trip


def test_layers_and_obsm_round_trip_bit_identical_and_shuffled_with_x(each_x):
    inputs, store = each_x
    src = sources(inputs)
    m = read_manifest(store)
    assert m.format_version == 3
    assert m.layers == {
        "counts": {"format": "csr", "dtype": "float32"},
        "scaled": {"format": "dense", "dtype": "float64"},
    }
    assert m.obsm == {"X_pca": {"k": K, "dtype": "float32"}, "id": {"k": 2, "dtype": "int32"}}
    assert len(m.files) == 4
    seen = []
    for f in chunk_files(store):
        one = ad.read_zarr(f)  # plain anndata opens it, layers and obsm in place
        assert set(layer_names(one)) == {"counts", "scaled"} and set(one.obsm) == {"X_pca", "id"}
        mine = src[one.obs_names]
        assert_bit_identical(one.X, mine.X)
        assert sp.issparse(one.layers["counts"]) and isinstance(one.layers["scaled"], np.ndarray)
        for name in ("counts", "scaled"):
            assert_bit_identical(one.layers[name], mine.layers[name])
            # the loader's reader sees the same values, in runs of rows
            n = one.n_obs
            runs = [[0, 3], [3, n // 2], [n // 2, n]]
            assert_bit_identical(read_rows(element_source(store, f.name, f"layers/{name}"), runs), mine.layers[name])
        for key in ("X_pca", "id"):
            assert_bit_identical(one.obsm[key], mine.obsm[key])
            assert_bit_identical(read_obsm(store, f.name, key), mine.obsm[key])
            assert_bit_identical(read_obsm(store, f.name, key, 5, 17), mine.obsm[key][5:17])
        # each row's obsm "id" names its source row: X's row and the id agree
        ids = one.obsm["id"]
        np.testing.assert_array_equal(one.obs_names, [f"{s}_c{i}" for s, i in ids])
        seen.extend(one.obs_names)
    assert sorted(seen) == sorted(src.obs_names)
    assert seen != list(src.obs_names)  # shuffled


def test_every_layer_and_obsm_array_is_complete_checksummed_and_encoded(each_x):
    store = each_x[1]
    group = zarr.open_group(chunk_files(store)[0], mode="r")
    assert group["layers"].attrs["encoding-type"] == "dict" and group["obsm"].attrs["encoding-type"] == "dict"
    assert dict(group["layers/counts"].attrs)["encoding-type"] == "csr_matrix"
    assert group["layers/scaled"].attrs["encoding-type"] == "array"
    for path in (
        "layers/counts/data",
        "layers/counts/indices",
        "layers/counts/indptr",
        "layers/scaled",
        "obsm/X_pca",
        "obsm/id",
    ):
        array = group[path]
        assert array.attrs[COMPLETE_ATTRIBUTE] is True, path
        assert missing_chunk_files(array) == [], path
        codecs = array.metadata.codecs
        inner = codecs[0].codecs if hasattr(codecs[0], "codecs") else codecs
        assert type(inner[-1]).__name__ == "Crc32cCodec", path
    assert group["layers/counts/indices"].dtype == np.uint16  # as X: the narrowest index dtype
    # dense elements: chunks and shards span whole rows (DirectArray reads runs of rows)
    for path, width in (("layers/scaled", N_VARS), ("obsm/X_pca", K)):
        assert group[path].chunks[1] == width and group[path].shards[1] == width


def contiguous(m):
    return m if sp.issparse(m) else np.ascontiguousarray(m)


def test_layers_follow_the_var_join(tmp_path):
    a = write(make_adata(20, 1, genes=[f"g{g}" for g in range(N_VARS)]), tmp_path / "a.h5ad")
    b = write(make_adata(15, 2, genes=[f"g{g}" for g in range(5, N_VARS + 5)]), tmp_path / "b.h5ad")
    for join in ("inner", "outer"):
        out = convert([a, b], tmp_path / join, var_join=join, n_obs_per_file=16)
        one = ad.concat([ad.read_zarr(f) for f in chunk_files(out)], merge="same")
        assert read_manifest(out).layers["counts"]["format"] == "csr"
        for path in (a, b):
            src = ad.read_h5ad(path)
            got = one[src.obs_names]
            shared = [g for g in got.var_names if g in src.var_names]
            for name in ("counts", "scaled"):
                assert_bit_identical(contiguous(got[:, shared].layers[name]), contiguous(src[:, shared].layers[name]))
                others = [g for g in got.var_names if g not in src.var_names]
                missing = got[:, others].layers[name]
                assert (missing.toarray() if sp.issparse(missing) else missing).sum() == 0
            assert_bit_identical(got.obsm["X_pca"], src.obsm["X_pca"])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 25), min_size=1, max_size=3), n_files=st.integers(1, 3), seed=st.integers(0, 9))
def test_every_output_row_is_its_source_row(tmp_path_factory, sizes, n_files, seed):
    """Whatever the number and sizes of inputs and files: each row's layers and obsm are those of its source cell."""
    n_obs_per_file = -(-sum(sizes) // n_files)  # at most 3 files: each costs ~0.3 s to write
    d = tmp_path_factory.mktemp("prop")
    paths = [write(make_adata(n, i), d / f"{i}.h5ad") for i, n in enumerate(sizes)]
    out = convert(paths, d / "s", n_obs_per_file=n_obs_per_file, seed=seed, layout=XLayout())
    src = sources(paths)
    files = chunk_files(out)
    assert len(files) == -(-sum(sizes) // n_obs_per_file)
    for f in files:
        one = ad.read_zarr(f)
        mine = src[one.obs_names]
        np.testing.assert_array_equal(one.obsm["id"], mine.obsm["id"])
        assert_bit_identical(read_obsm(out, f.name, "X_pca"), mine.obsm["X_pca"])
        assert_bit_identical(read_rows(element_source(out, f.name, "layers/counts")), mine.layers["counts"])
        assert_bit_identical(read_rows(element_source(out, f.name, "layers/scaled")), mine.layers["scaled"])


# ------------------------------------------------------------------ which to keep


def test_explicit_selection_keeps_only_those_without_a_warning(inputs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        out = convert(inputs, tmp_path / "s", layers=["scaled"], obsm_keys=[], n_obs_per_file=200)
    m = read_manifest(out)
    assert list(m.layers) == ["scaled"] and m.obsm == {}
    one = ad.read_zarr(chunk_files(out)[0])
    assert layer_names(one) == ["scaled"] and list(one.obsm) == []
    out = convert(inputs, tmp_path / "t", layers="counts", obsm_keys=["id"])  # one name as a str
    assert list(read_manifest(out).layers) == ["counts"] and list(read_manifest(out).obsm) == ["id"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"layers": ["nope"]}, r"0\.h5ad: has no layers 'nope' \(it has 'counts', 'scaled'\)"),
        ({"obsm_keys": ["X_umap"]}, r"0\.h5ad: has no obsm 'X_umap' \(it has 'X_pca', 'id'\)"),
    ],
)
def test_a_requested_key_an_input_lacks_is_named(inputs, tmp_path, kw, message):
    with pytest.raises(InputFileError, match=message):
        convert(inputs, tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()


def test_bad_selection_arguments_are_refused(inputs, tmp_path):
    with pytest.raises(ValueError, match="names 'counts' more than once"):
        convert(inputs, tmp_path / "s", layers=["counts", "counts"])
    with pytest.raises(ValueError, match="obsm_keys must be a list of names"):
        convert(inputs, tmp_path / "s", obsm_keys=[3])


def test_keys_only_some_inputs_have_are_dropped_with_one_warning(tmp_path):
    a_data = make_adata(12, 1)
    a_data.obsm["X_umap"] = np.zeros((12, 2), np.float32)
    a_data.obsm["sparse"] = sp.random(12, 4, density=0.5, format="csr", random_state=0)
    a_data.obsm["frame"] = pd.DataFrame({"x": np.arange(12.0)}, index=a_data.obs_names)
    b_data = make_adata(9, 2)
    del b_data.layers["scaled"]
    b_data.obsm["sparse"] = sp.random(9, 4, density=0.5, format="csr", random_state=1)
    a, b = write(a_data, tmp_path / "a.h5ad"), write(b_data, tmp_path / "b.h5ad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = convert([a, b], tmp_path / "s")
    ours = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(ours) == 1, ours
    message = ours[0]
    assert f"layers 'scaled' (not in every input) from {a}" in message
    assert f"obsm 'X_umap' (not in every input) from {a}" in message
    assert f"obsm 'sparse' (sparse (csr_matrix): only dense obsm arrays are carried) from {a}, {b}" in message
    assert "obsm 'frame' (has encoding 'dataframe'" in message
    assert "\n" not in message and "'counts'" not in message and "'X_pca'" not in message
    m = read_manifest(out)
    assert list(m.layers) == ["counts"] and sorted(m.obsm) == ["X_pca", "id"]
    # asked for explicitly, an obsm the store cannot hold is an error naming file and key
    with pytest.raises(InputFileError, match=rf"{a}: obsm 'sparse' cannot be carried: sparse"):
        convert([a, b], tmp_path / "t", obsm_keys=["sparse"])
    with pytest.raises(InputFileError, match=rf"{b}: has no layers 'scaled'"):
        convert([a, b], tmp_path / "t", layers=["scaled"])


def test_raw_and_obsp_are_not_carried_and_named(tmp_path):
    adata = make_adata(10, 1)
    adata.raw = adata.copy()
    adata.obsp["distances"] = sp.identity(10, format="csr")
    path = write(adata, tmp_path / "a.h5ad")
    with pytest.warns(ConversionWarning, match=rf"obsp 'distances' \(not carried\) from {path}; raw \(not carried\)"):
        out = convert([path], tmp_path / "s")
    assert list(read_manifest(out).layers) == ["counts", "scaled"]
    assert ad.read_zarr(chunk_files(out)[0]).raw is None


def test_obsm_of_other_width_or_dtype_is_refused_naming_both_files(tmp_path):
    a = write(make_adata(10, 1), tmp_path / "a.h5ad")
    wide = make_adata(8, 2)
    wide.obsm["X_pca"] = np.zeros((8, K + 1), np.float32)
    b = write(wide, tmp_path / "b.h5ad")
    with pytest.raises(
        InputFileError, match=rf"obsm 'X_pca' differs in width .*{K} columns in {a}; {K + 1} columns in {b}"
    ):
        convert([a, b], tmp_path / "s")
    wide.obsm["X_pca"] = np.zeros((8, K), np.float64)
    b = write(wide, tmp_path / "c.h5ad")
    with pytest.raises(InputFileError, match=rf"obsm 'X_pca' differs in dtype .*float32 in {a}; float64 in {b}"):
        convert([a, b], tmp_path / "s")
    out = convert([a, b], tmp_path / "s", obsm_keys=["id"])  # left out, the rest converts
    assert list(read_manifest(out).obsm) == ["id"]


def test_a_layer_csr_in_one_input_and_dense_in_another_is_refused(tmp_path):
    a = write(make_adata(10, 1), tmp_path / "a.h5ad")
    other = make_adata(8, 2)
    other.layers["counts"] = other.layers["counts"].toarray()
    b = write(other, tmp_path / "b.h5ad")
    with pytest.raises(InputFileError, match=rf"layers 'counts' differs in format .*CSR in {a}; dense in {b}"):
        convert([a, b], tmp_path / "s")


def test_a_layer_dtype_is_promoted_over_the_inputs(tmp_path):
    a = write(make_adata(10, 1), tmp_path / "a.h5ad")
    other = make_adata(8, 2)
    other.layers["counts"] = other.layers["counts"].astype(np.int16)
    b = write(other, tmp_path / "b.h5ad")
    out = convert([a, b], tmp_path / "s")
    assert read_manifest(out).layers["counts"] == {"format": "csr", "dtype": "float32"}
    one = ad.concat([ad.read_zarr(f) for f in chunk_files(out)])
    np.testing.assert_array_equal(one[other.obs_names].layers["counts"].toarray(), other.layers["counts"].toarray())


def test_a_damaged_layer_in_an_input_is_named(tmp_path):
    import h5py

    path = write(make_adata(10, 1), tmp_path / "a.h5ad")
    with h5py.File(path, "r+") as f:
        indptr = f["layers/counts/indptr"][:]
        indptr[3] = indptr[2] - 1
        f["layers/counts/indptr"][...] = indptr
    with pytest.raises(InputFileError, match=rf"{path}: layers/counts/indptr decreases at row 2"):
        convert([path], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_layers_and_obsm_keys(inputs, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_script", Path(__file__).parents[2] / "scripts" / "convert.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([*map(str, inputs), "-o", str(tmp_path / "s"), "--layers", "counts", "--obsm-keys", "X_pca"]) == 0
    m = read_manifest(tmp_path / "s")
    assert list(m.layers) == ["counts"] and list(m.obsm) == ["X_pca"]
    assert "layers counts, obsm X_pca" in capsys.readouterr().out
    assert cli.main([*map(str, inputs), "-o", str(tmp_path / "t"), "-q", "--layers", "--obsm-keys"]) == 0
    assert read_manifest(tmp_path / "t").layers == {} and read_manifest(tmp_path / "t").obsm == {}
    assert cli.main([*map(str, inputs), "-o", str(tmp_path / "u"), "-q", "--layers", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert.py: error: ") and "has no layers 'nope'" in err


# ------------------------------------------------------------------ damage and the manifest


# element -> its first shard file inside chunk_0.zarr
SHARDS = {
    "layers/counts/data": "layers/counts/data/c/0",
    "layers/counts/indices": "layers/counts/indices/c/0",
    "layers/scaled": "layers/scaled/c/0/0",
    "obsm/X_pca": "obsm/X_pca/c/0/0",
}


def read_element(store: Path, element: str) -> None:
    if element.startswith("obsm/"):
        read_obsm(store, "chunk_0.zarr", element.split("/")[1])
    else:
        read_rows(element_source(store, "chunk_0.zarr", "/".join(element.split("/")[:2])))


@pytest.mark.parametrize("damage", ["flip", "deleted"])
@pytest.mark.parametrize("element", list(SHARDS))
def test_a_damaged_layer_or_obsm_shard_is_detected_naming_the_file(store, tmp_path, element, damage):
    copy = damaged_copy(store, tmp_path)
    shard = copy / "chunk_0.zarr" / SHARDS[element]
    read_element(copy, element)  # intact: reads
    if damage == "deleted":
        shard.unlink()
        with pytest.raises(StoreError, match=f"{shard}: chunk file of chunk_0.zarr/{element} is missing"):
            read_manifest(copy)
    else:
        flip_byte(shard, 20)  # inside the first chunk's stored bytes
        read_manifest(copy)  # metadata and files are fine: the damage is inside a chunk
    with pytest.raises(OSError, match=str(shard)):
        read_element(copy, element)


def edit_manifest(store: Path, change) -> None:
    path = store / "arrayloaders.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["layers"]["counts"].__setitem__("dtype", "float64"),
            "layers/counts: holds float32, the manifest says float64",
        ),
        (
            lambda m: m["layers"].__setitem__("gone", {"format": "csr", "dtype": "float32"}),
            "layers/gone: .* is missing",
        ),
        (lambda m: m["layers"]["scaled"].__setitem__("format", "csr"), "layers/scaled: .* is missing"),
        (
            lambda m: m["obsm"]["X_pca"].__setitem__("k", K + 1),
            rf"obsm/X_pca: has shape \(\d+, {K}\), the manifest says",
        ),
        (lambda m: m["obsm"].__setitem__("X_umap", {"k": 2, "dtype": "float32"}), "obsm/X_umap: is missing"),
        (lambda m: m["obsm"]["id"].__setitem__("k", "two"), "'obsm' entry 'id' is not valid"),
    ],
    ids=["layer-dtype", "layer-missing", "layer-format", "obsm-width", "obsm-missing", "obsm-garbage"],
)
def test_a_manifest_that_does_not_match_the_layers_or_obsm_is_refused(store, tmp_path, edit, message):
    copy = damaged_copy(store, tmp_path)
    edit_manifest(copy, edit)
    with pytest.raises(StoreError, match=message) as info:
        read_manifest(copy)
    assert str(copy) in str(info.value) and "\n" not in str(info.value)


def test_a_deleted_layer_is_found_by_read_manifest(store, tmp_path):
    copy = damaged_copy(store, tmp_path)
    shutil.rmtree(copy / "chunk_1.zarr" / "obsm" / "id")
    with pytest.raises(StoreError, match=f"{copy / 'chunk_1.zarr'}/obsm/id.* missing"):
        read_manifest(copy)


def test_manifests_of_version_2_still_read(store, tmp_path):
    copy = damaged_copy(store, tmp_path)

    def as_version_2(m):
        m["format_version"] = 2
        del m["layers"], m["obsm"]

    edit_manifest(copy, as_version_2)
    m = read_manifest(copy)
    assert m.format_version == 2 and m.layers == {} and m.obsm == {}
