"""Write the small ``.h5ad`` fixtures of files made by newer anndata and pandas.

Run with anndata >= 0.13 and pandas >= 3 (Python 3.12), from the repository root::

    python tests/data/make_fixtures.py

The files are committed, so that tests on older stacks (anndata 0.12, pandas 2)
convert what current anndata writes: pandas 3's ``str`` columns and index (stored
as anndata's ``nullable-string-array``), nullable ``Int64``/``boolean`` columns
with missing values, categoricals, columns present in only one file, and
``layers``/``obsm``/``raw``, which the conversion does not carry (and says so).
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
N_VARS = 8


def counts(n_obs: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 4, (n_obs, N_VARS)).astype(np.float32)
    dense[rng.random((n_obs, N_VARS)) < 0.5] = 0
    return sp.csr_matrix(dense)


def var() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene_symbol": pd.array([f"SYM{g}" for g in range(N_VARS)], dtype="str"),
            "highly_variable": np.arange(N_VARS) % 3 == 0,
        },
        index=pd.Index([f"ENSG{g:05d}" for g in range(N_VARS)], dtype="str"),
    )


def file_a() -> ad.AnnData:
    n, na = 12, None
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", "B", na, "T", "NK", "B"] * 2, categories=["T", "B", "NK"]),
            "donor": pd.array(["d1", "d2", na, "d1"] * 3, dtype="str"),
            "barcode": pd.array([f"ACGT{i:02d}" for i in range(n)], dtype="str"),
            "n_counts": pd.array([10, na, 30, 2**40, 0, -5] * 2, dtype="Int64"),
            "doublet": pd.array([True, na, False] * 4, dtype="boolean"),
            "batch": np.arange(n, dtype=np.int64) % 3,
            "flag": np.arange(n) % 2 == 0,
            "score": np.array([0.5, np.nan, -0.0, 1e30, 2.25, 3] * 2, dtype=np.float32),
            "only_a": pd.array(["x", "y", "z", na] * 3, dtype="str"),
        },
        index=pd.Index([f"a_cell{i:02d}" for i in range(n)], dtype="str"),
    )
    adata = ad.AnnData(counts(n, 1), obs=obs, var=var())
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return adata


def file_b() -> ad.AnnData:
    n, na = 9, None
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["DC", "B", "T"] * 3, categories=["DC", "T", "B"]),
            "donor": pd.Categorical(["d3", "d1", "d3"] * 3),
            "n_counts": np.arange(n, dtype=np.int64) * 7,
            "doublet": np.arange(n) % 4 == 0,
            "batch": pd.array(["0", "1", "b2"] * 3, dtype="str"),  # int in a, str here: one categorical
            "flag": np.arange(n) % 3 == 0,
            "score": np.linspace(-1, 1, n),  # float64 here, float32 in a
            "only_b": pd.array([1, na, 3] * 3, dtype="Int64"),
        },
        index=pd.Index([f"b_cell{i:02d}" for i in range(n)], dtype="str"),
    )
    adata = ad.AnnData(counts(n, 2), obs=obs, var=var())
    adata.raw = adata.copy()
    return adata


def main() -> None:
    if int(version("anndata").split(".")[1]) < 13 or int(pd.__version__.split(".")[0]) < 3:
        sys.exit(f"run with anndata >= 0.13 and pandas >= 3 (found anndata {version('anndata')}, pandas {pd.__version__})")
    for name, adata in (("anndata013_a.h5ad", file_a()), ("anndata013_b.h5ad", file_b())):
        adata.uns["written_by"] = f"anndata {version('anndata')}, pandas {pd.__version__}"
        adata.write_h5ad(HERE / name)
        print(f"{name}: {(HERE / name).stat().st_size} bytes, {adata.uns['written_by']}")


if __name__ == "__main__":
    main()
