"""Fault scenarios of the worker engine, run in a child process by test_engine.py.

A hang or crash here fails one test (the parent's timeout), not the suite.
Usage: ``python engine_child.py SCENARIO STORE``. Prints one JSON line of
findings last; the parent asserts on it.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
import time

import numpy as np
import psutil
import torch

from arrayloaders import WorkerError, ZarrSparseDataset
from arrayloaders.engine import _grown, slot_layout
from arrayloaders.plan import plan_epoch
from arrayloaders.ring import segment_names


faulthandler.register(signal.SIGUSR1)  # the parent asks for our stacks before it gives up on us


def dataset(store: str, **kw) -> ZarrSparseDataset:
    # Small loads so an epoch has many of them and workers are mid-task when hit.
    kw = {"batch_size": 50, "chunk_size": 8, "preload_nchunks": 12, "num_workers": 2, "return_index": True, **kw}
    return ZarrSparseDataset(**kw).add_store(store, obs_keys="cell_type")


def leftovers() -> dict:
    time.sleep(0.2)  # let killed children be reaped
    return {
        "segments": segment_names(os.getpid()),
        # Our workers only: Python's resource tracker is a child too, for the process's lifetime.
        "children": [
            p.pid
            for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE and "arrayloaders.worker" in " ".join(p.cmdline())
        ],
    }


def rows_of_epoch(ds) -> list[int]:
    return torch.cat([i for _, _, i in ds]).tolist()


def worker_pids(ds) -> list[int]:
    return [p.pid for p in ds._engine.pool.processes]


def main(scenario: str, store: str) -> dict:
    out: dict = {"scenario": scenario}
    ds = dataset(store)
    if scenario == "sigkill":
        it = iter(ds)
        next(it)
        pids = worker_pids(ds)
        os.kill(pids[0], signal.SIGKILL)
        t = time.monotonic()
        try:
            for _ in it:
                pass
            out["error"] = None
        except WorkerError as e:
            out["error"], out["seconds"] = str(e), time.monotonic() - t
        out["killed_pid"] = pids[0]
        out.update(leftovers())
        out["next_epoch_rows"] = sorted(rows_of_epoch(ds))
        ds.close()
        out["after_close"] = leftovers()
    elif scenario == "break":
        for _ in ds:
            out["workers"] = worker_pids(ds)
            break
        out.update(leftovers())
    elif scenario == "consumer_error":
        try:
            for k, _ in enumerate(ds):
                if k == 3:
                    raise ValueError("consumer failed")
        except ValueError:
            pass
        out.update(leftovers())
        out["next_epoch_rows"] = sorted(rows_of_epoch(ds))
        ds.close()
    elif scenario == "delete":
        it = iter(ds)
        next(it)
        out["workers"] = worker_pids(ds)
        del it, ds
        gc.collect()
        out.update(leftovers())
    elif scenario == "delete_after_epoch":
        rows_of_epoch(ds)
        out["workers"] = worker_pids(ds)
        out["segments_between_epochs"] = len(segment_names(os.getpid()))
        del ds
        gc.collect()
        out.update(leftovers())
    elif scenario == "worker_exception":
        # A shard truncated after the store was opened: decoding it fails in the worker.
        for path in sorted(p for p in _files(store) if "/X/data/c/" in p):
            with open(path, "r+b") as f:
                f.truncate(100)
        try:
            rows_of_epoch(ds)
            out["error"] = None
        except WorkerError as e:
            out["error"] = str(e)
        out.update(leftovers())
    elif scenario == "interrupt":
        # The parent sends SIGINT once we say we are iterating. Python raises KeyboardInterrupt only if
        # SIGINT was not ignored when it started, and a shell ignores it for background jobs (a CI runner
        # may be one): install the handler a terminal user would have.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ds = dataset(store)
        n = 0
        try:
            while True:
                for _ in ds:
                    if n == 0:
                        print(json.dumps({"workers": worker_pids(ds)}), flush=True)
                    n += 1
        except KeyboardInterrupt:
            out["interrupted"] = True
        out.update(leftovers())
    elif scenario == "main_killed":
        it = iter(ds)
        next(it)
        print(json.dumps({"workers": worker_pids(ds), "pid": os.getpid()}), flush=True)
        time.sleep(60)  # the parent SIGKILLs us
    elif scenario == "many_epochs":
        proc = psutil.Process()
        rss, fds = [], []
        for _ in range(12):
            rows = rows_of_epoch(ds)
            assert len(rows) == len(set(rows))
            gc.collect()
            rss.append(proc.memory_info().rss)
            fds.append(proc.num_fds())
        out["rss"], out["fds"] = rss, fds
        out["workers_rss"] = [psutil.Process(p).memory_info().rss for p in worker_pids(ds)]
        ds.close()
    elif scenario == "held_batches":
        # Hold every batch while iterating, with a ring of only two slots.
        probe = dataset(store, num_workers=0)
        layout = _grown(slot_layout(probe._open_readers(), plan_epoch(probe._plan_config(), 1)))
        ds = dataset(store, memory_budget=int(layout.nbytes * 2.5))
        ds.set_epoch(1)
        batches = list(ds)
        out["slots"] = len(ds._engine.ring)
        ds.close()
        out.update(leftovers())
        # Batches are still valid after close(): compare with a fresh in-process epoch.
        ref = dataset(store, num_workers=0)
        ref.set_epoch(1)
        ref = list(ref)
        out["equal"] = all(
            torch.equal(a[2], b[2]) and torch.equal(a[0].to_dense(), b[0].to_dense()) for a, b in zip(batches, ref)
        ) and len(batches) == len(ref)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return out


def _files(root: str):
    for d, _, names in os.walk(root):
        for n in names:
            yield os.path.join(d, n)


if __name__ == "__main__":
    np.seterr(all="raise")
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
