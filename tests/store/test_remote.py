"""Stores read from object storage: a real S3 server (SeaweedFS), the same batches as from disk.

(Faults, versions, the cache and secrets: ``test_remote_faults.py``.)

Each store is converted on disk, uploaded object by object, and read back
through ``s3://``; every batch is compared bit for bit with the same loop
over the local copy.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from arrayloaders import StoreError, ZarrDenseDataset, ZarrSparseDataset, read_manifest
from conftest import BUCKET, batch_bytes, until_workers_are_up

SECRET = "sEcReT-" + uuid.uuid4().hex  # a credential that must never show anywhere


def upload(local: Path, server, prefix: str) -> str:
    """Put every file of the store ``local`` under ``s3://BUCKET/prefix``; the manifest last, as a conversion does."""
    import obstore
    from obstore.store import from_url

    s3 = from_url(f"s3://{BUCKET}/{prefix}", **options(server))
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "arrayloaders.json")
    for path in files:
        obstore.put(s3, path.relative_to(local).as_posix(), path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def options(server, **extra) -> dict:
    """storage_options for the test server (auth off), bounded retries so that faults are quick."""
    return {"endpoint": server.endpoint, "region": "us-east-1", "skip_signature": True,
            "client_options": {"allow_http": True, "connect_timeout": "2s", "timeout": "10s"},
            "retry_config": {"max_retries": 2, "retry_timeout": timedelta(seconds=5),
                             "backoff": {"init_backoff": timedelta(seconds=0.05), "max_backoff": timedelta(seconds=0.5),
                                         "base": 2.0}}, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def remote_store(store, s3_server) -> str:
    return upload(store, s3_server, f"stores/{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def remote_dense_store(dense_store, s3_server) -> str:
    return upload(dense_store, s3_server, f"stores/{uuid.uuid4().hex}")


def batches(ds, epochs: int = 1) -> list[bytes]:
    """Every batch's bytes over ``epochs`` epochs, decoded by the workers (once they are up) if it has any."""
    if ds.num_workers:
        until_workers_are_up(ds)
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out += [batch_bytes(b) for b in ds]
    return out


CASES = {
    "plain": dict(),
    "cells": dict(cells=np.arange(3, 900, 7)),
    "sampler": dict(sampler="random"),
    "genes": dict(var_names="genes"),
}


def make(cls, case: str, n_obs: int, var_names, **kw):
    settings = dict(CASES[case])
    if settings.get("var_names") == "genes":
        settings["var_names"] = list(var_names[::7])
    if settings.get("sampler") == "random":
        settings["sampler"] = np.random.default_rng(5).integers(0, n_obs, 300)
    return cls(batch_size=64, chunk_size=32, preload_nchunks=4, seed=3, return_index=True, **settings, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("case", ["plain", "cells", "sampler", "genes"])
def test_remote_batches_are_the_local_ones(store, remote_store, s3_server, num_workers, case):
    manifest = read_manifest(store)
    local = make(ZarrSparseDataset, case, manifest.n_obs, manifest.var_names, num_workers=num_workers)
    local.add_store(store, obs_keys="cell_type")
    remote = make(ZarrSparseDataset, case, manifest.n_obs, manifest.var_names, num_workers=num_workers)
    remote.add_store(remote_store, obs_keys="cell_type", storage_options=options(s3_server))
    want = batches(local, 2)
    assert want and batches(remote, 2) == want


@pytest.mark.parametrize("num_workers", [0, 2])
def test_remote_dense_store(dense_store, remote_dense_store, s3_server, num_workers):
    local = ZarrDenseDataset(batch_size=16, chunk_size=8, preload_nchunks=2, num_workers=num_workers, return_index=True)
    local.add_store(dense_store)
    remote = ZarrDenseDataset(batch_size=16, chunk_size=8, preload_nchunks=2, num_workers=num_workers, return_index=True)
    remote.add_store(remote_dense_store, storage_options=options(s3_server))
    assert batches(remote) == batches(local)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_store_served_over_plain_http_reads_as_on_disk(store, remote_store, s3_server, num_workers):
    """``http://`` (obstore's HTTP store: GET with Range, HEAD; no listing): SeaweedFS's filer serves the bucket's
    objects under ``/buckets/``, ETags included; batches are those of the disk."""
    url = f"http://127.0.0.1:{s3_server.filer_port}/buckets/{remote_store.removeprefix('s3://')}"
    kw = {"batch_size": 32, "chunk_size": 8, "preload_nchunks": 4, "seed": 2, "return_index": True, "num_workers": num_workers}
    local = ZarrSparseDataset(**kw).add_store(store, obs_keys="cell_type")
    remote = ZarrSparseDataset(**kw).add_store(url, obs_keys="cell_type",
                                               storage_options={"client_options": {"allow_http": True}})  # fmt: skip
    assert read_manifest(url, storage_options={"client_options": {"allow_http": True}}) == read_manifest(store)
    want = batches(local, 2)
    assert want and batches(remote, 2) == want


def test_zarr_metadata_is_read_once_per_process(store, remote_store, s3_server):
    """Opening a store's groups and X again (add_store, a loop's set-up) sends no request for metadata read before:
    each open of a remote group would be a round trip."""
    from arrayloaders.loading.sources import store_source
    from arrayloaders.store.location import store_location
    from arrayloaders.store.zarr_layout import open_x
    from s3_server import Proxy

    proxy = Proxy(("127.0.0.1", s3_server.s3_port))
    try:
        location = store_location(remote_store, options(s3_server, endpoint=proxy.endpoint))
        name = read_manifest(store).files[0]["name"]
        first = location.group(name)
        assert proxy.requests > 0
        before = proxy.requests
        again = location.group(name)
        source = store_source(location, name, None)
        data, indices = open_x(source, ("data", "indices"))
        assert proxy.requests == before  # everything from the file's consolidated zarr.json, read once
        assert again.metadata == first.metadata and data.shape[0] == indices.shape[0] > 0
    finally:
        proxy.close()


def test_read_manifest_of_a_url(store, remote_store, s3_server):
    assert read_manifest(remote_store, storage_options=options(s3_server)) == read_manifest(store)


def test_a_missing_bucket_is_one_line(s3_server):
    ds = ZarrSparseDataset(batch_size=8, num_workers=0)
    with pytest.raises(StoreError) as e:
        ds.add_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store", storage_options=options(s3_server))
    message = str(e.value)
    assert "\n" not in message and "no-such-bucket" in message and "404" in message, message


def test_not_a_store_says_so(s3_server):
    ds = ZarrSparseDataset(batch_size=8, num_workers=0)
    with pytest.raises(StoreError, match="not an arrayloaders store"):
        ds.add_store(f"s3://{BUCKET}/nothing-here-{uuid.uuid4().hex[:8]}", storage_options=options(s3_server))


def test_storage_options_are_for_urls_only(store):
    with pytest.raises(ValueError, match="storage_options is for URLs"):
        ZarrSparseDataset(batch_size=8).add_store(store, storage_options={"region": "x"})



# --------------------------------------------------------------------------- layers, obsm, resume


@pytest.fixture(scope="module")
def values_store(tmp_path_factory, s3_server):
    """A store of .h5ad files with layers (CSR and dense) and obsm, on disk and on the server."""
    from test_convert_values import make_adata, write

    from arrayloaders import create_store_from_h5ads

    d = tmp_path_factory.mktemp("remote_values")
    paths = [write(make_adata(n, i), d / f"{i}.h5ad") for i, n in enumerate((90, 70, 60))]
    local = create_store_from_h5ads(paths, d / "s", n_obs_per_file=100, progress=False)
    return local, upload(local, s3_server, f"stores/{uuid.uuid4().hex}")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("layer", [None, "counts", "scaled"])
def test_remote_layers_genes_and_obsm(values_store, s3_server, layer, num_workers):
    local_path, url = values_store
    cls = ZarrDenseDataset if layer == "scaled" else ZarrSparseDataset  # "scaled" is a dense layer

    def make():
        return cls(16, 4, 4, num_workers=num_workers, return_index=True, layer=layer, var_names=["g17", "g2", "g29", "g5"])

    local = make().add_store(local_path, obsm_keys=["X_pca", "id"])
    remote = make().add_store(url, obsm_keys=["X_pca", "id"], storage_options=options(s3_server))
    assert batches(remote) == batches(local)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_on_the_remote_store_from_a_local_checkpoint(store, remote_store, s3_server, num_workers):
    """A checkpoint taken on the store on disk resumes on its copy in a bucket: the same store (its store_id)."""

    def make():
        return ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=4, seed=9, return_index=True,
                                 num_workers=num_workers)  # fmt: skip

    local = make().add_store(store)
    local.set_epoch(2)
    it = iter(local)
    head = [batch_bytes(next(it)) for _ in range(5)]
    state = local.state_dict()
    rest = [batch_bytes(b) for b in it]
    remote = make().add_store(remote_store, storage_options=options(s3_server))
    remote.load_state_dict(state)
    assert head and rest and [batch_bytes(b) for b in remote] == rest
