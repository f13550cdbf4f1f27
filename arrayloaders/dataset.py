"""``ZarrSparseDataset`` / ``ZarrDenseDataset``: shuffled minibatches as torch tensors.

The iterator walks the epoch plan: it obtains each load's permuted rows
(from the worker engine, ``engine.py``, or read in-process for
``num_workers=0``), cuts batches as contiguous slices of them, and turns
the slices into tensors without copying X. obs columns are held in memory
(a few bytes per cell) and gathered by global row index.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
import torch
import zarr

from .engine import Engine
from .errors import StoreError
from .load import LoadedRows, read_load
from .plan import PlanConfig, plan_epoch
from .rows import CsrRows, DenseRows, open_rows
from .convert import parse_bytes
from .distributed import check_same_on_every_rank, rank_and_world_size
from .store import XSource, read_manifest, use_zarrs

__all__ = ["ZarrDenseDataset", "ZarrSparseDataset"]


Batch = tuple[torch.Tensor, Any] | tuple[torch.Tensor, Any, torch.Tensor]


def _x_source(adata: ad.AnnData, i: int) -> XSource:
    """Describe an AnnData's zarr-backed X, or explain why the loader cannot serve it."""
    X = adata.X
    where = f"AnnData #{i}"
    if X is None:
        raise ValueError(f"{where} has no X")
    if isinstance(X, ad.abc.CSRDataset | ad.abc.CSCDataset):
        group = X.group
        if not isinstance(group, zarr.Group):
            raise ValueError(
                f"{where}: X is backed by an .h5ad (HDF5) file ({getattr(group, 'file', group)}); the loader "
                "reads zarr stores only. Convert with arrayloaders.create_store_from_h5ads"
            )
        if X.format != "csr":
            raise ValueError(f"{where}: X is stored as CSC at {group.store}/{group.path}; the loader needs CSR rows")
        return XSource(group.store, group.path, "csr", X.shape[0], X.shape[1], str(X.dtype))
    if isinstance(X, zarr.Array):
        if X.ndim != 2:
            raise ValueError(f"{where}: X is a {X.ndim}-d zarr array; expected 2-d")
        return XSource(X.store, X.path, "dense", X.shape[0], X.shape[1], str(X.dtype))
    raise ValueError(
        f"{where}: X is {type(X).__name__}, not a zarr-backed array. Pass "
        "X=ad.io.sparse_dataset(zarr.open(path)['X']) (CSR) or X=zarr.open(path)['X'] (dense), "
        "or use add_store(path)"
    )


class _ObsColumns:
    """The requested obs columns of all added AnnData objects, concatenated.

    Categoricals become int64 codes over the union of categories (first-seen
    order), so the same label has one code across files.
    """

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.categories: dict[str, list] = {}
        self._parts: dict[str, list[pd.Series]] = {k: [] for k in keys}
        self.values: dict[str, np.ndarray] = {}

    def check(self, obs: pd.DataFrame, where: str) -> None:
        missing = [k for k in self.keys if k not in obs.columns]
        if missing:
            raise ValueError(f"{where}: obs has no column(s) {missing}; available: {list(obs.columns)}")

    def add(self, frames: list[pd.DataFrame]) -> None:
        for k in self.keys:
            self._parts[k] += [obs[k] for obs in frames]
        self._build()

    def _build(self) -> None:
        for k, parts in self._parts.items():
            if any(isinstance(p.dtype, pd.CategoricalDtype) or p.dtype.kind not in "biuf" for p in parts):
                cats = pd.Index(pd.unique(np.concatenate([_categories(p) for p in parts])))
                self.categories[k] = list(cats)
                self.values[k] = np.concatenate([cats.get_indexer(p.astype(object)) for p in parts]).astype(np.int64)
            else:
                self.values[k] = np.concatenate([p.to_numpy() for p in parts])

    def gather(self, rows: np.ndarray, single: bool):
        out = {k: torch.from_numpy(self.values[k][rows]) for k in self.keys}
        return out[self.keys[0]] if single else out


def _categories(s: pd.Series) -> np.ndarray:
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.categories.to_numpy(dtype=object)
    return pd.unique(s.dropna().astype(object))


