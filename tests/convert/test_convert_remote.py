"""Conversions into object storage (a real S3 server): read back exactly, overwrite rules, failed uploads."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from arrayloaders import StoreError, ZarrSparseDataset, create_store_from_h5ads, read_manifest
from conftest import BUCKET, batch_bytes
from test_remote import options

ROOT = Path(__file__).resolve().parents[2]


def s3(url: str, server):
    from obstore.store import from_url

    return from_url(url, **options(server))


def keys(url: str, server) -> list[str]:
    import obstore

    return sorted(m["path"] for batch in obstore.list(s3(url, server)) for m in batch)


def fresh_url() -> str:
    return f"s3://{BUCKET}/converted/{uuid.uuid4().hex}"


def epoch_bytes(where, **add) -> list[bytes]:
    ds = ZarrSparseDataset(batch_size=64, chunk_size=16, preload_nchunks=4, seed=2, num_workers=0, return_index=True)
    ds.add_store(where, obs_keys="cell_type", **add)
    return [batch_bytes(b) for b in ds]


def test_a_store_converted_into_a_bucket_reads_back_as_the_local_one(h5ads, s3_server, tmp_path):
    url = fresh_url()
    got = create_store_from_h5ads(h5ads, url, n_obs_per_file=256, progress=False, storage_options=options(s3_server),
                                  tmp_dir=tmp_path)  # fmt: skip
    assert got == url
    local = create_store_from_h5ads(h5ads, tmp_path / "local", n_obs_per_file=256, progress=False)
    manifest = read_manifest(url, storage_options=options(s3_server))
    assert [f["name"].split("/", 1)[1] for f in manifest.files] == [f["name"] for f in read_manifest(local).files]
    assert all(f["name"].startswith("g-") for f in manifest.files)
    assert epoch_bytes(url, storage_options=options(s3_server)) == epoch_bytes(local)
    assert list(tmp_path.iterdir()) == [tmp_path / "local"]  # the staging directory is gone


def test_an_existing_store_is_refused_without_overwrite_and_replaced_with_it(h5ads, s3_server):
    url, opts = fresh_url(), options(s3_server)
    create_store_from_h5ads(h5ads, url, n_obs_per_file=256, progress=False, storage_options=opts)
    first = keys(url, s3_server)
    reader = ZarrSparseDataset(batch_size=64, num_workers=0).add_store(url, storage_options=opts)
    with pytest.raises(StoreError, match="already holds a store; pass overwrite=True"):
        create_store_from_h5ads(h5ads, url, n_obs_per_file=256, progress=False, storage_options=opts)
    assert keys(url, s3_server) == first
    create_store_from_h5ads(h5ads[:2], url, n_obs_per_file=200, progress=False, storage_options=opts, overwrite=True)
    second = keys(url, s3_server)
    generations = {k.split("/")[0] for k in second if k != "arrayloaders.json"}
    assert len(generations) == 1 and not set(second) & (set(first) - {"arrayloaders.json"})  # the old objects are gone
    assert read_manifest(url, storage_options=opts).n_obs == 800
    with pytest.raises(StoreError, match="converted again"):  # a dataset of the old store refuses the new one
        list(reader)


def test_a_prefix_holding_other_objects_is_never_replaced(h5ads, s3_server):
    import obstore

    url = fresh_url()
    obstore.put(s3(url, s3_server), "notes.txt", b"mine")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="holds objects that are not an arrayloaders store's") as e:
            create_store_from_h5ads(h5ads, url, progress=False, storage_options=options(s3_server), overwrite=overwrite)
        assert "notes.txt" in str(e.value) and "\n" not in str(e.value)
    assert keys(url, s3_server) == ["notes.txt"]


def test_a_failed_upload_leaves_no_manifest_and_removes_what_it_put(h5ads, s3_server, monkeypatch):
    from arrayloaders.convert import upload

    url, put = fresh_url(), upload.RemoteOutput._put_checked
    calls = []

    def failing(self, path, key):
        calls.append(key)
        if len(calls) == 7:
            raise StoreError(f"{key}: the network went away (simulated)")
        put(self, path, key)

    monkeypatch.setattr(upload.RemoteOutput, "_put_checked", failing)
    with pytest.raises(StoreError, match="simulated"):
        create_store_from_h5ads(h5ads, url, n_obs_per_file=256, progress=False, storage_options=options(s3_server))
    assert len(calls) >= 7 and keys(url, s3_server) == []


def test_what_a_killed_upload_left_is_removed_by_the_next_conversion(h5ads, s3_server, tmp_path):
    """A generation without a manifest (the process killed mid-upload) is no obstacle, and is cleaned up."""
    import obstore

    url, opts = fresh_url(), options(s3_server)
    local = create_store_from_h5ads(h5ads, tmp_path / "s", n_obs_per_file=256, progress=False)
    left = [p for p in local.rglob("*") if p.is_file() and p.name != "arrayloaders.json"][:10]
    for p in left:
        obstore.put(s3(url, s3_server), f"g-0123456789abcdef/{p.relative_to(local).as_posix()}", p.read_bytes())
    create_store_from_h5ads(h5ads, url, n_obs_per_file=256, progress=False, storage_options=opts)
    assert not [k for k in keys(url, s3_server) if k.startswith("g-0123456789abcdef/")]
    assert epoch_bytes(url, storage_options=opts) == epoch_bytes(local)


def test_a_conversion_killed_mid_upload_leaves_no_manifest_and_the_next_one_cleans_up(h5ads, s3_server, tmp_path):
    """``convert.py -o s3://...`` SIGKILLed while it uploads (each request slowed by a proxy): the prefix holds
    objects but no manifest, so no reader takes it for a store; the next conversion there succeeds and removes
    what the killed one put."""
    import signal
    import time

    from s3_server import Proxy

    url = fresh_url()
    proxy = Proxy(("127.0.0.1", s3_server.s3_port), delay_s=0.3)
    try:
        slow = {k: v for k, v in options(s3_server, endpoint=proxy.endpoint).items() if k != "retry_config"}
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "convert.py"), *map(str, h5ads), "-o", url, "-q",
                                 "--storage-options", json.dumps(slow)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while len(keys(url, s3_server)) < 3:
            assert proc.poll() is None, "the conversion ended before it was killed: slow the proxy down"
            assert time.monotonic() < deadline, "no upload started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proxy.close()
    left = keys(url, s3_server)
    assert left and "arrayloaders.json" not in left
    with pytest.raises(StoreError, match="not an arrayloaders store"):
        ZarrSparseDataset(batch_size=8, num_workers=0).add_store(url, storage_options=options(s3_server))
    local = create_store_from_h5ads(h5ads, tmp_path / "s", n_obs_per_file=256, progress=False)
    create_store_from_h5ads(h5ads, url, n_obs_per_file=256, progress=False, storage_options=options(s3_server))
    assert not set(left) & set(keys(url, s3_server))
    assert epoch_bytes(url, storage_options=options(s3_server)) == epoch_bytes(local)


def test_the_etag_check_is_the_servers_etag(s3_server, tmp_path):
    """Uploads are checked against the ETag the server computes, whole or in parts: not a check that never fires."""
    import obstore

    from arrayloaders.convert.upload import PART_BYTES, _expected_etags

    url = fresh_url()
    for size in (1000, 2 * PART_BYTES + 123):
        path = tmp_path / f"f{size}"
        path.write_bytes(np.random.default_rng(size).bytes(size))
        obstore.put(s3(url, s3_server), path.name, path, chunk_size=PART_BYTES)
        etag = obstore.head(s3(url, s3_server), path.name)["e_tag"].strip('"')
        assert etag in _expected_etags(path), etag
        assert (etag.endswith("-3")) == (size > PART_BYTES)


def test_the_command_line_converts_into_a_bucket_and_keeps_secrets_off_it(h5ads, s3_server):
    url = fresh_url()
    opts = {k: v for k, v in options(s3_server).items() if k != "retry_config"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), *map(str, h5ads), "-o", url, "-q",
                          "--storage-options", json.dumps(opts)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert read_manifest(url, storage_options=options(s3_server)).n_obs == 1000
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), *map(str, h5ads), "-o", fresh_url(),
                          "--storage-options", json.dumps({**opts, "secret_access_key": "x"})],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 2 and "credentials go in the environment" in res.stderr
