"""StoreDataModule under a real Lightning Trainer: workers started once, exact resume, scvi-style batches.

The scvi-tools model itself trains in ``test_scvi.py`` (scvi-tools needs Python 3.12).
"""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import read_store, worker_pids

from arrayloaders import ZarrSparseDataset
from arrayloaders.lightning import StoreDataModule


class Recorder(pl.LightningModule):
    """A linear model that records the rows (``ind_x``) of every batch it sees, per epoch and stage."""

    def __init__(self, n_vars: int):
        super().__init__()
        self.lin = torch.nn.Linear(n_vars, 2)
        self.rows: dict[tuple[str, int], list[int]] = {}
        self.workers: list[list[int]] = []

    def _record(self, stage, batch):
        assert batch["X"].layout == torch.strided and batch["X"].dtype == torch.float32
        self.rows.setdefault((stage, self.current_epoch), []).extend(batch["ind_x"].ravel().tolist())
        return self.lin(batch["X"]).pow(2).mean()

    def training_step(self, batch, i):
        return self._record("train", batch)

    def validation_step(self, batch, i):
        self._record("sanity" if self.trainer.sanity_checking else "val", batch)

    def on_train_epoch_start(self):
        self.workers.append(worker_pids())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def trainer(**kw) -> pl.Trainer:
    kw = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, **kw}  # fmt: skip
    return pl.Trainer(**kw)


def module(store, **kw) -> StoreDataModule:
    kw = {"batch_size": 64, "batch_key": "batch", "labels_key": "cell_type", "chunk_size": 8, "preload_nchunks": 8,
          "num_workers": 2, "train_size": 0.8, **kw}  # fmt: skip
    return StoreDataModule(store, **kw)


def test_a_lightning_fit_starts_the_workers_once_and_sees_every_cell_once_per_epoch(store):
    dm = module(store)
    model = Recorder(dm.n_vars)
    trainer(max_epochs=3, num_sanity_val_steps=2).fit(model, dm)
    train, val = np.sort(dm.train_idx), np.sort(dm.val_idx)
    assert train.size == 800 and val.size == 200 and not np.intersect1d(train, val).size
    assert len(model.rows["sanity", 0]) == 2 * 64  # num_sanity_val_steps=2: a peek at validation
    for epoch in range(3):
        assert np.array_equal(np.sort(model.rows["train", epoch]), train)
        assert np.array_equal(np.sort(model.rows["val", epoch]), val)
    assert len(model.workers) == 3 and len(model.workers[0]) == 2
    assert model.workers[0] == model.workers[1] == model.workers[2] == worker_pids()  # never restarted
    orders = [model.rows["train", e] for e in range(3)]
    assert all(orders[a] != orders[b] for a, b in ((0, 1), (0, 2), (1, 2)))  # shuffled anew each epoch
    assert model.rows["val", 0] == model.rows["val", 1] == model.rows["val", 2]  # validation in one fixed order
    dm.close()
    assert worker_pids() == []


