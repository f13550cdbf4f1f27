"""A reference loader: the documented rules of the loader, in plain numpy and scipy, without the engine.

The model-based test (``test_model_based.py``) drives the real datasets and
compares every batch with what this module says it must be. Nothing here
imports the loader's engine, readers, batches or datasets: the store is read
with ``anndata.read_zarr`` (files concatenated in the manifest's order, read
as JSON), and each rule is written out from the README:

- **Which rows, in which order** (:func:`epoch_batches`). Chunked access:
  the store's chunks (runs of ``chunk_size`` cells within one file, the last
  of a file shorter; only those holding a selected cell), in an order
  shuffled by ``(seed, epoch)``; the selected cells of that chunk sequence,
  rank ``r`` of ``W`` taking its contiguous share (``equalize="drop"``:
  ``n // W`` rows from ``r * n // W``; ``"pad"``: ``ceil(n / W)``, its own
  first row repeated); ``drop_last`` keeps whole batches of it; the result
  cut into loads of ``preload_nchunks * chunk_size`` rows rounded up to
  whole batches, each load's rows shuffled (or, with ``window > 1``, every
  ``window`` loads' rows shuffled together); batch ``b`` is rows
  ``b * batch_size:(b + 1) * batch_size``. A sampler: its sequence for the
  epoch (torch's global generator seeded from ``(seed, epoch)``), the rank's
  contiguous share, batch ``b`` its ``b``-th run of ``batch_size`` indices,
  repeats included.
- **Randomness.** The chunk order and the shuffles are numpy generators
  seeded as the plan documents (``arrayloaders/loading/plan.py``); they are the only
  part taken from the plan's definition, and :func:`check_epoch` checks
  what does not depend on them.
- **What each row holds** (:meth:`StoreTruth.expected`): X's row (all genes,
  or ``var_names=`` in the order given, or a boolean mask), or a layer's;
  obsm rows (float32 unless stored as a float); obs columns (categorical:
  int64 codes into the categories, ``-1`` where missing; ``obs_codes``:
  codes into the sorted distinct values; numbers keep their dtype; nullable
  numbers as float64 with NaN); the global row index.
- **Selections** (:func:`split_sizes`, :func:`class_weights`): ``split``'s
  sizes, class weights that are 0 for missing labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "Settings", "StoreTruth", "Values", "check_epoch", "class_weights", "epoch_batches", "n_batches",
    "sampled_sequence", "split_sizes",
]  # fmt: skip


# --------------------------------------------------------------------------- which rows


@dataclass(frozen=True)
class Settings:
    """What the batch sequence of one rank depends on, besides the selection and the epoch."""

    batch_size: int
    chunk_size: int = 32
    preload_nchunks: int = 256
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    equalize: str = "drop"
    window: int = 1  # loads whose rows are shuffled together (1 without shuffle or with a sampler)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """The plan's generators: ``default_rng([seed, epoch, stream, ...])``."""
    return np.random.default_rng([seed, *stream])


def rank_share(n: int, s: Settings) -> tuple[int, int, int]:
    """(first, stop, rows yielded before ``drop_last``) of rank ``s.rank``'s share of ``n`` rows."""
    lo, hi = s.rank * n // s.world_size, (s.rank + 1) * n // s.world_size
    rows = n // s.world_size if s.equalize == "drop" else -(-n // s.world_size)
    return lo, hi, rows


def n_batches(n_selected: int, s: Settings) -> int:
    """Batches per epoch on each rank: ``len(ds)``."""
    rows = rank_share(n_selected, s)[2]
    return rows // s.batch_size if s.drop_last else -(-rows // s.batch_size)


def chunk_rows(file_n_obs: Sequence[int], chunk_size: int) -> list[np.ndarray]:
    """The global rows of every chunk, in store order: runs of ``chunk_size`` within a file, each file's last shorter."""
    out, offset = [], 0
    for n in file_n_obs:
        for a in range(0, n, chunk_size):
            out.append(np.arange(offset + a, offset + min(a + chunk_size, n), dtype=np.int64))
        offset += n
    return out


