"""The worker engine: same batches for any num_workers, zero-copy batches that stay valid, faults, cleanup."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from conftest import (
    PACKAGE_DIR, has_our_frame, in_the_ring, tensor_parts, until_workers_are_up, with_compressed_indptr, worker_pids,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from arrayloaders import WorkerError, ZarrDenseDataset, ZarrSparseDataset
from arrayloaders.loading.engine import DEFAULT_TIMEOUT_MARGIN_S, TASKS_PER_WORKER, Engine, split_points
from arrayloaders.loading.ring import Segment, SlotLayout, segment_names
from arrayloaders.loading.worker import WorkerPool
from arrayloaders.store.format import XLayout

CHILD = Path(__file__).with_name("engine_child.py")


def run_child(scenario: str, store: Path, timeout: float = 120) -> dict:
    res = subprocess.run(
        [sys.executable, str(CHILD), scenario, str(store)], capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def batches(ds, epochs=(0,)):
    """(X as bytes, index) of every batch of the given epochs."""
    out = []
    for e in epochs:
        ds.set_epoch(e)
        for X, _, idx in ds:
            out.append((b"".join(p.numpy().tobytes() for p in tensor_parts(X)), idx.numpy().copy()))
    return out


def until_exited(pid: int) -> None:
    """Wait until our child ``pid`` has exited, without reaping it: its pool reads its exit status."""
    deadline = time.monotonic() + 60
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"{pid} did not exit"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["sparse", "dense", "densified"])
@pytest.mark.parametrize(
    ("batch_size", "chunk_size", "preload_nchunks", "drop_last"),
    [(64, 8, 4, False), (100, 7, 3, True), (33, 1, 5, False)],
    ids=["even", "odd-drop-last", "chunk-of-one"],
)
def test_batches_do_not_depend_on_num_workers(store, dense_store, kind, batch_size, chunk_size, preload_nchunks, drop_last):
    cls = ZarrSparseDataset if kind == "sparse" else ZarrDenseDataset
    path = dense_store if kind == "dense" else store

    def run(num_workers):
        ds = cls(batch_size, chunk_size, preload_nchunks, drop_last=drop_last, return_index=True, num_workers=num_workers)
        with ds.add_store(path, obs_keys="cell_type"):
            return batches(ds, epochs=(0, 1))

    reference = run(0)
    rows = np.concatenate([i for _, i in reference[: len(reference) // 2]])
    assert np.unique(rows).size == rows.size > 0
    # 2 workers everywhere (loads may finish out of order); once 3, a number of workers that divides neither
    # the loads nor a load's runs. One worker (tasks done in order) is a simpler case of these.
    for num_workers in (2, 3) if (kind, chunk_size) == ("sparse", 7) else (2,):
        got = run(num_workers)
        assert len(got) == len(reference)
        for (x, i), (x0, i0) in zip(got, reference):
            assert np.array_equal(i, i0) and x == x0


def test_workers_stay_up_across_epochs_and_close_cleans_up(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2).add_store(store)
    for _ in ds:
        pass
    pids = worker_pids()
    assert len(pids) == 2 and len(segment_names(os.getpid())) >= 2
    for _ in ds:
        pass
    assert worker_pids() == pids
    ds.close()
    ds.close()  # idempotent
    assert segment_names(os.getpid()) == []
    assert worker_pids() == []


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_batches_are_zero_copy_views_that_outlive_the_next_step(store, dense_store, kind):
    cls, path, n = (ZarrSparseDataset, store, 50) if kind == "sparse" else (ZarrDenseDataset, dense_store, 20)
    with cls(n, 8, 12, num_workers=0).add_store(path) as ds:
        X, _ = next(iter(ds))
        assert not any(in_the_ring(t) for t in tensor_parts(X))  # the check tells a copy from a view
    ds = cls(n, 8, 12, num_workers=2, return_index=True).add_store(path)
    it = iter(ds)
    X, _, idx = next(it)
    # values and column indices (or dense X) are views of a ring slot; crow is a new array (rebased to 0)
    viewed = (X.values(), X.col_indices()) if kind == "sparse" else (X,)
    assert all(in_the_ring(t) for t in viewed)
    values = X.values().clone() if kind == "sparse" else X.clone()
    for _ in range(5):
        next(it)  # the first batch's slot must not be reused while X is alive
    assert torch.equal(X.values() if kind == "sparse" else X, values)
    del it
    ds.close()


def stopped_while_starting(make, which: tuple[int, ...] | None = None):
    """``(dataset, pids)``: a dataset from ``make()`` whose workers ``which`` (default: all) were stopped (SIGSTOP)
    before they reported that they started. A worker starts in ~0.15 s, so on a busy machine one may be up before
    it is stopped: then the dataset is closed and made again."""
    for _ in range(5):
        ds = make()
        pool = ds._runtime.engine.pool
        ks = range(len(pool)) if which is None else which
        pids = [pool.processes[k].pid for k in ks]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30  # a runnable process stops only once it next gets a core
        while any(psutil.Process(pid).status() != psutil.STATUS_STOPPED for pid in pids):
            assert time.monotonic() < deadline, [psutil.Process(pid).status() for pid in pids]
            time.sleep(0.01)
        if not any(pool.started_at[k] is not None or pool._replies[k].poll() for k in ks):
            return ds, pids
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        ds.close()
    pytest.fail("a worker was up before it could be stopped, five times")


def test_a_config_larger_than_the_pipe_neither_blocks_starting_nor_closing(tmp_path, monkeypatch):
    """A worker's config names every file of the stores (~600 bytes each): past the pipe's 64 KiB, starting the
    pool blocked until each worker in turn had imported and read it (16 workers: seconds in add_store). Here the
    workers never read it (a "python" that only sleeps): starting returns, and close() stops them."""
    from arrayloaders.loading.load import ALL_GENES
    from arrayloaders.loading.worker import WorkerConfig

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    big = tuple(range(100_000))  # sources: never unpickled here, only as large as a store of ~1,000 files
    box, done = {}, threading.Event()

    def start():
        box["pool"] = WorkerPool([WorkerConfig(k, big, ALL_GENES) for k in range(2)])
        done.set()

    threading.Thread(target=start, daemon=True).start()
    assert done.wait(60), "starting the pool blocked on sending the configs"
    pool = box["pool"]
    assert all(p.poll() is None for p in pool.processes)
    pool.close()
    assert all(p.poll() is not None for p in pool.processes)


def test_workers_do_not_import_torch(store):
    """Nor numcodecs, whose import (its codec registry: lz4, zstd...) was a fifth of a worker's start: blosc's C
    function is taken from numcodecs' extension file, loaded alone."""
    ds = ZarrSparseDataset(50, 8, 12, num_workers=1).add_store(store)
    with ds:
        until_workers_are_up(ds)
        assert len(list(ds)) == len(ds)
        (pid,) = worker_pids()
        maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "numpy" in maps
    assert "numcodecs/blosc" in maps and "numcodecs/lz4" not in maps and "numcodecs/zstd" not in maps


