"""Deterministic, realistic single-cell count data for examples, tests and benchmarks.

The generator mimics what makes scRNA-seq matrices hard to load fast: ~a few
thousand non-zeros per cell out of 20-36k genes, gene popularity spanning
orders of magnitude (a few housekeeping genes in almost every cell, a long tail
seen rarely), small integer counts (mostly 1 or 2) stored as float32, and cell
types that shift expression so that a classifier has something to learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["make_example_adata", "write_example_h5ads"]

_GENES_PER_TYPE_PROGRAM = 200


def _gene_weights(rng: np.random.Generator, n_vars: int, n_cell_types: int) -> np.ndarray:
    """Per-cell-type gene sampling weights, shape (n_cell_types, n_vars).

    A shared Zipf-like popularity profile (random gene order) times a per-type
    program that boosts a few hundred marker genes.
    """
    base = 1.0 / np.arange(1, n_vars + 1) ** 0.9
    base = base[rng.permutation(n_vars)]
    weights = np.repeat(base[None, :], n_cell_types, axis=0)
    for t in range(n_cell_types):
        markers = rng.choice(n_vars, size=min(_GENES_PER_TYPE_PROGRAM, n_vars), replace=False)
        weights[t, markers] *= 20.0
    return weights / weights.sum(axis=1, keepdims=True)


_TABLE_BITS = 20


class _GeneSampler:
    """Draws genes of one cell type by table lookup (fast inverse-CDF sampling).

    Popular genes are drawn many times per cell, so hitting ~2,500 *distinct*
    genes takes far more draws; E[distinct | k] = sum_g 1 - (1 - w_g)^k is
    tabulated on a grid of k and inverted by interpolation.
    """

    def __init__(self, weights: np.ndarray):
        bins = (np.arange(2**_TABLE_BITS) + 0.5) / 2**_TABLE_BITS
        self.table = np.minimum(
            np.searchsorted(np.cumsum(weights), bins, side="right"), weights.size - 1
        ).astype(np.int32)
        self.grid = np.unique(np.geomspace(1, 50 * weights.size, 128).astype(np.int64))
        log1m = np.log1p(-np.minimum(weights, 1 - 1e-12))
        self.expected = np.array([np.sum(-np.expm1(k * log1m)) for k in self.grid])

    def draws_for_distinct(self, targets: np.ndarray) -> np.ndarray:
        return np.interp(targets, self.expected, self.grid).astype(np.int64)

    def genes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.table[rng.integers(0, 2**_TABLE_BITS, n)]


def _sample_block(
    rng: np.random.Generator,
    cell_type: np.ndarray,
    samplers: list[_GeneSampler],
    n_vars: int,
    mean_nnz: float,
) -> sp.csr_matrix:
    """Sample count rows for cells of the given types (a CSR block)."""
    n_rows = cell_type.size
    sigma = 0.35  # log-normal spread of library complexity; mu keeps the mean at mean_nnz
    targets = np.clip(rng.lognormal(np.log(mean_nnz) - sigma**2 / 2, sigma, n_rows), 1, 0.9 * n_vars)
    present = np.zeros((n_rows, n_vars), dtype=bool)
    for t in np.unique(cell_type):
        rows = np.flatnonzero(cell_type == t)
        row_of = np.repeat(rows, samplers[t].draws_for_distinct(targets[rows]))
        present[row_of, samplers[t].genes(rng, row_of.size)] = True
    # A dense boolean block dedupes the draws and yields row-major, sorted
    # indices in one pass: much cheaper than sorting (row, gene) keys.
    row_of, gene_of = np.nonzero(present)
    counts = rng.geometric(0.6, size=row_of.size).astype(np.float32)  # 1: 60 %, 2: 24 %, ...
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((counts, gene_of.astype(np.int32), indptr), shape=(n_rows, n_vars))


def make_example_adata(
    n_obs: int = 2_000,
    n_vars: int = 20_000,
    *,
    nnz_per_cell: float = 2_500,
    n_cell_types: int = 12,
    n_batches: int = 4,
    seed: int = 0,
    name_prefix: str = "cell",
    dense: bool = False,
) -> ad.AnnData:
    """Make one AnnData of realistic scRNA-seq counts.

    Parameters
    ----------
    n_obs, n_vars
        Number of cells and genes.
    nnz_per_cell
        Mean number of non-zero genes per cell (log-normally spread).
    n_cell_types
        Categories of the ``cell_type`` column; each shifts expression.
    n_batches
        Distinct values of the integer ``batch`` column.
    seed
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    name_prefix
        obs_names are ``f"{name_prefix}_{i}"``.
    dense
        Return a dense ``numpy`` X instead of CSR.

    Returns
    -------
    AnnData with float32 X, obs columns ``cell_type`` (categorical) and
    ``batch`` (int64), var_names ``gene_0 … gene_{n_vars-1}``.
    """
    rng = np.random.default_rng(seed)
    # Gene weights depend only on n_vars and n_cell_types, not on the seed, so
    # files generated with different seeds share one biology.
    weights = _gene_weights(np.random.default_rng(12345), n_vars, n_cell_types)
    samplers = [_GeneSampler(w) for w in weights]
    cell_type = rng.integers(0, n_cell_types, n_obs)
    block = max(1, 2**25 // max(n_vars, 1))  # ~32 MB boolean scratch per block
    parts = [
        _sample_block(rng, cell_type[start : start + block], samplers, n_vars, nnz_per_cell)
        for start in range(0, n_obs, block)
    ]
    X = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n_vars), dtype=np.float32)
    X.indices = X.indices.astype(np.int32, copy=False)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(
                cell_type, categories=[f"type_{t}" for t in range(n_cell_types)]
            ),
            "batch": rng.integers(0, n_batches, n_obs).astype(np.int64),
        },
        index=pd.Index([f"{name_prefix}_{i}" for i in range(n_obs)], dtype=object),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_vars)], dtype=object))
    return ad.AnnData(X=X.toarray() if dense else X, obs=obs, var=var)


def write_example_h5ads(
    output_dir: str | Path,
    n_obs: Sequence[int] = (1_000, 1_000),
    n_vars: int = 20_000,
    *,
    seed: int = 0,
    **kwargs,
) -> list[Path]:
    """Write one ``.h5ad`` per entry of ``n_obs`` into ``output_dir``.

    File ``i`` is ``part_{i}.h5ad`` made with seed ``seed + i`` and obs_names
    prefixed ``part{i}``, so obs_names are unique across files. Further
    keyword arguments go to :func:`make_example_adata`. Returns the paths.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(n_obs):
        adata = make_example_adata(n, n_vars, seed=seed + i, name_prefix=f"part{i}", **kwargs)
        path = output_dir / f"part_{i}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths
