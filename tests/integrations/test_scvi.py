"""scvi-tools' SCVI trained from a store through StoreDataModule, with no glue: the README's example."""

from __future__ import annotations

import sys

import pytest

if sys.version_info < (3, 12):
    pytest.skip(
        "scvi-tools >= 1.4 needs Python 3.12: scripts/test.sh runs this file in its Python 3.12 step",
        allow_module_level=True,
    )

import numpy as np
import scvi
import torch
from conftest import read_store

from arrayloaders.lightning import StoreDataModule


@pytest.fixture(scope="module")
def trained(store):
    scvi.settings.seed = 0
    dm = StoreDataModule(store, batch_size=128, batch_key="batch", labels_key="cell_type", num_workers=2)
    model = scvi.model.SCVI(registry=dm.registry, n_latent=5, n_hidden=32)
    model.train(max_epochs=2, datamodule=dm, accelerator="cpu", check_val_every_n_epoch=1,
                enable_progress_bar=False)  # fmt: skip
    yield dm, model
    dm.close()


def test_scvi_trains_from_a_store_and_its_loss_falls(trained):
    dm, model = trained
    history = model.history
    train = history["elbo_train"]["elbo_train"].to_numpy(dtype=float)
    val = history["elbo_validation"]["elbo_validation"].to_numpy(dtype=float)
    assert train.size == 2 and val.size == 2 and np.isfinite(val).all()
    assert train[1] < train[0]
    assert model.module.n_batch == dm.n_batch == 4  # the int batch column, as codes
    assert model.summary_stats.n_vars == dm.n_vars
    assert dm.n_train + dm.n_val == dm.n_obs and dm.n_val > 0


def test_the_latent_representation_comes_in_store_order_with_the_obs_names(trained, store):
    dm, model = trained
    loader = dm.inference_dataloader()
    z = model.get_latent_representation(dataloader=loader)
    assert z.shape == (dm.n_obs, 5) and np.isfinite(z).all()
    assert list(loader.obs_names) == list(read_store(store).obs_names)
    # row i is cell i: the same cells alone give the same rows
    some = [3, 500, 999]
    z_some = model.get_latent_representation(dataloader=dm.inference_dataloader(cells=some))
    np.testing.assert_allclose(z_some, z[some], rtol=1e-5, atol=1e-6)


def test_the_registry_describes_the_store(trained):
    dm, model = trained
    registry = dm.registry
    assert registry["setup_method_name"] == "setup_datamodule"
    assert registry["field_registries"]["X"]["state_registry"]["column_names"] == list(read_var_names(dm))
    labels = registry["field_registries"]["labels"]["state_registry"]["categorical_mapping"]
    assert labels[-1] == "Unknown" and len(labels) == dm.n_labels
    assert torch.equal(torch.as_tensor(model.module.n_batch), torch.as_tensor(4))


def read_var_names(dm):
    return dm.dataset.var_names
