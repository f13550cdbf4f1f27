"""Stores read from object storage: a real S3 server (SeaweedFS), the same batches as from disk.

Each store is converted on disk, uploaded object by object, and read back
through ``s3://``; every batch is compared bit for bit with the same loop
over the local copy.
"""

from __future__ import annotations

import pickle
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


def test_a_secret_never_shows(remote_store, s3_server):
    """A credential in storage_options: not in repr, pickles, state_dict, worker command lines or messages."""
    import psutil

    ds = ZarrSparseDataset(batch_size=64, chunk_size=32, num_workers=2)
    ds.add_store(remote_store, storage_options=options(s3_server, secret_access_key=SECRET, access_key_id="AKIDEXAMPLE"))
    # the server ignores signatures (auth off), so the loop runs with the secret configured
    it = iter(ds)
    next(it)
    texts = [repr(ds), repr(ds._sources), str(ds._sources[0].store), repr(ds.state_dict())]
    blobs = [pickle.dumps(ds), pickle.dumps(ds.state_dict())]
    for child in psutil.Process().children(recursive=True):
        try:
            texts.append(" ".join(child.cmdline()))
            texts += [f"{k}={v}" for k, v in child.environ().items()]
        except psutil.Error:
            pass
    del it
    for text in texts:
        assert SECRET not in text
    for blob in blobs:
        assert SECRET.encode() not in blob


def signed(server, secret: str) -> dict:
    """storage_options signing requests with the auth server's access key and ``secret``."""
    from conftest import S3_CREDENTIALS

    opts = options(server, access_key_id=S3_CREDENTIALS[0], secret_access_key=secret)
    del opts["skip_signature"]
    return opts


@pytest.fixture(scope="module")
def signed_store(store, s3_auth_server) -> str:
    """``store`` on the server that checks signatures."""
    import obstore
    from obstore.store import from_url

    from conftest import S3_CREDENTIALS

    prefix = f"stores/{uuid.uuid4().hex}"
    s3 = from_url(f"s3://{BUCKET}/{prefix}", **signed(s3_auth_server, S3_CREDENTIALS[1]))
    files = sorted((p for p in store.rglob("*") if p.is_file()), key=lambda p: p.name == "arrayloaders.json")
    for path in files:
        obstore.put(s3, path.relative_to(store).as_posix(), path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_credentials_reach_the_workers(store, signed_store, s3_auth_server, num_workers):
    """With authentication on, workers can read only with the credentials, which they get through their pipe."""
    from conftest import S3_CREDENTIALS

    local = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=4, num_workers=num_workers)
    local.add_store(store)
    remote = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=4, num_workers=num_workers)
    remote.add_store(signed_store, storage_options=signed(s3_auth_server, S3_CREDENTIALS[1]))
    assert batches(remote) == batches(local)


def test_bad_credentials_are_one_line(signed_store, s3_auth_server):
    ds = ZarrSparseDataset(batch_size=8, num_workers=0)
    with pytest.raises(StoreError) as e:
        ds.add_store(signed_store, storage_options=signed(s3_auth_server, SECRET))
    message = str(e.value)
    assert "\n" not in message and signed_store in message and "403" in message and SECRET not in message, message


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


# --------------------------------------------------------------------------- faults


def copy_of(store: Path, server, tmp_path: Path) -> tuple[str, Path]:
    """An upload of ``store`` under a fresh prefix (a test may damage it), and a local copy to damage alongside."""
    return upload(store, server, f"stores/{uuid.uuid4().hex}"), store


def test_a_flipped_byte_is_a_checksum_error_naming_the_object(store, s3_server, tmp_path):
    import obstore
    from obstore.store import from_url

    from arrayloaders import WorkerError

    url = upload(store, s3_server, f"stores/{uuid.uuid4().hex}")
    s3 = from_url(url, **options(s3_server))
    key = "chunk_1.zarr/X/data/c/0"
    raw = bytearray(obstore.get(s3, key).bytes())
    raw[100] ^= 0x10  # inside the first inner chunk
    obstore.put(s3, key, bytes(raw))
    for num_workers in (0, 2):
        ds = ZarrSparseDataset(batch_size=64, chunk_size=32, num_workers=num_workers)
        ds.add_store(url, storage_options=options(s3_server))
        with pytest.raises((OSError, WorkerError)) as e:
            for _ in ds:
                pass
        assert f"{url}/{key}" in str(e.value) and "checksum mismatch" in str(e.value), str(e.value)


