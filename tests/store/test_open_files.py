"""One budget of open shard files per process (arrayloaders.store.open_files), down to a dataset under a low limit."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from arrayloaders import XLayout, ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.example_data import write_example_h5ads
from arrayloaders.store.open_files import OpenFiles, budget


def opened(n: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_least_recently_used_closed_first_but_never_the_file_in_use():
    files = OpenFiles(3)
    a, b = files.owner(), files.owner()
    fds = opened(5)
    files.put(a, 0, fds[0])
    files.put(b, 0, fds[1])
    files.put(a, 1, fds[2])  # a now reads file 1: its file 0 is the oldest not in use
    assert files.get(b, 0) == fds[1]  # b's file 0 used again: the newest
    files.put(a, 2, fds[3])  # over the limit: a's file 0 goes (b's file 0 is in use, a's file 1 was used later)
    assert not is_open(fds[0]) and files.get(a, 0) is None
    assert [files.get(b, 0), files.get(a, 2)] == [fds[1], fds[3]]
    files.put(b, 1, fds[4])  # a's file 1 is now the oldest, and not in use
    assert not is_open(fds[2]) and len(files) == 3
    files.close_all(a)
    assert not is_open(fds[3]) and len(files) == 2
    files.close_all(b)
    assert not any(is_open(fd) for fd in fds) and len(files) == 0


def test_every_file_in_use_goes_over_the_limit_rather_than_close_one():
    files = OpenFiles(1)
    owners = [files.owner() for _ in range(3)]
    fds = opened(3)
    for owner, fd in zip(owners, fds):
        files.put(owner, 7, fd)  # three readers each reading their one file
    assert len(files) == 3 and all(is_open(fd) for fd in fds)
    for owner in owners:
        files.close_all(owner)


@pytest.mark.parametrize(("soft", "expected"), [(1024, 256), (20000, 1024), (40, 16), (resource.RLIM_INFINITY, 1024)])
def test_budget_is_a_quarter_of_the_soft_limit(monkeypatch, soft, expected):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    assert budget() == expected


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """A store of 4 files whose X arrays have ~100 shard files each."""
    root = tmp_path_factory.mktemp("many_shards")
    h5ads = write_example_h5ads(root / "h5ad", n_obs=(3000, 3000), n_vars=300, seed=5)
    layout = XLayout(chunk_elements=2**9, shard_elements=2**12)
    return create_store_from_h5ads(h5ads, root / "store", layout=layout, n_obs_per_file=1500, progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_store_of_more_shard_files_than_the_descriptor_limit(many_shards, num_workers):
    """Under a soft limit of 96 descriptors (workers inherit it) a whole epoch reads every cell once, with the
    values of a read without the limit. Readers that kept 64 files open per array failed here with EMFILE."""
    assert len(list(many_shards.glob("chunk_*.zarr/X/*/c/*"))) > 150
    with ZarrSparseDataset(100, 8, 4, num_workers=0, return_index=True).add_store(many_shards) as ds:
        expected = {i: row.tobytes() for X, _, index in ds for i, row in zip(index.tolist(), X.to_dense().numpy())}
    child = textwrap.dedent(f"""
        import resource, sys, hashlib
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        from arrayloaders import ZarrSparseDataset
        ds = ZarrSparseDataset(100, 8, 4, num_workers={num_workers}, return_index=True).add_store(sys.argv[1])
        with ds:
            for epoch in range(2):
                ds.set_epoch(epoch)
                for X, _, index in ds:
                    for i, row in zip(index.tolist(), X.to_dense().numpy()):
                        print(epoch, i, hashlib.sha1(row.tobytes()).hexdigest())
    """)
    res = subprocess.run([sys.executable, "-c", child, str(many_shards)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want = {i: hashlib.sha1(b).hexdigest() for i, b in expected.items()}
    for epoch in range(2):
        got = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith(f"{epoch} ")]
        assert sorted(int(i) for i, _ in got) == list(range(len(want)))  # every cell once
        assert all(want[int(i)] == h for i, h in got)
