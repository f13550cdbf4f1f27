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

import itertools
import os
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import torch
import zarr

from .batches import Batch, BatchMaker, ObsColumns, keep
from .convert import parse_bytes
from .distributed import check_same_on_every_rank, rank_and_world_size
from .engine import Engine, EpochRun, slot_layout
from .errors import StoreError
from .load import LoadedRows, read_load
from .plan import EpochPlan, PlanConfig, batch_rows, plan_epoch
from .rows import CsrRows, DenseRows, open_rows, read_indptr
from .store import XSource, read_manifest, use_zarrs

__all__ = ["EpochIterator", "ZarrDenseDataset", "ZarrSparseDataset"]


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


class _Readers:
    """Idle reader sets (one reader per added X) for loops that read in their own thread.

    A set serves one loop at a time. Loops give sets back when they end, also
    from a finalizer, so giving back is a lock-free ``deque`` append.
    """

    def __init__(self):
        self._idle: deque[list[CsrRows] | list[DenseRows]] = deque()
        self._finalizer = weakref.finalize(self, _Readers._close_all, self._idle)

    def take(self, open_set: Callable[[], list[CsrRows] | list[DenseRows]]) -> list[CsrRows] | list[DenseRows]:
        try:
            return self._idle.pop()
        except IndexError:
            return open_set()

    def give_back(self, readers: list[CsrRows] | list[DenseRows]) -> None:
        self._idle.append(readers)

    def close(self) -> None:
        _Readers._close_all(self._idle)

    @staticmethod
    def _close_all(idle: deque) -> None:
        while idle:
            for reader in idle.pop():
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
    complete: bool = False
    done: bool = False


def _end_loop(state: _LoopState, dataset: _ZarrDataset) -> None:
    """Give back what a loop holds. Called once, when it ends or is garbage collected: sets flags only."""
    state.done = True
    if state.run is not None:
        state.run.release()
        state.run = None
    if state.readers is not None:
        dataset._runtime.readers.give_back(state.readers)
        state.readers = None
    if state.handed and not state.complete:
        dataset._last_stop = (state.epoch, state.position)


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
        self._finalizer = weakref.finalize(self, _end_loop, self._state, dataset)

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
            load, lo, hi = batch_rows(plan, state.position)
            if self._loaded is None or self._loaded.load.index != load:
                self._loaded = None  # drop our view of the previous load first: its slot may be refilled
                self._loaded, self._lend = self._read(load)
            batch = self._make(self._loaded, lo, hi, self._lend)
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
        if ds.rank is None and config.world_size > 1:  # rank and world size from torch.distributed
            check_same_on_every_rank({**ds._settings(config), "epoch": self.epoch, "resume_at": self._state.position})
        self._plan = plan_epoch(config, self.epoch)
        self._make = ds._batch_maker()

    def _read(self, load: int) -> tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]]:
        """Load ``load`` from the workers if they are (or become) ours, else read it in this thread."""
        state, ds, plan = self._state, self.dataset, self._plan
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
                state.readers = ds._runtime.readers.take(ds._open_readers)
            got = read_load(state.readers, plan, plan.loads[load]), keep
        got[0].rows = plan.rows_of_load(plan.loads[load])
        return got

    def _finish(self, complete: bool, failed: bool = False) -> None:
        state = self._state
        self._loaded = None
        state.complete = complete
        if failed and state.readers is not None:  # a read was cut short: do not reuse these readers
            for reader in state.readers:
                reader.close()
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
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.timeout = timeout
        self.memory_budget = default_memory_budget() if memory_budget is None else parse_bytes(memory_budget)
        self.pin_memory = pin_memory
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available: batches are not pinned", stacklevel=2)
            self.pin_memory = False
        self._sources: list[XSource] = []
        self._var_names: pd.Index | None = None
        self._obs: ObsColumns | None = None
        self._single_key = True
        # The current epoch: where the next loop starts (epoch, first batch), and where the last
        # abandoned loop stopped (for state_dict).
        self._epoch, self._start = 0, 0
        self._last_stop: tuple[int, int] | None = None
        self._runtime = _Runtime()
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
            self._obs = ObsColumns(keys)
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
            self._epoch, self._start, self._last_stop = int(epoch), 0, None

    def _epoch_complete(self, epoch: int) -> None:
        with self._rt().lock:
            if self._epoch == epoch:
                self._epoch, self._start, self._last_stop = epoch + 1, 0, None

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
        """Where training stands in the current epoch: restore it with :meth:`load_state_dict` to yield exactly the rest.

        Holds the seed, the current epoch and how many of its batches the
        furthest loop over it has handed out (a running loop, or the last
        one that stopped early), plus the settings the batch sequence
        depends on, to refuse a mismatch. After a complete epoch it points
        at the start of the next. Take it on every rank; under DDP each rank
        restores its own.
        """
        config = self._plan_config()
        rt = self._rt()
        with rt.lock:
            epoch, start, last = self._epoch, self._start, self._last_stop
            running = [it.position for it in list(rt.loops) if it.epoch == epoch and it._state.handed and not it._state.done]
        yielded = max(running) if running else last[1] if last is not None and last[0] == epoch else start
        return {
            "epoch": epoch,
            "batches_yielded": yielded,
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
            self._epoch, self._start, self._last_stop = epoch, yielded, None

    def _settings(self, config: PlanConfig) -> dict:
        return {
            "seed": config.seed, "n_obs": config.n_obs, "file_n_obs": list(config.file_n_obs),
            "batch_size": config.batch_size, "chunk_size": config.chunk_size,
            "preload_nchunks": config.preload_nchunks, "shuffle": config.shuffle, "drop_last": config.drop_last,
            "equalize": config.equalize,
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

    def _open_readers(self) -> list[CsrRows] | list[DenseRows]:
        return [open_rows(s, indptr) for s, indptr in zip(self._sources, self._indptrs())]

    def _batch_maker(self) -> BatchMaker:
        return BatchMaker(
            self.n_vars, self._dense_output, self._obs, self._single_key, self.return_index, self.pin_memory
        )

    def _start_run(self, plan: EpochPlan, loads: list[int], seq: int) -> EpochRun | None:
        """The workers for ``loads`` of ``plan``, or ``None`` while they serve another loop."""
        rt, sources = self._rt(), tuple(self._sources)
        with rt.lock:
            engine = rt.engine
            if engine is None or engine.closed or not engine.matches(sources, plan.config):
                if engine is not None and engine.in_use:
                    return None  # the sources or settings changed under a running loop: let it finish
                if engine is not None:
                    engine.close()
                engine = rt.engine = Engine(sources, plan.config, self.num_workers, self.memory_budget, self.timeout)
        source = self._sources[0]
        return engine.start(plan, loads, seq, lambda: slot_layout(source, self._indptrs(), plan))

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
        at the first loop and stay up across loops and epochs, whether a
        loop is exhausted, stopped at ``len(ds)`` or left with ``break``;
        they stop on :meth:`close`, on an error or Ctrl-C inside the loader,
        and when the dataset is garbage collected. They serve one loop at a
        time: another loop running meanwhile (a peek, a second thread) reads
        in its own thread, correct but slower.
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

    Serves dense zarr X, and densifies CSR stores batch by batch.
    """

    _dense_output = True
