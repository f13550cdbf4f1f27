"""Model-based test: random sequences of public calls on real datasets, every batch checked against ``oracle.py``.

A hypothesis ``RuleBasedStateMachine`` builds datasets with random settings
(sizes, shuffle, seed, drop_last, ranks, ``num_workers`` 0 or 2, a subset or
a sampler, genes, a layer, obsm, obs columns, sparse or dense), and then
iterates them partly or wholly, peeks, keeps loops open across other calls,
changes sizes, sets epochs, saves states into fresh datasets (with the other
``num_workers``), takes subsets and splits, and builds ``StoreDataModule``s.
The machine keeps a model of each dataset (its current epoch and position,
its loops) and compares every batch, bit for bit, with the reference loader
of ``oracle.py``: rows (``return_index``), order, X, obs and obsm values.

Each documented rule is its own ``@rule`` (or a branch tagged with the rule
it exercises); ``ARRAYLOADERS_MODEL_SKIP=rule1,rule3`` leaves tagged rules
out (see ``RULES``). Environment variables:

- ``ARRAYLOADERS_MODEL_EXAMPLES`` / ``ARRAYLOADERS_MODEL_STEPS``: examples and
  steps per example (default 100 x 20, about 1.5 minutes on 2 cores; a long
  run: ``ARRAYLOADERS_MODEL_EXAMPLES=2500``, about 45 minutes);
- ``ARRAYLOADERS_MODEL_SHRINK=0``: report a failure without shrinking it
  (shrinking a machine that reads stores can take minutes);
- ``ARRAYLOADERS_MODEL_TIMES=1``: print the seconds spent in each rule.

Every dataset is closed at the end of each example, which then checks that
no worker process and no shared-memory segment is left.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import anndata as ad
import numpy as np
import oracle
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_bit_identical, batch_bytes, worker_pids
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.loading.plan import PlanConfig, batch_rows, plan_epoch
from arrayloaders.loading.ring import segment_names

EXAMPLES = int(os.environ.get("ARRAYLOADERS_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("ARRAYLOADERS_MODEL_STEPS", "20"))
SHRINK = os.environ.get("ARRAYLOADERS_MODEL_SHRINK", "1") != "0"  # 0: report failures unshrunk (quicker)

# The rules under test that are new or changing; each tagged rule or branch can be left out.
RULES = {
    "rule1": "subset(cells=) narrows within the parent's selection; subset() keeps it; no subset/split of a sampler dataset",
    "rule2": "split([fractions]) gives disjoint parts sized as torch's random_split",
    "rule3": "a size change while a loop runs: that loop, its state_dict and its resume keep the old sizes",
    "rule4": "a state_dict resumes only on the store it was taken on",
    "rule5": "StoreDataModule with cells=, sampler=, drop_last: split within the selection; inference gives every cell",
    "rule6": "class_weights / class_run_sampler: missing labels (NaN, NA, -1) weigh 0, for every dtype",
    "rule3-len": "len(ds) while a loop runs with sizes changed since it started: that loop's (the current epoch's) count",
    "rule3-reload": "sizes changed after load_state_dict: the restored epoch still finishes with the saved ones",
    "threads-sampler": "two loops of a sampler dataset in two threads: each gets the epoch's sequence",
}
SKIP = {r.strip() for r in os.environ.get("ARRAYLOADERS_MODEL_SKIP", "").split(",") if r.strip()}


def on(tag: str) -> bool:
    return tag not in SKIP


def resizable(m) -> bool:
    """Sizes may change: always under rule 3, else only with no loop running (and not in a restored epoch)."""
    return (on("rule3") or not m.running()) and (on("rule3-reload") or not m.pinned)


def resumable(m) -> bool:
    """Without rule 3: no loop running with other sizes, no restored sizes."""
    return on("rule3") or not m.pinned and all(lp.settings == m.settings for lp in m.running())


def no_sampler(m) -> bool:
    return m.sampler is None


def has_obs(m) -> bool:
    return bool(m.values.obs_key_list())


def has_loops(m) -> bool:
    return bool(m.loops)


def some(where):
    return lambda self: any(where(m) for m in self.models)


# Calls of the costly rules per example (each makes datasets: ~0.25 s each on 2 cores).
BUDGET = {"all_ranks": 1, "datamodule": 1, "resume": 2, "resume_elsewhere": 1, "resume_on_another_store": 1, "threads": 1}


def within_budget(name: str):
    return lambda self: self.spent.get(name, 0) < BUDGET[name]


MAX_DATASETS = 4  # live datasets per example
SHAPE_KEYS = ("batch_size", "chunk_size", "preload_nchunks", "shuffle", "drop_last", "equalize", "window")
MAX_WORKER_FAMILIES = 1  # datasets with workers per example (subsets share them)
MAX_OPEN_LOOPS = 2

OBS = ("cell_type", "n_genes", "batch", "score", "flag", "doublet")  # categorical+missing, Int64+NA, int, float+NaN, bool, boolean+NA
NUMERIC_CODES = ("n_genes", "batch", "score", "flag", "doublet")
N_VARS = 24
SIZES = (40, 33, 50)


# --------------------------------------------------------------------------- stores


def write_inputs(folder: Path) -> list[Path]:
    """Three CSR .h5ad files: a CSR and a dense layer, two obsm arrays, obs columns of every kind, some missing."""
    paths = []
    for i, n in enumerate(SIZES):
        rng = np.random.default_rng(100 + i)
        X = sp.random(n, N_VARS, density=0.3, format="csr", dtype=np.float32, random_state=rng)
        X.data = rng.integers(1, 50, X.data.size).astype(np.float32)
        counts = X.copy()
        counts.data = rng.integers(1, 1000, counts.data.size).astype(np.float32)
        n_genes = pd.array(rng.integers(0, 5, n), dtype="Int64")
        n_genes[rng.random(n) < 0.15] = pd.NA
        score = rng.standard_normal(n).astype(np.float32)
        score[rng.random(n) < 0.1] = np.nan
        doublet = pd.array(rng.random(n) < 0.3, dtype="boolean")
        doublet[rng.random(n) < 0.2] = pd.NA
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical(rng.choice(["a", "b", "c", None], n, p=[0.4, 0.3, 0.2, 0.1]), categories=["a", "b", "c"]),
                "n_genes": n_genes,
                "batch": rng.integers(0, 3, n),
                "score": score,
                "flag": rng.random(n) < 0.5,
                "doublet": doublet,
            },
            index=[f"in{i}_cell{j}" for j in range(n)],
        )
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{k}" for k in range(N_VARS)]))
        adata.layers["counts"] = counts
        adata.layers["scaled"] = rng.standard_normal((n, N_VARS)).astype(np.float32)
        adata.obsm["X_pca"] = rng.standard_normal((n, 3)).astype(np.float32)
        adata.obsm["id"] = np.stack([np.full(n, i, np.int32), np.arange(n, dtype=np.int32)], axis=1)
        path = folder / f"in_{i}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Store "A" (three files); "B": the same inputs converted with another seed (other cells in each row);
    "U": not shuffled (the inputs' cells in order: batches mix a window of 8 loads by default)."""
    folder = tmp_path_factory.mktemp("model")
    inputs = write_inputs(folder)
    return {
        "A": create_store_from_h5ads(inputs, folder / "A", n_obs_per_file=50, progress=False),
        "B": create_store_from_h5ads(inputs, folder / "B", n_obs_per_file=50, seed=1, progress=False),
        "U": create_store_from_h5ads(inputs, folder / "U", n_obs_per_file=50, shuffle=False, progress=False),
    }


_TRUTHS: dict[tuple[Path, ...], oracle.StoreTruth] = {}


def truth_of(stores: tuple[Path, ...]) -> oracle.StoreTruth:
    if stores not in _TRUTHS:
        _TRUTHS[stores] = oracle.StoreTruth(stores)
    return _TRUTHS[stores]


