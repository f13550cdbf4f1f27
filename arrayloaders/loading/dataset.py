"""``ZarrSparseDataset`` / ``ZarrDenseDataset``: the public classes, their settings and sources, and the rules of
iterating them.

A dataset holds settings and sources (the added AnnData objects, their obs
columns) and, across loops, the resources loops share (``runtime.py``: the
worker engine and idle readers). Its methods are grouped by job: selecting
cells (``selection.py``), checkpoints (``resume.py``), the workers' lifecycle
(``runtime.py``); each ``iter(ds)`` is an :class:`~arrayloaders.loading.epoch_iterator.EpochIterator`
(``epoch_iterator.py``) that owns its epoch, its position and the loads it holds.

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

import dataclasses
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..byte_sizes import parse_bytes
from ..errors import StoreError
from ..store.disk_layout import XSource
from ..store.format import MANIFEST_NAME, use_zarrs
from ..store.location import StoreLocation, store_location
from ..store.manifest import manifest_stamp, read_manifest
from ..store.obs import read_obs
from .batches import BatchMaker, ObsColumns
from .distributed import rank_and_world_size
from .elastic import Chain, elastic_config
from .epoch_iterator import EpochIterator
from .genes import choose_genes
from .load import RowFormat
from .plan import PlanConfig
from .resume import ResumeMixin
from .runtime import Runtime, WorkerLifecycleMixin, default_memory_budget, default_num_workers
from .selection import SelectionMixin, check_sampler
from .sources import (
    anndatas_id,
    data_label,
    key_list,
    obsm_source,
    shuffled_at_conversion,
    store_obsm_source,
    store_source,
    x_source,
)  # fmt: skip

__all__ = ["ZarrDenseDataset", "ZarrSparseDataset"]


def _row_format(var: pd.Index, genes_given: np.ndarray | None, dense: bool, where: str) -> RowFormat:
    return RowFormat(None if genes_given is None else choose_genes(var, genes_given, where), dense)


DEFAULT_WINDOW = 8  # loads a batch mixes when the store is not known to be shuffled (see plan.py)


def _cache_spec(path, cache_dir, cache_bytes) -> tuple[str, int] | None:
    """(directory, bytes) of a remote store's local cache, or None; ``cache_bytes`` alone is refused."""
    if cache_dir is None:
        if cache_bytes is not None:
            raise ValueError("cache_bytes needs cache_dir (where the cache goes)")
        return None
    import shutil

    from ..store.remote import is_url

    if not is_url(path):
        raise ValueError(f"{path}: cache_dir is for URLs of object storage (s3://...), not local paths")

    os.makedirs(cache_dir, exist_ok=True)
    limit = parse_bytes(cache_bytes) if cache_bytes is not None else shutil.disk_usage(cache_dir).free // 2
    if limit <= 0:
        raise ValueError(f"cache_bytes must be positive, got {cache_bytes!r}")
    return str(os.path.abspath(cache_dir)), int(limit)