def _rank_rows(s: Settings, sequence: np.ndarray, n_rows: int) -> np.ndarray:
    """Rank ``s.rank``'s contiguous share of ``sequence``, equalised, cut to ``n_rows``."""
    lo, hi, rows = rank_share(sequence.size, s)
    mine = sequence[lo:hi]
    if s.equalize == "pad" and mine.size < rows:
        mine = np.concatenate([mine, mine[:1]])  # its own first cell again
    return mine[:rows][:n_rows]


def epoch_rows(
    file_n_obs: Sequence[int], s: Settings, epoch: int, cells: np.ndarray | None = None, sequence: np.ndarray | None = None
) -> np.ndarray:
    """Every row rank ``s.rank`` yields in ``epoch``, in yield order (global row numbers, files concatenated)."""
    n = sequence.size if sequence is not None else cells.size if cells is not None else int(sum(file_n_obs))
    if s.world_size > 1 and n < s.world_size:
        raise ValueError("fewer cells than ranks")
    nb = n_batches(n, s)
    n_rows = nb * s.batch_size if s.drop_last else rank_share(n, s)[2]
    if sequence is not None:  # a sampler: its order, repeats included, no shuffle of ours
        return _rank_rows(s, np.asarray(sequence, dtype=np.int64), n_rows)
    chunks = chunk_rows(file_n_obs, s.chunk_size)
    if cells is not None:
        selected = np.zeros(int(sum(file_n_obs)), dtype=bool)
        selected[cells] = True
        chunks = [c[selected[c]] for c in chunks]
        chunks = [c for c in chunks if c.size]
    order = np.arange(len(chunks))
    if s.shuffle:
        order = _rng(s.seed, epoch, 0).permutation(len(chunks))
    flat = np.concatenate([chunks[i] for i in order]) if chunks else np.empty(0, np.int64)
    mine = _rank_rows(s, flat, n_rows)
    load_rows = -(-s.preload_nchunks * s.chunk_size // s.batch_size) * s.batch_size
    loads = [mine[a : a + load_rows] for a in range(0, mine.size, load_rows)]
    if not s.shuffle:
        return mine
    if s.window == 1:
        return np.concatenate([load[_rng(s.seed, epoch, 1, i).permutation(load.size)] for i, load in enumerate(loads)] or [mine])
    windows = [np.concatenate(loads[w : w + s.window]) for w in range(0, len(loads), s.window)]
    return np.concatenate([rows[_rng(s.seed, epoch, 3, k).permutation(rows.size)] for k, rows in enumerate(windows)] or [mine])


def epoch_batches(
    file_n_obs: Sequence[int], s: Settings, epoch: int, cells: np.ndarray | None = None, sequence: np.ndarray | None = None
) -> list[np.ndarray]:
    """The rows of every batch rank ``s.rank`` yields in ``epoch``, in order."""
    rows = epoch_rows(file_n_obs, s, epoch, cells, sequence)
    return [rows[a : a + s.batch_size] for a in range(0, rows.size, s.batch_size)]


def sampled_sequence(sampler, seed: int, epoch: int) -> np.ndarray:
    """A sampler's indices for ``epoch``: it runs with torch's global generator seeded from ``(seed, epoch)``."""
    import torch

    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.default_rng([seed, epoch, 2]).integers(2**63)))
        return np.fromiter((int(i) for i in sampler), dtype=np.int64)


# --------------------------------------------------------------------------- plan-independent checks


