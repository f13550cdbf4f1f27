"""obs_records.py: obs read in row blocks equals anndata's whole read; the conversion's obs is the same
whatever the block size; damaged obs is refused naming the file and column."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from arrayloaders import InputFileError, create_store_from_h5ads, read_manifest
from arrayloaders.convert import obs_records
from arrayloaders.convert.columns import harmonise_frames, join_columns
from arrayloaders.convert.obs_records import InputObs, plan_obs

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURES = sorted(DATA.glob("anndata013_*.h5ad"))  # written by anndata 0.13 / pandas 3


def every_kind_h5ad(path: Path, n: int, seed: int, prefix: str) -> Path:
    """An .h5ad whose obs has every column kind anndata writes, missing values included, and unicode names."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK", None], n), categories=["NK", "T", "B", "unused"]),
            "donor": rng.choice([f"d{i}" for i in range(5)], n).astype(object),  # strings: string-array
            "count": rng.integers(0, 10**6, n),
            "score": rng.random(n).astype(np.float32),
            "flag": rng.random(n) < 0.5,
            "maybe": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(-5, 5, n)), dtype="Int16"),
            "ok": pd.array(np.where(rng.random(n) < 0.2, None, rng.random(n) < 0.5), dtype="boolean"),
            "mixed": rng.integers(0, 3, n) if seed % 2 else rng.choice(["x", "3"], n).astype(object),
        },
        index=pd.Index([f"{prefix}-zelle-é{i}" for i in range(n)], dtype=object),
    )
    x = sp.random(n, 5, density=0.4, format="csr", dtype=np.float32, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)])).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("obs")
    return [every_kind_h5ad(d / f"{p}.h5ad", n, seed, p) for p, n, seed in (("a", 53, 1), ("b", 40, 2), ("c", 1, 3))]


def whole(path: Path) -> pd.DataFrame:
    with h5py.File(path, "r") as f:
        return ad.io.read_elem(f["obs"])


@pytest.mark.parametrize("block", [1, 7, 2**17])
@pytest.mark.parametrize("which", ["generated", "anndata013"])
def test_blocks_read_what_anndata_reads_whole(every_kind, monkeypatch, block, which):
    monkeypatch.setattr(obs_records, "BLOCK_ROWS", block)
    for path in every_kind if which == "generated" else FIXTURES:
        expected = whole(path)
        with h5py.File(path, "r") as f:
            obs = InputObs(path, f)
            assert obs.n_obs == len(expected) and obs.columns == list(expected.columns)
            names = np.concatenate([obs.names(r0, r1) for r0, r1 in obs.blocks()])
            assert [n.decode() for n in names] == [str(n) for n in expected.index]
            for c in obs.columns:
                got = pd.concat([obs.column(c, r0, r1) for r0, r1 in obs.blocks()], ignore_index=True)
                want = expected[c].reset_index(drop=True)
                assert got.isna().tolist() == want.isna().tolist(), (path, c)
                if isinstance(want.dtype, pd.CategoricalDtype):
                    assert list(got.cat.categories) == list(want.cat.categories), (path, c)
                assert got.astype(object).where(got.notna(), None).tolist() == want.astype(object).where(
                    want.notna(), None
                ).tolist(), (path, c)


@pytest.mark.parametrize("block", [1, 7, 2**17])
def test_records_rebuild_the_harmonised_obs(every_kind, monkeypatch, block):
    """Records written block by block and rebuilt give exactly what harmonising the whole frames gives."""
    monkeypatch.setattr(obs_records, "BLOCK_ROWS", block)
    paths = [*every_kind, *FIXTURES]
    labels = [str(p) for p in paths]
    plan = plan_obs(paths, labels, "outer", None, "source_file")
    records = []
    for i, path in enumerate(paths):
        with h5py.File(path, "r") as f:
            obs = InputObs(path, f)
            records += [plan.records(obs, i, r0, r1) for r0, r1 in obs.blocks()]
    got = plan.frame(np.concatenate(records))
    frames = [whole(p) for p in paths]
    columns = join_columns(frames, labels, "outer")
    values, schema = harmonise_frames(frames, labels, columns)
    assert list(got.columns) == [*columns, "source_file"]
    assert [str(n) for n in got.index] == [str(n) for f in frames for n in f.index]
    for c in columns:
        assert plan.schema[c] == schema[c].to_json(), c
        pd.testing.assert_series_equal(got[c].reset_index(drop=True), pd.Series(values[c], name=c), check_names=False)
    assert got["source_file"].astype(str).tolist() == [label for f, label in zip(frames, labels) for _ in f.index]


