"""The S3 server the remote-store tests run against (``s3_server.py``): real SeaweedFS, read through obstore.

What the remote tests will rely on: exact byte ranges, an object's size and
ETag, listing, a missing object's error naming its URL and status, and a
proxy that delays every request and can drop connections (obstore then
retries, and the bytes are exact).
"""

from __future__ import annotations

import os
from pathlib import Path
from datetime import timedelta

import pytest
from conftest import BUCKET

obstore = pytest.importorskip("obstore", reason="obstore comes with the test extra")
from obstore.store import from_url  # noqa: E402
from s3_server import Proxy  # noqa: E402


def s3(endpoint: str, prefix: str):
    # Retries bounded (obstore's default keeps retrying for 3 minutes): a few, within seconds.
    retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=10),
             "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1), "base": 2}}
    return from_url(f"s3://{BUCKET}/{prefix}", endpoint=endpoint, region="us-east-1", skip_signature=True,
                    client_options={"allow_http": True, "connect_timeout": "2s"}, retry_config=retry)  # fmt: skip


@pytest.fixture
def prefix() -> str:
    return os.urandom(6).hex()


BLOB = os.urandom(3 << 20)  # several of SeaweedFS's upload chunks


def test_byte_ranges_come_back_exact(s3_server, prefix):
    store = s3(s3_server.endpoint, prefix)
    obstore.put(store, "x/shard", BLOB)
    starts, ends = [0, 17, (1 << 20) - 5, len(BLOB) - 9], [10, 4113, (2 << 20) + 3, len(BLOB)]
    got = obstore.get_ranges(store, "x/shard", starts=starts, ends=ends)
    assert [bytes(g) for g in got] == [BLOB[a:b] for a, b in zip(starts, ends)]
    meta = obstore.head(store, "x/shard")
    assert meta["size"] == len(BLOB) and meta["e_tag"]
    assert [m["path"] for m in obstore.list(store).collect()] == ["x/shard"]


def test_a_missing_object_names_its_url_and_status(s3_server, prefix):
    store = s3(s3_server.endpoint, prefix)
    with pytest.raises(FileNotFoundError) as e:
        obstore.get(store, "nowhere/zarr.json")
    assert f"/{BUCKET}/{prefix}/nowhere/zarr.json" in str(e.value) and "404" in str(e.value)


def test_the_proxy_delays_every_request_and_forwards_it_exactly(s3_server, prefix):
    proxy = Proxy(("127.0.0.1", s3_server.s3_port), delay_s=0.02)
    try:
        store = s3(proxy.endpoint, prefix)
        obstore.put(store, "blob", BLOB[:4096])
        before = proxy.chunks
        for k in range(5):
            assert bytes(obstore.get_range(store, "blob", start=k * 100, end=k * 100 + 50)) == BLOB[k * 100 : k * 100 + 50]
        assert proxy.chunks - before >= 5  # every request went through the proxy (and waited there)
        assert proxy.connections >= 1
    finally:
        proxy.close()


def test_dropped_connections_are_retried_and_the_bytes_are_exact(s3_server, prefix):
    proxy = Proxy(("127.0.0.1", s3_server.s3_port))
    try:
        store = s3(proxy.endpoint, prefix)
        obstore.put(store, "blob", BLOB)
        assert proxy.cut() >= 1  # the client's pooled connection is reset under it
        assert bytes(obstore.get(store, "blob").bytes()) == BLOB
        assert proxy.connections >= 2  # it connected again
    finally:
        proxy.close()


def test_a_server_that_is_gone_is_an_error_not_a_hang(s3_server, prefix):
    proxy = Proxy(("127.0.0.1", s3_server.s3_port))
    store = s3(proxy.endpoint, prefix)
    obstore.put(store, "blob", b"x")
    proxy.close()  # nothing listens there any more
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        obstore.get(store, "blob")


def test_a_server_dies_with_the_process_that_started_it(tmp_path):
    """A session killed without its teardown (SIGKILL, a CI timeout) leaves no server running."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from s3_server import SeaweedFS, "
        "weed_binary; s = SeaweedFS(Path(sys.argv[2]), weed_binary()).start(); print(s.process.pid, flush=True); "
        "import time; time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        server = int(parent.stdout.readline())
        assert psutil.pid_exists(server)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the server outlived the process that started it"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
