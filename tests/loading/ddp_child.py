"""One rank of a torch.distributed (gloo, CPU) scenario, run in a child process by test_distributed.py.

Usage: ``python ddp_child.py SCENARIO STORE OUTDIR [JSON_ARGS]``. With ``WORLD_SIZE`` > 1
in the environment (plus ``RANK`` and ``INIT_METHOD``, e.g. ``file:///tmp/x/rendezvous``;
without it ``env://``: ``MASTER_ADDR``, ``MASTER_PORT``) the process joins a process
group; otherwise it runs alone, without a group. It writes its findings as JSON to ``OUTDIR/rank{RANK}.json``; the parent
asserts on them. A hang here is ended by the parent's timeout (and by the group's
own collective timeout), so it fails one test, not the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from arrayloaders import ZarrSparseDataset

# Small loads, so that an epoch has several of them and batches cross load boundaries.
DATASET_KW = {"batch_size": 50, "chunk_size": 8, "preload_nchunks": 12}


def dataset(store: str, storage_options: dict | None = None, **kw) -> ZarrSparseDataset:
    kw = {**DATASET_KW, "return_index": True, "num_workers": 0, **kw}
    return ZarrSparseDataset(**kw).add_store(store, obs_keys="cell_type", storage_options=storage_options)


def record(X: torch.Tensor, index: torch.Tensor) -> list:
    """One batch as JSON: [global row indices, sha1 of X's CSR arrays (dtypes and bytes)]."""
    h = hashlib.sha1()
    for part in (X.crow_indices(), X.col_indices(), X.values()):
        a = part.numpy()
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    h.update(str(tuple(X.shape)).encode())
    return [index.tolist(), h.hexdigest()]


def epoch(ds) -> list:
    """The records of the next loop over ``ds``."""
    return [record(X, index) for X, _, index in ds]


def head(ds, n: int) -> tuple[list, dict]:
    """The records of the first ``n`` batches of the next loop, and ``ds.state_dict()`` taken then (while it runs)."""
    out, it = [], iter(ds)
    for _ in range(n):
        X, _, index = next(it)
        out.append(record(X, index))
    state = ds.state_dict()
    it.close()
    return out, state


def main(scenario: str, store: str, outdir: Path, args: dict, rank: int, world_size: int) -> dict:
    out: dict = {"scenario": scenario, "rank": rank, "world_size": world_size, "pid": os.getpid()}
    if scenario == "matrix":
        # Every equalize x num_workers combination, epochs 0 and 1; rank/world from the group.
        for equalize in ("drop", "pad"):
            for num_workers in (0, 2):
                with dataset(store, equalize=equalize, num_workers=num_workers) as ds:
                    res = {}
                    for e in (0, 1):
                        ds.set_epoch(e)
                        res[f"len{e}"] = len(ds)
                        res[f"epoch{e}"] = epoch(ds)
                    out[f"{equalize}-{num_workers}"] = res
    elif scenario == "epochs":
        # Epochs 0 and 1 of the store: a path, or a URL with args["storage_options"].
        with dataset(store, args.get("storage_options"), num_workers=args.get("num_workers", 0)) as ds:
            for e in (0, 1):
                ds.set_epoch(e)
                out[f"epoch{e}"] = epoch(ds)
    elif scenario == "seed_mismatch":
        ds = dataset(store, seed=1 if rank == 1 else 0)
        try:
            out["batches"] = epoch(ds)
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
        ds.close()
        dist.barrier()  # the group still works after the refusal
        out["barrier"] = True
    elif scenario == "resume_mismatch":
        # Ranks restored at different positions would yield different batch counts: refused.
        with dataset(store) as ds:
            it = iter(ds)
            [next(it) for _ in range(2 + rank)]
            state = ds.state_dict()
            del it
        ds = dataset(store)
        ds.load_state_dict(state)
        try:
            epoch(ds)
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
        ds.close()
    elif scenario == "resume_save":
        # The uninterrupted epoch, then a fresh dataset that stops after k batches and saves its state.
        kw = {"num_workers": args.get("num_workers", 0)}
        with dataset(store, **kw) as ds:
            ds.set_epoch(1)
            out["full"] = epoch(ds)
        with dataset(store, **kw) as ds:
            ds.set_epoch(1)
            out["first"], state = head(ds, args["k"])
        (outdir / f"state{rank}.json").write_text(json.dumps(state))
        out["state"] = state
    elif scenario == "resume_load":
        # A fresh dataset in a new process: load each saved state, and yield what its epoch had left.
        kw = {"num_workers": args.get("num_workers", 0)}
        out["rest"] = {}
        for name, path in args["states"].items():
            path = path.format(rank=rank)
            with dataset(store, **kw) as ds:
                ds.load_state_dict(json.loads(Path(path).read_text()))
                out["rest"][name] = epoch(ds)
        if "other_rank_state" in args:  # another rank's state: the same position, so the same rest
            with dataset(store, **kw) as ds:
                ds.load_state_dict(json.loads(Path(args["other_rank_state"].format(rank=(rank + 1) % world_size)).read_text()))
                out["other_rank_rest"] = epoch(ds)
    elif scenario == "elastic_save":
        # Per selection: this rank's uninterrupted epoch 1, and a state taken after k batches of it.
        for case in args["cases"]:
            with elastic_dataset(store, case, args) as ds:
                ds.set_epoch(1)
                out[case] = {"full": epoch(ds)}
            with elastic_dataset(store, case, args) as ds:
                ds.set_epoch(1)
                out[case]["first"], state = head(ds, args["k"])
            (outdir / f"state-{case}-{rank}.json").write_text(json.dumps(state))
    elif scenario == "elastic_load":
        # Rank 0's state (taken at another world size) loaded on every rank: the rest of epoch 1, then epoch 2,
        # and epoch 2 of a fresh dataset at this world size.
        for case in args["cases"]:
            with elastic_dataset(store, case, args) as ds:
                ds.load_state_dict(json.loads(Path(args["states"].format(case=case)).read_text()))
                n = len(ds)
                out[case] = {"len": n, "rest": epoch(ds), "next": epoch(ds)}
            with elastic_dataset(store, case, args) as ds:
                ds.set_epoch(2)
                out[case]["fresh_next"] = epoch(ds)
    elif scenario == "sampler":
        # A class-balancing sampler on every rank: each rank yields its share of the one sampled sequence.
        weights = torch.linspace(1, 2, 1000, dtype=torch.float64)
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=args.get("n", 601))
        with dataset(store, sampler=sampler, num_workers=args.get("num_workers", 0)) as ds:
            out["len"] = len(ds)
            out["epoch0"], out["epoch1"] = epoch(ds), epoch(ds)
    elif scenario == "sampler_mismatch":
        # Ranks whose samplers disagree would yield overlapping cells: refused on every rank.
        ds = dataset(store, sampler=list(range(rank, rank + 200)))
        try:
            epoch(ds)
            out["error"] = None
        except ValueError as e:
            out["error"] = str(e)
    elif scenario == "values_mismatch":
        # Ranks that would yield other genes, another layer or other obsm arrays: refused on every rank.
        out["errors"] = []
        for kw, add in args["cases"]:
            kw, add = (kw, add) if rank == 1 else ({}, {})
            ds = ZarrSparseDataset(**{**DATASET_KW, "num_workers": 0, **kw}).add_store(store, obs_keys="cell_type", **add)
            try:
                out["errors"].append(f"no error: {sum(1 for _ in ds)} batches")
            except ValueError as e:
                out["errors"].append(str(e))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return out


