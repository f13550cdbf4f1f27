"""How busy the workers and the main process are in the steady state, batches pinned and copied to the GPU.

One warm-up epoch, then four epochs of ``for X, y in ds`` with each batch
sent to the device (``--to cuda``, the default where CUDA is available) or
dropped (``--to cpu``); prints cells/s, the share of the wall time the main
thread spent in ``next()``, and each process's CPU time over the wall time.

    python scripts/measure/worker_load.py --store /tmp/al-bench/store --workers 16
"""

from __future__ import annotations

import argparse
import json
import time

import psutil
import torch

from arrayloaders import ZarrSparseDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--to", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cuda = args.to == "cuda"
    ds = ZarrSparseDataset(4096, 32, 256, num_workers=args.workers, pin_memory=cuda)
    ds.add_store(args.store, obs_keys="cell_type")

    def epoch(number: int) -> tuple[int, float]:
        ds.set_epoch(number)
        cells, waited, it = 0, 0.0, iter(ds)
        while True:
            t = time.perf_counter()
            try:
                X, y = next(it)
            except StopIteration:
                return cells, waited
            waited += time.perf_counter() - t
            if cuda:
                X.to("cuda", non_blocking=True), y.to("cuda", non_blocking=True)
            cells += X.shape[0]

    with ds:
        epoch(0)
        processes = [psutil.Process()] + [psutil.Process(w.pid) for w in ds._runtime.engine.pool.processes]
        before = [q.cpu_times() for q in processes]
        start, cells, waited = time.perf_counter(), 0, 0.0
        for number in range(1, 1 + args.epochs):
            n, w = epoch(number)
            cells, waited = cells + n, waited + w
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        busy = [
            (b.user + b.system - a.user - a.system) / wall for a, b in zip(before, [q.cpu_times() for q in processes])
        ]
    print(json.dumps({
        "cells_per_s": round(cells / wall), "main_in_next": round(waited / wall, 2), "main_cpu": round(busy[0], 2),
        "workers_cpu": [round(b, 2) for b in busy[1:]], "workers_cpu_mean": round(sum(busy[1:]) / len(busy[1:]), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
