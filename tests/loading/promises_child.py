"""Scenarios of test_promises.py that need a process of their own.

Usage: ``python promises_child.py SCENARIO STORE OUTDIR [JSON_ARGS]``. Each
writes its findings as JSON to ``OUTDIR/rank{RANK}.json`` (rank 0 without a
process group); the parent asserts on them. A hang is ended by the parent's
timeout (and, under DDP, by the group's collective timeout), so it fails one
test, not the suite.

- ``small_shm``: run inside a mount namespace whose ``/dev/shm`` is a 64 MiB
  tmpfs (Docker's default), made by the parent with ``unshare``.
- ``ddp_epoch_mismatch``, ``ddp_batch_size_mismatch``: one rank of a gloo group
  (``WORLD_SIZE``, ``RANK`` and ``INIT_METHOD``, a ``file://`` rendezvous, in the environment; without
  ``INIT_METHOD``, ``env://``: ``MASTER_ADDR``, ``MASTER_PORT``).
- ``numba_cache``: loops that use numba's compiled code (chunked loads, a
  sampler's gathers, chosen genes, densified rows), run with whatever numba
  environment the parent set (a read-only cache directory, ...).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest.py
from conftest import worker_pids  # noqa: E402

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset  # noqa: E402
from arrayloaders.loading.ring import SHM_DIR, segment_names  # noqa: E402


def digest(ds) -> list[str]:
    """One sha1 per batch of the next loop: X's arrays (dtype, shape and bytes) and the row indices."""
    out = []
    for X, _, index in ds:
        h = hashlib.sha1()
        parts = (X.crow_indices(), X.col_indices(), X.values()) if X.layout == torch.sparse_csr else (X,)
        for part in (*parts, index):
            a = part.numpy()
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        out.append(h.hexdigest())
    return out


def leftovers() -> dict:
    time.sleep(0.3)  # let stopped workers be reaped
    return {"segments": segment_names(os.getpid()), "workers": worker_pids()}


# The numba_cache scenario's loops: (name, dataset class, keyword arguments).
NUMBA_LOOPS = [
    ("chunked", "sparse", {}),
    ("sampler", "sparse", {"sampler": list(range(999, -1, -3))}),
    ("genes", "sparse", {"var_names": ["gene_7", "gene_3", "gene_200", "gene_42"]}),
    ("densified", "dense", {}),
]


def numba_loops(store: str, num_workers: int) -> dict[str, list[str]]:
    out = {}
    for name, kind, kw in NUMBA_LOOPS:
        cls = ZarrDenseDataset if kind == "dense" else ZarrSparseDataset
        ds = cls(batch_size=50, chunk_size=8, preload_nchunks=12, num_workers=num_workers, return_index=True, **kw)
        with ds.add_store(store) as ds:
            out[name] = digest(ds) + digest(ds)  # two epochs: workers serve the second with the code loaded
    return out


def main(scenario: str, store: str, outdir: Path, args: dict, rank: int, world_size: int) -> dict:
    out: dict = {"scenario": scenario, "rank": rank, "pid": os.getpid()}
    if scenario == "small_shm":
        st = os.statvfs(SHM_DIR)
        out["shm_bytes"] = st.f_blocks * st.f_frsize
        kw = {"batch_size": 64, "chunk_size": 32, "preload_nchunks": 64, "return_index": True}
        # Densified rows: slots of 2,048 rows x all genes (~23 MiB each), six of them for 2 workers.
        ds = ZarrDenseDataset(num_workers=2, **kw).add_store(store)
        out["workers_before"] = worker_pids()
        try:
            next(iter(ds))
            out["error"] = None
        except Exception as e:  # noqa: BLE001 - reported to the parent, which checks type and message
            out["error"], out["error_type"] = str(e), type(e).__name__
        out["after_error"] = leftovers()
        out["second_error"] = None
        try:  # the next loop starts afresh, and is refused the same way
            next(iter(ds))
        except Exception as e:  # noqa: BLE001
            out["second_error"] = str(e)
        ds.close()
        # What the message advises: a smaller memory_budget, or a smaller preload_nchunks.
        with ZarrDenseDataset(num_workers=0, **kw).add_store(store) as reference:
            want = digest(reference)
        out["fixed"] = {}
        for name, fix in {"memory_budget": {"memory_budget": "56MiB"}, "preload_nchunks": {"preload_nchunks": 16}}.items():
            with ZarrDenseDataset(num_workers=2, **{**kw, **fix}).add_store(store) as ds:
                got = digest(ds)
                slots = len(ds._runtime.engine.ring)
            if fix.get("preload_nchunks"):
                with ZarrDenseDataset(num_workers=0, **{**kw, **fix}).add_store(store) as reference:
                    expected = digest(reference)
            else:
                expected = want
            out["fixed"][name] = {"equal": got == expected and len(got) > 0, "slots": slots}
        # Batches held across epochs keep their slots' memory: the ring gives those slots new segments until
        # /dev/shm is full, and must then say so, not let a worker die of SIGBUS filling one.
        small = {**kw, "preload_nchunks": 16}
        with ZarrDenseDataset(num_workers=0, **small).add_store(store) as reference:
            epochs = [digest(reference) for _ in range(6)]
        ds = ZarrDenseDataset(num_workers=2, memory_budget="24MiB", **small).add_store(store)
        held, sums = [], []
        try:
            for _ in range(6):  # 6 epochs of 4 loads in 6 MiB slots: more than 64 MiB
                for batch in ds:
                    held.append(batch)
                    sums.append(digest([batch]))
            out["held_error"] = None
        except Exception as e:  # noqa: BLE001
            out["held_error"], out["held_error_type"] = str(e), type(e).__name__
        out["held_batches"] = len(held)
        out["held_unchanged"] = [digest([b]) for b in held] == sums
        out["held_as_reference"] = [d for (d,) in sums] == [d for e in epochs for d in e][: len(held)]
        del held, batch
        ds.set_epoch(0)
        out["after_dropping"] = digest(ds) == epochs[0]  # the next loop starts afresh
        ds.close()
        out["end"] = leftovers()
    elif scenario in ("ddp_epoch_mismatch", "ddp_batch_size_mismatch"):
        from ddp_child import dataset, epoch

        kw = {"num_workers": args.get("num_workers", 0)}
        if scenario == "ddp_batch_size_mismatch":
            kw["batch_size"] = 50 if rank == 0 else 40
        ds = dataset(store, **kw)
        if scenario == "ddp_epoch_mismatch":
            ds.set_epoch(rank)  # rank 0: epoch 0, rank 1: epoch 1
        try:
            out["batches"] = epoch(ds)
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
        ds.close()
        out["after"] = leftovers()  # once closed: nothing of the refused loop is left
        import torch.distributed as dist

        dist.barrier()  # the group still works after the refusal
        out["barrier"] = True
    elif scenario == "numba_cache":
        from arrayloaders.store.chunk_gather import chunk_gather

        out["compiled_loop"] = chunk_gather() is not None
        out["loops"] = {w: numba_loops(store, w) for w in (0, 2)}
        out["end"] = leftovers()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return out


if __name__ == "__main__":
    from ddp_child import run_as_rank

    run_as_rank(main)
