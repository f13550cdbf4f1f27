"""``ZarrSparseDataset`` / ``ZarrDenseDataset``: the public classes, and the rules of iterating them.

A dataset holds settings and sources (the added AnnData objects, their obs
columns) and, across loops, the resources loops share: the worker engine
(``engine.py``) and idle readers. Each ``iter(ds)`` is an :class:`EpochIterator`
that owns its epoch, its position and the loads it holds; it takes each load
from the engine, or reads it in its own thread when the engine serves another
loop (or ``num_workers=0``), and cuts batches from it (``batches.py``).

The rules (the README states them for users):

- ``iter(ds)`` takes the dataset's *current epoch* and its start (batch 0,
  or where :meth:`load_state_dict` left it). It does not change them.
- The current epoch advances when a loop hands out that epoch's last batch,
  whether or not the loop is then exhausted; ``set_epoch`` and
  ``load_state_dict`` set it. A ``break``, an exception or a peek
  (``next(iter(ds))``) leaves it, so the next loop yields the same sequence.
- Any number of loops may run at once, in one thread or several: each gets
  every batch of its epoch, exactly once, from slots nobody else writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import torch
import zarr

from .batches import Batch, BatchMaker, MixedWindow, ObsColumns, keep
from .class_runs import ClassRunSampler
from .convert import parse_bytes
from .distributed import check_same_on_every_rank, local_world_size, rank_and_world_size
from .engine import Engine, EpochRun, slot_layout
from .errors import StoreError
from .genes import choose_genes
from .load import LoadedRows, RowFormat, read_load
from .pinned_slots import PinnedSlots
from .plan import EpochPlan, PlanConfig, batch_rows, plan_epoch
from .rows import CsrRows, DenseRows, open_rows, read_indptr
from .store import MANIFEST_NAME, XSource, manifest_stamp, read_manifest, read_obs, use_zarrs

__all__ = ["EpochIterator", "ZarrDenseDataset", "ZarrSparseDataset"]


def _x_source(adata: ad.AnnData, i: int, layer: str | None = None) -> XSource:
    """Describe an AnnData's zarr-backed X (or ``layers[layer]``), or explain why the loader cannot serve it."""
    where = f"AnnData #{i}"
    if layer is None:
        return _element_source(adata.X, where)
    if layer not in adata.layers:
        # anndata 0.13 lists X among the layers, as None
        raise ValueError(f"{where} has no layer {layer!r}; its layers: {[k for k in adata.layers if k is not None]}")
    return _element_source(adata.layers[layer], f"{where} layers[{layer!r}]")


def _store_source(path: str | os.PathLike, file_name: str, layer: str | None) -> XSource:
    """The X (or ``layers[layer]``) of one file of a store, opened without building an AnnData."""
    group = zarr.open_group(os.path.join(path, file_name), mode="r")
    where = os.path.join(path, file_name)
    if layer is None:
        element = group["X"]
    else:
        layers = group.get("layers")
        if layers is None or layer not in layers:
            names = sorted(layers.keys()) if layers is not None else []
            raise ValueError(f"{where}: has no layer {layer!r}; its layers: {names}")
        element, where = layers[layer], f"{where}/layers/{layer}"
    return _element_source(ad.io.sparse_dataset(element) if isinstance(element, zarr.Group) else element, where)


def _key_list(keys: str | Sequence[str] | None) -> list[str]:
    return [] if keys is None else [keys] if isinstance(keys, str) else list(keys)


def _obsm_source(adata: ad.AnnData, i: int, key: str) -> XSource:
    """An AnnData's zarr-backed ``obsm[key]``, or why the loader cannot read it."""
    if key not in adata.obsm:
        raise ValueError(f"AnnData #{i} has no obsm {key!r}; its obsm: {list(adata.obsm)}")
    return _array_source(adata.obsm[key], f"AnnData #{i} obsm[{key!r}]")


def _store_obsm_source(path: str | os.PathLike, file_name: str, key: str) -> XSource:
    group = zarr.open_group(os.path.join(path, file_name), mode="r")
    obsm = group.get("obsm")
    where = os.path.join(path, file_name)
    if obsm is None or key not in obsm:
        names = sorted(obsm.keys()) if obsm is not None else []
        raise ValueError(f"{where}: has no obsm {key!r}; its obsm: {names}")
    return _array_source(obsm[key], f"{where}/obsm/{key}")


def _array_source(array, where: str) -> XSource:
    if not isinstance(array, zarr.Array) or array.ndim != 2:
        raise ValueError(f"{where}: is {type(array).__name__}, not a 2-d zarr array (n_obs x k)")
    if np.dtype(array.dtype).kind not in "biuf":
        raise ValueError(f"{where}: holds {array.dtype}, not numbers")
    return XSource(array.store, array.path, "dense", array.shape[0], array.shape[1], str(array.dtype))


def _element_source(X, where: str) -> XSource:
    """Describe a zarr-backed matrix (X or a layer), or explain why the loader cannot serve it."""
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
            raise ValueError(f"{where}: stored as CSC at {group.store}/{group.path}; the loader needs CSR rows")
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


def _label(source: XSource) -> str:
    """Where the data of ``source`` is, for messages: its store's directory."""
    root = getattr(source.store, "root", None)
    return str(Path(root).parent) if root is not None else "the added AnnData objects"


def _row_format(var: pd.Index, genes_given: np.ndarray | None, dense: bool, where: str) -> RowFormat:
    return RowFormat(None if genes_given is None else choose_genes(var, genes_given, where), dense)


DEFAULT_WINDOW = 8  # loads a batch mixes when the store is not known to be shuffled (see plan.py)


