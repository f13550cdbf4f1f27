"""Checkpoints: a dataset's ``state_dict`` and ``load_state_dict``, and what they compare.

A state records the current epoch, how far the furthest running loop has
come and the sizes that loop runs with, and what the batch sequence depends
on (the data's identity, sizes, selection), so that a restored dataset yields
exactly the rest of the epoch, or refuses a state of other data. It is the
same on every rank (ranks run in step), and resumes at another world size:
the rest of the epoch is then spread over the new ranks (``elastic.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

from .elastic import Chain, elastic_config
from .plan import PlanConfig

__all__ = ["SHAPE", "ResumeMixin"]

# Settings a restored epoch keeps from its state: the sizes its batches were cut with (``load_state_dict``).
SHAPE = ("batch_size", "chunk_size", "preload_nchunks", "shuffle", "drop_last", "equalize", "window")


class ResumeMixin:
    """The checkpoint methods of a dataset (``ZarrSparseDataset``/``ZarrDenseDataset``)."""

    def state_dict(self) -> dict:
        """Where training stands: restore it with :meth:`load_state_dict` to yield exactly the rest.

        Holds the seed, the current epoch and how many of its batches the
        furthest *running* loop over it has handed out (a loop left early or
        a peek no longer counts: the next loop starts the epoch again, and so
        does a restored one), with the sizes that loop runs with (a
        ``batch_size`` changed while it runs applies from the next epoch).
        After a complete epoch it points at the start of the next. Also
        holds what the batch sequence depends on, to refuse a mismatch: the
        data's identity (each store's ``store_id``; a digest of added
        AnnData objects' obs names), sizes and selection.

        Under DDP the state is the same on every rank (ranks yield batches in
        step), so rank 0's is enough, as Lightning saves it; every rank
        loads it. It resumes at another world size too: the cells the
        interrupted epoch had not yet yielded on any rank are then yielded
        exactly once across the new ranks (each rank padded by at most one
        cell so that all yield the same number of batches), and later epochs
        are those of the new world size. ``rank`` is recorded for
        information only.
        """
        epoch, start, config, chain = self._current_epoch()
        return {
            "epoch": epoch,
            "batches_yielded": start,
            "seed": config.seed,
            "rank": config.rank,
            "world_size": config.world_size,
            "elastic": [list(step) for step in chain],
            "settings": self._settings(config),
        }

    def _current_epoch(self) -> tuple[int, int, PlanConfig, Chain]:
        """(epoch, next batch, plan settings, earlier world sizes) of the current epoch: the furthest running
        loop's, if one runs (it keeps the sizes it started with), else where the next loop starts. The settings
        are the epoch's own, before an elastic resume turned them into those of its rest."""
        rt = self._rt()
        with rt.lock:
            epoch, start, shape, chain = self._epoch, self._start, self._start_shape, self._start_elastic
            loops = [it for it in list(rt.loops) if it.dataset is self and it.epoch == epoch]
        running = [it for it in loops if it._state.handed and not it._state.done and it._plan is not None]
        furthest = max(running, key=lambda it: it.position, default=None)
        if furthest is not None:
            return epoch, furthest.position, furthest._config, furthest._elastic
        return epoch, start, self._plan_config(shape), chain

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next loop yields the batches its epoch had left.

        The rest of that epoch is cut with the sizes the state was saved
        with (``batch_size``, ``chunk_size``...), as the interrupted run
        would have cut it; later epochs use the dataset's own.

        Raises
        ------
        ValueError
            If ``state`` is not a dataset's state, or the dataset differs in
            what the batch sequence depends on: the data (another store, or
            the same inputs converted again), cells, file sizes, selection.
            Neither the world size nor the rank need match (see :meth:`state_dict`).
        """
        keys = ("epoch", "batches_yielded", "seed", "rank", "world_size", "settings")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            lacking = [k for k in keys if not isinstance(state, dict) or k not in state]
            raise ValueError(
                f"cannot resume: not a state_dict() of a {type(self).__name__} (it lacks {lacking}); "
                "a StoreDataModule's state holds one under 'train'"
            )
        config = self._plan_config()
        mine = {**self._settings(config), "rank": config.rank, "world_size": config.world_size}
        theirs = {**state["settings"], "rank": state["rank"], "world_size": state["world_size"]}
        # Sizes first: they say the most about what differs; then the data's identity (same sizes, other cells).
        differing = sorted(k for k in mine if k not in ("seed", "data", "rank", "world_size", *SHAPE)
                           and mine[k] != theirs.get(k))  # fmt: skip
        if differing:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r}, now {mine[k]!r}" for k in differing)
            raise ValueError(f"cannot resume: the state was saved with other settings ({detail})")
        if theirs.get("data") is None:
            warnings.warn(
                "the state records no identity of its data (saved by an earlier arrayloaders): it cannot be "
                "checked to come from this store",
                stacklevel=2,
            )
        elif theirs["data"] != mine["data"]:
            raise ValueError(
                f"cannot resume: the state was saved on other data ({'; '.join(theirs['data'])}), this dataset reads "
                f"{'; '.join(mine['data'])}: a state resumes only the stores it was taken on (a store converted "
                "again has a new store_id)"
            )
        self.seed = state["seed"]
        epoch, yielded = int(state["epoch"]), int(state["batches_yielded"])
        chain: Chain = tuple((int(w), int(p)) for w, p in state.get("elastic", ()))
        # Every size the saved position counts in, so that sizes set after this call cannot move it either.
        shape = {k: theirs.get(k, mine[k]) for k in SHAPE}
        saved = dataclasses.replace(self._plan_config(shape), world_size=int(state["world_size"]), rank=0)
        if yielded >= elastic_config(saved, chain).n_batches:  # saved after a complete epoch: go on with the next
            epoch, yielded, chain = epoch + 1, 0, ()
        elif saved.world_size != config.world_size:  # elastic: the rest of the epoch over this world size
            chain, yielded = (*chain, (saved.world_size, yielded)), 0
            elastic_config(self._plan_config(shape), chain)  # refuse now a rest too small for the ranks
        with self._rt().lock:
            self._epoch, self._start = epoch, yielded
            self._start_shape = shape if yielded or chain else None
            self._start_elastic = chain

    def _settings(self, config: PlanConfig) -> dict:
        return {
            "seed": config.seed, "n_obs": config.n_obs, "file_n_obs": list(config.file_n_obs),
            "batch_size": config.batch_size, "chunk_size": config.chunk_size,
            "preload_nchunks": config.preload_nchunks, "shuffle": config.shuffle, "drop_last": config.drop_last,
            "equalize": config.equalize, "window": config.window, "n_selected": config.n_selected,
            "selection": self._selection_id(), "data": list(self._data_ids),
        }  # fmt: skip

    def _values_settings(self) -> dict:
        """What the ranks must agree on besides the plan: what each batch holds."""
        genes = self._row_format().genes
        chosen = None if genes is None else hashlib.sha1(genes.columns.tobytes()).hexdigest()
        return {
            "genes": chosen, "layer": self.layer, "obs_keys": list(self._obs.keys) if self._obs else [],
            "obsm_keys": list(self._obsm or ()), "dense": self._dense_output,
        }  # fmt: skip