# --------------------------------------------------------------------------- the oracle against the plan


@settings(max_examples=300, deadline=None)
@given(
    files=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    sizes=st.tuples(st.integers(1, 12), st.integers(1, 7), st.integers(1, 4)),
    shuffle=st.booleans(), seed=st.integers(0, 5), drop_last=st.booleans(),
    world=st.integers(1, 3), equalize=st.sampled_from(["drop", "pad"]), window=st.sampled_from([1, 1, 2, 3]),
    epoch=st.integers(0, 3), data=st.data(),
)  # fmt: skip
def test_the_oracle_agrees_with_the_plan(files, sizes, shuffle, seed, drop_last, world, equalize, window, epoch, data):
    """oracle.epoch_batches (written from the README) gives the batches plan_epoch + batch_rows cut."""
    n_obs = sum(files)
    kind = data.draw(st.sampled_from(["all", "cells", "sequence"]))
    cells = sequence = None
    if kind == "cells":
        cells = np.array(sorted(data.draw(st.sets(st.integers(0, max(n_obs - 1, 0)), min_size=1))) if n_obs else [], dtype=np.int64)
        cells = cells[cells < n_obs]
    elif kind == "sequence":
        sequence = np.array(data.draw(st.lists(st.integers(0, max(n_obs - 1, 0)), min_size=1, max_size=50)), dtype=np.int64)
    n = n_obs if kind == "all" else cells.size if cells is not None else sequence.size
    if n_obs == 0 or n == 0 or (world > 1 and n < world):
        return
    rank = data.draw(st.integers(0, world - 1))
    window = 1 if not shuffle or sequence is not None else window
    s = oracle.Settings(*sizes, shuffle, seed, drop_last, rank, world, equalize, window)
    config = PlanConfig(tuple(files), *sizes, shuffle, seed, drop_last, rank, world, equalize, None if kind == "all" else n, window)
    plan = plan_epoch(config, epoch, cells=cells, sequence=sequence)
    got = []
    for b in range(plan.n_batches):
        w, lo, hi = batch_rows(plan, b)
        if plan.window == 1:
            rows = plan.rows_of_load(plan.loads[w])
        else:
            rows = np.concatenate([plan.rows_of_load(plan.loads[i]) for i in plan.window_loads(w)])[plan.window_order(w)]
        got.append(rows[lo:hi])
    want = oracle.epoch_batches(files, s, epoch, cells, sequence)
    assert len(got) == len(want) == oracle.n_batches(n, s)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 80), sizes=st.tuples(st.integers(1, 12), st.integers(1, 7), st.integers(1, 4)),
    shuffle=st.booleans(), seed=st.integers(0, 5), drop_last=st.booleans(), world=st.integers(1, 4),
    equalize=st.sampled_from(["drop", "pad"]), window=st.sampled_from([1, 2]), epoch=st.integers(0, 3),
    kind=st.sampled_from(["all", "cells", "sequence"]), data=st.data(),
)  # fmt: skip
def test_the_oracle_keeps_the_rules_that_do_not_depend_on_the_order(n, sizes, shuffle, seed, drop_last, world, equalize, window, epoch, kind, data):
    """Every rank set of an epoch: each selected cell once (minus drops), ranks disjoint, equal batch counts."""
    files = [n // 3, n - n // 3]
    pool = sequence = cells = None
    if kind == "cells":
        cells = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))), dtype=np.int64)
        pool, n_sel = cells, cells.size
    elif kind == "sequence":
        sequence = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=60)), dtype=np.int64)
        n_sel = sequence.size
    else:
        n_sel = n
    if world > 1 and n_sel < world:
        return
    per_rank = [
        oracle.epoch_batches(files, oracle.Settings(*sizes, shuffle, seed, drop_last, r, world, equalize, window), epoch, cells, sequence)
        for r in range(world)
    ]
    oracle.check_epoch(per_rank, n_sel, oracle.Settings(*sizes, shuffle, seed, drop_last, 0, world, equalize, window), pool, sequence)


# --------------------------------------------------------------------------- what the model found


def test_sizes_changed_after_loading_leave_the_restored_epoch_as_saved(stores):
    """The rest of a restored epoch is cut with the sizes it was saved with, even if they change before it runs
    (``dm.set_batch_size`` after restoring a checkpoint); later epochs take the new ones.

    Found by the model (rule ``rule3-reload``): only the settings that differed at ``load_state_dict`` were kept,
    so a batch size equal then and changed afterwards cut the rest of the epoch anew from the saved batch
    position: rows 15-29 came twice.
    """
    kw = {"batch_size": 10, "num_workers": 0, "return_index": True}
    with ZarrSparseDataset(**kw).add_store(stores["A"]) as a, ZarrSparseDataset(**kw).add_store(stores["A"]) as b:
        it = iter(a)
        head = [next(it)[2] for _ in range(3)]
        b.load_state_dict(a.state_dict())
        b.batch_size = 5
        assert len(b) == 13  # the restored epoch: batches of 10
        rows = torch.cat(head + [batch[2] for batch in b]).numpy()
        assert sorted(rows.tolist()) == list(range(a.n_obs)), f"{rows.size} rows, {np.unique(rows).size} distinct"
        assert len(b) == 25 and b.epoch == 1  # then its own batch size


def test_len_is_the_running_epochs_count_after_a_size_change(stores):
    """``len(ds)`` is the current epoch's number of batches: while a loop runs with the sizes it started with,
    that loop's count, as a state taken then and restored elsewhere says.

    Found by the model (rule ``rule3-len``): ``len(ds)`` gave the new sizes' count (3) while the running epoch
    has 13 batches, and ``len`` of its restored state 13.
    """
    with ZarrSparseDataset(batch_size=10, num_workers=0).add_store(stores["A"]) as ds:
        it = iter(ds)
        next(it)
        ds.batch_size = 50
        with ZarrSparseDataset(batch_size=50, num_workers=0).add_store(stores["A"]) as other:
            other.load_state_dict(ds.state_dict())
            assert len(other) == 13
        assert len(ds) == 13 == 1 + sum(1 for _ in it)
        assert len(ds) == 3  # the next epoch: batches of 50


class _OneByOne(torch.utils.data.Sampler):
    """Each index drawn alone from torch's global generator, as a sampler with ``generator=None`` may draw."""

    def __iter__(self):
        return (int(torch.randint(0, 123, ())) for _ in range(20_000))

    def __len__(self):
        return 20_000


def test_two_loops_in_two_threads_draw_a_samplers_epoch_alike(stores):
    """Two loops of one epoch at once, one in another thread, each get the sequence the sampler gives that epoch.

    Found by the model (rule ``threads-sampler``): the sampler runs with torch's global generator seeded from
    ``(seed, epoch)``; two loops starting together in two threads drew from it in turn, so each got part of
    the other's stream: neither loop yielded the epoch's batches.
    """
    with ZarrSparseDataset(batch_size=10_000, num_workers=0, return_index=True, sampler=_OneByOne()).add_store(stores["A"]) as ds:
        want = next(iter(ds))[2].numpy()  # the first batch of epoch 0, alone (of 2: the epoch goes on)
        its, got = [iter(ds), iter(ds)], [None, None]

        def run(i):
            got[i] = next(its[i])[2].numpy()

        other = threading.Thread(target=run, args=(1,))
        other.start()
        run(0)
        other.join(60)
        assert [np.array_equal(g, want) for g in got] == [True, True]


# --------------------------------------------------------------------------- the model


class Recorder(torch.utils.data.Sampler):
    """A torch sampler that remembers each sequence it yields (the loader's draws; the oracle draws ``inner``)."""

    def __init__(self, inner):
        self.inner, self.draws = inner, []
        if callable(getattr(inner, "set_epoch", None)):
            self.set_epoch = inner.set_epoch

    def __iter__(self):
        drawn = [int(i) for i in self.inner]
        self.draws.append(drawn)
        return iter(drawn)

    def __len__(self):
        return len(self.inner)