def check_epoch(
    per_rank: list[list[np.ndarray]], n_selected: int, s: Settings, pool: np.ndarray | None = None,
    sequence: np.ndarray | None = None,
) -> None:  # fmt: skip
    """What every rank's batches of one epoch must satisfy, whatever the order the plan chose.

    ``per_rank[r]``: rank ``r``'s batches (global rows). ``pool``: the
    selected cells (``None``: ``range(n_selected)``); ``sequence``: a
    sampler's sequence for the epoch instead.
    """
    world, bs = s.world_size, s.batch_size
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks yield different batch counts: {[len(b) for b in per_rank]}"
    assert counts.pop() == n_batches(n_selected, s)
    for batches in per_rank:
        assert all(len(b) == bs for b in batches[:-1]), [len(b) for b in batches]
        if batches:
            assert 0 < len(batches[-1]) <= bs and (not s.drop_last or len(batches[-1]) == bs)
    rows = [np.concatenate(b) if b else np.empty(0, np.int64) for b in per_rank]
    share = n_selected // world if s.equalize == "drop" else -(-n_selected // world)
    for r, mine in enumerate(rows):
        dropped = share - mine.size
        assert 0 <= dropped < (bs if s.drop_last else 1), f"rank {r} yields {mine.size} of its {share} rows"
    if sequence is not None:  # each rank: its contiguous share of the sequence, in the sequence's order
        for r, mine in enumerate(rows):
            lo = r * n_selected // world
            expect = sequence[lo : (r + 1) * n_selected // world]
            if s.equalize == "pad" and expect.size < share:
                expect = np.concatenate([expect, expect[:1]])
            np.testing.assert_array_equal(mine, expect[: mine.size], err_msg=f"rank {r} is not its share of the sequence")
        return
    pool = np.arange(n_selected) if pool is None else pool
    everything = np.concatenate(rows)
    for r, mine in enumerate(rows):
        distinct = np.unique(mine)
        padded = mine.size - distinct.size
        assert padded <= (1 if s.equalize == "pad" else 0), f"rank {r} repeats {padded} rows"
    assert np.isin(everything, pool).all(), "rows outside the selection"
    if s.equalize == "drop":
        assert np.unique(everything).size == everything.size, "a row twice in one epoch (or on two ranks)"
    missing = np.setdiff1d(pool, everything)
    lost = world * ((bs - 1) if s.drop_last else 0) + (world - 1 if s.equalize == "drop" else 0)
    assert missing.size <= lost, f"{missing.size} selected rows never yielded"
    if s.equalize == "pad" and not s.drop_last:
        assert missing.size == 0


# --------------------------------------------------------------------------- selections


def split_sizes(n: int, fractions: float | Sequence[float]) -> list[int]:
    """Cells per part: ``round(f * n)`` and the rest for one fraction; else ``floor(f * n)`` each,
    the remainder one by one from the first (``torch.utils.data.random_split``)."""
    if isinstance(fractions, (int, float)):
        k = round(fractions * n)
        return [k, n - k]
    sizes = [math.floor(n * f) for f in fractions]
    for i in range(n - sum(sizes)):
        sizes[i % len(sizes)] += 1
    return sizes


def missing_mask(column: pd.Series) -> np.ndarray:
    """Cells without a value: NaN, ``pd.NA``, a categorical's -1."""
    return column.isna().to_numpy()


def class_weights(column: pd.Series, cells: np.ndarray | None) -> np.ndarray:
    """``1 / (cells of its class)`` for selected cells with a label, else 0."""
    n = len(column)
    inside = np.zeros(n, dtype=bool)
    inside[np.arange(n) if cells is None else cells] = True
    inside &= ~missing_mask(column)
    values = column.astype(object).to_numpy()
    labels = pd.Series(values[inside]).astype(str).to_numpy()
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    out = np.zeros(n, dtype=np.float64)
    out[inside] = 1.0 / counts[inverse]
    return out


# --------------------------------------------------------------------------- what each row holds


@dataclass(frozen=True)
class Values:
    """What a dataset yields for each row.

    ``genes``: the var_names argument (names in order, or a boolean mask),
    ``None`` for all; ``obs_keys``: a str (one tensor) or a list (a dict);
    ``obsm_keys`` join the dict.
    """

    dense: bool = False
    layer: str | None = None
    genes: tuple | None = None
    mask: bool = False  # genes is a boolean mask
    obs_keys: str | tuple[str, ...] | None = None
    obsm_keys: tuple[str, ...] = ()
    obs_codes: tuple[str, ...] = ()
    return_index: bool = True

    def var_names_arg(self):
        if self.genes is None:
            return None
        return np.array(self.genes, dtype=bool) if self.mask else list(self.genes)

    def obs_key_list(self) -> list[str]:
        return [] if self.obs_keys is None else [self.obs_keys] if isinstance(self.obs_keys, str) else list(self.obs_keys)


class StoreTruth:
    """One or more stores read with plain anndata, files in manifest order, stores in the order given."""

    def __init__(self, stores: Sequence[Path]):
        adatas, self.file_n_obs, self.schema, self.shuffled = [], [], {}, True
        for store in stores:
            manifest = json.loads((Path(store) / "arrayloaders.json").read_text())
            self.shuffled &= bool(manifest.get("shuffle", False))  # cells shuffled at conversion
            for f in manifest["files"]:
                a = ad.read_zarr(Path(store) / f["name"])
                assert a.n_obs == f["n_obs"]
                adatas.append(a)
                self.file_n_obs.append(a.n_obs)
            for key, col in manifest["obs_schema"].items():
                self.schema.setdefault(key, col)
        self.n_obs = int(sum(self.file_n_obs))
        self.var_names = adatas[0].var_names
        self.obs = pd.concat([a.obs for a in adatas])
        self.obs_names = self.obs.index
        self.X = sp.vstack([a.X for a in adatas], format="csr") if sp.issparse(adatas[0].X) else np.concatenate([a.X for a in adatas])
        self.layers = {}
        for name in adatas[0].layers:
            if name is None:  # anndata 0.13 lists X among the layers
                continue
            parts = [a.layers[name] for a in adatas]
            self.layers[name] = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)
        self.obsm = {k: np.concatenate([a.obsm[k] for a in adatas]) for k in adatas[0].obsm}

    # ------------------------------------------------------------------ values

    def columns(self, v: Values) -> np.ndarray | None:
        if v.genes is None:
            return None
        if v.mask:
            return np.flatnonzero(np.asarray(v.genes, dtype=bool))
        return self.var_names.get_indexer(list(v.genes))

    def var_names_of(self, v: Values) -> pd.Index:
        cols = self.columns(v)
        return self.var_names if cols is None else self.var_names[cols]

    def categories(self, key: str, v: Values) -> list:
        """The categories behind a column's codes: the manifest's for text, sorted distinct values for ``obs_codes``."""
        col = self.schema[key]
        if col["kind"] == "categorical":
            return list(col["categories"])
        values = self.obs[key].dropna().to_numpy()
        return list(np.unique(values))

    def obs_values(self, key: str, rows: np.ndarray, v: Values) -> np.ndarray:
        """One obs column as yielded, for ``rows``."""
        column = self.obs[key].iloc[rows]
        col = self.schema[key]
        if col["kind"] == "categorical" or key in v.obs_codes:
            cats = pd.Index(self.categories(key, v))
            values = column.astype(object).to_numpy()
            missing = column.isna().to_numpy()
            codes = np.full(rows.size, -1, dtype=np.int64)
            if (~missing).any():
                present = values[~missing]
                if col["kind"] == "categorical":
                    present = present.astype(str)
                at = cats.get_indexer(pd.Index(present))
                assert (at >= 0).all()
                codes[~missing] = at
            return codes
        if isinstance(column.dtype, pd.api.extensions.ExtensionDtype):  # nullable: float64, NaN where missing
            return column.to_numpy(dtype=np.float64, na_value=np.nan)
        return column.to_numpy()

    def matrix(self, v: Values):
        return self.X if v.layer is None else self.layers[v.layer]

    def expected(self, rows: np.ndarray, v: Values) -> dict:
        """X (scipy CSR, or a dense array), obs (None, an array or a dict of arrays) and index of ``rows``."""
        m = self.matrix(v)[rows]
        cols = self.columns(v)
        if cols is not None:
            m = m[:, cols]
        if sp.issparse(m):
            m = sp.csr_matrix(m)
            if v.dense:
                m = m.toarray()
        elif not v.dense:
            raise ValueError("a dense matrix as sparse batches")
        keys = v.obs_key_list()
        obs = {k: self.obs_values(k, rows, v) for k in keys}
        for k in v.obsm_keys:
            values = self.obsm[k][rows]
            obs[k] = values if values.dtype.kind == "f" else values.astype(np.float32)
        if not obs:
            obs = None
        elif isinstance(v.obs_keys, str) and not v.obsm_keys:
            obs = obs[v.obs_keys]
        return {"X": m, "obs": obs, "index": rows}