class _ZarrDataset(torch.utils.data.IterableDataset):
    _dense_output: bool

    def __init__(
        self,
        batch_size: int = 4096,
        chunk_size: int = 32,
        preload_nchunks: int = 256,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        return_index: bool = False,
        num_workers: int | None = None,
        memory_budget: int | str | None = None,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        equalize: Literal["drop", "pad"] = "drop",
    ):
        # Validate now, not at the first iteration.
        explicit = rank_and_world_size(rank, world_size) if rank is not None or world_size is not None else (0, 1)
        PlanConfig((), batch_size, chunk_size, preload_nchunks, shuffle, seed, drop_last, *explicit, equalize)
        self.rank, self.world_size, self.equalize = rank, world_size, equalize
        self.batch_size, self.chunk_size, self.preload_nchunks = batch_size, chunk_size, preload_nchunks
        self.shuffle, self.seed, self.drop_last, self.return_index = shuffle, seed, drop_last, return_index
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.memory_budget = default_memory_budget() if memory_budget is None else parse_bytes(memory_budget)
        self.pin_memory = pin_memory
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available: batches are not pinned", stacklevel=2)
            self.pin_memory = False
        self._sources: list[XSource] = []
        self._readers: list[CsrRows] | list[DenseRows] = []
        self._engine: Engine | None = None
        self._var_names: pd.Index | None = None
        self._obs: _ObsColumns | None = None
        self._single_key = True
        self._epoch = 0
        self._epoch_pinned = True  # the first iteration runs epoch 0
        self._yielded = 0  # batches of the current epoch handed out (for state_dict)
        self._resume_at = 0  # batches of the next epoch to skip (set by load_state_dict)
        use_zarrs()

    # ------------------------------------------------------------------ filling

    def add_anndatas(self, adatas: Sequence[ad.AnnData], obs_keys: str | Sequence[str] | None = None):
        """Add AnnData objects whose X is zarr-backed; returns the dataset.

        Parameters
        ----------
        adatas
            AnnData objects with ``X=ad.io.sparse_dataset(group)`` (CSR) or
            a 2-d ``zarr.Array`` (dense). Rows are indexed in the order added.
        obs_keys
            obs column(s) yielded with each batch: one name gives a tensor,
            a list gives a dict of tensors, ``None`` gives ``None``.
            Categoricals are yielded as int64 codes into :attr:`categories`.
        """
        adatas = list(adatas)
        if not adatas:
            raise ValueError("add_anndatas needs at least one AnnData")
        self._obs_keys(obs_keys)  # validates and fixes the keys on first use
        sources = [_x_source(a, len(self._sources) + i) for i, a in enumerate(adatas)]
        kinds = {s.kind for s in self._sources + sources}
        if len(kinds) > 1:
            raise ValueError("the AnnData objects mix sparse (CSR) and dense X; add one kind per dataset")
        if kinds == {"dense"} and not self._dense_output:
            raise ValueError("X is dense; use ZarrDenseDataset for dense stores")
        var = self._var_names
        for i, a in enumerate(adatas):
            if var is None:
                var = a.var_names
            elif not a.var_names.equals(var):
                raise ValueError(
                    f"AnnData #{len(self._sources) + i} has different var ({a.n_vars} genes) from the first "
                    f"({len(var)} genes); every AnnData of a dataset must share var_names"
                )
        for i, a in enumerate(adatas):
            self._obs.check(a.obs, f"AnnData #{len(self._sources) + i}")
        self._obs.add([a.obs for a in adatas])
        self._var_names = var
        self._sources += sources
        return self

    def add_store(self, path: str | os.PathLike, obs_keys: str | Sequence[str] | None = None):
        """Add every file of a store made by ``create_store_from_h5ads``, in file order.

        The store is checked against its manifest; a directory without one
        (not a store, or an unfinished conversion) is refused.
        """
        manifest = read_manifest(path)
        adatas = []
        for f in manifest.files:
            group = zarr.open_group(os.path.join(path, f["name"]), mode="r")
            X = ad.io.sparse_dataset(group["X"]) if manifest.x_format == "csr" else group["X"]
            obs = ad.io.read_elem(group["obs"])
            if X.shape[0] != f["n_obs"] or X.shape[1] != manifest.n_vars or len(obs) != f["n_obs"]:
                raise StoreError(
                    f"{path}/{f['name']}: shape {X.shape} does not match the manifest "
                    f"({f['n_obs']} x {manifest.n_vars})"
                )
            adatas.append(ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=manifest.var_names)))
        return self.add_anndatas(adatas, obs_keys)

    def _obs_keys(self, obs_keys) -> list[str]:
        keys = [] if obs_keys is None else [obs_keys] if isinstance(obs_keys, str) else list(obs_keys)
        if self._obs is None:
            self._obs = _ObsColumns(keys)
            self._single_key = isinstance(obs_keys, str)
        elif keys != self._obs.keys:
            raise ValueError(f"obs_keys {keys} differ from those given before ({self._obs.keys})")
        return keys

    # ------------------------------------------------------------------ epochs

    @property
    def categories(self) -> dict[str, list]:
        """Categories behind the int64 codes of categorical obs keys."""
        return dict(self._obs.categories) if self._obs else {}

    @property
    def n_obs(self) -> int:
        """Cells in all added AnnData objects (before rank sharding)."""
        return sum(s.n_obs for s in self._sources)

    @property
    def n_vars(self) -> int:
        """Genes: the width of every X batch (0 while the dataset is empty)."""
        return self._sources[0].n_vars if self._sources else 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order for the next iteration (later loops continue from it).

        Under DDP call it with the same epoch on every rank, as with
        ``torch.utils.data.DistributedSampler``.
        """
        self._epoch, self._epoch_pinned, self._resume_at, self._yielded = int(epoch), True, 0, 0

    def _plan_config(self) -> PlanConfig:
        if not self._sources:
            raise ValueError("the dataset is empty: call add_anndatas(...) or add_store(...) first")
        rank, world_size = rank_and_world_size(self.rank, self.world_size)
        return PlanConfig(
            tuple(s.n_obs for s in self._sources), self.batch_size, self.chunk_size, self.preload_nchunks,
            self.shuffle, self.seed, self.drop_last, rank, world_size, self.equalize,
        )  # fmt: skip

    # ------------------------------------------------------------------ resuming

    def state_dict(self) -> dict:
        """Where the iteration stands: restore it with :meth:`load_state_dict` to yield exactly the rest.

        Holds the seed, the epoch and the batches of it already yielded (plus
        the settings the batch sequence depends on, to refuse a mismatch).
        Take it on every rank; under DDP each rank restores its own.
        """
        config = self._plan_config()
        return {
            "epoch": self._epoch,
            "batches_yielded": self._yielded,
            "seed": self.seed,
            "rank": config.rank,
            "world_size": config.world_size,
            "settings": self._settings(config),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next loop yields the batches its epoch had left.

        Raises ``ValueError`` if the dataset differs in anything the batch
        sequence depends on (cells, sizes, shuffle, world size, rank).
        """
        config = self._plan_config()
        mine = {**self._settings(config), "rank": config.rank, "world_size": config.world_size}
        theirs = {**state["settings"], "rank": state["rank"], "world_size": state["world_size"]}
        differing = sorted(k for k in mine if k != "seed" and mine[k] != theirs.get(k))
        if differing:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r}, now {mine[k]!r}" for k in differing)
            raise ValueError(f"cannot resume: the state was saved with other settings ({detail})")
        self.seed = state["seed"]
        n_batches = plan_epoch(self._plan_config(), state["epoch"]).n_batches
        if state["batches_yielded"] >= n_batches:  # saved after a complete epoch: go on with the next
            self.set_epoch(state["epoch"] + 1)
        else:
            self.set_epoch(state["epoch"])
            self._resume_at = self._yielded = state["batches_yielded"]

    def _settings(self, config: PlanConfig) -> dict:
        return {
            "seed": config.seed, "n_obs": config.n_obs, "file_n_obs": list(config.file_n_obs),
            "batch_size": config.batch_size, "chunk_size": config.chunk_size,
            "preload_nchunks": config.preload_nchunks, "shuffle": config.shuffle, "drop_last": config.drop_last,
            "equalize": config.equalize,
        }  # fmt: skip

    def __len__(self) -> int:
        return plan_epoch(self._plan_config(), self._epoch).n_batches

    def _next_epoch(self) -> int:
        if not self._epoch_pinned:
            self._epoch += 1
        self._epoch_pinned = False
        return self._epoch

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        config = self._plan_config()
        resume_at, self._resume_at = self._resume_at, 0
        plan = plan_epoch(config, self._next_epoch())
        if self.rank is None and config.world_size > 1:  # rank and world size from torch.distributed
            check_same_on_every_rank({**self._settings(config), "epoch": plan.epoch, "resume_at": resume_at})
        info = torch.utils.data.get_worker_info()
        batches = range(resume_at, plan.n_batches)
        if info is not None:  # inside a torch DataLoader worker: take every n-th batch
            batches = range(info.id, plan.n_batches, info.num_workers)
        self._yielded = resume_at
        per_load = plan.config.load_rows // plan.config.batch_size
        wanted = sorted({b // per_load for b in batches})
        readers = self._open_readers()
        if self.num_workers > 0 and info is None:
            loads = self._start_engine().loads(plan, readers, wanted)
        else:
            loads = ((read_load(readers, plan, plan.loads[i]), _own) for i in wanted)
        take = set(batches) if info is not None else None
        for loaded, lend in loads:
            loaded.rows = plan.rows_of_load(loaded.load)
            first = loaded.load.index * per_load
            for b in range(first, min(first + per_load, plan.n_batches)):
                if b >= resume_at and (take is None or b in take):
                    lo = (b - first) * self.batch_size
                    batch = self._make_batch(loaded, lo, min(lo + self.batch_size, loaded.load.n_rows), lend)
                    self._yielded = b + 1
                    yield batch

    # ------------------------------------------------------------------ engine

    def _open_readers(self) -> list[CsrRows] | list[DenseRows]:
        if len(self._readers) != len(self._sources):
            self._readers += [open_rows(s) for s in self._sources[len(self._readers) :]]
        return self._readers

    def _start_engine(self) -> Engine:
        sources, config = tuple(self._sources), self._plan_config()
        engine = self._engine
        if engine is None or engine.closed or engine.sources != sources or engine.plan_config != config:
            if engine is not None:
                engine.close()
            self._engine = engine = Engine(sources, config, self.num_workers, self.memory_budget)
        return engine

    def close(self) -> None:
        """Stop the worker processes and free the shared memory (idempotent).

        Iterating again starts new workers. Batches already yielded stay valid.
        """
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        for reader in self._readers:
            reader.close()
        self._readers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Pickled into torch DataLoader workers: open files and our own workers stay behind.
        state = dict(self.__dict__)
        state["_readers"], state["_engine"] = [], None
        return state

    # ------------------------------------------------------------------ batches

    def _make_batch(self, loaded: LoadedRows, lo: int, hi: int, lend: Callable[[np.ndarray], np.ndarray]) -> Batch:
        X = self._x_tensor(loaded, lo, hi, lend)
        rows = loaded.rows[lo:hi]
        obs = self._obs.gather(rows, self._single_key) if self._obs and self._obs.keys else None
        batch = (X, obs, torch.from_numpy(rows.copy())) if self.return_index else (X, obs)
        return _pinned(batch) if self.pin_memory else batch

    def _x_tensor(self, loaded: LoadedRows, lo: int, hi: int, lend) -> torch.Tensor:
        n_vars = self._sources[0].n_vars
        if loaded.dense is not None:
            return torch.from_numpy(lend(loaded.dense[lo:hi]))
        a, b = int(loaded.indptr[lo]), int(loaded.indptr[hi])
        if self._dense_output:
            # scipy's C loop densifies ~10x faster than torch's CSR to_dense (59 vs 570 ms for 4096 x 33,538).
            rows = sp.csr_matrix(
                (loaded.data[a:b], loaded.indices[a:b], loaded.indptr[lo : hi + 1] - a), shape=(hi - lo, n_vars)
            )
            return torch.from_numpy(rows.toarray())
        index_dtype = np.int32 if b - a < 2**31 else np.int64
        crow = torch.from_numpy((loaded.indptr[lo : hi + 1] - a).astype(index_dtype))
        cols = torch.from_numpy(lend(loaded.indices[a:b]))
        if index_dtype is np.int64:
            cols = cols.long()
        values = torch.from_numpy(lend(loaded.data[a:b]))
        with warnings.catch_warnings():
            # torch warns that sparse CSR support is "beta" the first time one is built.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return torch.sparse_csr_tensor(crow, cols, values, size=(hi - lo, n_vars), check_invariants=False)


def _pinned(value):
    """Every tensor of a batch (X, obs tensors or dicts of them, index) in page-locked memory, as torch's DataLoader pins."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_pinned(v) for v in value)
    return value


def _own(view: np.ndarray) -> np.ndarray:
    """Lending of views into arrays the batch owns outright (the in-process path): nothing to count."""
    return view


def default_num_workers() -> int:
    """One worker per core this process may run on (the main process mostly waits)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    # 16: measured to scale up to there (a 16-core machine: 8 workers 205k, 16 workers 451k cells/s).
    return max(1, min(cores, 16)) if os.path.isdir("/dev/shm") else 0


def default_memory_budget() -> int:
    """Ring memory: a quarter of the available RAM.

    The ring takes only what its ``2 * num_workers + 2`` slots need; a fixed
    cap (1 GiB, five loads of 8,192 typical cells) starved workers beyond
    four of free slots.
    """
    return int(psutil.virtual_memory().available // 4)


class ZarrSparseDataset(_ZarrDataset):
    """Shuffled minibatches of a CSR AnnData zarr store as ``torch.sparse_csr`` tensors.

    Parameters
    ----------
    batch_size
        Cells per batch (the last one may be shorter unless ``drop_last``).
    chunk_size
        Cells per chunk: runs of consecutive cells within one file, the unit
        of random access.
    preload_nchunks
        Chunks read together and shuffled among each other (a *load*: its
        ``preload_nchunks * chunk_size`` cells, rounded up to whole batches,
        so that every batch is a slice of one load).
    shuffle
        Shuffle chunks and the rows of each load; ``False`` yields store order.
    seed
        Seed of the plan: the same seed and epoch give the same batches.
    drop_last
        Drop the final short batch.
    return_index
        Also yield int64 global row indices into the concatenation of the
        added AnnData objects (in the order added).
    num_workers
        Worker processes that decode loads into shared memory (default: one
        per core this process may use, at most 16; ``0`` reads in the main
        process). The batches are the same for every value. Workers start
        at the first iteration, stay up across complete epochs, and stop on
        :meth:`close`, on any early exit from a loop (``break``, an
        exception, Ctrl-C) and when the dataset is garbage collected.
    memory_budget
        Bytes (or a string such as ``"1GiB"``) of shared memory for the ring
        of decoded loads (default: a quarter of the available RAM). It sets
        how many loads are decoded ahead: up to ``2 * num_workers + 2``, at
        least 2; the ring takes no more than those slots need.
    pin_memory
        Copy each batch (X, the obs tensors and the index) into page-locked
        memory for faster, asynchronous transfer to a CUDA device
        (``X.to("cuda", non_blocking=True)``); a no-op with a warning where
        CUDA is not available.

    Iterating yields ``(X, obs)`` (``(X, obs, index)`` with ``return_index``);
    each loop starts the next epoch unless :meth:`set_epoch` chose one.

    X is a view of the decoded load, not a copy: it stays valid for as long
    as you hold it (its memory is not reused until it is garbage collected),
    but writing into it in place changes nothing else. Holding many batches
    holds their loads' memory.
    """

    _dense_output = False


class ZarrDenseDataset(_ZarrDataset):
    """Like :class:`ZarrSparseDataset`, yielding dense X tensors.

    Serves dense zarr X, and densifies CSR stores batch by batch.
    """

    _dense_output = True