@dataclass(repr=False)
class Loop:
    """A loop (``iter(ds)``) the machine keeps open: what it must yield and how far it is."""

    it: object
    epoch: int
    position: int
    settings: oracle.Settings
    batches: list[np.ndarray]
    handed: int = 0
    done: bool = False

    def __repr__(self) -> str:
        return f"<loop over epoch {self.epoch} at {self.position} of {len(self.batches)}, {self.settings}>"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))


@dataclass(repr=False)
class Model:
    """What the machine knows of one dataset: how it was made, its current epoch and position, its loops."""

    ds: object
    name: str
    stores: tuple[Path, ...]
    values: oracle.Values
    settings: oracle.Settings
    window: int | None  # the window argument
    cells: np.ndarray | None
    sampler: object | None
    num_workers: int
    family: int  # datasets of one family share worker processes
    epoch: int = 0
    start: int = 0
    pinned: oracle.Settings | None = None  # sizes of the current epoch's rest, from load_state_dict (rule 3)
    within: np.ndarray | None = None  # a sampler subset's parent's cells: what it may draw from
    loops: list[Loop] = field(default_factory=list)

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints draws with IPython's pretty printer
        p.text(repr(self))

    def __repr__(self) -> str:
        selection = "" if self.cells is None else f", {self.cells.size} cells"
        selection += "" if self.sampler is None else f", sampler of {len(self.sampler)}"
        return f"<{self.name}: epoch {self.epoch} from {self.start}{selection}, {self.settings}, workers {self.num_workers}>"

    @property
    def truth(self) -> oracle.StoreTruth:
        return truth_of(self.stores)

    @property
    def n_selected(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        return self.truth.n_obs if self.cells is None else self.cells.size

    def running(self) -> list[Loop]:
        """Loops over the current epoch that have handed out a batch and not ended."""
        return [lp for lp in self.loops if lp.handed and not lp.done and lp.epoch == self.epoch]

    def states(self) -> list[tuple[int, int, oracle.Settings]]:
        """What ``state_dict()`` may describe: (epoch, next batch, the sizes of the rest of that epoch).

        The furthest running loop's; running loops at the same position with other sizes describe
        different rests of the epoch, each valid (which one is recorded is not specified).
        """
        running = self.running()
        if running:
            furthest = max(lp.position for lp in running)
            return list(dict.fromkeys((self.epoch, furthest, lp.settings) for lp in running if lp.position == furthest))
        return [(self.epoch, self.start, self.pinned or self.settings)]

    def state(self, recorded: dict | None = None) -> tuple[int, int, oracle.Settings]:
        """The state ``state_dict()`` must describe; ``recorded``: a state taken, to choose among equal positions."""
        candidates = self.states()
        if recorded is not None and len(candidates) > 1:
            saved = recorded["settings"]
            candidates = [c for c in candidates if all(saved.get(k) == getattr(c[2], k) for k in SHAPE_KEYS)] or candidates
        return candidates[0]

    def sequence(self, epoch: int) -> np.ndarray | None:
        if self.sampler is None:
            return None
        inner = self.sampler.inner if isinstance(self.sampler, Recorder) else self.sampler
        return oracle.sampled_sequence(inner, self.settings.seed, epoch)

    def batches(self, s: oracle.Settings, epoch: int) -> list[np.ndarray]:
        return oracle.epoch_batches(self.truth.file_n_obs, s, epoch, self.cells, self.sequence(epoch))


def make_dataset(stores, values: oracle.Values, s: oracle.Settings, window, cells, sampler, num_workers, made: list):
    """A dataset with these settings over ``stores``; appended to ``made`` (closed at the end, whatever happens)."""
    kind = ZarrDenseDataset if values.dense else ZarrSparseDataset
    ds = kind(
        batch_size=s.batch_size, chunk_size=s.chunk_size, preload_nchunks=s.preload_nchunks, shuffle=s.shuffle,
        seed=s.seed, drop_last=s.drop_last, return_index=values.return_index, num_workers=num_workers,
        rank=s.rank, world_size=s.world_size, equalize=s.equalize, cells=cells, sampler=sampler, window=window,
        var_names=values.var_names_arg(), layer=values.layer, memory_budget="256MiB",
    )  # fmt: skip
    made.append(ds)
    obs_keys = values.obs_keys if values.obs_keys is None or isinstance(values.obs_keys, str) else list(values.obs_keys)
    for store in stores:
        ds.add_store(store, obs_keys=obs_keys, obsm_keys=list(values.obsm_keys) or None, obs_codes=list(values.obs_codes) or None)
    return ds


def csr_of(X: torch.Tensor) -> sp.csr_matrix:
    return sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=tuple(X.shape))