class Crash(pl.Callback):
    """Stops training with an error at a given step, as a preempted job does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Preempted(self.step)


class Preempted(Exception):
    pass


@pytest.mark.parametrize("saved_at", [1, 5, 12])  # in the first load, mid-epoch, at the epoch's last batch
def test_resuming_from_a_mid_epoch_checkpoint_yields_exactly_the_remaining_batches(store, tmp_path, saved_at):
    """A checkpoint saved by ModelCheckpoint mid-epoch holds the dataset's position (Lightning saves the
    loader's state with the loop's); the run resumed from it must neither repeat nor skip a batch."""
    reference = Recorder(module(store).n_vars)
    trainer(max_epochs=2, num_sanity_val_steps=0).fit(reference, module(store))
    assert len(reference.rows["train", 0]) == 800  # 13 batches: 12 of 64, one of 32
    first = Recorder(reference.lin.in_features)
    every = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=saved_at, save_top_k=-1, filename="{step}")
    crashing = trainer(max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=True, callbacks=[every, Crash(saved_at + 1)])
    with pytest.raises(Preempted):
        crashing.fit(first, module(store))
    assert len(first.rows["train", 0]) == min((saved_at + 1) * 64, 800)  # it went on one batch past the checkpoint
    resumed = Recorder(reference.lin.in_features)
    ckpt = tmp_path / f"step={saved_at}.ckpt"
    trainer(max_epochs=2, num_sanity_val_steps=0).fit(resumed, module(store), ckpt_path=ckpt)
    done = first.rows["train", 0][: saved_at * 64]
    assert done + resumed.rows.get(("train", 0), []) == reference.rows["train", 0]  # same batches, same order
    assert resumed.rows["train", 1] == reference.rows["train", 1]
    assert resumed.rows["val", 1] == reference.rows["val", 1]


def test_batches_are_scvi_dicts_with_codes_of_any_dtype(store):
    dm = module(store, categorical_covariate_keys=["batch"], continuous_covariate_keys=["batch"], train_size=1.0)
    whole = read_store(store)
    batch_ids = np.asarray(whole.obs["batch"])  # an int column: codes into its sorted values
    assert list(dm.batch_labels) == sorted(set(batch_ids.tolist())) and dm.n_batch == len(set(batch_ids.tolist()))
    cell_types = list(whole.obs["cell_type"].astype(str))
    assert dm.n_labels == len(set(cell_types)) + 1  # the labels and the unlabeled category
    seen = 0
    for raw in dm.train_dataloader():
        b = dm.on_after_batch_transfer(dm.on_before_batch_transfer(raw, 0), 0)
        rows = b["ind_x"].ravel().numpy()
        n = rows.size
        assert set(b) == {"X", "batch", "labels", "ind_x", "extra_categorical_covs", "extra_continuous_covs"}
        for key in ("batch", "labels", "ind_x"):
            assert b[key].shape == (n, 1) and b[key].dtype == torch.int64
        np.testing.assert_array_equal(dm.batch_labels[b["batch"].ravel().numpy()], batch_ids[rows])
        assert list(dm.labels_mapping[b["labels"].ravel().numpy()]) == [cell_types[r] for r in rows]
        np.testing.assert_array_equal(b["extra_categorical_covs"].numpy(), b["batch"].numpy())
        np.testing.assert_array_equal(b["extra_continuous_covs"].ravel().numpy(), batch_ids[rows].astype(np.float32))
        X = whole.X[rows]
        np.testing.assert_array_equal(b["X"].numpy(), X.toarray().astype(np.float32))
        seen += n
    assert seen == dm.n_obs


def test_missing_labels_are_the_unlabeled_category_and_a_missing_batch_is_refused(tmp_path):
    import anndata as ad

    from arrayloaders import create_store_from_h5ads
    from arrayloaders.example_data import make_example_adata

    paths = []
    for i, n in enumerate((60, 40)):
        a = make_example_adata(n, 30, nnz_per_cell=5, seed=i, name_prefix=f"f{i}-")
        a.obs["cell_type"] = a.obs["cell_type"].astype(object)
        a.obs.iloc[::3, a.obs.columns.get_loc("cell_type")] = None  # unlabeled cells
        a.obs["donor"] = pd_int_with_missing(n, i)
        paths.append(tmp_path / f"{i}.h5ad")
        ad.AnnData(a.X, obs=a.obs, var=a.var).write_h5ad(paths[-1])
    store = create_store_from_h5ads(paths, tmp_path / "store", progress=False)
    dm = StoreDataModule(store, labels_key="cell_type", num_workers=0, train_size=1.0, unlabeled_category="none")
    assert dm.labels_mapping[-1] == "none"
    labels = np.concatenate([dm.on_before_batch_transfer(b, 0)["labels"].ravel().numpy() for b in dm.train_dataloader()])
    unlabeled = dm.n_labels - 1
    assert (labels == unlabeled).sum() == sum(len(range(0, n, 3)) for n in (60, 40))
    assert (dm.labels_ == "none").sum() == (labels == unlabeled).sum()
    with pytest.raises(ValueError, match=r"'donor' \(batch_key\) is missing for some cells"):
        StoreDataModule(store, batch_key="donor", num_workers=0)


def pd_int_with_missing(n: int, seed: int):
    import pandas as pd

    values = pd.array(np.random.default_rng(seed).integers(0, 3, n), dtype="Int64")
    values[0] = pd.NA
    return values


def test_split_and_batch_size_follow_scvi_tools_calls(store):
    dm = module(store, num_workers=0)
    dm.set_split(train_size=0.5, validation_size=0.25, shuffle_set_split=False, batch_size=32)
    assert np.array_equal(dm.train_idx, np.arange(500)) and np.array_equal(dm.val_idx, np.arange(500, 750))
    assert np.array_equal(dm.test_idx, np.arange(750, 1000)) and (dm.n_train, dm.n_val) == (500, 250)
    assert len(dm.train_dataloader()) == 500 // 32 + 1 and len(dm.val_dataloader()) == 250 // 32 + 1
    assert all(x.shape[0] == 32 for x, *_ in list(dm.train_dataloader())[:-1])
    dm.set_split(train_size=1.0)
    assert dm.val_dataloader() == [] and dm.train_dataloader() is dm.dataset
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        dm.set_batch_size(0)
    with pytest.raises(ValueError, match="more than 1"):
        dm.set_split(train_size=0.8, validation_size=0.5)


def test_the_inference_dataloader_gives_every_cell_once_in_store_order_with_its_name(store):
    dm = module(store)
    loader = dm.inference_dataloader(batch_size=100)
    rows = np.concatenate([b["ind_x"].ravel().numpy() for b in loader])
    assert np.array_equal(rows, np.arange(dm.n_obs))
    whole = read_store(store)
    assert list(dm.obs_names) == list(whole.obs_names) == list(loader.obs_names)
    some = dm.inference_dataloader(cells=[5, 3, 900])
    assert np.array_equal(np.concatenate([b["ind_x"].ravel().numpy() for b in some]), [3, 5, 900])
    assert list(some.obs_names) == list(whole.obs_names[[3, 5, 900]])
    dm.close()


def test_the_datamodule_state_round_trips_and_refuses_another_split(store):
    dm = module(store, num_workers=0)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    again = module(store, num_workers=0)
    again.load_state_dict(state)
    assert again.train_dataloader().state_dict() == dm.train_dataloader().state_dict()
    for other in (module(store, num_workers=0, train_size=0.5), module(store, num_workers=0, seed=1)):
        with pytest.raises(ValueError, match=r"saved with another split of the cells \(800 training and 200 valid"):
            other.load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stateful_dataloader_round_trip_resumes_mid_epoch(store, num_workers):
    """torchdata's StatefulDataLoader around the dataset (batch_size=None: the dataset batches), state saved
    mid-epoch and loaded into a fresh loader over a fresh dataset."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def dataset():
        return ZarrSparseDataset(50, 8, 8, num_workers=num_workers, return_index=True).add_store(store)

    reference = [idx.tolist() for _, _, idx in StatefulDataLoader(dataset(), batch_size=None)]
    loader = StatefulDataLoader(dataset(), batch_size=None)
    it = iter(loader)
    head = [next(it)[2].tolist() for _ in range(7)]
    state = loader.state_dict()
    del it
    fresh = StatefulDataLoader(dataset(), batch_size=None)
    fresh.load_state_dict(state)
    tail = [idx.tolist() for _, _, idx in fresh]
    assert head + tail == reference