@pytest.fixture
def workers_find_no_zarr(tmp_path, monkeypatch):
    """Workers inherit the environment: on their path comes a zarr that fails to import (this process has
    the real one already), so a worker that imports zarr fails to start, saying so."""
    fake = tmp_path / "no-zarr" / "zarr"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("this worker imported zarr")\n')
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))


def _anndata_zarr_v2(h5ad: Path, dest: Path) -> Path:
    """An .h5ad as a zarr v2 AnnData: arrays DirectArray does not read, so its workers read them through zarr."""
    import anndata as ad

    with ad.settings.override(zarr_write_format=2), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's note that v3 becomes the default
        ad.read_h5ad(h5ad).write_zarr(dest)
    return dest


@pytest.mark.parametrize("kind", ["sparse", "dense", "zarr v2 (read through zarr)"])
def test_workers_read_our_stores_without_importing_zarr(store, dense_store, h5ads, tmp_path, kind, workers_find_no_zarr):
    """Importing zarr was half of a worker's start (0.15 s of 0.3 s, again in every worker while the first
    epoch runs): workers get each array's layout from this process instead, and read the files with it."""
    if kind == "zarr v2 (read through zarr)":  # the control: such a worker needs zarr, and the fake one stops it
        import anndata as ad

        adata = ad.read_zarr(_anndata_zarr_v2(h5ads[0], tmp_path / "v2.zarr"))
        adata.X = ad.io.sparse_dataset(zarr.open_group(tmp_path / "v2.zarr", mode="r")["X"])
        ds = ZarrSparseDataset(50, 8, 12, num_workers=2, return_index=True).add_anndatas([adata])
        with ds, pytest.raises(WorkerError, match="failed to start(.|\n)*this worker imported zarr"):
            until_workers_are_up(ds)
        return
    cls, path = (ZarrSparseDataset, store) if kind == "sparse" else (ZarrDenseDataset, dense_store)
    ds = cls(50, 8, 12, num_workers=2, return_index=True).add_store(path)
    with ds:
        until_workers_are_up(ds)
        got = batches(ds, epochs=(0, 1))
    reference = batches(cls(50, 8, 12, num_workers=0, return_index=True).add_store(path), epochs=(0, 1))
    assert [(x, i.tolist()) for x, i in got] == [(x, i.tolist()) for x, i in reference]


@pytest.mark.parametrize("layout", ["raw, in the store", "compressed (older stores)"])
def test_workers_map_one_copy_of_the_row_pointers(store, tmp_path, layout):
    """8 bytes per cell in every worker would be 13 GB for 100M cells and 16 workers. A store's raw row
    pointer file is mapped by every process (one copy per machine, however many ranks); an older store's
    compressed one is decoded once into a segment that the workers map (one copy per main process)."""
    raw = layout.startswith("raw")
    path = store if raw else with_compressed_indptr(store, tmp_path / "older")
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2).add_store(path)
    with ds:
        until_workers_are_up(ds)
        files = sorted(str(p) for p in path.glob("chunk_*.zarr/X/indptr/c/0"))
        (segment,) = [n for n in segment_names(os.getpid()) if n.endswith("_indptr")]
        for pid in [os.getpid(), *worker_pids()]:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert all((f in maps) == raw for f in files), pid
            if not raw:
                assert f"/dev/shm/{segment}" in maps, pid
        assert all(isinstance(p, np.memmap) == raw for p in ds._rt().engine.row_pointers())
    assert segment_names(os.getpid()) == []  # unlinked by close(), like the ring