class _ZarrDataset(SelectionMixin, ResumeMixin, WorkerLifecycleMixin, torch.utils.data.IterableDataset):
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
        check_sampler(sampler)
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
        self._within: np.ndarray | None = None  # a subset's parent's cells: its selection must lie within
        self.sampler = sampler
        self._sources: list[XSource] = []
        self._stores: list[tuple[StoreLocation, tuple | None]] = []  # (store, its manifest's stamp) of each add_store
        self._shuffled: list[bool] = []  # per source: known to be shuffled at conversion
        self._var_names: pd.Index | None = None
        self._obs: ObsColumns | None = None
        self._obsm: dict[str, list[XSource]] | None = None  # key -> its array in every added file
        self._single_key = True
        # The current epoch: where the next loop starts (epoch, first batch, and the sizes that batch counts
        # in when a restored state's differ from the dataset's own: the rest of that epoch keeps them).
        self._epoch, self._start, self._start_shape = 0, 0, None
        self._start_elastic: Chain = ()  # a restored epoch's earlier world sizes (elastic.py)
        self._data_ids: list[str] = []  # what each add_store/add_anndatas added, for checkpoints
        self._runtime = Runtime()
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
        if self._genes_given is not None and self._genes_given.dtype != bool:
            for i, a in enumerate(adatas):
                if a.var_names.equals(pd.RangeIndex(a.n_vars).astype(str)):
                    raise ValueError(
                        f"AnnData #{len(self._sources) + i} has no gene names (its var_names are '0'...'{a.n_vars - 1}', "
                        "as AnnData numbers genes when var is not given), so var_names= cannot choose genes: "
                        "build it with var=, e.g. var=ad.io.read_elem(zarr.open(path)['var'])"
                    )
        sources = [x_source(a, len(self._sources) + i, self.layer) for i, a in enumerate(adatas)]
        obsm = {
            key: [obsm_source(a, len(self._sources) + i, key) for i, a in enumerate(adatas)]
            for key in key_list(obsm_keys)
        }
        self._add(sources, [a.obs for a in adatas], var, obs_keys, obsm, obs_codes)
        self._data_ids = self._data_ids + [anndatas_id(adatas)]
        return self

    def _add(
        self, sources: list[XSource], frames: list[pd.DataFrame], var: pd.Index, obs_keys, obsm: dict[str, list[XSource]],
        obs_codes=None, shuffled: bool | None = None,
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
        what = "X" if self.layer is None else f"layers[{self.layer!r}]"
        if len(kinds) > 1:
            dense = next(s for s in self._sources + sources if s.kind == "dense")
            raise ValueError(f"{dense.where}: {what} is dense, but others added are sparse (CSR); add one kind per dataset")
        if kinds == {"dense"} and not self._dense_output:
            raise ValueError(
                f"{sources[0].where}: {what} is dense; ZarrSparseDataset yields CSR batches: use ZarrDenseDataset"
            )
        if self._var_names is not None and not var.equals(self._var_names):
            raise ValueError(
                f"AnnData #{len(self._sources)} has different var ({len(var)} genes) from the first "
                f"({len(self._var_names)} genes); every AnnData of a dataset must share var_names"
            )
        for i, obs in enumerate(frames):
            self._obs.check(obs, f"AnnData #{len(self._sources) + i}")
        fmt = _row_format(var, self._genes_given, self._dense_output, data_label((self._sources + sources)[0]))
        self._obs.add(frames)
        self._var_names, self._fmt = var, fmt
        self._obsm = {key: (self._obsm or {}).get(key, []) + key_sources for key, key_sources in obsm.items()}
        self._sources = self._sources + sources
        self._shuffled = self._shuffled + [shuffled_at_conversion(s) if shuffled is None else shuffled for s in sources]
        self._cells_checked = None
        # New sources, new workers: loops already running keep the old ones until they end.
        self._runtime = Runtime()
        if self.num_workers > 0:
            self._engine(self._window()).start_workers()
        return self

    def add_store(
        self,
        path: str | os.PathLike,
        obs_keys: str | Sequence[str] | None = None,
        obsm_keys: str | Sequence[str] | None = None,
        obs_codes: str | Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int | str | None = None,
    ):
        """Add every file of a store made by ``create_store_from_h5ads``, in file order.

        The store is checked against its manifest; a directory without one
        (not a store, or an unfinished conversion) is refused. ``obs_keys``,
        ``obsm_keys`` and ``obs_codes`` as for :meth:`add_anndatas`.

        ``path`` may be a URL of object storage (``s3://bucket/prefix``,
        ``gs://``, ``az://``, ``https://``), read through obstore with
        ``storage_options`` (keyword arguments of ``obstore.store.from_url``:
        endpoint, region, credentials...; without them credentials come from
        the environment). Workers fetch the byte ranges they need, many at a
        time; see :doc:`/remote`. With ``cache_dir``, the bytes fetched are
        kept there (at most ``cache_bytes``, default half the free space
        there; e.g. ``"50GiB"``), shared by every process of the machine that
        names the same directory, so that later epochs read them locally.
        """
        location = store_location(path, storage_options, _cache_spec(path, cache_dir, cache_bytes))
        try:
            stamp = manifest_stamp(location)  # before reading: a store converted again from now on is noticed
        except OSError as e:  # remote: the bucket or credentials, said in one line
            raise StoreError(str(e)) from None
        manifest = read_manifest(location)  # checks the files against it: shapes, dtypes, every chunk there
        keys = key_list(obs_keys)
        missing = [k for k in keys if k not in manifest.obs_schema]
        if missing:
            raise ValueError(f"{location}: obs has no column(s) {missing}; available: {list(manifest.obs_schema)}")
        sources = [store_source(location, f["name"], self.layer) for f in manifest.files]
        # only the columns asked for; names a damaged array
        frames = [read_obs(location, f["name"], columns=keys, index=False) for f in manifest.files]
        obsm = {key: [store_obsm_source(location, f["name"], key) for f in manifest.files] for key in key_list(obsm_keys)}
        self._add(sources, frames, pd.Index(manifest.var_names), obs_keys, obsm, obs_codes, shuffled=manifest.shuffle)
        self._stores = self._stores + [(location, stamp)]
        self._data_ids = self._data_ids + [manifest.identity]
        return self

    def _check_stores_unchanged(self, reachable_only: bool = False, local_only: bool = False) -> None:
        """Raise if a store added with :meth:`add_store` was converted again since (a new manifest).

        Its row pointers, read when it was added, would then point into other
        files: every row read wrong, checksums valid. With ``reachable_only``
        a store that cannot be reached now (its server down) is passed over;
        with ``local_only``, remote stores are (each of their range requests
        names the version of the object it reads: a replaced object fails it).
        """
        for path, stamp in self._stores:
            if local_only and path.is_remote:
                continue
            try:
                now = manifest_stamp(path)
            except OSError as e:
                if reachable_only:
                    continue
                raise StoreError(str(e)) from None
            if now != stamp:
                raise StoreError(
                    f"{path}: the store was converted again (or removed) since it was added: its {MANIFEST_NAME} "
                    "is not the one read then, and neither are its files; add it to a new dataset"
                )

    def _obs_keys(self, obs_keys, obs_codes=None) -> list[str]:
        keys, codes = key_list(obs_keys), tuple(key_list(obs_codes))
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
            self._epoch, self._start, self._start_shape, self._start_elastic = int(epoch), 0, None, ()

    def _epoch_complete(self, epoch: int) -> None:
        with self._rt().lock:
            if self._epoch == epoch:
                self._epoch, self._start, self._start_shape, self._start_elastic = epoch + 1, 0, None, ()

    def _plan_config(self, shape: dict | None = None) -> PlanConfig:
        """The plan's settings now; ``shape``: sizes to use instead (a restored epoch's, see ``SHAPE``)."""
        if not self._sources:
            raise ValueError("the dataset is empty: call add_anndatas(...) or add_store(...) first")
        rank, world_size = rank_and_world_size(self.rank, self.world_size)
        cells = self._cells()
        n_selected = len(self.sampler) if self.sampler is not None else None if cells is None else cells.size
        config = PlanConfig(
            tuple(s.n_obs for s in self._sources), self.batch_size, self.chunk_size, self.preload_nchunks,
            self.shuffle, self.seed, self.drop_last, rank, world_size, self.equalize, n_selected, self._window(),
        )  # fmt: skip
        return dataclasses.replace(config, **shape) if shape else config

    def _window(self) -> int:
        """Loads a batch mixes: ``window`` if given; 1 for stores shuffled at conversion, else DEFAULT_WINDOW."""
        if not self.shuffle or self.sampler is not None:
            return 1
        if self.window is not None:
            return self.window
        return 1 if all(self._shuffled) else DEFAULT_WINDOW



    @property
    def batch_sampler(self) -> None:
        """``None``: the dataset makes its own batches.

        A ``DataLoader`` attribute: Lightning reads it of any dataloader
        with a ``sampler`` attribute, as this dataset has, when the dataset
        itself is the dataloader.
        """
        return None




    def __len__(self) -> int:
        """Batches of the current epoch (on this rank): the same every epoch, unless a size was changed (a
        running loop keeps its sizes to its epoch's end, and so does an epoch restored by :meth:`load_state_dict`)."""
        _, _, config, chain = self._current_epoch()
        return elastic_config(config, chain).n_batches

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> EpochIterator:
        rt = self._rt()
        with rt.lock:
            it = EpochIterator(self, self._epoch, self._start, next(rt.seq), self._start_shape, self._start_elastic)
            rt.loops.add(it)
        return it


    def _batch_maker(self) -> BatchMaker:
        return BatchMaker(
            self.n_vars, self._obs, self._single_key, self.return_index, self.pin_memory, tuple(self._obsm or ())
        )

    def _row_format(self) -> RowFormat:
        """What the rows become (genes kept, dense or CSR): made once per set of sources, shared by subsets."""
        if self._fmt is None:
            self._fmt = _row_format(self._var_names, self._genes_given, self._dense_output, data_label(self._sources[0]))
        return self._fmt


    def __getstate__(self) -> dict:
        # Pickled (e.g. into another process): settings and sources only, no workers, readers or loops.
        state = dict(self.__dict__)
        del state["_runtime"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._runtime = Runtime()


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
        ``torch.utils.data.Sampler`` or re-iterable of row indices (ints:
        floats, booleans and 2-d arrays are refused) with a length. Batch
        ``b`` holds its ``b``-th run of ``batch_size`` indices, in its
        order, repeats included. Not with ``cells``.
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

    Notes
    -----
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