def test_arrayloaders_imports_without_lightning():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import arrayloaders; arrayloaders.ZarrSparseDataset\n"
        "try:\n    import arrayloaders.lightning\nexcept ImportError as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "arrayloaders[lightning]"' in res.stdout


class GrowBatches(pl.Callback):
    """Sets the data module's batch size at a step mid-epoch, as scvi-tools or a user's callback may."""

    def __init__(self, step: int, batch_size: int):
        self.step, self.batch_size = step, batch_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.datamodule.set_batch_size(self.batch_size)


@pytest.mark.parametrize("grown", [128, 40])
def test_a_batch_size_changed_mid_epoch_resumes_exactly_from_a_checkpoint(store, tmp_path, grown):
    """The running epoch keeps its batch size; a checkpoint taken after the change must resume that epoch as it
    was cut (it used to record the new size with the old position: cells repeated or skipped). Lightning
    counts an epoch's batches when it loads the dataloaders: it must reload them to see the new size."""
    kw = {"max_epochs": 2, "num_sanity_val_steps": 0, "reload_dataloaders_every_n_epochs": 1}
    reference = Recorder(module(store).n_vars)
    trainer(**kw, callbacks=[GrowBatches(3, grown)]).fit(reference, module(store))
    assert len(reference.rows["train", 0]) == len(reference.rows["train", 1]) == 800
    first = Recorder(reference.lin.in_features)
    every = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    with pytest.raises(Preempted):
        trainer(**kw, enable_checkpointing=True, callbacks=[GrowBatches(3, grown), every, Crash(7)]).fit(first, module(store))
    resumed = Recorder(reference.lin.in_features)
    trainer(**kw).fit(resumed, module(store), ckpt_path=tmp_path / "step=6.ckpt")
    done = first.rows["train", 0][: 6 * 64]
    assert done + resumed.rows.get(("train", 0), []) == reference.rows["train", 0]  # neither repeated nor skipped
    assert resumed.rows["train", 1] == reference.rows["train", 1]  # the next epoch at the new size


def test_a_batch_size_change_lightning_would_not_see_is_refused(store):
    """Without reloading, Lightning keeps the batch count it took at the start: a smaller batch size would
    leave each later epoch unfinished, and the next would repeat it."""
    with pytest.raises(RuntimeError, match=r"set_batch_size\(40\) while Trainer.fit runs: .*reload_dataloaders_every_n_epochs=1"):
        trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[GrowBatches(3, 40)]).fit(Recorder(400), module(store))
    dm = module(store)
    dm.set_batch_size(40)  # outside a fit: as before
    with pytest.raises(RuntimeError, match=r"set_split\(\) while Trainer.fit runs"):
        trainer(max_epochs=1, callbacks=[Resplit()]).fit(Recorder(400), dm)


class Resplit(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.datamodule.set_split(train_size=0.5)


def test_a_store_in_a_bucket_trains_as_the_store_on_disk(store, s3_server):
    """StoreDataModule("s3://...", storage_options=...): the same cells, in the same order, as from disk."""
    import uuid

    from test_remote import options, upload

    url = upload(store, s3_server, f"lightning/{uuid.uuid4().hex}")
    models = []
    for where, extra in ((store, {}), (url, {"storage_options": options(s3_server)})):
        dm = module(where, **extra)
        model = Recorder(dm.n_vars)
        trainer(max_epochs=2, num_sanity_val_steps=0).fit(model, dm)
        models.append((model.rows, list(dm.obs_names), dm.train_idx.copy()))
        dm.close()
    (local_rows, local_names, local_train), (remote_rows, remote_names, remote_train) = models
    assert np.array_equal(local_train, remote_train) and local_names == remote_names
    assert local_rows == remote_rows and len(local_rows["train", 1]) == 800