def _shuffled_at_conversion(source: XSource) -> bool:
    """Whether ``source`` is a file of a store that ``create_store_from_h5ads`` shuffled (its manifest says so)."""
    root = getattr(source.store, "root", None)
    if root is None:
        return False
    manifest = Path(root).parent / MANIFEST_NAME
    try:
        return bool(json.loads(manifest.read_text()).get("shuffle", False))
    except (OSError, ValueError, AttributeError):
        return False


def _checked_cells(cells: np.ndarray, n_obs: int) -> np.ndarray:
    """``cells`` (a boolean mask over all cells, or row indices) as sorted distinct int64 rows; or a clear error."""
    if cells.dtype == bool:
        if cells.ndim != 1 or cells.size != n_obs:
            raise ValueError(f"cells is a boolean mask of shape {cells.shape}; the dataset has {n_obs} cells")
        rows = np.flatnonzero(cells).astype(np.int64)
    elif cells.ndim != 1 or (cells.size and not np.issubdtype(cells.dtype, np.integer)):
        raise ValueError(f"cells must be a boolean mask or a 1-d array of row indices, got {cells.dtype} of shape {cells.shape}")
    else:
        rows = np.sort(cells.astype(np.int64))
    if rows.size == 0:
        raise ValueError("cells selects no cells")
    if rows[0] < 0 or rows[-1] >= n_obs:
        bad = rows[0] if rows[0] < 0 else rows[-1]
        raise IndexError(f"cells holds row {bad}, outside the dataset's {n_obs} cells")
    if (np.diff(rows) == 0).any():
        raise ValueError("cells repeats rows; to yield rows more than once per epoch, use sampler=")
    return rows


class _Readers:
    """Idle reader sets (one reader per added X) for loops that read in their own thread.

    A set serves one loop at a time. Loops give sets back when they end, also
    from a finalizer, so giving back is a lock-free ``deque`` append.
    """

    def __init__(self):
        self._idle: deque[_ReaderSet] = deque()
        self._finalizer = weakref.finalize(self, _Readers._close_all, self._idle)

    def take(self, open_set: Callable[[], _ReaderSet]) -> _ReaderSet:
        try:
            return self._idle.pop()
        except IndexError:
            return open_set()

    def give_back(self, readers: _ReaderSet) -> None:
        self._idle.append(readers)

    def close(self) -> None:
        _Readers._close_all(self._idle)

    @staticmethod
    def _close_all(idle: deque) -> None:
        while idle:
            idle.pop().close()


@dataclass
class _ReaderSet:
    """Readers of every added X (``x``), and of every file's array of each obsm key."""

    x: list[CsrRows] | list[DenseRows]
    obsm: dict[str, list[DenseRows]]

    def close(self) -> None:
        for reader in [*self.x, *(r for readers in self.obsm.values() for r in readers)]:
            reader.close()


@dataclass
class _Runtime:
    """What the loops over one dataset share in one process; made anew after a fork or unpickling."""

    owner: int = field(default_factory=os.getpid)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the epoch cursor and the engine slot
    engine: Engine | None = None
    readers: _Readers = field(default_factory=_Readers)
    indptrs: list[np.ndarray | None] | None = None  # each CSR file's row pointer, read once, shared read-only
    loops: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    seq: Iterator[int] = field(default_factory=itertools.count)


@dataclass
class _LoopState:
    """A loop's position and resources, shared with the finalizer that ends an abandoned loop."""

    epoch: int
    position: int  # the next batch
    handed: int = 0  # batches this loop has handed out
    run: EpochRun | None = None
    readers: list | None = None
    pool: _Readers | None = None  # where ``readers`` came from, and go back to
    owner: int = field(default_factory=os.getpid)  # the process the run and readers belong to
    complete: bool = False
    done: bool = False

    def forked(self) -> None:
        """In a child forked mid-loop: the parent's run and readers are the parent's; drop them untouched."""
        if self.owner != os.getpid():
            self.run, self.readers, self.pool, self.owner = None, None, None, os.getpid()


def _end_loop(state: _LoopState) -> None:
    """Give back what a loop holds. Called once, when it ends or is garbage collected: sets flags only."""
    state.done = True
    state.forked()
    if state.run is not None:
        state.run.release()
        state.run = None
    if state.readers is not None:
        state.pool.give_back(state.readers)
        state.readers = None