def test_shared_row_pointers_are_read_only_views_not_copies(store):
    from arrayloaders.loading.load import RowFormat
    from arrayloaders.loading.ring import SharedIndptrs, map_indptrs
    from arrayloaders.loading.worker import SlotDecoder, WorkerConfig

    ds = ZarrSparseDataset(50, 8, 12, num_workers=0).add_store(store)
    indptrs = ds._indptrs()
    shared = SharedIndptrs([*indptrs, None])  # a dense file has none
    try:
        views = map_indptrs(shared.table)
        assert views[-1] is None
        for view, want in zip(views, indptrs):
            np.testing.assert_array_equal(view, want)
            assert not view.flags.writeable and not view.flags.owndata
        decoder = SlotDecoder(WorkerConfig(0, tuple(ds._sources), RowFormat(), (), shared.table))
        for reader, want in zip(decoder.readers, indptrs):
            np.testing.assert_array_equal(reader.indptr, want)
            assert not reader.indptr.flags.writeable and not reader.indptr.flags.owndata  # mapped, no private copy
    finally:
        shared.unlink()
        shared.unlink()  # idempotent
    assert segment_names(os.getpid()) == []


def test_too_small_memory_budget_is_refused_with_numbers(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=1, memory_budget="1KiB").add_store(store)
    with pytest.raises(ValueError, match=r"memory_budget=0.0 MiB holds fewer than 2 ring slots of 0.\d MiB"):
        next(iter(ds))
    assert segment_names(os.getpid()) == []


def test_settings_changed_after_the_workers_started_still_apply(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=1).add_store(store)  # the workers start here
    ds.memory_budget, ds.timeout = 1024, 7.0
    with pytest.raises(ValueError, match=r"memory_budget=0.0 MiB holds fewer than 2 ring slots"):
        next(iter(ds))
    ds.memory_budget = 2**28
    it = iter(ds)
    next(it)
    assert ds._runtime.engine.timeout == 7.0
    ds.close()


@pytest.mark.parametrize("num_workers", [2, 4])
def test_default_memory_budget_gives_every_worker_two_slots(num_workers):
    # A typical load, 8,192 cells x 2,500 non-zeros: ~160 MiB a slot. A fixed 1 GiB budget held
    # six (five with the ring's 10 % headroom), so more than four workers waited for free slots.
    layout = SlotLayout("csr", "float32", max_rows=8192, max_nnz=8192 * 2500)
    budget = ZarrSparseDataset(num_workers=num_workers).memory_budget
    assert Engine((), num_workers, budget)._n_slots(layout) == 2 * num_workers + 2


def test_pin_memory_without_cuda_warns():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: pinning is real here")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        ds = ZarrSparseDataset(pin_memory=True, num_workers=0)
    assert ds.pin_memory is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU behaviour is the test above)")
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cls", [ZarrSparseDataset, ZarrDenseDataset])
def test_pinned_batches_reach_the_gpu_unchanged(store, cls, num_workers):
    def make(pin):
        ds = cls(64, 8, 4, num_workers=num_workers, return_index=True, pin_memory=pin)
        return ds.add_store(store, obs_keys=["cell_type", "batch"])

    with make(False) as plain, make(True) as pinned:
        n = 0
        for (X, obs, idx), (Xp, obsp, idxp) in zip(plain, pinned, strict=True):
            held = [*tensor_parts(Xp), *obsp.values(), idxp]
            assert all(t.is_pinned() for t in held)
            on_gpu = [t.to("cuda", non_blocking=True) for t in held]
            torch.cuda.synchronize()
            expected = [*tensor_parts(X), *obs.values(), idx]
            assert all(torch.equal(g.cpu(), e) and g.dtype == e.dtype for g, e in zip(on_gpu, expected, strict=True))
            n += idx.shape[0]
    assert n == 1000


def test_bad_num_workers_is_refused():
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        ZarrSparseDataset(num_workers=-1)


# --------------------------------------------------------------------------- faults, in child processes


def test_sigkilled_worker_raises_and_leaves_nothing(store):
    out = run_child("sigkill", store)  # a hang fails here, at the child's timeout
    assert out["error"] is not None, "the epoch finished although a worker was killed"
    assert "SIGKILL" in out["error"] and f"pid {out['victim']}" in out["error"] and "worker " in out["error"]
    assert out["held_unchanged"]  # batches received before the failure keep their values
    assert out["segments"] == [] and out["children"] == []
    assert out["next_epoch_rows"] == list(range(1000))
    assert out["after_close"] == {"segments": [], "children": []}


def test_stopped_worker_is_reported_after_the_timeout(store):
    # SIGSTOP: the workers are alive but make no progress. With timeout=2 the loop raises (rather than
    # hang: the child's own timeout fails the test), naming a worker, its state and its loads. Every worker
    # is stopped (and 2 s applies only then): a healthy one slowed by a busy machine cannot be the one named.
    out = run_child("sigstop", store)
    error = out["error"]
    assert error is not None, "the epoch finished although the workers were stopped"
    assert len(out["victims"]) == 2 and "has made no progress" in error, error
    assert any(f"pid {pid}, stopped)" in error for pid in out["victims"]), error
    assert "decoding load(s) [" in error and "timeout=2" in error, error
    assert out["held_unchanged"]
    assert out["segments"] == [] and out["children"] == []  # the stopped worker was killed too
    assert out["next_epoch_rows"] == list(range(1000))


def test_default_timeout_is_the_slowest_load_plus_a_margin():
    engine = Engine((), 1, 2**20)
    assert engine._limit() == DEFAULT_TIMEOUT_MARGIN_S == 60
    engine._slowest = 12.5
    assert engine._limit() == 72.5
    assert Engine((), 1, 2**20, timeout=3)._limit() == 3


def test_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        ZarrSparseDataset(timeout=0)