@pytest.fixture
def proxied(store, s3_server):
    """``store`` uploaded, read through a proxy that can delay or cut connections: (url, proxy)."""
    from s3_server import Proxy

    url = upload(store, s3_server, f"stores/{uuid.uuid4().hex}")
    proxy = Proxy(("127.0.0.1", s3_server.s3_port))
    yield url, proxy
    proxy.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dropped_connections_are_retried_and_the_epoch_is_exact(store, s3_server, proxied, num_workers):
    import threading

    url, proxy = proxied
    local = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=2, num_workers=num_workers, return_index=True)
    local.add_store(store)
    remote = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=2, num_workers=num_workers, return_index=True)
    retry = {"max_retries": 6, "retry_timeout": timedelta(seconds=20),
             "backoff": {"init_backoff": timedelta(seconds=0.02), "max_backoff": timedelta(seconds=0.2), "base": 2.0}}
    remote.add_store(url, storage_options=options(s3_server, endpoint=proxy.endpoint, retry_config=retry))
    want = batches(local, 3)
    stop, cuts = threading.Event(), []

    def cutting():  # every open connection reset, 10 times a second
        while not stop.wait(0.1):
            cuts.append(proxy.cut())

    cutter = threading.Thread(target=cutting, daemon=True)
    cutter.start()
    try:
        got = batches(remote, 3)
    finally:
        stop.set()
        cutter.join()
    assert sum(cuts) > 0, "no connection was cut: the test tested nothing"
    assert got == want


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_server_gone_midway_is_an_error_naming_the_object_in_bounded_time(s3_server, proxied, num_workers):
    """Every connection refused from the second batch on: an error naming an object, within the retry budget."""
    import time

    from arrayloaders import WorkerError

    url, proxy = proxied
    ds = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=2, num_workers=num_workers, timeout=30)
    ds.add_store(url, storage_options=options(s3_server, endpoint=proxy.endpoint))
    if num_workers:
        until_workers_are_up(ds)
    ds.set_epoch(7)  # loads nobody has fetched yet
    it = iter(ds)
    next(it)
    proxy.close()
    start = time.monotonic()
    with pytest.raises((OSError, WorkerError, StoreError)) as e:
        for _ in it:
            pass
    took = time.monotonic() - start
    message = str(e.value)
    assert url in message and ("chunk_" in message or "arrayloaders.json" in message), message
    # bounded: the retry budget given (5 s) plus the time to notice, never a hang (no assertion on speed)
    assert took < 120, took


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ddp_ranks_read_the_bucket_as_the_disk(store, remote_store, s3_server, tmp_path, num_workers):
    """Two gloo ranks on s3://: each rank's batches are those it gets from the store on disk."""
    from test_distributed import launch

    opts = {k: v for k, v in options(s3_server).items() if k != "retry_config"}  # JSON on the child's command line
    local = launch("epochs", store, tmp_path / "local", 2, 120, num_workers=num_workers)
    remote = launch("epochs", remote_store, tmp_path / "remote", 2, 120, num_workers=num_workers, storage_options=opts)
    for rank in (0, 1):
        assert local[rank]["epoch0"] and remote[rank]["epoch0"] == local[rank]["epoch0"]
        assert remote[rank]["epoch1"] == local[rank]["epoch1"]
    rows = [{i for index, _ in r["epoch0"] for i in index} for r in remote]
    assert not rows[0] & rows[1]  # the ranks' cells are disjoint


def test_a_store_replaced_at_its_url_is_refused_at_the_next_epoch(store, s3_server):
    """Another manifest at the URL (the store converted again, uploaded over it): the next epoch refuses to read."""
    import obstore
    from obstore.store import from_url

    url = upload(store, s3_server, f"stores/{uuid.uuid4().hex}")
    ds = ZarrSparseDataset(batch_size=64, num_workers=0).add_store(url, storage_options=options(s3_server))
    assert len(list(ds)) == len(ds)
    s3 = from_url(url, **options(s3_server))
    manifest = bytes(obstore.get(s3, "arrayloaders.json").bytes())
    obstore.put(s3, "arrayloaders.json", manifest.replace(b'"store_id": "', b'"store_id": "x'))
    with pytest.raises(StoreError, match="converted again"):
        list(ds)


# --------------------------------------------------------------------------- the local cache