def assert_same_array(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{what}: values differ\n{got}\n{want}"


def check_batch(batch, truth: oracle.StoreTruth, rows: np.ndarray, v: oracle.Values, where: str) -> None:
    """One yielded batch against the oracle's rows: index, X bit for bit, obs and obsm."""
    want = truth.expected(rows, v)
    # (a DataLoader with batch_size=None hands tuples on as lists)
    assert isinstance(batch, tuple | list) and len(batch) == (3 if v.return_index else 2), f"{where}: batch of {len(batch)}"
    X, obs = batch[0], batch[1]
    if v.return_index:
        assert_same_array(batch[2].numpy(), rows.astype(np.int64), f"{where}: index")
    if v.dense:
        assert X.layout == torch.strided
        assert_same_array(X.numpy(), want["X"], f"{where}: X")
    else:
        assert X.layout == torch.sparse_csr
        m = csr_of(X)
        assert m.shape == want["X"].shape, f"{where}: X shape {m.shape}, expected {want['X'].shape}"
        steps = np.diff(m.indices.astype(np.int64))
        within = np.ones(steps.size, dtype=bool)  # steps inside a row, not from one row's last entry to the next's first
        at = m.indptr[1:-1] - 1
        within[at[(at >= 0) & (at < steps.size)]] = False
        assert (steps[within] > 0).all(), f"{where}: a row's column indices do not increase"
        assert_bit_identical(m, want["X"])
    if want["obs"] is None:
        assert obs is None, f"{where}: obs {obs!r}, expected None"
    elif isinstance(want["obs"], np.ndarray):
        assert isinstance(obs, torch.Tensor), f"{where}: obs is {type(obs).__name__}, expected a tensor"
        assert_same_array(obs.numpy(), want["obs"], f"{where}: obs")
    else:
        assert isinstance(obs, dict) and list(obs) == list(want["obs"]), f"{where}: obs keys {list(obs)}"
        for key, values in want["obs"].items():
            assert_same_array(obs[key].numpy(), values, f"{where}: obs[{key!r}]")


# --------------------------------------------------------------------------- strategies


@st.composite
def values_strategy(draw, dense_ok: bool = True) -> oracle.Values:
    dense = draw(st.booleans()) if dense_ok else False
    layer = draw(st.sampled_from([None, None, "counts"] + (["scaled"] if dense else [])))
    genes, mask = None, False
    how = draw(st.sampled_from(["all", "all", "names", "mask"]))
    if how == "names":
        genes = tuple(f"g{k}" for k in draw(st.lists(st.integers(0, N_VARS - 1), min_size=1, max_size=N_VARS, unique=True)))
    elif how == "mask":
        chosen = draw(st.lists(st.booleans(), min_size=N_VARS, max_size=N_VARS).filter(any))
        genes, mask = tuple(chosen), True
    keys = draw(st.lists(st.sampled_from(OBS), unique=True, max_size=4))
    obs_keys = None if not keys else keys[0] if len(keys) == 1 and draw(st.booleans()) else tuple(keys)
    codes = tuple(k for k in keys if k in NUMERIC_CODES and draw(st.booleans()))
    obsm = tuple(draw(st.lists(st.sampled_from(["X_pca", "id"]), unique=True, max_size=2)))
    return oracle.Values(dense, layer, genes, mask, obs_keys, obsm, codes, draw(st.sampled_from([True, True, True, False])))


@st.composite
def settings_strategy(draw, n_max: int = 3) -> oracle.Settings:
    world = draw(st.sampled_from([1, 1, 1, 2, 3]))
    return oracle.Settings(
        batch_size=draw(st.integers(1, 20)), chunk_size=draw(st.integers(1, 8)), preload_nchunks=draw(st.integers(1, 4)),
        shuffle=draw(st.booleans()), seed=draw(st.integers(0, 3)), drop_last=draw(st.booleans()),
        rank=draw(st.integers(0, world - 1)), world_size=world, equalize=draw(st.sampled_from(["drop", "pad"])),
    )  # fmt: skip


def effective(s: oracle.Settings, window: int | None, sampler, stores: tuple[Path, ...]) -> oracle.Settings:
    """``s`` with the window a dataset uses: 1 without shuffle or with a sampler, else the argument; by default
    1 for stores shuffled at conversion, 8 for others."""
    if not s.shuffle or sampler is not None:
        return replace(s, window=1)
    return replace(s, window=window if window is not None else 1 if truth_of(stores).shuffled else 8)


def draw_shape(data, s: oracle.Settings, window: int | None) -> dict:
    """New values of the settings that shape an epoch: ``batch_size`` always, the others sometimes."""
    new = {"batch_size": data.draw(st.integers(1, 20), label="batch_size"), "chunk_size": s.chunk_size,
           "preload_nchunks": s.preload_nchunks, "drop_last": s.drop_last, "shuffle": s.shuffle, "equalize": s.equalize,
           "window": window}  # fmt: skip
    if data.draw(st.booleans(), label="other sizes"):
        new["chunk_size"], new["preload_nchunks"] = data.draw(st.integers(1, 8), label="chunk_size"), data.draw(st.integers(1, 4), label="preload_nchunks")
    if data.draw(st.integers(0, 3), label="other settings") == 0:
        new["drop_last"], new["shuffle"] = data.draw(st.booleans(), label="drop_last"), data.draw(st.booleans(), label="shuffle")
        new["equalize"] = data.draw(st.sampled_from(["drop", "pad"]), label="equalize")
        new["window"] = data.draw(st.sampled_from([None, 2, 3]), label="window")
    return new


def draw_cells(data, pool: np.ndarray, label: str) -> np.ndarray:
    """A non-empty subset of ``pool`` (sorted distinct rows)."""
    chosen = data.draw(st.lists(st.booleans(), min_size=pool.size, max_size=pool.size), label=label)
    cells = pool[np.array(chosen, dtype=bool)]
    return cells if cells.size else pool[:1]


def draw_sampler(data, pool: np.ndarray, label: str):
    """A sampler of rows of ``pool``: a list (repeats), or torch's samplers drawing from the global generator."""
    kind = data.draw(st.sampled_from(["list", "list", "random", "weighted", "subset-random", "distributed"]), label=label)
    if kind == "list":
        return [int(pool[i]) for i in data.draw(st.lists(st.integers(0, pool.size - 1), min_size=1, max_size=60), label=label)]
    k = data.draw(st.integers(1, 60), label=label + " length")
    if kind == "random":
        replacement = data.draw(st.booleans())
        inner = torch.utils.data.RandomSampler(pool.tolist(), replacement=replacement, num_samples=k if replacement else None)
        rows = torch.as_tensor(pool)
        return Recorder(_Mapped(inner, rows))
    if kind == "distributed":  # a sampler with set_epoch and a generator of its own, seeded by its seed and the epoch
        inner = torch.utils.data.DistributedSampler(pool.tolist(), num_replicas=1, rank=0, seed=k)
        return Recorder(_Mapped(inner, torch.as_tensor(pool)))
    if kind == "weighted":
        weights = torch.zeros(int(pool.max()) + 1, dtype=torch.float64)
        weights[torch.as_tensor(pool)] = torch.rand(pool.size, generator=torch.Generator().manual_seed(k), dtype=torch.float64) + 0.01
        return Recorder(torch.utils.data.WeightedRandomSampler(weights, num_samples=k))
    return Recorder(torch.utils.data.SubsetRandomSampler(pool.tolist()))


class _Mapped(torch.utils.data.Sampler):
    """A sampler of positions turned into rows (RandomSampler yields positions into its data source)."""

    def __init__(self, inner, rows: torch.Tensor):
        self.inner, self.rows = inner, rows
        if callable(getattr(inner, "set_epoch", None)):
            self.set_epoch = inner.set_epoch

    def __iter__(self):
        return (int(self.rows[i]) for i in self.inner)

    def __len__(self):
        return len(self.inner)


# --------------------------------------------------------------------------- the machine

TIMES: dict[str, list[float]] = {}


def timed(f):
    """ARRAYLOADERS_MODEL_TIMES=1: the seconds spent in each rule are printed at the end."""
    if not os.environ.get("ARRAYLOADERS_MODEL_TIMES"):
        return f

    @functools.wraps(f)
    def timed_rule(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            TIMES.setdefault(f.__name__, []).append(time.perf_counter() - t)

    return timed_rule


class LoaderMachine(RuleBasedStateMachine):
    """Random sequences of public calls on datasets; every batch against the oracle."""

    stores: ClassVar[dict[str, Path]] = {}  # set by test_model_based (a module fixture)

    def __init__(self):
        super().__init__()
        self.models: list[Model] = []
        self.others: list = []  # datasets and modules made along the way, closed at the end
        self.held: list[tuple[object, bytes]] = []  # batches kept, with their bytes when yielded
        self.families = 0
        self.worker_families: set[int] = set()
        self.spent: dict[str, int] = {}

    def spend(self, name: str) -> None:
        self.spent[name] = self.spent.get(name, 0) + 1

    # ------------------------------------------------------------------ helpers

    def workers_for(self, data, label: str) -> int:
        """2 workers for a new family while few families have them, else 0."""
        want = data.draw(st.sampled_from([0, 0, 0, 2]), label=label)
        return want if want == 0 or len(self.worker_families) < MAX_WORKER_FAMILIES else 0

    def new_family(self, num_workers: int) -> int:
        self.families += 1
        if num_workers:
            self.worker_families.add(self.families)
        return self.families

    def add(self, model: Model) -> None:
        truth = model.truth
        ds, v = model.ds, model.values
        assert list(ds.var_names) == list(truth.var_names_of(v))
        assert ds.n_vars == len(truth.var_names_of(v))
        assert ds.n_obs == truth.n_obs
        for key in v.obs_key_list():
            if truth.schema[key]["kind"] == "categorical" or key in v.obs_codes:
                assert list(ds.categories[key]) == truth.categories(key, v), key
        if model.cells is not None:
            np.testing.assert_array_equal(ds.cells, model.cells)
        self.models.append(model)

    def pick(self, data, label: str, where=None) -> Model:
        """A dataset (that satisfies ``where``); the step is left out if none does."""
        models = [m for m in self.models if where is None or where(m)]
        return data.draw(st.sampled_from(models), label=label)

    def start(self, m: Model) -> Loop:
        """``iter(ds)``: a loop over the current epoch from its position, with the sizes in force."""
        s = m.pinned or m.settings
        loop = Loop(iter(m.ds), m.epoch, m.start, s, m.batches(s, m.epoch))
        m.loops.append(loop)
        return loop

    def take(self, m: Model, loop: Loop) -> bool:
        """One ``next()`` of ``loop``, checked; False once it is exhausted."""
        try:
            batch = next(loop.it)
        except StopIteration:
            assert loop.position >= len(loop.batches), (
                f"{m.name}: the loop stopped at batch {loop.position} of {len(loop.batches)} (epoch {loop.epoch})"
            )
            if not loop.done:  # an empty epoch (or one resumed at its end): ending it completes it
                loop.done = True
                self.completed(m, loop.epoch)
            return False
        assert loop.position < len(loop.batches), f"{m.name}: a batch past the end of epoch {loop.epoch} ({len(loop.batches)} batches)"
        rows = loop.batches[loop.position]
        check_batch(batch, m.truth, rows, m.values, f"{m.name} epoch {loop.epoch} batch {loop.position}")
        if loop.handed == 0 and isinstance(m.sampler, Recorder) and m.sampler.draws:
            # plan-independent: the batches are the runs of the sequence the loader drew itself
            np.testing.assert_array_equal(np.array(m.sampler.draws[-1], dtype=np.int64), m.sequence(loop.epoch))
        loop.position += 1
        loop.handed += 1
        if len(self.held) < 4 and loop.position % 3 == 1:
            self.held.append((batch, batch_bytes(batch)))
        if loop.position == len(loop.batches):
            loop.done = True
            self.completed(m, loop.epoch)
        return True

    def completed(self, m: Model, epoch: int) -> None:
        """A loop handed out the last batch of ``epoch``: if it is the current epoch, the next one is."""
        if m.epoch == epoch:
            m.epoch, m.start, m.pinned = epoch + 1, 0, None

    def end(self, m: Model, loop: Loop, how: str) -> None:
        """Leave a loop: ``close()``, or drop it (as ``break`` does)."""
        if how == "close":
            loop.it.close()
        loop.it = None
        loop.done = True
        m.loops.remove(loop)

    def run_loop(self, m: Model, k: int | None, how: str = "drop") -> None:
        loop = self.start(m)
        n = 0
        while k is None or n < k:
            if not self.take(m, loop):
                break
            n += 1
        if k is None:
            assert loop.done
        self.end(m, loop, how)

    # ------------------------------------------------------------------ datasets

    @initialize(data=st.data())
    @timed
    def first_dataset(self, data):
        self.new_dataset(data)

    @precondition(lambda self: len(self.models) < MAX_DATASETS)
    @rule(data=st.data())
    @timed
    def new_dataset(self, data):
        """A dataset with random settings, selection and values, over store A (or A then B)."""
        names = data.draw(st.sampled_from([("A",), ("A",), ("A",), ("A", "B"), ("U",)]), label="stores")
        stores = tuple(self.stores[n] for n in names)
        truth = truth_of(stores)
        v = data.draw(values_strategy(), label="values")
        s = data.draw(settings_strategy(), label="settings")
        selection = data.draw(st.sampled_from(["all", "all", "cells", "sampler"]), label="selection")
        cells = sampler = cells_arg = None
        pool = np.arange(truth.n_obs, dtype=np.int64)
        if selection == "cells":
            cells = draw_cells(data, pool, "cells")
            as_mask = data.draw(st.booleans(), label="cells as a mask")
            if as_mask:
                cells_arg = np.zeros(truth.n_obs, dtype=bool)
                cells_arg[cells] = True
            else:
                cells_arg = np.random.default_rng(cells.size).permutation(cells)  # any order
        elif selection == "sampler":
            sampler = draw_sampler(data, pool, "sampler")
        n = len(sampler) if sampler is not None else truth.n_obs if cells is None else cells.size
        if n < s.world_size:
            s = replace(s, rank=0, world_size=1)
        window = data.draw(st.sampled_from([None, None, None, 2, 3]), label="window")
        s = effective(s, window, sampler, stores)
        workers = self.workers_for(data, "num_workers")
        ds = make_dataset(stores, v, s, window, cells_arg, sampler, workers, self.others)
        model = Model(ds, f"ds{len(self.models)}", stores, v, s, window, cells, sampler, workers, self.new_family(workers))
        self.add(model)
        assert len(ds) == oracle.n_batches(n, s)

    # ------------------------------------------------------------------ loops

    @rule(data=st.data())
    @timed
    def iterate(self, data):
        """A loop of k batches (or to its end), then left by ``close()`` or ``break``; as a plain loop or a DataLoader."""
        m = self.pick(data, "dataset")
        k = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="batches")
        how = data.draw(st.sampled_from(["drop", "close", "dataloader"]), label="how")
        if how != "dataloader":
            self.run_loop(m, k, how)
            return
        s = m.pinned or m.settings
        expected = m.batches(s, m.epoch)[m.start :]
        loader = torch.utils.data.DataLoader(m.ds, batch_size=None)
        it = iter(loader)
        epoch, taken = m.epoch, 0
        for b, rows in enumerate(expected if k is None else expected[:k]):
            check_batch(next(it), m.truth, rows, m.values, f"{m.name} via DataLoader, batch {m.start + b}")
            taken += 1
        if k is None or k > len(expected):
            with pytest.raises(StopIteration):
                next(it)
        del it, loader
        if taken == len(expected):
            self.completed(m, epoch)

    @precondition(some(lambda m: on("threads-sampler") or m.sampler is None))
    @precondition(within_budget("threads"))
    @rule(data=st.data())
    @timed
    def threads(self, data):
        """Two loops at once, one in another thread: each gets every batch of the epoch (rows, order, values)."""
        self.spend("threads")
        m = self.pick(data, "dataset", lambda m: on("threads-sampler") or m.sampler is None)
        ks = [data.draw(st.one_of(st.none(), st.integers(1, 6)), label=f"batches of loop {i}") for i in range(2)]
        s = m.pinned or m.settings
        expected, epoch, start = m.batches(s, m.epoch)[m.start :], m.epoch, m.start
        got, errors = [[], []], []

        its = [iter(m.ds), iter(m.ds)]  # both made before either runs: the same epoch from the same start

        def run(i):
            try:
                it = its[i]
                for batch in it:
                    got[i].append(batch)
                    if ks[i] is not None and len(got[i]) == ks[i]:
                        break
                it.close()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        other = threading.Thread(target=run, args=(1,))
        other.start()
        run(0)
        other.join(60)
        assert not other.is_alive(), f"{m.name}: a loop in another thread did not end"
        its.clear()
        if errors:
            raise errors[0]
        for i in range(2):
            want = expected if ks[i] is None else expected[: ks[i]]
            assert len(got[i]) == len(want), f"{m.name}: loop {i} yielded {len(got[i])} batches, expected {len(want)}"
            for b, (batch, rows) in enumerate(zip(got[i], want)):
                check_batch(batch, m.truth, rows, m.values, f"{m.name} thread loop {i} batch {start + b}")
        if any(k is None or k >= len(expected) for k in ks):
            self.completed(m, epoch)

    @rule(data=st.data())
    @timed
    def peek(self, data):
        """``next(iter(ds))``: the current epoch's next batch; the epoch moves on only if that was its last."""
        m = self.pick(data, "dataset")
        self.run_loop(m, 1, "drop")

    @precondition(lambda self: sum(len(m.loops) for m in self.models) < MAX_OPEN_LOOPS)
    @rule(data=st.data())
    @timed
    def open_loop(self, data):
        """A loop kept open across other calls (another loop, a state_dict, a size change...)."""
        m = self.pick(data, "dataset")
        loop = self.start(m)
        for _ in range(data.draw(st.integers(1, 3), label="batches")):
            if not self.take(m, loop):
                break
        if loop.done:
            self.end(m, loop, "drop")

    @precondition(some(has_loops))
    @rule(data=st.data())
    @timed
    def advance_loop(self, data):
        m = self.pick(data, "dataset", has_loops)
        loop = data.draw(st.sampled_from(m.loops), label="loop")
        for _ in range(data.draw(st.integers(1, 6), label="batches")):
            if not self.take(m, loop):
                break
        if loop.done and data.draw(st.booleans(), label="drop it"):
            self.end(m, loop, "drop")

    @precondition(some(has_loops))
    @rule(data=st.data())
    @timed
    def leave_loop(self, data):
        m = self.pick(data, "dataset", has_loops)
        loop = data.draw(st.sampled_from(m.loops), label="loop")
        self.end(m, loop, data.draw(st.sampled_from(["drop", "close"]), label="how"))

    @precondition(some(lambda m: m.num_workers))
    @rule(data=st.data())
    @timed
    def close_and_go_on(self, data):
        """``close()`` stops the workers (of every dataset sharing them); open loops go on, the next loop starts new ones."""
        m = self.pick(data, "dataset", lambda m: m.num_workers)
        m.ds.close()

    @rule(data=st.data())
    @timed
    def set_epoch(self, data):
        m = self.pick(data, "dataset")
        e = data.draw(st.integers(0, 4), label="epoch")
        m.ds.set_epoch(e)
        m.epoch, m.start, m.pinned = e, 0, None

    @precondition(some(resizable))
    @rule(data=st.data())
    @timed
    def change_sizes(self, data):
        """New sizes (``batch_size``, maybe ``chunk_size``, ``preload_nchunks``, ``drop_last``, ``shuffle``, ``equalize``,
        ``window``): the next epoch's loops use them; a loop running keeps its own (rule 3)."""
        self.change_shape(self.pick(data, "dataset", resizable), data)

    def change_shape(self, m: Model, data) -> None:
        new = draw_shape(data, m.settings, m.window)
        m.ds.batch_size, m.ds.chunk_size, m.ds.preload_nchunks = new["batch_size"], new["chunk_size"], new["preload_nchunks"]
        m.ds.drop_last, m.ds.shuffle, m.ds.equalize, m.ds.window = new["drop_last"], new["shuffle"], new["equalize"], new["window"]
        m.window = new.pop("window")
        m.settings = effective(replace(m.settings, **new), m.window, m.sampler, m.stores)

    # ------------------------------------------------------------------ resume

    @precondition(some(resumable))
    @precondition(within_budget("resume"))
    @rule(data=st.data())
    @timed
    def resume(self, data):
        """``state_dict()`` into a fresh dataset (the other num_workers): its next loop yields what ``ds``'s would."""
        self.spend("resume")
        m = self.pick(data, "dataset", resumable)
        if not m.running() and data.draw(st.booleans(), label="a loop runs"):  # a state taken mid-epoch
            loop = self.start(m)
            for _ in range(data.draw(st.integers(1, 3), label="batches")):
                if not self.take(m, loop):
                    break
            if loop.done:
                self.end(m, loop, "drop")
        state = m.ds.state_dict()
        epoch, position, saved = m.state(state)
        if "epoch" in state and "batches_yielded" in state:
            assert (state["epoch"], state["batches_yielded"]) == (epoch, position), f"{m.name}: state {state}"
        workers = 0 if m.num_workers else self.workers_for(data, "num_workers")
        v = replace(m.values, return_index=data.draw(st.booleans(), label="return_index"))
        own, window = m.settings, m.window
        if on("rule3") and data.draw(st.booleans(), label="other sizes of its own"):
            shape = draw_shape(data, own, window)
            window = shape.pop("window")
            own = effective(replace(own, **shape), window, m.sampler, m.stores)
        ds = make_dataset(m.stores, v, own, window, m.cells, m.sampler, workers, self.others)
        ds.load_state_dict(state)
        fresh = Model(ds, f"{m.name}-resumed", m.stores, v, own, window, m.cells, m.sampler, workers, self.new_family(workers))
        if position >= oracle.n_batches(m.n_selected, saved):  # an epoch resumed at its end (empty): the next one
            epoch, position, saved = epoch + 1, 0, own
        fresh.epoch, fresh.start = epoch, position
        # The rest of the saved epoch keeps the sizes it was saved with, even if the dataset's own change meanwhile.
        fresh.pinned = saved if position else None
        if on("rule3") and on("rule3-reload") and data.draw(st.booleans(), label="sizes changed after loading"):
            self.change_shape(fresh, data)
        assert len(ds) == oracle.n_batches(fresh.n_selected, fresh.pinned or fresh.settings), f"{fresh.name}: len"
        self.run_loop(fresh, data.draw(st.one_of(st.none(), st.integers(1, 5)), label="batches"))
        if len(self.models) < MAX_DATASETS:
            self.add(fresh)
        else:
            self.close_model(fresh)

    @precondition(within_budget("resume_elsewhere"))
    @rule(data=st.data())
    @timed
    def resume_elsewhere(self, data):
        """A state loaded into a dataset over another selection is refused; as another rank (of another world
        size), it loads, and the loop yields what ``len`` says (what it yields: ``test_elastic.py``)."""
        self.spend("resume_elsewhere")
        m = self.pick(data, "dataset")
        state = m.ds.state_dict()
        cells, sampler, s = m.cells, m.sampler, m.settings
        if data.draw(st.sampled_from(["cells", "rank"]), label="differs in") == "cells":
            n = m.truth.n_obs
            cells = np.arange(0, n, 2) if cells is None or cells.size != (n + 1) // 2 else np.arange(1, n, 2)
            sampler = None
        else:
            s = replace(s, rank=(s.rank + 1) % 2, world_size=2)
        ds = make_dataset(m.stores, m.values, s, m.window, cells, sampler, 0, self.others)
        if s is m.settings:
            with pytest.raises(ValueError):
                ds.load_state_dict(state)
            return
        try:
            ds.load_state_dict(state)
        except ValueError as e:  # the rest of the epoch too small for the ranks: said so
            assert "fewer than the ranks" in str(e)
            return
        n = len(ds)
        assert sum(1 for _ in ds) == n

    @precondition(lambda self: on("rule4"))
    @precondition(within_budget("resume_on_another_store"))
    @rule(data=st.data())
    @timed
    def resume_on_another_store(self, data):
        """rule 4: a state loaded into a dataset over another store (the same inputs converted with another seed) is refused."""
        self.spend("resume_on_another_store")
        m = self.pick(data, "dataset")
        state = m.ds.state_dict()
        stores = tuple(self.stores["B" if p == self.stores["A"] else "A"] for p in m.stores)  # U -> A: same sizes
        ds = make_dataset(stores, m.values, m.settings, m.window, m.cells, m.sampler, 0, self.others)
        with pytest.raises(ValueError):
            ds.load_state_dict(state)

    # ------------------------------------------------------------------ selections

    def derived(self, m: Model, ds, name: str, cells, sampler=None) -> Model:
        model = Model(ds, name, m.stores, m.values, effective(m.settings, m.window, sampler, m.stores), m.window, cells, sampler, m.num_workers, m.family)
        model.within = m.cells if sampler is not None else None
        return model

    def keep_or_close(self, model: Model) -> None:
        """Keep a new dataset for later steps while there is room; one with fewer cells than ranks refuses to loop."""
        s = model.settings
        if s.world_size > 1 and model.n_selected < s.world_size:
            with pytest.raises(ValueError, match="fewer than world_size"):
                next(iter(model.ds))
            self.others.append(model.ds)
        elif len(self.models) < MAX_DATASETS:
            self.add(model)
        else:
            self.others.append(model.ds)

    @precondition(some(no_sampler))
    @rule(data=st.data())
    @timed
    def subset_within(self, data):
        """``subset(cells=...)`` inside the parent's selection: chunked access over those cells."""
        m = self.pick(data, "dataset", no_sampler)
        pool = np.arange(m.truth.n_obs) if m.cells is None else m.cells
        cells = draw_cells(data, pool, "cells")
        sub = m.ds.subset(cells=cells)
        model = self.derived(m, sub, f"{m.name}.subset", cells)
        if cells.size < m.settings.world_size:
            self.others.append(sub)
            return
        self.run_loop(model, data.draw(st.one_of(st.none(), st.integers(1, 4)), label="batches"))
        self.keep_or_close(model)

    @precondition(lambda self: on("rule1"))
    @rule(data=st.data())
    @timed
    def subset_narrows(self, data):
        """rule 1: cells outside the parent's selection are refused; ``subset()`` keeps it; a sampler dataset has no subsets."""
        m = self.pick(data, "dataset")
        what = data.draw(st.sampled_from(["outside", "keep", "sampler-inside", "sampler-outside"]), label="what")
        if m.sampler is not None:
            with pytest.raises(ValueError):
                m.ds.subset() if what == "keep" else m.ds.subset(cells=np.arange(3))
            with pytest.raises(ValueError):
                m.ds.split(0.5)
            return
        n = m.truth.n_obs
        if what == "keep":
            sub = m.ds.subset()
            model = self.derived(m, sub, f"{m.name}.subset()", m.cells)
            if m.cells is not None:
                np.testing.assert_array_equal(sub.cells, m.cells)
            else:
                assert sub.cells is None or np.array_equal(sub.cells, np.arange(n))
            self.run_loop(model, data.draw(st.one_of(st.none(), st.integers(1, 4)), label="batches"))
            self.keep_or_close(model)
            return
        if m.cells is None or m.cells.size == n:
            return  # every cell is inside
        outside = np.setdiff1d(np.arange(n), m.cells)
        if what == "outside":
            cells = np.union1d(m.cells[:2], outside[:1])
            with pytest.raises(ValueError):
                m.ds.subset(cells=cells)
            return
        if what == "sampler-outside":
            s = m.settings
            sampler = [int(outside[0])] * ((s.batch_size + 1) * s.world_size)  # in every rank's share, a whole batch
            sub = m.ds.subset(sampler=sampler)
            self.others.append(sub)
            with pytest.raises((ValueError, IndexError)):
                next(iter(sub))
            return
        sampler = draw_sampler(data, m.cells, "sampler")
        sub = m.ds.subset(sampler=sampler)
        model = self.derived(m, sub, f"{m.name}.subset(sampler)", None, sampler)
        if len(sampler) < m.settings.world_size:
            self.others.append(sub)
            return
        self.run_loop(model, data.draw(st.one_of(st.none(), st.integers(1, 4)), label="batches"))
        self.keep_or_close(model)

    @precondition(some(no_sampler))
    @rule(data=st.data())
    @timed
    def split(self, data):
        """``split(fraction)`` (and, rule 2, ``split([fractions])``): disjoint parts of the selection, sized as documented."""
        m = self.pick(data, "dataset", no_sampler)
        pool = np.arange(m.truth.n_obs) if m.cells is None else m.cells
        if pool.size < 2:
            return
        seed = data.draw(st.integers(0, 3), label="seed")
        if on("rule2") and data.draw(st.booleans(), label="a list"):
            weights = data.draw(st.lists(st.integers(1, 10), min_size=2, max_size=4), label="weights")
            fractions = [w / sum(weights) for w in weights]
        else:
            fractions = data.draw(st.floats(0.05, 0.95), label="fraction")
        sizes = oracle.split_sizes(pool.size, fractions)
        if min(sizes) == 0:
            return
        parts = m.ds.split(fractions, seed=seed)
        again = m.ds.split(fractions, seed=seed)
        assert len(parts) == len(sizes)
        got = [p.cells for p in parts]
        assert [c.size for c in got] == sizes, f"split {fractions} of {pool.size} cells: {[c.size for c in got]}, expected {sizes}"
        everything = np.concatenate(got)
        assert np.unique(everything).size == everything.size, "split parts overlap"
        np.testing.assert_array_equal(np.sort(everything), pool)
        for a, b in zip(got, (p.cells for p in again)):
            np.testing.assert_array_equal(a, b)
        self.others.extend(again)
        for i, (part, cells) in enumerate(zip(parts, got)):
            model = self.derived(m, part, f"{m.name}.split{i}", cells)
            if cells.size >= m.settings.world_size and data.draw(st.booleans(), label=f"iterate part {i}"):
                self.run_loop(model, data.draw(st.one_of(st.none(), st.integers(1, 3)), label="batches"))
            if i == 0:
                self.keep_or_close(model)
            else:
                self.others.append(part)

    @precondition(within_budget("all_ranks"))
    @rule(data=st.data())
    @timed
    def all_ranks(self, data):
        """Every rank of one epoch (num_workers=0): the oracle's batches, and what holds whatever the order."""
        self.spend("all_ranks")
        m = self.pick(data, "dataset")
        world = data.draw(st.integers(1, 3), label="world_size")
        n = m.n_selected
        if n < world:
            return
        epoch = data.draw(st.integers(0, 3), label="epoch")
        s0 = replace(m.settings, rank=0, world_size=world)
        v = replace(m.values, return_index=True)  # the rows as the loader says, not only the oracle's
        per_rank = []
        for r in range(world):
            s = replace(s0, rank=r)
            ds = make_dataset(m.stores, v, s, m.window, m.cells, m.sampler, 0, self.others)
            ds.set_epoch(epoch)
            model = Model(ds, f"{m.name}-rank{r}of{world}", m.stores, v, s, m.window, m.cells, m.sampler, 0, 0, epoch=epoch)
            per_rank.append(self.whole_epoch(model))
            assert model.epoch == epoch + 1
            if r == 0 and world == 1 and s.shuffle and m.sampler is None and n >= 8:
                # set_epoch changes the order (8 rows or more: the same order by chance is below 1/8!)
                ds.set_epoch(epoch + 1)
                model.epoch = epoch + 1
                later = self.whole_epoch(model)
                assert not np.array_equal(np.concatenate(per_rank[0] or [[]]), np.concatenate(later or [[]])), (
                    f"{model.name}: epochs {epoch} and {epoch + 1} in the same order"
                )
            ds.close()
        oracle.check_epoch(per_rank, n, s0, m.cells, m.sequence(epoch))

    def whole_epoch(self, model: Model) -> list[np.ndarray]:
        """One loop to the end; the rows of each batch (checked against the index the loader yielded)."""
        batches = []
        loop = self.start(model)
        while self.take(model, loop):
            batches.append(loop.batches[loop.position - 1])
        self.end(model, loop, "drop")
        return batches

    # ------------------------------------------------------------------ class balance

    @precondition(some(has_obs))
    @rule(data=st.data())
    @timed
    def class_weights(self, data):
        """``class_weights(key)``: 1 / (cells of its class) inside the selection, 0 outside and for missing labels."""
        m = self.pick(data, "dataset", has_obs)
        key = data.draw(st.sampled_from(m.values.obs_key_list()), label="key")
        column = m.truth.obs[key]
        if not on("rule6") and key != "cell_type" and column.isna().any():
            return
        weights = m.ds.class_weights(key)
        cells = m.cells if m.sampler is None else m.within  # a sampler subset weighs its parent's cells
        want = oracle.class_weights(column, cells)
        assert weights.dtype == torch.float64
        np.testing.assert_allclose(weights.numpy(), want, rtol=1e-12, err_msg=f"class_weights({key!r})")
        if want.sum() == 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the store is not grouped by class: runs are single cells
            sampler = m.ds.class_run_sampler(key)
        drawn = oracle.sampled_sequence(sampler, 0, data.draw(st.integers(0, 3), label="epoch"))
        allowed = want > 0
        assert allowed[drawn].all(), f"class_run_sampler({key!r}) drew cells {drawn[~allowed[drawn]]} without a label or outside"
        if m.sampler is None and len(sampler) >= m.settings.world_size and data.draw(st.booleans(), label="iterate it"):
            sub = m.ds.subset(sampler=sampler)
            self.others.append(sub)
            self.run_loop(self.derived(m, sub, f"{m.name}.subset(class_run_sampler)", None, sampler), data.draw(st.integers(1, 3)))

    # ------------------------------------------------------------------ Lightning

    @precondition(within_budget("datamodule"))
    @rule(data=st.data())
    @timed
    def datamodule(self, data):
        """``StoreDataModule``: train/val within the selection, their batches, and inference over every cell in store order."""
        self.spend("datamodule")
        from arrayloaders.lightning import StoreDataModule

        store = self.stores["A"]
        truth = truth_of((store,))
        n = truth.n_obs
        extra = data.draw(st.sampled_from(["none", "cells", "sampler", "drop_last"]) if on("rule5") else st.just("none"), label="extra")
        train_size = data.draw(st.sampled_from([1.0, 0.9, 0.7]), label="train_size")
        validation_size = data.draw(st.sampled_from([None, 0.1, 0.2]), label="validation_size")
        if validation_size is not None and train_size + validation_size > 1:
            validation_size = None
        kwargs = {
            "batch_size": data.draw(st.integers(1, 20), label="batch_size"), "chunk_size": data.draw(st.integers(1, 8), label="chunk"),
            "preload_nchunks": data.draw(st.integers(1, 4), label="preload"), "seed": data.draw(st.integers(0, 3), label="seed"),
            "num_workers": 0,
        }  # fmt: skip
        pool = np.arange(n)
        if extra == "cells":
            kwargs["cells"] = pool = draw_cells(data, np.arange(n), "cells")
        elif extra == "drop_last":
            kwargs["drop_last"] = True
        elif extra == "sampler":
            kwargs["sampler"] = draw_sampler(data, np.arange(n), "sampler")
            if train_size < 1:
                with pytest.raises(ValueError):
                    StoreDataModule(store, batch_key="batch", labels_key="cell_type", train_size=train_size, **kwargs)
                return
            validation_size = None
        dm = StoreDataModule(store, batch_key="batch", labels_key="cell_type", train_size=train_size,
                             validation_size=validation_size, **kwargs)  # fmt: skip
        self.others.append(dm)
        m_sel = pool.size
        train, val = dm.train_idx, dm.val_idx
        assert np.isin(train, pool).all() and np.isin(val, pool).all(), "train/val cells outside the selection"
        assert np.intersect1d(train, val).size == 0
        if extra != "sampler":
            assert train.size == int(np.ceil(train_size * m_sel)), (train.size, train_size, m_sel)
            want_val = m_sel - train.size if validation_size is None else int(np.floor(validation_size * m_sel))
            assert val.size == want_val
        v = oracle.Values(obs_keys=("batch", "cell_type"), obs_codes=("batch",))
        s = oracle.Settings(kwargs["batch_size"], kwargs["chunk_size"], kwargs["preload_nchunks"], True, kwargs["seed"], kwargs.get("drop_last", False))
        # the training dataset's first epoch
        sampler = kwargs.get("sampler")
        train_cells = None if train.size == n and extra != "cells" else train
        if sampler is not None:
            train_cells = None
        train_model = Model(dm.train_dataloader(), "dm.train", (store,), v, s, None, train_cells, sampler, 0, 0)
        loop = self.start(train_model)
        for _ in range(data.draw(st.integers(1, 4), label="train batches")):
            if not self.take(train_model, loop):
                break
        if data.draw(st.booleans(), label="resume the module"):
            # dm.state_dict() (what Lightning checkpoints) into a new module: the rest of the epoch, exactly
            state = dm.state_dict()
            epoch, position, _ = train_model.state(state["train"])
            again = StoreDataModule(store, batch_key="batch", labels_key="cell_type", train_size=train_size,
                                    validation_size=validation_size, **kwargs)  # fmt: skip
            self.others.append(again)
            again.load_state_dict(state)
            resumed = Model(again.train_dataloader(), "dm.train-resumed", (store,), v, s, None, train_cells, sampler, 0, 0,
                            epoch=epoch, start=position)  # fmt: skip
            self.run_loop(resumed, None)
        self.end(train_model, loop, "close")
        if dm.val_dataset is not None:
            model = Model(dm.val_dataloader(), "dm.val", (store,), v, replace(s, shuffle=False), None, val, None, 0, 0)
            self.run_loop(model, None)
        # inference: every cell of the store once (or those asked for), in store order, whatever the training settings
        asked = None
        if data.draw(st.booleans(), label="inference of some cells"):
            asked = np.random.default_rng(n).permutation(draw_cells(data, np.arange(n), "inference cells"))
        loader = dm.inference_dataloader(cells=asked, batch_size=data.draw(st.integers(1, 50), label="inference batch"))
        want_rows = np.arange(n) if asked is None else np.sort(asked)
        rows, xs = [], []
        for batch in loader:
            assert batch["X"].layout == torch.strided and batch["X"].dtype == torch.float32
            index = batch["ind_x"].numpy().ravel()
            rows.append(index)
            xs.append(batch["X"].numpy())
            labels = dm.labels_mapping[batch["labels"].numpy().ravel()]
            want = truth.obs["cell_type"].iloc[index].astype(object).fillna(dm.unlabeled_category).to_numpy()
            assert (labels == want).all()
            assert (dm.batch_labels[batch["batch"].numpy().ravel()] == truth.obs["batch"].iloc[index].to_numpy()).all()
        rows = np.concatenate(rows)
        np.testing.assert_array_equal(rows, want_rows, err_msg=f"inference_dataloader ({extra}) is not every cell asked for, in store order")
        assert_same_array(np.concatenate(xs), truth.X[want_rows].toarray(), "inference X")
        assert list(loader.obs_names) == list(truth.obs_names[want_rows])
        assert len(loader) == -(-want_rows.size // loader.dataset.batch_size)

    # ------------------------------------------------------------------ invariants and the end

    @invariant()
    def held_batches_never_change(self):
        for batch, saved in self.held:
            assert batch_bytes(batch) == saved, "a batch held by the user changed"

    @invariant()
    def lengths(self):
        """``len(ds)``: the batches of the current epoch (with the sizes it runs with)."""
        for m in self.models:
            running = m.running()
            resized = any(lp.settings != m.settings for lp in running)
            if (not on("rule3") and (m.pinned or resized)) or (resized and not on("rule3-len")):
                continue
            counts = {oracle.n_batches(m.n_selected, s) for _, _, s in m.states()}
            assert len(m.ds) in counts, f"{m.name}: len(ds) {len(m.ds)}, expected {counts}, epoch {m.epoch}"

    def close_model(self, m: Model) -> None:
        for loop in list(m.loops):
            self.end(m, loop, "close")
        m.ds.close()

    @timed
    def teardown(self):
        for m in self.models:
            for loop in list(m.loops):
                self.end(m, loop, "close")
        for m in self.models:
            m.ds.close()
        for thing in self.others:
            thing.close()
        self.held_batches_never_change()  # after close too
        self.models, self.others, self.held = [], [], []
        deadline = time.monotonic() + 10
        while (worker_pids() or segment_names(os.getpid())) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not worker_pids(), "worker processes outlive their datasets"
        assert not segment_names(os.getpid()), f"shared memory left: {segment_names(os.getpid())}"


def test_model_based(stores):
    """Random call sequences on real datasets against the oracle (ARRAYLOADERS_MODEL_EXAMPLES for a long run)."""
    LoaderMachine.stores = stores
    run_state_machine_as_test(
        LoaderMachine,
        settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            phases=[p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        ),
    )  # fmt: skip
    for name, t in sorted(TIMES.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:22s} {len(t):5d} calls {sum(t):7.1f} s {1000 * sum(t) / len(t):8.1f} ms each")
