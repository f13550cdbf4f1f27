"""The worker engine: same batches for any num_workers, zero-copy batches that stay valid, faults, cleanup."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.engine import Engine
from arrayloaders.ring import Segment, SlotLayout, segment_names

CHILD = Path(__file__).with_name("engine_child.py")


def run_child(scenario: str, store: Path, timeout: float = 120) -> dict:
    res = subprocess.run(
        [sys.executable, str(CHILD), scenario, str(store)], capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def tensor_parts(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The arrays behind a tensor: (crow, col, values) of a sparse CSR one, else itself."""
    return (t.crow_indices(), t.col_indices(), t.values()) if t.layout == torch.sparse_csr else (t,)


def batches(ds, epochs=(0,)):
    """(X as bytes, index) of every batch of the given epochs."""
    out = []
    for e in epochs:
        ds.set_epoch(e)
        for X, _, idx in ds:
            out.append((b"".join(p.numpy().tobytes() for p in tensor_parts(X)), idx.numpy().copy()))
    return out


@pytest.fixture(scope="module")
def dense_store(dense_h5ads, tmp_path_factory):
    return create_store_from_h5ads(dense_h5ads, tmp_path_factory.mktemp("dense") / "s", n_obs_per_file=80, progress=False)


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
    for num_workers in (1, 2, 4):
        got = run(num_workers)
        assert len(got) == len(reference)
        for (x, i), (x0, i0) in zip(got, reference):
            assert np.array_equal(i, i0) and x == x0


def test_workers_stay_up_across_epochs_and_close_cleans_up(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2).add_store(store)
    for _ in ds:
        pass
    pids = [p.pid for p in ds._engine.pool.processes]
    assert len(segment_names(os.getpid())) == len(ds._engine.ring) >= 2
    for _ in ds:
        pass
    assert [p.pid for p in ds._engine.pool.processes] == pids
    ds.close()
    ds.close()  # idempotent
    assert segment_names(os.getpid()) == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_batches_are_zero_copy_views_that_outlive_the_next_step(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=2, return_index=True).add_store(store)
    it = iter(ds)
    X, _, idx = next(it)
    values = X.values().clone()
    for _ in range(5):
        next(it)  # the first batch's slot must not be reused while X is alive
    assert torch.equal(X.values(), values)
    del it
    ds.close()


def test_workers_do_not_import_torch(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=1).add_store(store)
    with ds:
        it = iter(ds)
        next(it)
        pid = ds._engine.pool.processes[0].pid
        maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "numpy" in maps


def test_too_small_memory_budget_is_refused_with_numbers(store):
    ds = ZarrSparseDataset(50, 8, 12, num_workers=1, memory_budget="1KiB").add_store(store)
    with pytest.raises(ValueError, match=r"memory_budget=0.0 MiB holds fewer than 2 ring slots of 0.\d MiB"):
        next(iter(ds))
    assert segment_names(os.getpid()) == []


@pytest.mark.parametrize("num_workers", [2, 4])
def test_default_memory_budget_gives_every_worker_two_slots(num_workers):
    # A typical load, 8,192 cells x 2,500 non-zeros: ~160 MiB a slot. A fixed 1 GiB budget held
    # six (five with the ring's 10 % headroom), so more than four workers waited for free slots.
    layout = SlotLayout("csr", "float32", max_rows=8192, max_nnz=8192 * 2500)
    budget = ZarrSparseDataset(num_workers=num_workers).memory_budget
    assert Engine((), None, num_workers, budget)._n_slots(layout) == 2 * num_workers + 2


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


def test_sigkilled_worker_raises_within_seconds_and_leaves_nothing(store):
    out = run_child("sigkill", store)
    assert out["error"] is not None, "the epoch finished although a worker was killed"
    assert "SIGKILL" in out["error"] and f"pid {out['killed_pid']}" in out["error"] and "worker 0" in out["error"]
    assert out["seconds"] < 5
    assert out["segments"] == [] and out["children"] == []
    assert out["next_epoch_rows"] == list(range(1000))
    assert out["after_close"] == {"segments": [], "children": []}


@pytest.mark.parametrize("scenario", ["break", "consumer_error", "delete"])
def test_leaving_the_loop_early_leaves_nothing(store, scenario):
    out = run_child(scenario, store)
    assert out["segments"] == [] and out["children"] == []
    if "next_epoch_rows" in out:
        assert out["next_epoch_rows"] == list(range(1000))


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


def test_ctrl_c_stops_workers_and_unlinks(store):
    p = subprocess.Popen(
        [sys.executable, str(CHILD), "interrupt", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        workers = json.loads(p.stdout.readline())["workers"]
        p.send_signal(signal.SIGINT)
        try:
            stdout, stderr = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)  # the child's stacks, to stderr
            time.sleep(1)
            p.kill()
            stdout, stderr = p.communicate()
            pytest.fail(f"Ctrl-C did not stop the loop within 30 s; the child's stderr:\n{stderr[-6000:]}")
    finally:
        p.kill()
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["interrupted"] and out["segments"] == [] and out["children"] == [], stderr
    assert not any(psutil.pid_exists(w) for w in workers)


def test_killed_main_process_leaves_no_workers_or_segments(store):
    p = subprocess.Popen([sys.executable, str(CHILD), "main_killed", str(store)], stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    assert segment_names(info["pid"])
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (segment_names(info["pid"]) or any(psutil.pid_exists(w) for w in info["workers"])):
        time.sleep(0.2)
    # Workers notice their parent is gone; the resource tracker unlinks the segments.
    assert not any(psutil.pid_exists(w) for w in info["workers"])
    assert segment_names(info["pid"]) == []


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