@pytest.mark.parametrize("scenario", ["break", "consumer_error"])
def test_leaving_a_loop_early_keeps_the_workers_and_the_epoch(store, scenario):
    out = run_child(scenario, store)
    assert len(out["workers"]) == 2 and out["between"]["children"] == out["workers"]
    assert out["next_epoch_is_the_same"]  # a loop left early does not advance the epoch
    assert out["workers_after"] == out["workers"]  # the next loop ran on the same workers
    assert out["segments"] == [] and out["children"] == []  # ... until close()


def test_deleting_a_live_loop_and_the_dataset_leaves_nothing(store):
    out = run_child("delete", store)
    assert len(out["workers"]) == 2
    assert out["segments"] == [] and out["children"] == []


def test_deleting_the_dataset_between_epochs_leaves_nothing(store):
    out = run_child("delete_after_epoch", store)
    assert out["segments_between_epochs"] >= 2  # the ring stays up between epochs...
    assert out["segments"] == [] and out["children"] == []  # ...until the dataset goes


def test_worker_exception_is_raised_with_its_traceback(store, tmp_path):
    broken = Path(shutil.copytree(store, tmp_path / "broken"))
    out = run_child("worker_exception", broken)
    assert out["error"] is not None
    assert "Traceback" in out["error"] and "/X/data/c/" in out["error"] and "too short for its index" in out["error"]
    assert out["segments"] == [] and out["children"] == []


def test_lent_views_are_counted_without_python_callbacks():
    # The interpreter swallows a KeyboardInterrupt raised inside a weakref callback, so a Ctrl-C that
    # landed while a dead batch's callback ran was lost (1 run in ~50 of the test below hung).
    seg = Segment(f"al_test_{os.getpid()}", SlotLayout("csr", "float32", max_rows=4, max_nnz=8))
    try:
        views = [seg.lend(seg.arrays.data[:3]), seg.lend(seg.arrays.indices[:3])]
        assert seg.lent == 2
        assert all(ref.__callback__ is None for v in views for ref in weakref.getweakrefs(v))
        del views[0]
        gc.collect()
        assert seg.lent == 1
    finally:
        seg.unlink()


def _resident_kib(address: int) -> int:
    """Rss of this process's mapping that starts at ``address`` (from /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for k, line in enumerate(lines):
        head = re.match(r"^([0-9a-f]+)-[0-9a-f]+ ", line)
        if head and int(head.group(1), 16) == address:
            return next(int(x.split()[1]) for x in lines[k + 1 :] if x.startswith("Rss:"))
    raise AssertionError(f"no mapping at {address:#x}")


@pytest.mark.parametrize(("n_rows", "nnz"), [(1024, 2**20), (100, 5000)], ids=["full", "a-small-load"])
def test_a_worker_faults_in_what_a_load_writes_with_one_call(n_rows, nnz):
    """A worker populates the parts of a newly mapped slot that its load writes (MADV_POPULATE_WRITE), instead
    of ~45,000 faults while decoding; the room left for larger loads takes no memory."""
    import ctypes
    import errno
    import mmap

    from arrayloaders.loading.ring import map_segment, populate

    layout = SlotLayout("csr", "float32", max_rows=1024, max_nnz=2**20)
    seg = Segment(f"al_test_{os.getpid()}_populate", layout)
    try:
        mapping = map_segment(seg.name, layout.nbytes)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        assert _resident_kib(address) == 0
        written = layout.written(n_rows, nnz)
        assert populate(mapping, written)
        page = mmap.PAGESIZE
        pages = {p for offset, size in written for p in range(offset // page, -(-(offset + size) // page))}
        assert _resident_kib(address) * 1024 == page * len(pages)  # exactly the pages the load writes
        arrays = layout.arrays(mapping)
        assert [(a.ctypes.data - address, min(a.nbytes, size)) for a, (_, size) in
                zip([arrays.header, arrays.indptr, arrays.data, arrays.indices], written)] == written  # fmt: skip
        arrays.data[:nnz] = 7  # writable memory of the segment, as before
        assert seg.arrays.data[nnz - 1] == 7
    finally:
        seg.unlink()

    class OldKernel:
        def madvise(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument")

    assert populate(OldKernel(), written) is False  # nothing done: the pages fault in on first touch, as before


def interrupt(store: Path, scenario: str, n_signals: int, gap: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``scenario`` in a child and press Ctrl-C ``n_signals`` times, ``gap`` seconds apart, once it iterates."""
    p = subprocess.Popen(
        [sys.executable, str(CHILD), scenario, str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        started = json.loads(p.stdout.readline())
        for _ in range(n_signals):
            if p.poll() is not None:
                break
            p.send_signal(signal.SIGINT)
            time.sleep(gap)
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)  # the child's stacks, to stderr
            time.sleep(1)
            p.kill()
            stdout, stderr = p.communicate()
            pytest.fail(f"Ctrl-C did not stop the child within 60 s; its stderr:\n{stderr[-6000:]}")
    finally:
        p.kill()
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), started


def assert_nothing_left(started: dict) -> None:
    deadline = time.monotonic() + 10  # the child is gone; give the kernel a moment to reap its workers
    while time.monotonic() < deadline and any(psutil.pid_exists(w) for w in started["workers"]):
        time.sleep(0.1)
    assert not any(psutil.pid_exists(w) for w in started["workers"])
    assert segment_names(started["pid"]) == []


def test_ctrl_c_caught_in_the_loop_then_the_next_loop_works(store):
    res, started = interrupt(store, "interrupt", 1, 0)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["interrupted"] and out["next_epoch_rows"] == list(range(1000)), res.stderr
    assert out["segments"] == [] and out["children"] == [], res.stderr
    assert not any(psutil.pid_exists(w) for w in started["workers"])


