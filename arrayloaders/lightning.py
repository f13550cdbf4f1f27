"""Lightning and scvi-tools: :class:`StoreDataModule`, a ``LightningDataModule`` over a store.

Needs the ``lightning`` extra (``pip install "arrayloaders[lightning]"``);
``import arrayloaders`` works without it.

The module hands Lightning the datasets themselves as its dataloaders, so
the worker processes start once and serve every epoch, and Lightning's
checkpoints hold their positions (a dataset has ``state_dict`` and
``load_state_dict``: Lightning saves and restores them as it does a
stateful dataloader's). Batches become the dicts scvi-tools' modules take:
``X`` (float32, dense; a sparse batch is densified after it reached the
device, so a GPU receives the compact CSR form), ``batch`` and ``labels``
((n, 1) int64 codes), ``extra_categorical_covs`` / ``extra_continuous_covs``
when asked for, and ``ind_x``, each cell's row in the store. The scvi-tools
side (``registry``, ``set_split``, ``set_batch_size``, ``n_batch``...) is
the contract its custom-dataloader path reads; scvi-tools itself is not
imported.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'arrayloaders.lightning needs Lightning: pip install "arrayloaders[lightning]" (or pip install lightning)'
    ) from e

from .loading.dataset import ZarrDenseDataset, ZarrSparseDataset, _cache_spec, _ZarrDataset
from .store.location import store_location
from .store.manifest import read_manifest
from .store.obs import read_obs

__all__ = ["StoreDataModule"]

UNLABELED = "Unknown"


class StoreDataModule(pl.LightningDataModule):
    """Train and validation datasets over one store, for Lightning and scvi-tools.

    Parameters
    ----------
    store
        A store made by ``create_store_from_h5ads``.
    batch_size
        Cells per batch (scvi-tools sets it again through :meth:`set_batch_size`).
    batch_key, labels_key
        obs columns of the batch (e.g. sample or donor) and of the labels
        (e.g. cell type): any dtype, yielded as codes into their
        categories (ints too). A cell without a label gets
        ``unlabeled_category``; every cell must have a batch.
    categorical_covariate_keys, continuous_covariate_keys
        More obs columns, as scvi-tools' ``extra_categorical_covs`` (codes)
        and ``extra_continuous_covs`` (float32).
    train_size, validation_size
        Fractions of the cells for training and validation (default: 90 %
        and the rest); the cells are drawn at random with ``seed``, from
        the ``cells=`` selection if one is given. Both datasets read the
        same store and share the worker processes.
    seed
        Seed of the split and of the training shuffle.
    layer
        Read this layer instead of X.
    unlabeled_category
        The label of cells whose label is missing.
    storage_options
        For a store in object storage (``store="s3://bucket/prefix"``): the
        keyword arguments of ``obstore.store.from_url``, as for
        :meth:`~arrayloaders.ZarrSparseDataset.add_store`.
    cache_dir, cache_bytes
        For a store in object storage: a local cache of the bytes fetched, as
        for :meth:`~arrayloaders.ZarrSparseDataset.add_store`.
    **dataset_kwargs
        Passed to :class:`~arrayloaders.ZarrSparseDataset` (or
        ``ZarrDenseDataset`` for a dense store): ``chunk_size``,
        ``preload_nchunks``, ``num_workers``, ``memory_budget``,
        ``pin_memory``, ``var_names``... ``cells=`` selects the cells that
        are split into training and validation (the others are in neither);
        ``sampler=`` draws the training cells itself, so it needs
        ``train_size=1.0`` (``model.train(train_size=1.0)`` with scvi-tools):
        a split it would ignore is refused. :meth:`inference_dataloader`
        gives every cell of the store whatever these select.

    Examples
    --------
    >>> dm = StoreDataModule("store", batch_key="batch", labels_key="cell_type")
    >>> model = scvi.model.SCVI(registry=dm.registry)
    >>> model.train(max_epochs=10, datamodule=dm)
    >>> z = model.get_latent_representation(dataloader=dm.inference_dataloader())  # row i: dm.obs_names[i]
    """

    def __init__(
        self,
        store: str | os.PathLike,
        batch_size: int = 128,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        seed: int = 0,
        layer: str | None = None,
        unlabeled_category: str = UNLABELED,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int | str | None = None,
        **dataset_kwargs,
    ):
        super().__init__()
        self.store = store
        # credentials stay in the location (never an attribute of their own: a checkpoint or a log may show those)
        self._location = store_location(store, storage_options, _cache_spec(store, cache_dir, cache_bytes))
        self.batch_key, self.labels_key = batch_key, labels_key
        self.categorical_covariate_keys = list(categorical_covariate_keys or [])
        self.continuous_covariate_keys = list(continuous_covariate_keys or [])
        self.unlabeled_category, self.seed, self.layer = unlabeled_category, seed, layer
        manifest = read_manifest(self._location)
        codes = [k for k in (batch_key, labels_key, *self.categorical_covariate_keys) if k is not None]
        keys = list(dict.fromkeys(codes + self.continuous_covariate_keys))
        kind = ZarrDenseDataset if manifest.x_format == "dense" else ZarrSparseDataset
        cells, self.sampler = dataset_kwargs.pop("cells", None), dataset_kwargs.pop("sampler", None)
        if cells is not None and self.sampler is not None:
            raise ValueError("give cells= (the cells to split and train on) or sampler= (your own order), not both")
        dataset_kwargs = {"return_index": True, "shuffle": True, **dataset_kwargs}
        # Every cell of the store: the inference loader's, and what the training and validation datasets narrow.
        self.dataset: _ZarrDataset = kind(batch_size, seed=seed, layer=layer, **dataset_kwargs)
        self.dataset.add_store(self._location, obs_keys=keys, obs_codes=codes)
        self.cells: np.ndarray | None = None if cells is None else self.dataset.subset(cells=cells).cells
        self._var_names = list(manifest.var_names)
        self._obs_names: pd.Index | None = None
        if batch_key is not None and (self._codes(batch_key) < 0).any():
            raise ValueError(f"{store}: obs column {batch_key!r} (batch_key) is missing for some cells; every cell needs a batch")
        self.batch_size = batch_size
        self.train_dataset: _ZarrDataset = self.dataset
        self.val_dataset: _ZarrDataset | None = None
        self.train_idx = self.val_idx = self.test_idx = np.empty(0, np.int64)
        self.set_split(train_size, validation_size)

    # ------------------------------------------------------------------ split and batch size (scvi-tools calls these)

    def set_split(
        self,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int | None = None,
    ) -> None:
        """Split the cells into training, validation and the rest (the test set, not loaded).

        Of the ``n`` cells (the ``cells=`` selection, or every cell),
        ``ceil(train_size * n)`` cells train and ``floor(validation_size *
        n)`` validate (default: all the others), drawn at random with the
        module's seed, or the first and next ones in store order if not
        ``shuffle_set_split``. ``batch_size`` as :meth:`set_batch_size`.
        With ``sampler=`` only ``train_size=1`` is accepted.
        """
        self.set_batch_size(batch_size)
        if train_size is None and validation_size is None:
            return
        self._refuse_while_fitting("set_split()")
        train_size = 1.0 - validation_size if train_size is None else train_size
        if not 0 < train_size <= 1 or (validation_size is not None and not 0 <= validation_size < 1):
            raise ValueError(f"train_size must be in (0, 1] and validation_size in [0, 1), got {train_size}, {validation_size}")
        pool = np.arange(self.dataset.n_obs, dtype=np.int64) if self.cells is None else self.cells
        n = pool.size
        n_train = math.ceil(train_size * n)
        n_val = n - n_train if validation_size is None else math.floor(validation_size * n)
        if n_train + n_val > n:
            raise ValueError(f"train_size + validation_size = {train_size + validation_size} is more than 1")
        if self.sampler is not None and n_train < n:
            raise ValueError(
                f"train_size={train_size}: sampler= draws the training cells itself and would ignore a split; "
                "pass train_size=1.0 (model.train(train_size=1.0) with scvi-tools), or cells= to split a selection"
            )
        order = np.random.default_rng(self.seed).permutation(n) if shuffle_set_split else np.arange(n)
        self.train_idx = np.sort(pool[order[:n_train]])
        self.val_idx = np.sort(pool[order[n_train : n_train + n_val]])
        self.test_idx = np.sort(pool[order[n_train + n_val :]])
        if self.sampler is not None:
            self.train_dataset = self.dataset.subset(sampler=self.sampler)
        elif n_train == self.dataset.n_obs:
            self.train_dataset = self.dataset
        else:
            self.train_dataset = self.dataset.subset(cells=self.train_idx)
        self.val_dataset = None
        if n_val:
            self.val_dataset = self.dataset.subset(cells=self.val_idx)
            self.val_dataset.shuffle = False  # the same batches every time: comparable validation losses
        self.set_batch_size(self.batch_size)

    def set_batch_size(self, batch_size: int | None = None) -> None:
        """Cells per batch of both datasets, from their next epoch on (``None``: unchanged).

        While a ``Trainer.fit`` runs, only with ``Trainer(reload_dataloaders_every_n_epochs=1)``: Lightning
        counts an epoch's batches when it loads the dataloaders, and would cut later epochs short.
        """
        if batch_size is None:
            return
        if not isinstance(batch_size, int | np.integer) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(batch_size) != self.batch_size:
            self._refuse_while_fitting(f"set_batch_size({batch_size})")
        self.batch_size = int(batch_size)
        for ds in (self.dataset, self.train_dataset, self.val_dataset):
            if ds is not None:
                ds.batch_size = self.batch_size

    def _refuse_while_fitting(self, call: str) -> None:
        """Refuse a change Lightning would not see while it fits: it counted each epoch's batches, and holds
        the datasets, when it loaded the dataloaders (a smaller batch size would cut every later epoch short,
        its last batches never delivered, and the next epoch would repeat it)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.reload_dataloaders_every_n_epochs:
            return
        if trainer.state.fn == "fit" and trainer.state.status == "running":
            raise RuntimeError(
                f"{call} while Trainer.fit runs: Lightning counted each epoch's batches when fit began; set it "
                "before fit (as scvi-tools does), or make the Trainer with reload_dataloaders_every_n_epochs=1"
            )

    @property
    def n_train(self) -> int:
        return int(self.train_idx.size)

    @property
    def n_val(self) -> int:
        return int(self.val_idx.size)

    # ------------------------------------------------------------------ Lightning

    def train_dataloader(self) -> _ZarrDataset:
        """The training dataset itself (shuffled; workers kept across epochs)."""
        return self.train_dataset

    def val_dataloader(self) -> _ZarrDataset | list:
        """The validation dataset itself, in store order (``[]`` without a validation set)."""
        return self.val_dataset if self.val_dataset is not None else []

    def on_before_batch_transfer(self, batch, dataloader_idx: int) -> dict[str, torch.Tensor]:
        """A ``(X, obs, index)`` batch as scvi-tools' dict; X stays as yielded (sparse: compact to move)."""
        return self._as_dict(batch)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """X densified as float32, where it now is (on the GPU, after the sparse copy)."""
        batch["X"] = _dense(batch["X"])
        return batch

    def state_dict(self) -> dict:
        """Where training and validation stand (epoch, batch), and the split, for exact resume."""
        state = {"batch_size": self.batch_size, "train": self.train_dataset.state_dict(), "split": self._split_id()}
        if self.val_dataset is not None:
            state["val"] = self.val_dataset.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("split") != self._split_id():
            raise ValueError(
                f"the checkpoint was saved with another split of the cells ({state.get('split')}), this module has "
                f"{self._split_id()}: make it with the same store, train_size, validation_size and seed"
            )
        self.set_batch_size(state["batch_size"])
        self.train_dataset.load_state_dict(state["train"])
        if self.val_dataset is not None and "val" in state:
            self.val_dataset.load_state_dict(state["val"])

    def _split_id(self) -> str:
        digest = hashlib.sha1(self.train_idx.tobytes() + b"|" + self.val_idx.tobytes()).hexdigest()[:12]
        return f"{self.n_train} training and {self.n_val} validation cells, sha1 {digest}"

    def close(self) -> None:
        """Stop the worker processes (they also stop when the module is garbage collected)."""
        self.dataset.close()

    # ------------------------------------------------------------------ inference

    def inference_dataloader(self, cells: np.ndarray | Sequence[int] | None = None, batch_size: int | None = None):
        """Every cell of the store once (or those of ``cells``), in store order, as dense scvi-tools dicts.

        For ``model.get_latent_representation(dataloader=...)``: row ``i`` of
        the result is cell ``i`` of :attr:`obs_names` (of
        ``obs_names[cells]``, with ``cells`` sorted, if given). Whatever
        the training settings (``cells=``, ``sampler=``, ``drop_last``, DDP
        ranks), it yields every cell asked for, in this process.
        """
        ds = self.dataset.subset(cells=cells)
        ds.shuffle, ds.drop_last, ds.rank, ds.world_size = False, False, 0, 1
        ds.batch_size = batch_size or self.batch_size
        return _DictBatches(ds, self)

    @property
    def obs_names(self) -> pd.Index:
        """The store's obs_names, in store order (read on first use)."""
        if self._obs_names is None:
            files = read_manifest(self._location).files
            self._obs_names = pd.Index(np.concatenate([read_obs(self._location, f["name"], columns=[]).index for f in files]))
        return self._obs_names

    # ------------------------------------------------------------------ the scvi-tools contract

    @property
    def n_obs(self) -> int:
        return self.dataset.n_obs

    @property
    def n_vars(self) -> int:
        return self.dataset.n_vars

    @property
    def batch_labels(self) -> np.ndarray:
        if self.batch_key is None:
            return np.array(["batch_0"], dtype=object)
        return np.array(self.dataset.categories[self.batch_key], dtype=object)

    @property
    def n_batch(self) -> int:
        return len(self.batch_labels)

    @property
    def labels_mapping(self) -> np.ndarray:
        """The label categories, with ``unlabeled_category`` last if no cell has it as its label."""
        if self.labels_key is None:
            return np.array([self.unlabeled_category], dtype=object)
        labels = [str(c) for c in self.dataset.categories[self.labels_key]]
        if self.unlabeled_category not in labels:
            labels.append(self.unlabeled_category)
        return np.array(labels, dtype=object)

    @property
    def n_labels(self) -> int:
        return len(self.labels_mapping)

    @property
    def labels_(self) -> np.ndarray:
        """Every cell's label (``unlabeled_category`` where missing), in store order: what SCANVI reads."""
        return self.labels_mapping[self._label_codes(np.arange(self.n_obs))]

    @property
    def n_cats_per_cov(self) -> list[int] | None:
        cats = [len(self.dataset.categories[k]) for k in self.categorical_covariate_keys]
        return cats or None

    @property
    def n_continuous_cov(self) -> int:
        return len(self.continuous_covariate_keys)

    @property
    def n_samples(self) -> int:
        return 0

    @property
    def registry(self) -> dict:
        """scvi-tools' registry of a model set up from this module (``scvi.model.SCVI(registry=dm.registry)``)."""
        import scvi  # only asked for by scvi-tools users

        cat_keys, cont_keys = self.categorical_covariate_keys, self.continuous_covariate_keys
        categorical = {"data_registry": {}, "state_registry": {}, "summary_stats": {"n_extra_categorical_covs": 0}}
        if cat_keys:
            mapping = {k: np.array(self.dataset.categories[k], dtype=object) for k in cat_keys}
            categorical = {
                "data_registry": {"attr_key": "_scvi_extra_categorical_covs", "attr_name": "obsm"},
                "state_registry": {"field_keys": cat_keys, "mapping": mapping, "n_cats_per_key": self.n_cats_per_cov},
                "summary_stats": {"n_extra_categorical_covs": len(cat_keys)},
            }
        continuous = {"data_registry": {}, "state_registry": {}, "summary_stats": {"n_extra_continuous_covs": 0}}
        if cont_keys:
            continuous = {
                "data_registry": {"attr_key": "_scvi_extra_continuous_covs", "attr_name": "obsm"},
                "state_registry": {"columns": np.array(cont_keys, dtype=object)},
                "summary_stats": {"n_extra_continuous_covs": len(cont_keys)},
            }
        return {
            "scvi_version": scvi.__version__,
            "model_name": "SCVI",
            "setup_args": {
                "layer": self.layer, "batch_key": self.batch_key, "labels_key": self.labels_key,
                "size_factor_key": None, "categorical_covariate_keys": cat_keys or None,
                "continuous_covariate_keys": cont_keys or None,
            },  # fmt: skip
            "field_registries": {
                "X": {
                    "data_registry": {"attr_name": "X", "attr_key": self.layer},
                    "state_registry": {"n_obs": self.n_obs, "n_vars": self.n_vars, "column_names": self._var_names},
                    "summary_stats": {"n_vars": self.n_vars, "n_cells": self.n_obs},
                },
                "batch": {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                    "state_registry": {"categorical_mapping": self.batch_labels, "original_key": self.batch_key or "batch"},
                    "summary_stats": {"n_batch": self.n_batch},
                },
                "labels": {
                    "data_registry": {"attr_name": "obs", "attr_key": "_scvi_labels"},
                    "state_registry": {
                        "categorical_mapping": self.labels_mapping,
                        "original_key": self.labels_key or "labels",
                        "unlabeled_category": self.unlabeled_category,
                    },
                    "summary_stats": {"n_labels": self.n_labels},
                },
                "size_factor": {"data_registry": {}, "state_registry": {}, "summary_stats": {}},
                "extra_categorical_covs": categorical,
                "extra_continuous_covs": continuous,
            },
            "setup_method_name": "setup_datamodule",
        }

    # ------------------------------------------------------------------ batches

    def _codes(self, key: str) -> np.ndarray:
        return self.dataset._obs.values[key]

    def _label_codes(self, rows: np.ndarray) -> np.ndarray:
        """Codes into :attr:`labels_mapping` of ``rows`` (missing labels: the unlabeled category)."""
        if self.labels_key is None:
            return np.zeros(rows.size, np.int64)
        codes = self._codes(self.labels_key)[rows].astype(np.int64)
        return np.where(codes < 0, self._unlabeled_code(), codes)

    def _unlabeled_code(self) -> int:
        return int(np.flatnonzero(self.labels_mapping == self.unlabeled_category)[0])

    def _as_dict(self, batch) -> dict[str, torch.Tensor]:
        X, obs, index = batch
        n = X.shape[0]
        out = {"X": X, "ind_x": index.reshape(n, 1)}
        out["batch"] = obs[self.batch_key].reshape(n, 1) if self.batch_key is not None else torch.zeros((n, 1), dtype=torch.int64)
        if self.labels_key is None:
            out["labels"] = torch.zeros((n, 1), dtype=torch.int64)
        else:  # a missing label (-1) is the unlabeled category
            codes = obs[self.labels_key]
            out["labels"] = torch.where(codes < 0, self._unlabeled_code(), codes).reshape(n, 1)
        if self.categorical_covariate_keys:
            out["extra_categorical_covs"] = torch.stack([obs[k] for k in self.categorical_covariate_keys], dim=1)
        if self.continuous_covariate_keys:
            out["extra_continuous_covs"] = torch.stack(
                [obs[k].to(torch.float32) for k in self.continuous_covariate_keys], dim=1
            )
        return out


def _dense(X: torch.Tensor) -> torch.Tensor:
    return (X.to_dense() if X.layout != torch.strided else X).to(torch.float32)


class _DictBatches:
    """A dataset's batches as dense scvi-tools dicts (for loops outside Lightning, such as scvi's inference)."""

    def __init__(self, dataset: _ZarrDataset, module: StoreDataModule):
        self.dataset, self._module = dataset, module

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.dataset:
            out = self._module._as_dict(batch)
            out["X"] = _dense(out["X"])
            yield out

    @property
    def obs_names(self) -> pd.Index:
        """The obs_names of the cells, in the order the batches hold them."""
        cells = self.dataset.cells
        names = self._module.obs_names
        return names if cells is None else names[cells]