def cached_dataset(url, server, endpoint, cache_dir, num_workers=0, **add):
    ds = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=4, seed=4, return_index=True,
                           num_workers=num_workers)  # fmt: skip
    return ds.add_store(url, storage_options=options(server, endpoint=endpoint), cache_dir=cache_dir, **add)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_cache_serves_later_epochs_and_other_processes(store, s3_server, proxied, tmp_path, num_workers):
    """Epoch 2 fetches no chunk; a fresh dataset reads every chunk the first one's processes fetched from the
    cache; batches are those of the store on disk throughout."""
    url, proxy = proxied
    local = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=4, seed=4, return_index=True)
    local.add_store(store)
    want = [batches(local, 1)]
    local.set_epoch(1)
    want.append([batch_bytes(b) for b in local])
    ds = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache", num_workers)
    first, received = proxy.requests, proxy.received
    assert [batch_bytes(b) for b in ds] == want[0]
    cold = proxy.requests - first
    shards = [f for f in store.rglob("X/*/c/*") if f.parent.parent.name in ("data", "indices")]
    index_bytes = len(shards) * (16 * 512 + 4)
    ds.set_epoch(1)
    before, received = proxy.requests, proxy.received
    assert [batch_bytes(b) for b in ds] == want[1]
    # epoch 2: the manifest's check, and shard indexes a worker had not read yet (one that started late), no chunk
    assert cold > 20 and proxy.received - received <= (num_workers + 1) * index_bytes + 4096, (
        cold, proxy.requests - before, proxy.received - received)
    # A fresh dataset in this process (no workers: its cache's counts are here) finds every chunk the first one's
    # processes (its workers, or this one) fetched: the cache is the machine's, not a process's.
    again = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache", 0)
    assert [batch_bytes(b) for b in again] == want[0]
    cache = again._sources[0].store.root.cache()
    assert cache.hits > 20 and cache.misses == 0, (cache.hits, cache.misses)


def test_a_damaged_cache_entry_is_fetched_again(store, s3_server, proxied, tmp_path):
    url, proxy = proxied
    ds = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache")
    want = [batch_bytes(b) for b in ds]
    cached = sorted(p for p in (tmp_path / "cache").rglob("X/data/c/*") if p.is_file())
    assert cached
    for path in cached:  # a bit flipped in every cached shard, past its first chunk's header
        raw = bytearray(path.read_bytes())
        raw[40] ^= 0x01
        path.write_bytes(bytes(raw))
    before = proxy.requests
    again = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache")
    assert [batch_bytes(b) for b in again] == want
    assert proxy.requests > before  # the damaged chunks came from the server


def test_the_cache_stays_within_its_bytes(store, s3_server, proxied, tmp_path):
    url, proxy = proxied
    limit = sum(f.stat().st_size for f in store.rglob("X/*/c/*")) // 3
    ds = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache", cache_bytes=limit)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert len([b for b in ds]) == len(ds)
    on_disk = sum(p.stat().st_blocks * 512 for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert 0 < on_disk <= limit + limit // 10 + 2**20, (on_disk, limit)


def test_a_cache_is_for_urls(store, tmp_path):
    with pytest.raises(ValueError, match="cache_dir is for URLs"):
        ZarrSparseDataset(batch_size=8).add_store(store, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="cache_bytes needs cache_dir"):
        ZarrSparseDataset(batch_size=8).add_store(store, cache_bytes="1GiB")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_object_replaced_under_a_dataset_fails_its_reads_instead_of_mixing_versions(store, dense_store, s3_server,
                                                                                        num_workers):  # fmt: skip
    """Another valid shard (its checksums intact) put over one the dataset reads: a read of it fails, naming it."""
    import obstore
    from obstore.store import from_url

    from arrayloaders import WorkerError

    url = upload(store, s3_server, f"stores/{uuid.uuid4().hex}")
    ds = ZarrSparseDataset(batch_size=64, chunk_size=32, num_workers=num_workers).add_store(
        url, storage_options=options(s3_server))  # fmt: skip
    batches(ds)  # every shard's index read, with its ETag
    s3 = from_url(url, **options(s3_server))
    key = "chunk_0.zarr/X/data/c/0"
    other = bytes(obstore.get(s3, "chunk_1.zarr/X/data/c/0").bytes())  # valid chunks, checksums and all
    obstore.put(s3, key, other)
    with pytest.raises((OSError, WorkerError)) as e:
        for epoch in range(1, 4):
            ds.set_epoch(epoch)
            list(ds)
    assert f"{url}/{key}" in str(e.value) and "replaced while it was read" in str(e.value), str(e.value)


def test_row_pointers_are_kept_whole_in_the_cache_and_mapped(store, s3_server, proxied, tmp_path):
    """With a cache, each file's row pointers are one cached file, mapped: one copy per machine. A damaged copy
    is fetched again."""
    url, proxy = proxied
    local = ZarrSparseDataset(batch_size=64, chunk_size=32, preload_nchunks=4, seed=4, return_index=True)
    want = batches(local.add_store(store))
    ds = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache")
    assert batches(ds) == want
    whole = sorted((tmp_path / "cache").rglob("*.whole"))
    assert len(whole) == len(read_manifest(store).files) and all("X/indptr" in str(p) for p in whole)
    raw = bytearray(whole[0].read_bytes())
    raw[8] ^= 0x01
    whole[0].write_bytes(bytes(raw))
    again = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache")
    assert batches(again) == want