def tracebacks(stderr: str) -> list[str]:
    """The tracebacks in ``stderr``, each with the lines up to the next one; a chained exception's report (a
    KeyboardInterrupt raised while CPython handles an exception of its own, e.g. in pathlib) is one traceback."""
    parts = re.split(
        r"(?m)^(?<!occurred:\n\n)(?<!exception:\n\n)(?=(?:Exception ignored in.*\n)?Traceback \(most recent call last\):)",
        stderr,
    )
    return [p for p in parts if "Traceback (most recent call last):" in p]


def test_tracebacks_are_read_as_python_prints_them():
    # Both seen in CI: a press landing in pathlib's handled AttributeError (one chained report), and a later
    # press in torch's atexit callback under a venv in ~/.cache/arrayloaders (a path with our name, not ours).
    ours = f'  File "{PACKAGE_DIR}/loading/load.py", line 1, in f\n'
    chained = (f"Traceback (most recent call last):\n  File \"pathlib.py\"\nAttributeError: _str\n\nDuring handling of the "
               f"above exception, another exception occurred:\n\nTraceback (most recent call last):\n{ours}KeyboardInterrupt\n")  # fmt: skip
    atexit = ("Exception ignored in atexit callback: <bound method>\nTraceback (most recent call last):\n"
              '  File "/root/.cache/arrayloaders/venv/lib/torch/library.py", line 1\nKeyboardInterrupt: \n')  # fmt: skip
    found = tracebacks(chained + atexit)
    assert len(found) == 2 and found[0].rstrip().endswith("KeyboardInterrupt") and has_our_frame(found[0])
    assert not has_our_frame(found[1])


@pytest.mark.parametrize("n_signals", [1, 2, 3])
def test_ctrl_c_pressed_again_and_again_leaves_nothing_and_one_traceback_of_ours(store, n_signals):
    # Presses 30 ms apart (faster than a person presses twice). The first stops the loop with one
    # traceback; the others land in our cleanup (deferred until it is done) or in the interpreter's
    # own exit, where CPython may print a traceback of its own (threading, concurrent.futures: a plain
    # torch + zarr script does the same). None may come from our code or our workers.
    res, started = interrupt(store, "interrupt_uncaught", n_signals, 0.03)
    assert res.returncode != 0
    found = tracebacks(res.stderr)
    assert found and "KeyboardInterrupt" in found[0], res.stderr
    assert not any(has_our_frame(t) for t in found[1:]), res.stderr
    assert "BrokenPipeError" not in res.stderr and "leaked shared_memory" not in res.stderr, res.stderr
    assert_nothing_left(started)


def test_ctrl_c_in_a_burst_still_leaves_nothing(store):
    # Three signals back to back can land inside the interpreter's own teardown, where CPython prints
    # what it can (a plain torch + zarr script does the same); our cleanup must still complete.
    res, started = interrupt(store, "interrupt_uncaught", 3, 0)
    assert res.returncode != 0 and "KeyboardInterrupt" in res.stderr
    assert "BrokenPipeError" not in res.stderr and "leaked shared_memory" not in res.stderr, res.stderr
    assert_nothing_left(started)


@pytest.mark.parametrize("scenario", ["main_killed", "main_killed_with_helper", "main_killed_while_workers_start"])
def test_killed_main_process_leaves_no_workers_or_segments(store, scenario):
    # With a forked helper alive, the resource tracker (shared with it) would unlink the segments
    # only when the helper exits: the workers unlink them when they notice their parent died. A helper
    # also keeps the workers' pipes open: a worker whose parent died while it was still importing
    # (reparented before it could ask who its parent was) waited for tasks until the helper exited.
    p = subprocess.Popen([sys.executable, str(CHILD), scenario, str(store)], stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    assert segment_names(info["pid"])
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (segment_names(info["pid"]) or any(psutil.pid_exists(w) for w in info["workers"])):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(w) for w in info["workers"])
    assert segment_names(info["pid"]) == []
    for child in psutil.Process().children(recursive=True):  # the helper, reparented away from p
        if "main_killed" in " ".join(child.cmdline()):
            child.kill()


def test_a_child_forked_mid_loop_never_drives_the_parents_workers(store):
    out = run_child("fork_mid_loop", store)
    assert out["child"]["rest_ok"]  # the inherited loop went on correctly in the child...
    assert out["parent_ok"]  # ...and the parent's loop and held batches are untouched
    assert out["segments"] == [] and out["children"] == []


def test_a_forked_child_leaving_with_os_exit_leaves_no_segments(store):
    out = run_child("fork_exit", store)
    assert out["child"]["own_ok"] and out["child"]["segments"] >= 2  # it ran its own workers and ring
    assert out["child_segments_after_exit"] == []  # its workers unlinked them
    assert out["parent_ok"]
    assert out["segments"] == [] and out["children"] == []


