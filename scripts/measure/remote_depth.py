#!/usr/bin/env python
"""How many requests in flight hide a 20 ms round trip, for a store read from s3://?

Starts SeaweedFS here (tests/s3_server.py), uploads a store, and reads it
through a proxy that adds ``--latency-ms`` to every request, once per depth
(``ARRAYLOADERS_REMOTE_DEPTH``: requests in flight per process), each in a
fresh process: first batch, first epoch and steady state (the last of
``--epochs``), alternating the depths ``--repeats`` times; medians::

    python scripts/measure/remote_depth.py --store /tmp/bench-remote/store              # from benchmark.py --remote
    python scripts/measure/remote_depth.py --store /tmp/bench-remote/store --depths 4 32

The store is any arrayloaders store on disk (``scripts/benchmark.py --remote``
makes one under ``--data``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts")]


def child(url: str, options: dict, args) -> dict:
    """One process's epochs (run with ``--child``)."""
    from arrayloaders import ZarrSparseDataset

    start = time.perf_counter()
    ds = ZarrSparseDataset(args.batch_size, args.chunk_size, args.preload_nchunks, num_workers=args.workers)
    ds.add_store(url, obs_keys="cell_type", storage_options=options)
    setup = time.perf_counter() - start
    epochs = []
    for epoch in range(args.epochs):
        ds.set_epoch(epoch)
        t, first, cells = time.perf_counter(), None, 0
        for X, _ in ds:
            first = first if first is not None else time.perf_counter() - t
            cells += X.shape[0]
        epochs.append({"cells": cells, "wall_s": time.perf_counter() - t, "first_batch_s": first})
    ds.close()
    return {"setup_s": setup, "epochs": epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]), args)))
        return

    import benchmark_remote as br
    from s3_server import Proxy, SeaweedFS, weed_binary

    server = SeaweedFS(args.store.parent / "seaweedfs-depth", weed_binary()).start()
    try:
        server.create_bucket(br.BUCKET)
        url = br.upload(args.store, server.endpoint, "depth")
        proxy = Proxy(("127.0.0.1", server.s3_port), delay_s=args.latency_ms / 1000)
        runs: dict[int, list[dict]] = {d: [] for d in args.depths}
        for _ in range(args.repeats):
            for depth in args.depths:
                cmd = [sys.executable, __file__, "--store", str(args.store), "--workers", str(args.workers),
                       "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
                       "--preload-nchunks", str(args.preload_nchunks), "--epochs", str(args.epochs),
                       "--child", url, json.dumps(br.storage_options(proxy.endpoint))]  # fmt: skip
                env = {**os.environ, "ARRAYLOADERS_REMOTE_DEPTH": str(depth)}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                runs[depth].append(json.loads(out.strip().splitlines()[-1]))
        proxy.close()
    finally:
        server.stop()
    print(f"{args.latency_ms:g} ms added per request, {args.workers} workers, {os.cpu_count()} cores, SeaweedFS here; "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| requests in flight | steady cells/s | first epoch cells/s | first batch s |\n|---:|---:|---:|---:|")
    for depth, rs in runs.items():
        steady = statistics.median(r["epochs"][-1]["cells"] / r["epochs"][-1]["wall_s"] for r in rs)
        first = statistics.median(r["epochs"][0]["cells"] / (r["setup_s"] + r["epochs"][0]["wall_s"]) for r in rs)
        batch = statistics.median(r["epochs"][0]["first_batch_s"] for r in rs)
        print(f"| {depth} | {steady:,.0f} | {first:,.0f} | {batch:.2f} |")


if __name__ == "__main__":
    main()