def elastic_dataset(store: str, case: str, args: dict) -> ZarrSparseDataset:
    """The dataset of an elastic-resume case: every cell, a subset (``cells=``), or a sampler."""
    kw = {"num_workers": args.get("num_workers", 0)}
    if case == "sampler":
        weights = torch.linspace(1, 2, 1000, dtype=torch.float64)
        return dataset(store, sampler=torch.utils.data.WeightedRandomSampler(weights, num_samples=601), **kw)
    ds = dataset(store, **kw)
    return ds.subset(cells=list(range(2, 1000, 3))) if case == "cells" else ds


def run_as_rank(main) -> None:
    """``main(scenario, store, outdir, args, rank, world_size)`` with this script's arguments, as the rank its
    environment names (in a gloo group for a world of several); its result written to ``outdir/rank{rank}.json``."""
    scenario, store, outdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        # A collective that never completes raises after this long instead of hanging.
        dist.init_process_group(
            "gloo", init_method=os.environ.get("INIT_METHOD", "env://"), rank=int(os.environ["RANK"]),
            world_size=world_size, timeout=timedelta(seconds=args.get("timeout", 45)),
        )  # fmt: skip
    rank = dist.get_rank() if world_size > 1 else 0
    try:
        result = main(scenario, store, outdir, args, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    (outdir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_as_rank(main)