def test_lending_and_counting_from_several_threads_loses_no_view():
    """Threads lend views and drop some at once while other threads count them (``lent`` prunes the dead
    ones, replacing the list): every view still alive must still be counted. Without the lock, a count that
    replaced the list after another count had, lost the views lent in between (most rounds, here)."""
    seg = Segment(f"al_test_{os.getpid()}_race", SlotLayout("csr", "float32", max_rows=4, max_nnz=64))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns every few bytecodes: the interleavings a race needs
    try:
        for _ in range(20):
            kept: list[list[np.ndarray]] = [[] for _ in range(3)]
            start, counts = threading.Barrier(6), []

            def lend(mine: list) -> None:
                start.wait()
                for k in range(1_500):
                    view = seg.lend(seg.arrays.data[:3])
                    if k % 3:  # two views in three are kept; the third is dropped (released) at once
                        mine.append(view)
                    del view

            def count() -> None:
                start.wait()
                while any(t.is_alive() for t in lenders):
                    counts.append(seg.lent)

            lenders = [threading.Thread(target=lend, args=(mine,)) for mine in kept]
            counters = [threading.Thread(target=count) for _ in range(3)]
            for t in lenders + counters:
                t.start()
            for t in lenders + counters:
                t.join(timeout=300)  # a hang guard only
            assert not any(t.is_alive() for t in lenders + counters)
            assert counts  # counting ran while views were lent
            assert seg.lent == sum(len(mine) for mine in kept) == 3 * 1_000
            kept[0].clear()
            assert seg.lent == 2 * 1_000  # released views are no longer counted
            del kept
            assert seg.lent == 0
    finally:
        sys.setswitchinterval(switch)
        seg.unlink()


def test_many_epochs_do_not_grow_memory_or_open_files(store):
    out = run_child("many_epochs", store, timeout=300)
    rss, fds = out["rss"], out["fds"]
    assert max(fds[2:]) <= fds[1] + 2, fds
    assert max(rss[2:]) - rss[1] < 30 * 2**20, rss


def test_batches_held_by_the_user_stay_valid_with_a_tiny_ring(store):
    out = run_child("held_batches", store)
    assert out["slots"] == 2
    assert out["equal"]
    assert out["segments"] == [] and out["children"] == []


def test_a_forked_child_leaves_the_parents_loader_intact(store):
    out = run_child("fork", store)
    assert out["child_exit"] == 0 and out["child"]["rows_ok"], out["child"]
    assert out["child"]["workers"] and not set(out["child"]["workers"]) & set(out["workers"])  # its own workers
    assert out["segments_after"] == out["segments_before"] >= 2  # the child's exit unlinked none of ours
    assert out["parent_epoch_ok"] and out["workers_after"] == out["workers"]
    assert out["segments"] == [] and out["children"] == []


# --------------------------------------------------------------------------- start-up: early workers, split first load


def test_workers_start_when_the_store_is_added_and_serve_the_first_loop(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2).add_store(store)
    started = worker_pids()
    assert len(started) == 2  # before any iteration: they import while the user builds a model
    assert sum(1 for _ in ds) == len(ds)
    assert worker_pids() == started  # the same processes served the loop
    ds.close()
    assert worker_pids() == [] and segment_names(os.getpid()) == []


def test_a_dataset_without_workers_starts_none(store):
    ZarrSparseDataset(50, 8, 12, num_workers=0).add_store(store)
    assert worker_pids() == []


def test_adding_a_second_store_replaces_the_starting_workers(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2, return_index=True).add_store(store)
    first = worker_pids()
    ds.add_store(store)  # the first pair is still importing: stopped at once, a pair for both stores started
    second = worker_pids()
    assert len(second) == 2 and not set(first) & set(second)
    rows = torch.cat([i for _, _, i in ds])
    assert torch.equal(rows.sort().values, torch.arange(2 * 1000))
    assert worker_pids() == second
    ds.close()


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_the_first_load_is_decoded_here_while_the_workers_start(store, dense_store, kind):
    """Workers stopped (SIGSTOP) before they could start: the first batch still comes, so the main process
    decoded its load; resumed, they decode the rest, and the epoch equals one read without workers."""
    source, cls = (store, ZarrSparseDataset) if kind == "sparse" else (dense_store, ZarrDenseDataset)
    expected = batches(cls(50, 8, 12, num_workers=0, return_index=True).add_store(source))
    ds, pids = stopped_while_starting(lambda: cls(50, 8, 12, num_workers=2, return_index=True).add_store(source))
    try:
        loop = iter(ds)
        X, _, idx = next(loop)
        assert all(psutil.Process(pid).status() == psutil.STATUS_STOPPED for pid in pids)
        first = (b"".join(p.numpy().tobytes() for p in tensor_parts(X)), idx.numpy().copy())
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    rest = [(b"".join(p.numpy().tobytes() for p in tensor_parts(X)), i.numpy().copy()) for X, _, i in loop]
    got = [first, *rest]
    assert len(got) == len(expected)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(got, expected))
    assert worker_pids() == pids
    ds.close()


def test_once_the_workers_are_up_they_decode_every_load(store, monkeypatch):
    calls = []
    decode_here = Engine._decode_here
    monkeypatch.setattr(Engine, "_decode_here", lambda self, run, task: calls.append(task.load) or decode_here(self, run, task))
    with ZarrSparseDataset(50, 8, 12, num_workers=2, return_index=True).add_store(store) as ds:
        until_workers_are_up(ds)
        calls.clear()
        for epoch in (1, 2):
            ds.set_epoch(epoch)
            assert sum(len(i) for *_, i in ds) == 1000
        assert calls == []


