"""Stores read from object storage, when things go wrong: faults, versions, the cache, secrets (a real S3 server).

What these check is the remote reader's own (its fetcher, obstore, the cache, the worker's config pipe), not
what a data library decides: ``scripts/test.sh`` runs them on the first Python only (``--stack-free``). The
reading itself, bit for bit against the store on disk, is ``test_remote.py``'s.
"""

from __future__ import annotations

import pickle
import shutil
import uuid
from datetime import timedelta

import pytest

from arrayloaders import StoreError, ZarrSparseDataset, read_manifest
from conftest import BUCKET, batch_bytes, until_workers_are_up
from test_remote import SECRET, batches, options, upload


@pytest.fixture(scope="module")
def remote_store(store, s3_server) -> str:
    return upload(store, s3_server, f"stores/{uuid.uuid4().hex}")

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

# --------------------------------------------------------------------------- faults


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


def test_a_cache_that_cannot_be_written_is_read_past(store, s3_server, proxied, tmp_path):
    """The cache directory deleted between epochs and a file put where it was (a user's clean-up, a full or
    read-only disk): loads fetch from the server, batches unchanged."""
    url, proxy = proxied
    ds = cached_dataset(url, s3_server, proxy.endpoint, tmp_path / "cache")
    want = [batch_bytes(b) for b in ds]
    ds.set_epoch(0)
    assert [batch_bytes(b) for b in ds] == want  # again: read in place from the cached files
    mine = ds._sources[0].store.root.cache().directory
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    mine.write_bytes(b"not a directory")
    before = proxy.requests
    ds.set_epoch(0)
    assert [batch_bytes(b) for b in ds] == want
    assert proxy.requests > before


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
