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
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest.py
from conftest import batch_bytes, worker_pids  # noqa: E402

from arrayloaders import WorkerError, ZarrSparseDataset
from arrayloaders.loading.engine import _grown, slot_layout
from arrayloaders.loading.plan import plan_epoch
from arrayloaders.loading.ring import segment_names

faulthandler.register(signal.SIGUSR1)  # the parent asks for our stacks before it gives up on us


def dataset(store: str, **kw) -> ZarrSparseDataset:
    # Small loads so an epoch has many of them and workers are mid-task when hit.
    kw = {"batch_size": 50, "chunk_size": 8, "preload_nchunks": 12, "num_workers": 2, "return_index": True, **kw}
    return ZarrSparseDataset(**kw).add_store(store, obs_keys="cell_type")


def leftovers() -> dict:
    time.sleep(0.2)  # let killed children be reaped
    # Our workers only: Python's resource tracker is a child too, for the process's lifetime.
    return {"segments": segment_names(os.getpid()), "children": worker_pids()}


def rows_of_epoch(ds) -> list[int]:
    return torch.cat([i for _, _, i in ds]).tolist()


def main(scenario: str, store: str) -> dict:
    out: dict = {"scenario": scenario}
    ds = dataset(store)
    if scenario in ("sigkill", "sigstop"):
        # A worker killed, or every worker stopped (SIGSTOP: alive but making no progress), mid-epoch.
        while None in ds._runtime.engine.pool.started_at:  # till the workers are up, this process decodes
            rows_of_epoch(ds)
        ds.set_epoch(1)
        it = iter(ds)
        held = [next(it)]
        before = [batch_bytes(b) for b in held]
        if scenario == "sigkill":
            victims = worker_pids()[:1]
            os.kill(victims[0], signal.SIGKILL)
        else:
            victims = worker_pids()
            for pid in victims:
                os.kill(pid, signal.SIGSTOP)
            deadline = time.monotonic() + 60  # a runnable process stops only once it next gets a core
            while any(psutil.Process(pid).status() != psutil.STATUS_STOPPED for pid in victims):
                assert time.monotonic() < deadline, "the workers did not stop"
                time.sleep(0.01)
            # Only now a short limit (the user's timeout=2, set on this loop's engine): every worker is certainly
            # stopped, so only a stopped one can exceed it. The healthy loops before and after keep the default.
            ds._runtime.engine.timeout = 2
        victim = victims[0]
        t = time.monotonic()
        try:
            for batch in it:
                held.append(batch)
                before.append(batch_bytes(batch))
            out["error"] = None
        except WorkerError as e:
            out["error"], out["seconds"] = str(e), time.monotonic() - t
        out["victim"], out["victims"] = victim, victims
        out["held_unchanged"] = [batch_bytes(b) for b in held] == before
        out.update(leftovers())
        out["next_epoch_rows"] = sorted(rows_of_epoch(ds))
        ds.close()
        out["after_close"] = leftovers()
    elif scenario in ("break", "consumer_error"):
        # Leaving a loop early keeps the workers for the next loop, which yields that same epoch.
        reference = dataset(store, num_workers=0)
        want = rows_of_epoch(reference)
        try:
            for k, _ in enumerate(ds):
                if k == 0:
                    out["workers"] = worker_pids()
                if k == 3:
                    if scenario == "break":
                        break
                    raise ValueError("consumer failed")
        except ValueError:
            pass
        gc.collect()
        out["between"] = leftovers()
        out["next_epoch_is_the_same"] = rows_of_epoch(ds) == want
        out["workers_after"] = worker_pids()
        ds.close()
        out.update(leftovers())
    elif scenario == "delete":
        it = iter(ds)
        next(it)
        out["workers"] = worker_pids()
        del it, ds
        gc.collect()
        out.update(leftovers())
    elif scenario == "delete_after_epoch":
        rows_of_epoch(ds)
        out["workers"] = worker_pids()
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
    elif scenario in ("interrupt", "interrupt_uncaught"):
        # The parent sends SIGINT (maybe several) once we say we are iterating. Python raises
        # KeyboardInterrupt only if SIGINT was not ignored when it started, and a shell ignores it for
        # background jobs (a CI runner may be one): install the handler a terminal user would have.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        n = 0
        try:
            while True:
                for _ in ds:
                    if n == 0:
                        print(json.dumps({"workers": worker_pids(), "pid": os.getpid()}), flush=True)
                    n += 1
        except KeyboardInterrupt:
            if scenario == "interrupt_uncaught":
                raise  # as a script stopped at a terminal: the interpreter prints it and exits
            out["interrupted"] = True
        gc.collect()
        out["next_epoch_rows"] = sorted(rows_of_epoch(ds))
        ds.close()
        out.update(leftovers())
    elif scenario in ("main_killed", "main_killed_with_helper", "main_killed_while_workers_start"):
        if scenario != "main_killed_while_workers_start":  # else: killed while the workers import
            it = iter(ds)
            next(it)
        if scenario != "main_killed" and os.fork() == 0:
            time.sleep(60)  # a forked helper (sharing our resource tracker) outlives us
            os._exit(0)
        print(json.dumps({"workers": worker_pids(), "pid": os.getpid()}), flush=True)
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
        out["workers_rss"] = [psutil.Process(p).memory_info().rss for p in worker_pids()]
        ds.close()
    elif scenario == "held_batches":
        # Hold every batch while iterating, with a ring of only two slots.
        probe = dataset(store, num_workers=0)
        plan = plan_epoch(probe._plan_config(), 1)
        layout = _grown(slot_layout(probe._sources[0], probe._indptrs(), plan))
        ds = dataset(store, memory_budget=int(layout.nbytes * 2.5))
        ds.set_epoch(1)
        batches = list(ds)
        out["slots"] = len(ds._runtime.engine.ring)
        ds.close()
        out.update(leftovers())
        # Batches are still valid after close(): compare with a fresh in-process epoch.
        ref = dataset(store, num_workers=0)
        ref.set_epoch(1)
        ref = list(ref)
        out["equal"] = all(
            torch.equal(a[2], b[2]) and torch.equal(a[0].to_dense(), b[0].to_dense()) for a, b in zip(batches, ref)
        ) and len(batches) == len(ref)
    elif scenario == "fork":
        # A child forked after a complete epoch (workers up) uses the dataset and exits normally,
        # running its finalizers; the parent's workers and ring must survive it.
        want = [rows_of_epoch(dataset(store, num_workers=0, seed=s)) for s in (0,)]
        rows_of_epoch(ds)  # epoch 0
        out["workers"] = worker_pids()
        out["segments_before"] = len(segment_names(os.getpid()))
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # the child: its own loop (its own workers), then a normal exit
            os.close(r)
            code = 0
            try:
                ds.set_epoch(0)
                rows = rows_of_epoch(ds)
                os.write(w, json.dumps({"rows_ok": rows == want[0], "workers": worker_pids()}).encode())
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                os.write(w, json.dumps({"error": repr(e)}).encode())
                code = 1
            os.close(w)
            sys.exit(code)  # atexit handlers and finalizers run, as at any normal exit
        os.close(w)
        with os.fdopen(r) as f:
            out["child"] = json.loads(f.read() or "{}")
        out["child_exit"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        out["segments_after"] = len(segment_names(os.getpid()))
        rows = rows_of_epoch(ds)  # epoch 1, on the parent's own workers
        out["parent_epoch_ok"] = sorted(rows) == list(range(1000)) and rows != want[0]
        out["workers_after"] = worker_pids()
        ds.close()
        out.update(leftovers())
    elif scenario in ("fork_mid_loop", "fork_exit"):
        # fork_mid_loop: a child forked mid-loop goes on with the inherited loop; the parent holds
        # batches and goes on with its own. fork_exit: a child runs its own loop and leaves with
        # os._exit (as multiprocessing's fork workers do): its ring must not outlive it.
        want = [batch_bytes(b) for b in dataset(store, num_workers=0)]
        it = iter(ds)
        held = [next(it) for _ in range(3)]
        before = [batch_bytes(b) for b in held]
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            if scenario == "fork_mid_loop":
                del held
                rest = [batch_bytes(b) for b in it]
                report = {"rest_ok": before + rest == want}
            else:
                ds.set_epoch(0)
                report = {"own_ok": [batch_bytes(b) for b in ds] == want, "pid": os.getpid()}
                report["segments"] = len(segment_names(os.getpid()))
            os.write(w, json.dumps(report).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out["child"] = json.loads(f.read() or "{}")
        os.waitpid(child, 0)
        rest = [batch_bytes(b) for b in it]
        out["parent_ok"] = before + rest == want and [batch_bytes(b) for b in held] == before
        if scenario == "fork_exit":
            deadline = time.monotonic() + 10  # the child's workers notice within a second or two
            while segment_names(child) and time.monotonic() < deadline:
                time.sleep(0.2)
            out["child_segments_after_exit"] = segment_names(child)
        ds.close()
        out.update(leftovers())
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