def test_the_first_worker_up_is_not_given_every_load_while_the_others_start(store, monkeypatch):
    """Workers 1 and 2 stopped while starting, worker 0 up: it is given at most TASKS_PER_WORKER loads at a
    time (found on 16 cores: the first worker up got every free slot's load, and the others, once up, had
    nothing to do: the first epoch ran at one worker's speed); once the others are up, they get loads too."""
    given = []
    submit = WorkerPool.submit

    def counted(pool, worker, task, doing):
        waiting = sum(f.worker == worker for f in engine._flight.values())
        given.append((worker, waiting))
        return submit(pool, worker, task, doing)

    monkeypatch.setattr(WorkerPool, "submit", counted)
    ds, late = stopped_while_starting(lambda: ZarrSparseDataset(50, 8, 12, num_workers=3, return_index=True).add_store(store), (1, 2))
    with ds:
        engine = ds._runtime.engine
        try:
            deadline = time.monotonic() + 60
            while 0 not in engine.pool.started():
                assert time.monotonic() < deadline, "worker 0 did not start"
                time.sleep(0.01)
            assert sorted(np.concatenate([i.numpy() for *_, i in ds]).tolist()) == list(range(1000))
            assert given and {w for w, _ in given} == {0}
            assert max(waiting for _, waiting in given) == TASKS_PER_WORKER - 1  # never more queued than that
        finally:
            for pid in late:
                os.kill(pid, signal.SIGCONT)
        until_workers_are_up(ds)
        given.clear()
        ds.set_epoch(1)
        assert sorted(np.concatenate([i.numpy() for *_, i in ds]).tolist()) == list(range(1000))
        assert {w for w, _ in given} == {0, 1, 2}
        assert max(waiting for _, waiting in given) < TASKS_PER_WORKER


def test_a_damaged_first_load_decoded_here_is_a_worker_error_naming_the_file(store, tmp_path):
    damaged = Path(shutil.copytree(store, tmp_path / "damaged"))
    for shard in damaged.glob("chunk_*.zarr/X/data/c/*"):
        raw = bytearray(shard.read_bytes())
        stored = len(raw) - 16 * (XLayout().shard_elements // XLayout().chunk_elements) - 4  # before the shard index
        raw[: stored // 2] = bytes(stored // 2)  # every inner chunk stored in the first half: zeros
        shard.write_bytes(bytes(raw))
    ds, pids = stopped_while_starting(lambda: ZarrSparseDataset(50, 8, 12, num_workers=2).add_store(damaged))
    try:
        with pytest.raises(WorkerError, match=r"the main process failed decoding load 0 of epoch 0 while the workers "
                                              r"were starting:\nTraceback(.|\n)*OSError: .*damaged.*X/data/c/\d+: inner chunk"):
            next(iter(ds))
    finally:
        for pid in pids:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
    assert worker_pids() == [] and segment_names(os.getpid()) == []  # the engine closed, as for a worker's error


def test_a_worker_that_cannot_open_the_store_is_reported_with_its_reason(store, tmp_path, monkeypatch):
    from arrayloaders.loading import worker

    gone = Path(shutil.copytree(store, tmp_path / "gone"))
    gone_sources = tuple(ZarrSparseDataset(50, 8, 12, num_workers=0).add_store(gone)._sources)
    shutil.rmtree(gone)
    start = worker.WorkerPool._start

    def start_on_a_deleted_store(self, config):  # the store vanishes between add_store and the worker opening it
        start(self, dataclasses.replace(config, sources=gone_sources))

    monkeypatch.setattr(worker.WorkerPool, "_start", start_on_a_deleted_store)
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2).add_store(store)  # does not wait for the workers
    for pid in worker_pids():  # until a worker is up this process decodes: let them fail first
        until_exited(pid)
    with pytest.raises(WorkerError, match=r"worker \d \(pid \d+\) failed to start:(.|\n)*gone"):
        next(iter(ds))
    assert worker_pids() == [] and segment_names(os.getpid()) == []


def test_a_worker_killed_while_starting_is_reported_and_the_next_loop_works(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2, return_index=True).add_store(store)
    victim = worker_pids()[0]
    os.kill(victim, signal.SIGKILL)  # still importing: the pool has not waited for it
    until_exited(victim)
    with pytest.raises(WorkerError, match=r"worker 0 \(pid \d+\) was killed by signal SIGKILL"):
        next(iter(ds))
    assert worker_pids() == [] and segment_names(os.getpid()) == []
    rows = torch.cat([i for *_, i in ds])
    assert torch.equal(rows.sort().values, torch.arange(1000)) and len(worker_pids()) == 2
    ds.close()


def test_a_child_forked_while_the_workers_start_reads_with_its_own(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2, return_index=True).add_store(store)
    parents = worker_pids()
    pid = os.fork()
    if pid == 0:  # the child: a full epoch with workers of its own, the parent's left alone
        ok = False
        try:
            rows = torch.cat([i for *_, i in ds])
            ok = torch.equal(rows.sort().values, torch.arange(1000)) and set(parents) <= set(worker_pids(os.getppid()))
        finally:
            os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert worker_pids() == parents
    assert torch.equal(torch.cat([i for *_, i in ds]).sort().values, torch.arange(1000))
    ds.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=30), st.integers(1, 8))
