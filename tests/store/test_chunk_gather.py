"""The compiled gather (arrayloaders.store.chunk_gather): used for blosc arrays, equal to the Python loop, and
when it stops at a fault, the error is the Python loop's, naming the file and the chunk.

tests/test_shards.py runs every DirectArray test with it, with the Python loop and through numcodecs;
these check what those cannot see: that it is used at all, where it hands over, and that chunked access
switches to it once it is loaded (warm), in the main process and in workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from conftest import assert_bit_identical, read_store, worker_pids
from zarr.codecs import BloscCodec, Crc32cCodec

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset
from arrayloaders.store import chunk_gather, shards
from arrayloaders.store.shards import DirectArray
from arrayloaders.store.zarr_layout import direct_array

N, CHUNK, SHARD = 4000, 64, 512


def make_array(path, dtype: str, checksum: bool = True) -> tuple[zarr.Array, np.ndarray]:
    rng = np.random.default_rng(0)
    values = (rng.poisson(2, N) * (rng.random(N) < 0.3)).astype(dtype)  # count-like: compresses
    compressors = [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")] + ([Crc32cCodec()] if checksum else [])
    array = zarr.create_array(store=str(path), shape=(N,), chunks=(CHUNK,), shards=(SHARD,), dtype=dtype,
                              compressors=compressors)  # fmt: skip
    array[:] = values
    return zarr.open_array(str(path), mode="r"), values


def gather(reader: DirectArray, ranges: list[tuple[int, int]], dtype) -> np.ndarray:
    starts = np.array([a for a, _ in ranges], np.int64)
    stops = np.array([b for _, b in ranges], np.int64)
    sizes = stops - starts
    out = np.full(int(sizes.sum()), 99, dtype)
    reader.gather(starts, stops, np.cumsum(sizes) - sizes, out)
    return out


def random_ranges(seed: int, n: int = 300) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, N - 1, n)
    return [(int(a), int(min(N, a + rng.integers(1, 3 * CHUNK)))) for a in starts]


@pytest.fixture
def calls(monkeypatch):
    """What the compiled loop returned, call by call."""
    returned = []
    original = chunk_gather.ChunkGather.__call__

    def spy(self, *args):
        returned.append(original(self, *args))
        return returned[-1]

    monkeypatch.setattr(chunk_gather.ChunkGather, "__call__", spy)
    return returned


@pytest.mark.parametrize(("stored", "into"), [("float32", "float32"), ("uint16", "int32"), ("int64", "int64")])
def test_blosc_arrays_are_gathered_by_the_compiled_loop_bit_identically(tmp_path, calls, monkeypatch, stored, into):
    array, values = make_array(tmp_path / "a", stored)
    ranges = random_ranges(1) + [(0, N), (CHUNK, 2 * CHUNK), (N - 1, N)]
    want = np.concatenate([values[a:b] for a, b in ranges]).astype(into)
    reader = direct_array(array)
    got = gather(reader, ranges, into)
    assert calls and set(calls) == {chunk_gather.DONE}  # every file done by the compiled loop
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    monkeypatch.setattr(DirectArray, "_compiled", lambda *args: None)
    np.testing.assert_array_equal(gather(direct_array(array), ranges, into).view(np.uint8), want.view(np.uint8))


def shard_chunks(shard_path) -> np.ndarray:
    """(offset, nbytes) of each inner chunk of a shard (index at the end, then its crc32c)."""
    raw = shard_path.read_bytes()
    return np.frombuffer(raw[-(16 * (SHARD // CHUNK) + 4) : -4], dtype="<u8").reshape(-1, 2).astype(np.int64)


DAMAGE = {
    "checksum": lambda raw, at, n: raw.__setitem__(at + n // 2, raw[at + n // 2] ^ 0xFF),
    "blosc-header-size": lambda raw, at, n: raw.__setitem__(at + 12, raw[at + 12] ^ 0x01),
}


@pytest.mark.parametrize(("damage", "checksum"), [("checksum", True), ("blosc-header-size", True),
                                                  ("blosc-header-size", False)])  # fmt: skip
def test_a_fault_mid_file_stops_the_loop_and_the_python_loop_names_it(tmp_path, calls, monkeypatch, damage, checksum):
    make_array(tmp_path / "a", "float32", checksum)
    shard = tmp_path / "a" / "c" / "1"
    raw = bytearray(shard.read_bytes())
    bad = 5  # inner chunk 5 of shard 1: wanted after chunks 1-4 of the same file
    at, n = (int(x) for x in shard_chunks(shard)[bad])
    DAMAGE[damage](raw, at, n)
    shard.write_bytes(bytes(raw))
    ranges = [(SHARD + c * CHUNK + 3, SHARD + c * CHUNK + 9) for c in range(1, 8)]
    with pytest.raises(OSError) as compiled:
        gather(direct_array(zarr.open_array(str(tmp_path / "a"), mode="r")), ranges, "float32")
    assert calls == [bad - 1]  # stopped at the damaged chunk: the 5th wanted (0-based 4)
    monkeypatch.setattr(DirectArray, "_compiled", lambda *args: None)
    with pytest.raises(OSError) as python:
        gather(direct_array(zarr.open_array(str(tmp_path / "a"), mode="r")), ranges, "float32")
    assert str(compiled.value) == str(python.value)
    assert str(shard) in str(compiled.value)


@pytest.mark.parametrize("warm", [False, True], ids=["python-loop", "compiled-loop"])
def test_chunked_loads_read_every_cell_bit_identically_on_either_loop(store, calls, monkeypatch, warm):
    """Runs of rows (chunked access) are read run by run until the compiled loop is loaded, then through it."""
    monkeypatch.setattr(shards, "_compiled_loop_warm", lambda: warm)
    ds = ZarrSparseDataset(50, 8, 12, num_workers=0, return_index=True).add_store(store)
    parts, rows = [], []
    for X, _, index in ds:
        parts.append(sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), X.shape))
        rows.append(index.numpy())
    rows = np.concatenate(rows)
    assert sorted(rows.tolist()) == list(range(ds.n_obs))  # every cell once
    assert bool(calls) == warm and set(calls) <= {chunk_gather.DONE}
    assert_bit_identical(sp.vstack(parts, format="csr"), read_store(store).X[rows])


def test_warm_makes_the_loop_ready_for_chunked_access_of_the_store_dtypes(store, h5ads, tmp_path, monkeypatch):
    from arrayloaders import create_store_from_h5ads
    from arrayloaders.loading.load import RowFormat
    from arrayloaders.loading.worker import SlotDecoder, WorkerConfig
    from arrayloaders.store.format import XLayout

    readers = ZarrSparseDataset(50, 8, 12, num_workers=0).add_store(store)._open_readers().x
    dtypes = SlotDecoder(WorkerConfig(0, tuple(r.source for r in readers), RowFormat())).gather_dtypes()
    assert dtypes == [(np.dtype(np.float32), np.dtype(np.float32)), (np.dtype(np.int32), np.dtype(np.uint16))]
    # what a worker of a store of other dtypes loads: float64 values, int32 column indices (> 65,536 genes)
    monkeypatch.setattr(chunk_gather, "_warmed", chunk_gather._warmed)  # later tests' loops: as this process had them
    chunk_gather.warm([*dtypes, (np.dtype(np.float64), np.dtype(np.float64)), (np.dtype(np.int32), np.dtype(np.int32))])
    assert chunk_gather.is_warm() and shards._compiled_loop_warm()
    # (out, scratch): the loop's arguments after the three C functions and fd, offsets, nbytes, group_ends, at, src, dst, sizes
    loaded = {(str(sig[11].dtype), str(sig[12].dtype)) for sig in chunk_gather._gather_chunks.signatures}
    assert {("float32", "float32"), ("int32", "uint16"), ("float64", "float64"), ("int32", "int32")} <= loaded
    assert all(r.compiled for r in readers)
    # A store without checksums bound-checks column indices in Python after a gather: it reads run by run.
    unchecked = create_store_from_h5ads(h5ads, tmp_path / "s", layout=XLayout(checksum=False), progress=False)
    assert not any(r.compiled for r in ZarrSparseDataset(50, 8, 12, num_workers=0).add_store(unchecked)._open_readers().x)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_a_worker_loads_the_compiled_loop_in_the_background_for_sparse_stores_only(store, dense_store, kind):
    """A worker loads numba's code in a thread from its start (no load waits for it), then reads chunked loads
    with it; dense loads never use it, so a dense store's workers do not load it at all (nor map LLVM)."""
    cls, path = (ZarrSparseDataset, store) if kind == "sparse" else (ZarrDenseDataset, dense_store)
    others = set(worker_pids())  # datasets of earlier tests may not be collected yet
    with cls(50, 8, 12, num_workers=1).add_store(path) as ds:
        assert len(list(ds)) == len(ds)
        (pid,) = set(worker_pids()) - others
        deadline = time.monotonic() + (60 if kind == "sparse" else 2)  # a fresh install compiles the loop first
        while "llvmlite" not in _maps(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ("llvmlite" in _maps(pid)) == (kind == "sparse")
        assert len(list(ds)) == len(ds)  # and goes on serving


@pytest.mark.parametrize("sampled", [False, True], ids=["chunked", "sampler"])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_with_numba_jit_disabled_loads_take_the_python_loop(store, sampled, num_workers):
    """NUMBA_DISABLE_JIT=1 leaves plain Python functions, which cannot call the C functions: neither a worker
    that warms nor a sampler's gather may take them for the compiled loop (a sampler's loads all failed)."""
    import os
    import subprocess
    import sys

    script = f"""
import time, numpy as np, anndata as ad, scipy.sparse as sp
from arrayloaders import ZarrSparseDataset
store = {str(store)!r}
want = ad.concat([ad.read_zarr(f"{{store}}/chunk_{{i}}.zarr") for i in range(4)]).X
sampler = list(range(0, 1000, 3)) + [5, 5] if {sampled} else None
with ZarrSparseDataset(50, 8, 12, num_workers={num_workers}, return_index=True, sampler=sampler).add_store(store) as ds:
    for epoch in range(2):
        got = [(X, index.numpy()) for X, _, index in ds]
        rows = np.concatenate([i for _, i in got])
        assert np.array_equal(np.sort(rows), np.sort(sampler) if sampler else np.arange(ds.n_obs)), epoch
        for X, index in got:
            X = X.to_sparse_csr()
            csr = sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=X.shape)
            assert (csr != want[index]).nnz == 0
        time.sleep(0.5)  # a worker warms meanwhile (and finds nothing compiled)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "NUMBA_DISABLE_JIT": "1"},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
