"""What one worker's load costs on each of its two loops: the Python one (run by run) and the compiled one.

A worker reads chunked loads run by run in Python until numba's compiled
loop is loaded (``arrayloaders.store.chunk_gather``), then inner chunk by inner
chunk through it. This reads the first loads of an epoch of the default
settings (chunk 32, preload 256) in this process, into one reused output
as a worker's slot is, both ways, checks that both give the same bytes,
and prints one JSON object: milliseconds per load (median) and cells/s of
each loop, and what loading the compiled loop cost this process.

    python scripts/measure/load_paths.py --store /tmp/al-bench/store
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from arrayloaders import ZarrSparseDataset
from arrayloaders.loading.load import LoadedRows, load_nnz, read_load
from arrayloaders.loading.plan import plan_epoch
from arrayloaders.store import shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--loads", type=int, default=8)
    args = p.parse_args()
    ds = ZarrSparseDataset(args.batch_size, args.chunk_size, args.preload_nchunks, num_workers=0).add_store(args.store)
    readers = ds._open_readers().x
    plan = plan_epoch(ds._plan_config(), 0)
    loads = [(spec, plan.take(spec)) for spec in plan.loads[: args.loads + 1]]
    if len(loads) < 2:
        raise SystemExit(f"the epoch has {len(loads)} load(s): need 2 (the first only faults the output in)")
    nnz = max(load_nnz([r.indptr for r in readers], spec.runs) for spec, _ in loads)
    out = LoadedRows(None, np.empty(max(s.n_rows for s, _ in loads) + 1, np.int64), np.zeros(nnz, readers[0].source.dtype),
                     np.zeros(nnz, np.int32))  # fmt: skip

    def timed(compiled: bool) -> tuple[list[float], list[bytes]]:
        shards._compiled_loop_warm = lambda: compiled  # noqa: E731 - this process only
        seconds, digests = [], []
        for k, (spec, take) in enumerate(loads):
            start = time.perf_counter()
            got = read_load(readers, spec, take, out)
            if k:  # the first load faults the output's pages in
                seconds.append(time.perf_counter() - start)
            digests.append(got.indptr.tobytes() + got.data.tobytes() + got.indices.tobytes())
        return seconds, digests

    start = time.perf_counter()
    from arrayloaders.store.chunk_gather import warm

    warm()
    warm_s = time.perf_counter() - start
    python_s, python_bytes = timed(False)
    compiled_s, compiled_bytes = timed(True)
    if python_bytes != compiled_bytes:
        raise SystemExit("the two loops read different bytes")
    cells = statistics.mean(s.n_rows for s, _ in loads[1:])
    report = {"loads": len(python_s), "cells_per_load": cells, "warm_s": round(warm_s, 3)}
    for name, seconds in (("python", python_s), ("compiled", compiled_s)):
        report[f"{name}_ms_per_load"] = round(1e3 * statistics.median(seconds), 1)
        report[f"{name}_cells_per_s"] = round(cells / statistics.median(seconds))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