def test_a_store_converted_in_tiny_blocks_has_the_same_obs(every_kind, tmp_path, monkeypatch):
    big = create_store_from_h5ads(every_kind, tmp_path / "big", progress=False, n_obs_per_file=30)
    monkeypatch.setattr(obs_records, "BLOCK_ROWS", 3)
    small = create_store_from_h5ads(every_kind, tmp_path / "small", progress=False, n_obs_per_file=30)
    assert read_manifest(big).obs_schema == read_manifest(small).obs_schema
    for f in read_manifest(big).files:
        a, b = ad.read_zarr(big / f["name"]).obs, ad.read_zarr(small / f["name"]).obs
        pd.testing.assert_frame_equal(a, b)


def test_damaged_category_codes_are_refused_naming_the_file_and_column(tmp_path):
    path = every_kind_h5ad(tmp_path / "a.h5ad", 20, 1, "a")
    with h5py.File(path, "r+") as f:
        f["obs/cell_type/codes"][3] = 42  # 4 categories
    with pytest.raises(InputFileError, match=r"a\.h5ad: cannot read obs column 'cell_type'"):
        create_store_from_h5ads([path], tmp_path / "s", progress=False)


def ordered_h5ad(path: Path, n: int, prefix: str, categories=("early", "mid", "late")) -> Path:
    """An .h5ad whose obs column ``stage`` is an ordered categorical (with an unused category and missing values)."""
    rng = np.random.default_rng(len(prefix) + n)
    obs = pd.DataFrame(
        {"stage": pd.Categorical(rng.choice([*categories[:2], None], n), categories=list(categories), ordered=True)},
        index=pd.Index([f"{prefix}{i}" for i in range(n)], dtype=object),
    )
    ad.AnnData(X=sp.random(n, 3, density=0.5, format="csr", dtype=np.float32, random_state=n), obs=obs).write_h5ad(path)
    return path


@pytest.mark.parametrize("block", [1, 7, 2**17])
def test_an_ordered_categorical_read_in_blocks_stays_ordered(tmp_path, monkeypatch, block):
    monkeypatch.setattr(obs_records, "BLOCK_ROWS", block)
    paths = [ordered_h5ad(tmp_path / "a.h5ad", 20, "a"), ordered_h5ad(tmp_path / "b.h5ad", 9, "b")]
    with h5py.File(paths[0], "r") as f:
        obs = InputObs(paths[0], f)
        got = pd.concat([obs.column("stage", r0, r1) for r0, r1 in obs.blocks()], ignore_index=True)
    want = whole(paths[0])["stage"].reset_index(drop=True)
    assert want.cat.ordered
    pd.testing.assert_series_equal(got, want, check_names=False)
    labels = [str(p) for p in paths]
    plan = plan_obs(paths, labels, "outer", None, "source_file")
    assert plan.schema["stage"] == {
        "kind": "categorical", "dtype": "category", "categories": ["early", "mid", "late"], "missing": True,
        "ordered": True,
    }  # fmt: skip
    records = []
    for i, path in enumerate(paths):
        with h5py.File(path, "r") as f:
            obs = InputObs(path, f)
            records += [plan.records(obs, i, r0, r1) for r0, r1 in obs.blocks()]
    stage = plan.frame(np.concatenate(records))["stage"]
    assert stage.cat.ordered and list(stage.cat.categories) == ["early", "mid", "late"]
    expected = pd.concat([whole(p)["stage"].astype(object) for p in paths], ignore_index=True)
    assert stage.astype(object).fillna("-").tolist() == expected.fillna("-").tolist()
    assert not plan.frame(records[0])["source_file"].cat.ordered
