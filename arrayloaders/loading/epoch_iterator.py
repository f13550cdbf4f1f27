"""One loop over a dataset: :class:`EpochIterator`, what ``iter(ds)`` returns.

It owns its epoch, its position and the loads it holds; it takes each load
from the engine, or reads it in its own thread when the engine serves another
loop (or ``num_workers=0``), and cuts batches from it (``batches.py``). The
rules it follows are in ``dataset.py``'s docstring and the README.
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ArrayloadersError
from .batches import Batch, BatchMaker, MixedWindow, keep
from .distributed import check_same_on_every_rank
from .elastic import Chain, elastic_config, elastic_plan
from .engine import EpochRun
from .load import LoadedRows, read_load
from .plan import EpochPlan, batch_rows, plan_epoch
from .runtime import Readers

if TYPE_CHECKING:
    from .dataset import _ZarrDataset

__all__ = ["EpochIterator"]


@dataclass
class _LoopState:
    """A loop's position and resources, shared with the finalizer that ends an abandoned loop."""

    epoch: int
    position: int  # the next batch
    handed: int = 0  # batches this loop has handed out
    run: EpochRun | None = None
    readers: list | None = None
    pool: Readers | None = None  # where ``readers`` came from, and go back to
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

    def __init__(self, dataset: _ZarrDataset, epoch: int, start: int, seq: int, shape: dict | None = None,
                 elastic: Chain = ()):  # fmt: skip
        self.dataset, self.epoch, self._seq = dataset, epoch, seq
        self._shape = shape  # the sizes its start was counted in, if a restored state's differ from the dataset's
        self._elastic = elastic  # a restored epoch's earlier world sizes: this loop yields the rest (elastic.py)
        self._state = _LoopState(epoch, start)
        self._plan: EpochPlan | None = None
        self._config = None  # the epoch's plan settings (of the whole epoch, if this loop yields an elastic rest)
        self._make: BatchMaker | None = None
        self._loaded: LoadedRows | None = None
        self._lend: Callable[[np.ndarray], np.ndarray] = keep
        self._mixed: MixedWindow | None = None  # the loads of the current window, when batches mix several
        self._mixed_index = -1
        self._remote_checked = False  # remote stores' manifests checked in this loop
        self._cells: np.ndarray | None = None  # the selection planned over (for the next epoch's plan)
        self._returned: float | None = None  # when this loop last returned a batch (ds.stats(): the model's time)
        self._finalizer = weakref.finalize(self, _end_loop, self._state)

    @property
    def position(self) -> int:
        """The index of the next batch in the epoch."""
        return self._state.position

    def __iter__(self) -> EpochIterator:
        return self

    def __len__(self) -> int:
        """Batches this loop has left."""
        if self._state.done:
            return 0
        if self._plan is not None:
            config = self._plan.config
        else:
            config = elastic_config(self.dataset._plan_config(self._shape), self._elastic)
        return config.n_batches - self._state.position

    def __next__(self) -> Batch:
        state = self._state
        if state.done:
            raise StopIteration
        entered = time.perf_counter()
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
        returned = time.perf_counter()
        between = entered - self._returned if self._returned is not None else 0.0
        self.dataset._rt().stats.batch(hi - lo, returned - entered, between)
        self._returned = returned
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
        config = self._config = ds._plan_config(self._shape)
        cells = self._cells = ds._cells()
        ds._rt().stats.start()
        # The plan the engine decoded this epoch's first loads for, while the last epoch ended, if still ours.
        ahead = ds._rt().ahead
        ahead = ahead if ahead is not None and not self._elastic and ahead.serves(self.epoch, config, cells) else None
        if ahead is not None:
            sequence = ahead.sequence
        else:
            sequence = ds._sample(self.epoch) if ds.sampler is not None else None
        if ds.rank is None and config.world_size > 1:  # rank and world size from torch.distributed
            settings = {**ds._settings(config), **ds._values_settings(), "epoch": self.epoch, "resume_at": self._state.position,
                        "elastic": [list(step) for step in self._elastic]}  # fmt: skip
            if sequence is not None:  # a sampler must give every rank the same sequence
                settings["sampled"] = hashlib.sha1(sequence.tobytes()).hexdigest()
            check_same_on_every_rank(settings)
        if ahead is not None:
            self._plan = ahead.plan
        elif self._elastic:  # the rest of an epoch interrupted at another world size
            self._plan = elastic_plan(config, self.epoch, cells, sequence, self._elastic)
        else:
            self._plan = plan_epoch(config, self.epoch, cells=cells, sequence=sequence)
        self._make = ds._batch_maker()

    def _read(self, load: int) -> tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]]:
        """Load ``load`` from the workers if they are (or become) ours, else read it in this thread."""
        try:
            return self._read_load(load)
        except (OSError, ArrayloadersError) as e:
            # A store converted again under the loop breaks reads (its old files are gone): say that, not what broke.
            try:
                self.dataset._check_stores_unchanged(reachable_only=True)
            except ArrayloadersError as changed:
                raise changed from e
            raise

    def _read_load(self, load: int) -> tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]]:
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
            state.run = ds._start_run(plan, list(range(load, len(plan.loads))), self._seq, self._cells)
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
            ds._rt().stats.load(spec.n_rows, here=True)
        # After the load is read: rows read from a store converted again before this point are never yielded.
        # A remote store's manifest is checked once per loop (a request): its range requests name the version of
        # each object they read (If-Match), so a replaced object fails them instead.
        ds._check_stores_unchanged(local_only=self._remote_checked)
        self._remote_checked = True
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