class EpochIterator(Iterator[Batch]):
    """One loop over a dataset: the batches of one epoch, made by ``iter(dataset)``.

    It starts where the dataset's current epoch stood when it was made
    (batch 0, or the position :meth:`~ZarrSparseDataset.load_state_dict`
    restored) and owns its position and the loads it holds. Handing out the
    epoch's last batch completes the epoch (the dataset moves on to the next
    one), whether or not the loop is then exhausted. :meth:`close` (or
    dropping the iterator) ends the loop early; the workers stay up.
    """

    def __init__(self, dataset: _ZarrDataset, epoch: int, start: int, seq: int):
        self.dataset, self.epoch, self._seq = dataset, epoch, seq
        self._state = _LoopState(epoch, start)
        self._plan: EpochPlan | None = None
        self._make: BatchMaker | None = None
        self._loaded: LoadedRows | None = None
        self._lend: Callable[[np.ndarray], np.ndarray] = keep
        self._mixed: MixedWindow | None = None  # the loads of the current window, when batches mix several
        self._mixed_index = -1
        self._finalizer = weakref.finalize(self, _end_loop, self._state)

    @property
    def position(self) -> int:
        """The index of the next batch in the epoch."""
        return self._state.position

    def __iter__(self) -> EpochIterator:
        return self

    def __len__(self) -> int:
        """Batches this loop has left."""
        return 0 if self._state.done else self.dataset._plan_config().n_batches - self._state.position

    def __next__(self) -> Batch:
        state = self._state
        if state.done:
            raise StopIteration
        try:
            if self._plan is None:
                self._begin()
            plan = self._plan
            if state.position >= plan.n_batches:  # an empty epoch, or resumed at its end
                self._finish(complete=True)
                raise StopIteration
            window, lo, hi = batch_rows(plan, state.position)
            if plan.window == 1:  # the window is one load, already in batch order: slices of it
                if self._loaded is None or self._loaded.load.index != window:
                    self._loaded = None  # drop our view of the previous load first: its slot may be refilled
                    self._loaded, self._lend = self._read(window)
                batch = self._make(self._loaded, lo, hi, self._lend)
            else:
                if self._mixed is None or self._mixed_index != window:
                    self._mixed = None
                    loads = [self._read(i)[0] for i in plan.window_loads(window)]
                    self._mixed, self._mixed_index = MixedWindow(loads, plan.window_order(window)), window
                batch = self._make.mixed(self._mixed, lo, hi)
        except StopIteration:
            raise
        except BaseException:
            self._finish(complete=False, failed=True)
            raise
        state.position += 1
        state.handed += 1
        if state.run is not None:
            state.run.delivered = state.handed
        if state.position == plan.n_batches:
            self._finish(complete=True)
        return batch

    def close(self) -> None:
        """End this loop now (as ``break`` does); the dataset's workers stay up for the next one."""
        if not self._state.done:
            self._finish(complete=False)

    def _begin(self) -> None:
        ds = self.dataset
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                f"{type(ds).__name__} is being iterated inside a torch DataLoader worker process. It decodes in "
                "worker processes of its own: wrap it as DataLoader(ds, batch_size=None) with num_workers=0 (or "
                f"iterate it directly) and set {type(ds).__name__}(num_workers=...) instead"
            )
        config = ds._plan_config()
        cells = ds._cells()
        sequence = ds._sample(self.epoch) if ds.sampler is not None else None
        if ds.rank is None and config.world_size > 1:  # rank and world size from torch.distributed
            settings = {**ds._settings(config), "epoch": self.epoch, "resume_at": self._state.position}
            if sequence is not None:  # a sampler must give every rank the same sequence
                settings["sampled"] = hashlib.sha1(sequence.tobytes()).hexdigest()
            check_same_on_every_rank(settings)
        self._plan = plan_epoch(config, self.epoch, cells=cells, sequence=sequence)
        self._make = ds._batch_maker()

    def _read(self, load: int) -> tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]]:
        """Load ``load`` from the workers if they are (or become) ours, else read it in this thread."""
        state, ds, plan = self._state, self.dataset, self._plan
        state.forked()
        if state.run is not None:
            got = state.run.get(load)
            if got is None:  # a newer loop took the workers, or the dataset was closed
                state.run.release()
                state.run = None
        else:
            got = None
        if got is None and ds.num_workers > 0:
            state.run = ds._start_run(plan, list(range(load, len(plan.loads))), self._seq)
            if state.run is not None:
                state.run.delivered = state.handed
                got = state.run.get(load)
        if got is None:
            if state.readers is None:
                state.pool = ds._rt().readers
                state.readers = state.pool.take(ds._open_readers)
            spec = plan.loads[load]
            readers = state.readers
            got = read_load(readers.x, spec, plan.take(spec), fmt=ds._row_format(), obsm=readers.obsm), keep
        # After the load is read: rows read from a store converted again before this point are never yielded.
        ds._check_stores_unchanged()
        got[0].rows = plan.rows_of_load(plan.loads[load])
        return got

    def _finish(self, complete: bool, failed: bool = False) -> None:
        state = self._state
        self._loaded = self._mixed = None
        state.complete = complete
        if failed and state.readers is not None:  # a read was cut short: do not reuse these readers
            state.readers.close()
            state.readers = None
        self._finalizer()
        if complete:
            self.dataset._epoch_complete(self.epoch)


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
        timeout: float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        equalize: Literal["drop", "pad"] = "drop",
        cells: np.ndarray | Sequence[int] | Sequence[bool] | None = None,
        sampler: Iterable[int] | None = None,
        window: int | None = None,
        var_names: Sequence[str] | np.ndarray | pd.Index | None = None,
        layer: str | None = None,
    ):
        # Validate now, not at the first iteration.
        if cells is not None and sampler is not None:
            raise ValueError("give cells= (chunked access over a subset) or sampler= (your own order), not both")
        if sampler is not None and not hasattr(sampler, "__len__"):
            raise ValueError(f"sampler must have a length (len(sampler) rows per epoch); {type(sampler).__name__} has none")
        if sampler is not None and iter(sampler) is sampler:
            raise ValueError("sampler must be re-iterable (a Sampler, list or array), not an iterator: every epoch iterates it anew")
        explicit = rank_and_world_size(rank, world_size) if rank is not None or world_size is not None else (0, 1)
        PlanConfig((), batch_size, chunk_size, preload_nchunks, shuffle, seed, drop_last, *explicit, equalize)
        self.rank, self.world_size, self.equalize = rank, world_size, equalize
        self.batch_size, self.chunk_size, self.preload_nchunks = batch_size, chunk_size, preload_nchunks
        self.shuffle, self.seed, self.drop_last, self.return_index = shuffle, seed, drop_last, return_index
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.timeout = timeout
        self.memory_budget = default_memory_budget() if memory_budget is None else parse_bytes(memory_budget)
        self.pin_memory = pin_memory
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available: batches are not pinned", stacklevel=2)
            self.pin_memory = False
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive integer or None, got {window!r}")
        self.window = window
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer must be the name of a layer or None (X), got {layer!r}")
        self.layer = layer
        if var_names is not None and isinstance(var_names, str):
            raise ValueError(f"var_names must be a list of gene names or a boolean mask, not the string {var_names!r}")
        self._genes_given = None if var_names is None else np.asarray(var_names)
        self._fmt: RowFormat | None = None  # what workers make of rows, once the genes are known
        self._cells_given = None if cells is None else np.asarray(cells)
        self._cells_checked: np.ndarray | None = None  # sorted distinct rows, once checked against n_obs
        self.sampler = sampler
        self._sources: list[XSource] = []
        self._stores: list[tuple[Path, tuple | None]] = []  # (store, its manifest's stamp) of each add_store
        self._shuffled: list[bool] = []  # per source: known to be shuffled at conversion
        self._var_names: pd.Index | None = None
        self._obs: ObsColumns | None = None
        self._obsm: dict[str, list[XSource]] | None = None  # key -> its array in every added file
        self._single_key = True
        # The current epoch: where the next loop starts (epoch, first batch).
        self._epoch, self._start = 0, 0
        self._runtime = _Runtime()
        use_zarrs()

    # ------------------------------------------------------------------ filling

    def add_anndatas(
        self,
        adatas: Sequence[ad.AnnData],
        obs_keys: str | Sequence[str] | None = None,
        obsm_keys: str | Sequence[str] | None = None,
        obs_codes: str | Sequence[str] | None = None,
    ):
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
        obsm_keys
            obsm array(s) (zarr-backed, n_obs x k) yielded with each batch in
            the obs dict, as (batch, k) tensors (float32 unless stored as a
            float). The workers read their rows along with X, so they need
            not fit in memory. Given any, obs is always a dict.
        obs_codes
            obs column(s), among ``obs_keys``, yielded as int64 codes into
            :attr:`categories` whatever their dtype: a batch or donor id
            stored as an int gets its distinct values, sorted, as
            categories (``-1`` where missing), ready for an embedding or a
            loss. Text columns are codes anyway.
        """
        adatas = list(adatas)
        if not adatas:
            raise ValueError("add_anndatas needs at least one AnnData")
        var = adatas[0].var_names
        for i, a in enumerate(adatas):
            if not a.var_names.equals(var):
                raise ValueError(
                    f"AnnData #{len(self._sources) + i} has different var ({a.n_vars} genes) from the first "
                    f"({len(var)} genes); every AnnData of a dataset must share var_names"
                )
        sources = [_x_source(a, len(self._sources) + i, self.layer) for i, a in enumerate(adatas)]
        obsm = {
            key: [_obsm_source(a, len(self._sources) + i, key) for i, a in enumerate(adatas)]
            for key in _key_list(obsm_keys)
        }
        return self._add(sources, [a.obs for a in adatas], var, obs_keys, obsm, obs_codes)

    def _add(
        self, sources: list[XSource], frames: list[pd.DataFrame], var: pd.Index, obs_keys, obsm: dict[str, list[XSource]],
        obs_codes=None,
    ) -> _ZarrDataset:  # fmt: skip
        """Add matrices with their obs frames and obsm arrays; ``var``: their (shared) var_names."""
        self._obs_keys(obs_keys, obs_codes)  # validates and fixes the keys on first use
        if self._obsm is not None and list(obsm) != list(self._obsm):
            raise ValueError(f"obsm_keys {list(obsm)} differ from those given before ({list(self._obsm)})")
        for key, key_sources in obsm.items():
            known = (self._obsm or {}).get(key, []) + key_sources
            shapes = {(s.n_vars, s.dtype) for s in known}
            if len(shapes) > 1:
                raise ValueError(f"obsm {key!r} has different widths or dtypes across the added data: {sorted(shapes)}")
            for s, x in zip(key_sources, sources):
                if s.n_obs != x.n_obs:
                    raise ValueError(f"{s.label}: obsm {key!r} has {s.n_obs} rows, but X has {x.n_obs}")
        kinds = {s.kind for s in self._sources + sources}
        if len(kinds) > 1:
            raise ValueError("the AnnData objects mix sparse (CSR) and dense X; add one kind per dataset")
        if kinds == {"dense"} and not self._dense_output:
            raise ValueError("X is dense; use ZarrDenseDataset for dense stores")
        if self._var_names is not None and not var.equals(self._var_names):
            raise ValueError(
                f"AnnData #{len(self._sources)} has different var ({len(var)} genes) from the first "
                f"({len(self._var_names)} genes); every AnnData of a dataset must share var_names"
            )
        for i, obs in enumerate(frames):
            self._obs.check(obs, f"AnnData #{len(self._sources) + i}")
        fmt = _row_format(var, self._genes_given, self._dense_output, _label((self._sources + sources)[0]))
        self._obs.add(frames)
        self._var_names, self._fmt = var, fmt
        self._obsm = {key: (self._obsm or {}).get(key, []) + key_sources for key, key_sources in obsm.items()}
        self._sources = self._sources + sources
        self._shuffled = self._shuffled + [_shuffled_at_conversion(s) for s in sources]
        self._cells_checked = None
        # New sources, new workers: loops already running keep the old ones until they end.
        self._runtime = _Runtime()
        if self.num_workers > 0:
            self._engine(self._window()).start_workers()
        return self

    def add_store(
        self,
        path: str | os.PathLike,
        obs_keys: str | Sequence[str] | None = None,
        obsm_keys: str | Sequence[str] | None = None,
        obs_codes: str | Sequence[str] | None = None,
    ):
        """Add every file of a store made by ``create_store_from_h5ads``, in file order.

        The store is checked against its manifest; a directory without one
        (not a store, or an unfinished conversion) is refused. ``obs_keys``,
        ``obsm_keys`` and ``obs_codes`` as for :meth:`add_anndatas`.
        """
        stamp = manifest_stamp(path)  # before reading: a store converted again from now on is noticed
        manifest = read_manifest(path)  # checks the files against it: shapes, dtypes, every chunk there
        keys = _key_list(obs_keys)
        missing = [k for k in keys if k not in manifest.obs_schema]
        if missing:
            raise ValueError(f"{path}: obs has no column(s) {missing}; available: {list(manifest.obs_schema)}")
        sources = [_store_source(path, f["name"], self.layer) for f in manifest.files]
        # only the columns asked for; names a damaged array
        frames = [read_obs(path, f["name"], columns=keys, index=False) for f in manifest.files]
        obsm = {key: [_store_obsm_source(path, f["name"], key) for f in manifest.files] for key in _key_list(obsm_keys)}
        self._add(sources, frames, pd.Index(manifest.var_names), obs_keys, obsm, obs_codes)
        self._stores = self._stores + [(Path(path), stamp)]
        return self

    def _check_stores_unchanged(self) -> None:
        """Raise if a store added with :meth:`add_store` was converted again since (a new manifest).

        Its row pointers, read when it was added, would then point into other
        files: every row read wrong, checksums valid.
        """
        for path, stamp in self._stores:
            if manifest_stamp(path) != stamp:
                raise StoreError(
                    f"{path}: the store was converted again (or removed) since it was added: its {MANIFEST_NAME} "
                    "is not the one read then, and neither are its files; add it to a new dataset"
                )

    def _obs_keys(self, obs_keys, obs_codes=None) -> list[str]:
        keys, codes = _key_list(obs_keys), tuple(_key_list(obs_codes))
        stray = [k for k in codes if k not in keys]
        if stray:
            raise ValueError(f"obs_codes {stray} are not among obs_keys {keys}: name each column in obs_keys too")
        if self._obs is None:
            self._obs = ObsColumns(keys, codes)
            self._single_key = isinstance(obs_keys, str)
        elif keys != self._obs.keys or set(codes) != set(self._obs.as_codes):
            raise ValueError(
                f"obs_keys {keys} (obs_codes {list(codes)}) differ from those given before "
                f"({self._obs.keys}, obs_codes {list(self._obs.as_codes)})"
            )
        return keys

    # ------------------------------------------------------------------ epochs

    @property
    def categories(self) -> dict[str, list]:
        """Categories behind the int64 codes of categorical obs keys: per key a list of labels in code order
        (:class:`~arrayloaders.Categories`, whose ``ordered`` says whether the column is an ordered categorical)."""
        return dict(self._obs.categories) if self._obs else {}

    @property
    def n_obs(self) -> int:
        """Cells in all added AnnData objects (before rank sharding)."""
        return sum(s.n_obs for s in self._sources)

    @property
    def n_vars(self) -> int:
        """Genes: the width of every X batch (0 while the dataset is empty)."""
        return self._row_format().n_vars(self._sources[0].n_vars) if self._sources else 0

    @property
    def var_names(self) -> pd.Index:
        """The genes of X's columns, in order: those chosen with ``var_names=``, else all of the data's."""
        if self._var_names is None:
            return pd.Index([])
        genes = self._row_format().genes
        return self._var_names if genes is None else self._var_names[genes.columns]

    @property
    def epoch(self) -> int:
        """The current epoch: the one the next loop runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the current epoch: the next loop runs it from its first batch.

        Loops already running keep their own epoch. Under DDP call it with
        the same epoch on every rank, as with ``torch.utils.data.DistributedSampler``.
        """
        with self._rt().lock:
            self._epoch, self._start = int(epoch), 0

    def _epoch_complete(self, epoch: int) -> None:
        with self._rt().lock:
            if self._epoch == epoch:
                self._epoch, self._start = epoch + 1, 0

    def _plan_config(self) -> PlanConfig:
        if not self._sources:
            raise ValueError("the dataset is empty: call add_anndatas(...) or add_store(...) first")
        rank, world_size = rank_and_world_size(self.rank, self.world_size)
        cells = self._cells()
        n_selected = len(self.sampler) if self.sampler is not None else None if cells is None else cells.size
        return PlanConfig(
            tuple(s.n_obs for s in self._sources), self.batch_size, self.chunk_size, self.preload_nchunks,
            self.shuffle, self.seed, self.drop_last, rank, world_size, self.equalize, n_selected, self._window(),
        )  # fmt: skip

    def _window(self) -> int:
        """Loads a batch mixes: ``window`` if given; 1 for stores shuffled at conversion, else DEFAULT_WINDOW."""
        if not self.shuffle or self.sampler is not None:
            return 1
        if self.window is not None:
            return self.window
        return 1 if all(self._shuffled) else DEFAULT_WINDOW

    # ------------------------------------------------------------------ selection

    @property
    def cells(self) -> np.ndarray | None:
        """The subset this dataset yields (sorted row indices, as ``return_index`` numbers them), or ``None`` for all."""
        return self._cells()

    @property
    def n_cells(self) -> int:
        """Rows an epoch draws from: the subset's size, the sampler's length, or every cell."""
        return self._plan_config().n_epoch

    def _cells(self) -> np.ndarray | None:
        if self._cells_given is None:
            return None
        if self._cells_checked is None:
            self._cells_checked = _checked_cells(self._cells_given, self.n_obs)
        return self._cells_checked

    def _selection_id(self) -> str | None:
        """What the batch sequence depends on in the selection, for state_dict and the ranks' check."""
        if self.sampler is not None:
            return f"sampler {type(self.sampler).__name__} of length {len(self.sampler)}"
        cells = self._cells()
        return None if cells is None else "cells sha1 " + hashlib.sha1(cells.tobytes()).hexdigest()

    def _sample(self, epoch: int) -> np.ndarray:
        """The sampler's indices for ``epoch``, checked.

        The sampler runs with torch's global generator seeded from ``(seed,
        epoch)`` (and restored after), so samplers that draw from it (torch's
        own, with ``generator=None``) give the same sequence for the same
        epoch on every rank and after a resume. ``set_epoch`` is called on
        samplers that have it.
        """
        sampler, n_obs = self.sampler, self.n_obs
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.default_rng([self.seed, epoch, 2]).integers(2**63)))
            if isinstance(sampler, np.ndarray | torch.Tensor | list | tuple | range):
                sequence = np.asarray(sampler, dtype=np.int64).ravel()
            else:
                sequence = np.fromiter((int(i) for i in sampler), dtype=np.int64)
        if sequence.size != len(sampler):
            raise ValueError(f"the sampler yielded {sequence.size} indices in epoch {epoch}, but len(sampler) is {len(sampler)}")
        bad = (sequence < 0) | (sequence >= n_obs)
        if bad.any():
            raise IndexError(
                f"the sampler yielded index {int(sequence[bad][0])} in epoch {epoch}, outside the dataset's "
                f"{n_obs} cells (rows are numbered as return_index numbers them)"
            )
        return sequence

    @property
    def batch_sampler(self) -> None:
        """``None``: the dataset makes its own batches.

        A ``DataLoader`` attribute: Lightning reads it of any dataloader
        with a ``sampler`` attribute, as this dataset has, when the dataset
        itself is the dataloader.
        """
        return None

    def subset(self, cells=None, sampler: Iterable[int] | None = None) -> _ZarrDataset:
        """A dataset over the same sources and settings with another selection (``cells`` or ``sampler``).

        Nothing is read again: the new dataset shares the sources, the obs
        columns in memory and the worker processes (one of them iterating at
        a time uses them; :meth:`close` on either stops them for both).
        """
        if cells is not None and sampler is not None:
            raise ValueError("give cells= (chunked access over a subset) or sampler= (your own order), not both")
        if sampler is not None and not hasattr(sampler, "__len__"):
            raise ValueError(f"sampler must have a length; {type(sampler).__name__} has none")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)  # the runtime too: one set of workers for both
        new._cells_given = None if cells is None else np.asarray(cells)
        new._cells_checked = None
        new.sampler = sampler
        new._obs = self._obs.copy() if self._obs is not None else None
        new._epoch, new._start = 0, 0
        new._cells()  # refuse bad cells now
        return new

    def split(self, fraction: float, seed: int = 0) -> tuple[_ZarrDataset, _ZarrDataset]:
        """Split the cells (of the subset, if any) at random into two datasets: ``train, val = ds.split(0.9)``.

        ``round(fraction * n)`` cells go to the first, the rest to the
        second; the same ``seed`` gives the same split. Both share the
        sources, the obs columns and the workers (see :meth:`subset`).
        """
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be between 0 and 1, got {fraction!r}")
        if self.sampler is not None:
            raise ValueError("split() divides cells; this dataset has a sampler: split before choosing one")
        cells = self._cells()
        pool = np.arange(self.n_obs, dtype=np.int64) if cells is None else cells
        order = np.random.default_rng(seed).permutation(pool.size)
        k = int(round(fraction * pool.size))
        return self.subset(cells=np.sort(pool[order[:k]])), self.subset(cells=np.sort(pool[order[k:]]))

    def class_weights(self, key: str) -> torch.Tensor:
        """Per-cell weights that give every class of obs column ``key`` the same total, for ``WeightedRandomSampler``.

        A float64 tensor with one weight per cell of the dataset (numbered
        as ``return_index`` numbers them): ``1 / (cells of its class)`` for
        cells of this dataset's selection, 0 for cells outside it and for
        cells with a missing label. ``key`` must be one of the ``obs_keys``.

        Examples
        --------
        >>> weights = ds.class_weights("cell_type")
        >>> sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=ds.n_cells)
        >>> balanced = ds.subset(sampler=sampler)
        """
        labels = self._class_codes("class_weights", key)
        inside = labels >= 0
        counts = np.bincount(labels[inside], minlength=1)
        weights = np.zeros(labels.size, dtype=np.float64)
        weights[inside] = 1.0 / counts[labels[inside]]
        return torch.from_numpy(weights)

    def class_run_sampler(
        self, key: str, num_samples: int | None = None, class_weights: Sequence[float] | None = None
    ) -> ClassRunSampler:
        """Class-balanced sampling at chunked-access speed, for stores whose cells are grouped by class.

        Draws runs of ``chunk_size`` consecutive cells of one class (see
        :class:`~arrayloaders.class_runs.ClassRunSampler`), so the workers
        read runs, not single cells. Use it with ``subset(sampler=...)``.
        Cells of this dataset's selection with a label are drawn; each class
        of obs column ``key`` (one of the ``obs_keys``; codes as in
        ``categories[key]``, or the sorted distinct values of a numeric
        column) gets an equal share of the cells, or ``class_weights``'s.
        On a store that is not grouped by class (converted with shuffling)
        runs are single cells: it warns, and ``class_weights()`` with
        ``WeightedRandomSampler`` is the way there.

        Examples
        --------
        >>> balanced = ds.subset(sampler=ds.class_run_sampler("cell_type"))
        """
        labels = self._class_codes("class_run_sampler", key)
        return ClassRunSampler(labels, self.chunk_size, num_samples, class_weights, window=self.preload_nchunks)

    def _class_codes(self, caller: str, key: str) -> np.ndarray:
        """One class code per cell of obs column ``key``; -1 for cells outside the selection or without a label."""
        if self._obs is None or key not in self._obs.keys:
            keys = [] if self._obs is None else self._obs.keys
            raise ValueError(f"{caller}({key!r}): {key!r} is not among the obs_keys given when adding data ({keys})")
        labels = self._obs.values[key]
        if key not in self._obs.categories:  # numeric: each distinct value is a class
            labels = np.unique(labels, return_inverse=True)[1]
        labels = labels.astype(np.int64, copy=True)
        cells = self._cells()
        if cells is not None:
            inside = np.zeros(labels.size, dtype=bool)
            inside[cells] = True
            labels[~inside] = -1
        return labels

    # ------------------------------------------------------------------ resuming

    def state_dict(self) -> dict:
        """Where training stands: restore it with :meth:`load_state_dict` to yield exactly the rest.

        Holds the seed, the current epoch and how many of its batches the
        furthest *running* loop over it has handed out (a loop left early or
        a peek no longer counts: the next loop starts the epoch again, and so
        does a restored one). After a complete epoch it points at the start
        of the next. Also holds the settings the batch sequence depends on,
        to refuse a mismatch. Take it on every rank; under DDP each rank
        restores its own.
        """
        config = self._plan_config()
        rt = self._rt()
        with rt.lock:
            epoch, start = self._epoch, self._start
            loops = [it for it in list(rt.loops) if it.dataset is self and it.epoch == epoch]
        running = [it.position for it in loops if it._state.handed and not it._state.done]
        return {
            "epoch": epoch,
            "batches_yielded": max(running, default=start),
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
        epoch, yielded = int(state["epoch"]), int(state["batches_yielded"])
        if yielded >= config.n_batches:  # saved after a complete epoch: go on with the next
            epoch, yielded = epoch + 1, 0
        with self._rt().lock:
            self._epoch, self._start = epoch, yielded

    def _settings(self, config: PlanConfig) -> dict:
        return {
            "seed": config.seed, "n_obs": config.n_obs, "file_n_obs": list(config.file_n_obs),
            "batch_size": config.batch_size, "chunk_size": config.chunk_size,
            "preload_nchunks": config.preload_nchunks, "shuffle": config.shuffle, "drop_last": config.drop_last,
            "equalize": config.equalize, "n_selected": config.n_selected, "selection": self._selection_id(),
        }  # fmt: skip

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        return self._plan_config().n_batches

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> EpochIterator:
        rt = self._rt()
        with rt.lock:
            it = EpochIterator(self, self._epoch, self._start, next(rt.seq))
            rt.loops.add(it)
        return it

    def _rt(self) -> _Runtime:
        """This process's runtime; a forked child gets its own and leaves the parent's workers alone."""
        if self._runtime.owner != os.getpid():
            self._runtime = _Runtime()
        return self._runtime

    def _indptrs(self) -> list[np.ndarray | None]:
        rt = self._rt()
        if rt.indptrs is None or len(rt.indptrs) != len(self._sources):
            rt.indptrs = [read_indptr(s) if s.kind == "csr" else None for s in self._sources]
        return rt.indptrs

    def _open_readers(self) -> _ReaderSet:
        x = [open_rows(s, indptr) for s, indptr in zip(self._sources, self._indptrs())]
        return _ReaderSet(x, {key: [open_rows(s) for s in sources] for key, sources in (self._obsm or {}).items()})

    def _obsm_sources(self) -> tuple[tuple[str, tuple[XSource, ...]], ...]:
        return tuple((key, tuple(sources)) for key, sources in (self._obsm or {}).items())

    def _batch_maker(self) -> BatchMaker:
        return BatchMaker(
            self.n_vars, self._obs, self._single_key, self.return_index, self.pin_memory, tuple(self._obsm or ())
        )

    def _row_format(self) -> RowFormat:
        """What the rows become (genes kept, dense or CSR): made once per set of sources, shared by subsets."""
        if self._fmt is None:
            self._fmt = _row_format(self._var_names, self._genes_given, self._dense_output, _label(self._sources[0]))
        return self._fmt

    def _engine(self, window: int) -> Engine | None:
        """This process's engine for the current sources and settings, made if needed (workers not yet
        started); ``None`` while a loop still uses one made for other sources or settings."""
        rt, sources, fmt, obsm = self._rt(), tuple(self._sources), self._row_format(), self._obsm_sources()
        with rt.lock:
            engine = rt.engine
            pinned = self.pin_memory
            if engine is None or engine.closed or not engine.matches(sources, fmt, obsm, self.num_workers, pinned):
                if engine is not None and engine.in_use:
                    return None  # the sources or settings changed under a running loop: let it finish
                if engine is not None:
                    engine.close()
                pins = PinnedSlots() if pinned else None
                engine = rt.engine = Engine(
                    sources, self.num_workers, self.memory_budget, self.timeout, window, fmt, obsm, self._indptrs(), pins
                )
                # The engine shares them with its workers; a loop reading in its own thread reads them again.
                rt.indptrs = None
            elif not engine.in_use:
                # Made when the data was added: settings changed since apply from the next run on.
                engine.memory_budget, engine.timeout, engine.window = self.memory_budget, self.timeout, window
        return engine

    def _start_run(self, plan: EpochPlan, loads: list[int], seq: int) -> EpochRun | None:
        """The workers for ``loads`` of ``plan``, or ``None`` while they serve another loop."""
        engine = self._engine(plan.window)
        if engine is None:
            return None
        source, fmt, obsm = self._sources[0], self._row_format(), self._obsm_sources()
        return engine.start(plan, loads, seq, lambda: slot_layout(source, engine.row_pointers(), plan, fmt, obsm))

    def close(self) -> None:
        """Stop the worker processes and free the shared memory (idempotent).

        Batches already yielded stay valid. A loop still running goes on
        (it reads in its own thread, or starts new workers at its next load),
        and the next loop starts new workers.
        """
        rt = self._rt()
        with rt.lock:
            engine, rt.engine = rt.engine, None
        if engine is not None:
            engine.close()
        rt.readers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Pickled (e.g. into another process): settings and sources only, no workers, readers or loops.
        state = dict(self.__dict__)
        del state["_runtime"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._runtime = _Runtime()

def default_num_workers() -> int:
    """The cores this process may run on, shared with the other ranks of its node; at most 16.

    The main process mostly waits, so it gets no core of its own. Under
    DDP, ``LOCAL_WORLD_SIZE`` ranks share the node: 8 ranks on 64 cores
    start 8 workers each, not 8 x 16.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    # 16: measured to scale up to there (a 16-core machine: 8 workers 205k, 16 workers 451k cells/s).
    return max(1, min(cores // local_world_size(), 16)) if os.path.isdir("/dev/shm") else 0


def default_memory_budget() -> int:
    """Ring memory: a quarter of the available RAM, shared with the other ranks of the node.

    The ring takes only what its ``2 * num_workers + 2`` slots need; a fixed
    cap (1 GiB, five loads of 8,192 typical cells) starved workers beyond
    four of free slots. Under DDP each of the ``LOCAL_WORLD_SIZE`` ranks
    gets its share, so 8 ranks do not reserve 8 quarters of the RAM.
    """
    return int(psutil.virtual_memory().available // 4 // local_world_size())


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
        per core this process may use, divided among the ``LOCAL_WORLD_SIZE``
        ranks of the node under DDP, at most 16; ``0`` reads in the main
        process). The batches are the same for every value. Workers start
        when the dataset is filled (``add_store``/``add_anndatas``), without
        waiting for them, so they import and open the store while you build
        your model; they stay up across loops and epochs, whether a
        loop is exhausted, stopped at ``len(ds)`` or left with ``break``;
        they stop on :meth:`close`, on an error or Ctrl-C inside the loader,
        and when the dataset is garbage collected. They serve one loop at a
        time: another loop running meanwhile (a peek, a second thread) reads
        in its own thread, correct but slower.
    memory_budget
        Bytes (or a string such as ``"1GiB"``) of shared memory for the ring
        of decoded loads (default: a quarter of the available RAM, divided
        among the ``LOCAL_WORLD_SIZE`` ranks of the node). It sets
        how many loads are decoded ahead: up to ``2 * num_workers + 2``, at
        least 2; the ring takes no more than those slots need.
    pin_memory
        Batches (X, the obs tensors and the index) in page-locked memory,
        for fast, asynchronous transfer to a CUDA device
        (``X.to("cuda", non_blocking=True)``); a no-op with a warning where
        CUDA is not available. With workers, X is not copied: the ring's
        shared memory is registered with CUDA, and a slot is refilled only
        once the copies enqueued from it on the stream current in the
        iterating thread have completed (copies enqueued on another stream
        must be synchronized before the batch is dropped). The obs tensors,
        the index and X's row pointers are copied into pinned memory.
    timeout
        Seconds a worker with work may make no progress (a hung disk, a
        stopped process) before the loop raises a ``WorkerError`` naming it
        and its load. Default (``None``): 60 s more than the slowest load
        seen so far.
    rank, world_size
        This process's rank and the number of ranks; default: from the
        initialised ``torch.distributed`` process group, else one process.
    equalize
        How ranks get equal batch counts: ``"drop"`` (every rank yields
        ``n // world_size`` cells) or ``"pad"`` (``ceil(n / world_size)``,
        repeating a rank's first cell).
    cells
        Chunked access over a subset only: a boolean mask or row indices
        (numbered as ``return_index`` numbers them). Rows outside it are
        read with their chunk and skipped.
    sampler
        Your own sampling strategy instead of chunked access: any
        ``torch.utils.data.Sampler`` or re-iterable of row indices with a
        length. Batch ``b`` holds its ``b``-th run of ``batch_size``
        indices, in its order, repeats included. Not with ``cells``.
    window
        Loads a batch mixes (``None``: 1 for stores shuffled at conversion,
        8 for others, whose neighbouring cells are alike).
    var_names
        Genes to yield, chosen at load time: gene names, in the order X's
        columns should have them, or a boolean mask over var. Workers drop
        the other genes' entries while decoding. ``None``: every gene.
    layer
        Read ``layers[layer]`` of every added AnnData (or store file)
        instead of X; ``None``: X.

    Iterating yields ``(X, obs)`` (``(X, obs, index)`` with ``return_index``).
    Each loop (``iter(ds)``, an :class:`EpochIterator`) runs the current
    epoch; the current epoch advances once a loop has handed out its last
    batch, so a loop stopped at ``len(ds)`` counts as complete while a
    ``break`` or a peek (``next(iter(ds))``) does not change what the next
    loop yields. :meth:`set_epoch` and :meth:`load_state_dict` set it.

    X is a view of the decoded load, not a copy: it stays valid for as long
    as you hold it (its memory is not reused until it is garbage collected),
    but writing into it in place changes nothing else. Holding many batches
    holds their loads' memory.
    """

    _dense_output = False


class ZarrDenseDataset(_ZarrDataset):
    """Like :class:`ZarrSparseDataset`, yielding dense X tensors.

    Serves dense zarr X, and CSR stores densified by the worker processes
    (so densifying scales with ``num_workers``); X is then a view of the
    slot, as sparse X is. A load's slot holds ``rows x n_vars`` values:
    with ``var_names=`` choosing a few thousand genes, far less memory.
    """

    _dense_output = True