def test_split_points_cover_the_runs_in_order_with_none_empty(lengths, parts):
    runs = np.array([[0, 0, n] for n in lengths], dtype=np.int64).reshape(-1, 3)
    got = split_points(runs, parts)
    if not lengths:
        assert got == [(0, 0)]
        return
    assert got[0][0] == 0 and got[-1][1] == len(lengths) and 1 <= len(got) <= parts
    assert all(a < b for a, b in got) and all(b == c for (_, b), (c, _) in zip(got, got[1:]))
    rows = [sum(lengths[a:b]) for a, b in got]
    assert max(rows) <= sum(lengths) / parts + max(lengths)  # no part holds much more than its share


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("selection", ["all", "subset", "sampler"])
@pytest.mark.parametrize("n_parts", [2, 3, 7])
@pytest.mark.parametrize("compiled", [False, True], ids=["python-loop", "compiled-loop"])
def test_a_load_read_in_parts_equals_the_whole_load(store, dense_store, kind, selection, n_parts, compiled, monkeypatch):
    """Several workers filling one slot side by side, a part of the runs each, write exactly the whole load
    (chunked loads on either of the loops a worker reads them with: before and after it loads the compiled one)."""
    from arrayloaders.loading.load import LoadedRows, read_load
    from arrayloaders.loading.plan import plan_epoch
    from arrayloaders.store import shards

    monkeypatch.setattr(shards, "_compiled_loop_warm", lambda: compiled)

    cls, path = (ZarrSparseDataset, store) if kind == "sparse" else (ZarrDenseDataset, dense_store)
    n_obs = ZarrSparseDataset(num_workers=0).add_store(store).n_obs if kind == "sparse" else 210
    rng = np.random.default_rng(n_parts)
    kw = {
        "all": {},
        "subset": {"cells": np.sort(rng.choice(n_obs, n_obs // 3, replace=False))},
        "sampler": {"sampler": rng.integers(0, n_obs, 150)},  # repeats, runs of a few rows: the gather path
    }[selection]
    ds = cls(40, 4, 6, num_workers=0, **kw).add_store(path)
    readers, fmt = ds._open_readers(), ds._row_format()
    config = ds._plan_config()
    plan = plan_epoch(config, 0, cells=ds._cells(), sequence=ds._sample(0) if ds.sampler is not None else None)
    def unwritten(whole):  # -1: no value of the example data
        if whole.dense is not None:
            return LoadedRows(whole.load, dense=np.full_like(whole.dense, -1))
        nnz = whole.data.size
        return LoadedRows(whole.load, np.zeros(whole.indptr.size, np.int64), np.full(nnz, -1, whole.data.dtype), np.full(nnz, -1, np.int32))

    def written(out):
        return (out.dense != -1).any(axis=1) if out.dense is not None else out.data != -1

    for spec in plan.loads[:3]:
        take = plan.take(spec)
        whole = read_load(readers.x, spec, take, fmt=fmt)
        parts = split_points(spec.runs, n_parts)
        assert len(parts) > 1
        out = unwritten(whole)
        for part in parts[::-1]:  # in any order
            read_load(readers.x, spec, take, out, fmt, part=part)
        if whole.dense is not None:
            assert out.dense.tobytes() == whole.dense.tobytes()
        else:
            assert np.array_equal(out.indptr, whole.indptr)
            assert out.data.tobytes() == whole.data.tobytes() and np.array_equal(out.indices, whole.indices)
        # each part writes its own rows only: together exactly once
        alone = [written(read_load(readers.x, spec, take, unwritten(whole), fmt, part=part)) for part in parts]
        assert np.array_equal(np.sum(alone, axis=0), np.ones_like(alone[0], dtype=int))


def test_loads_that_choose_genes_are_not_read_in_parts(store):
    from arrayloaders.loading.load import read_load
    from arrayloaders.loading.plan import plan_epoch

    genes = ZarrSparseDataset(num_workers=0).add_store(store).var_names[[0, 2, 5]]
    ds = ZarrSparseDataset(40, 4, 6, num_workers=0, var_names=genes).add_store(store)
    spec = plan_epoch(ds._plan_config(), 0).loads[0]
    with pytest.raises(ValueError, match="cannot be read in parts"):
        read_load(ds._open_readers().x, spec, np.arange(spec.n_rows), fmt=ds._row_format(), part=(0, 1))


@pytest.mark.parametrize("ended", [False, True], ids=["live", "stale"])
@pytest.mark.parametrize("last_fails", [False, True])
def test_a_split_load_is_ready_or_free_only_when_every_part_is_back(ended, last_fails):
    """The slot of a split load must not be handed out (or, if its loop was abandoned, refilled) while
    some part may still write into it."""
    from arrayloaders.loading.engine import EpochRun, _Flight, _Slot
    from arrayloaders.loading.worker import Failed, Filled

    engine = Engine((), 3, 2**20)
    run = EpochRun(engine, None, [0], 0)
    run.ended = ended
    first = 10
    engine._slots = [_Slot("filling", first)]
    engine._flight = {first + k: _Flight(weakref.ref(run), 0, 0, k, 0, first) for k in range(3)}
    engine._parts_left = {first: 3}
    engine._busy_since = dict.fromkeys(range(3), 0.0)
    for k in (2, 0):
        engine._receive([(k, Filled(k, first + k, 0, 0, 40, 400, 0.1))])
        assert engine._slots[0].state == "filling" and run.ready == {}
    last = Failed(1, first + 1, 0, "Traceback: boom") if last_fails else Filled(1, first + 1, 0, 0, 40, 400, 0.1)
    if last_fails and not ended:
        engine.pool = type("Pool", (), {"processes": [None, type("P", (), {"pid": 1})()]})()
        with pytest.raises(WorkerError, match="boom"):
            engine._receive([(1, last)])
        return
    engine._receive([(1, last)])
    assert engine._parts_left == {} and engine._flight == {}
    if ended:
        assert engine._slots[0].state == "free"
    else:
        assert engine._slots[0].state == "ready" and run.ready[0].ticket == first  # the ticket in the slot's header
