"""Seconds to the first batch, and where they go, in fresh processes.

Each measurement is a new Python process that imports arrayloaders, builds
a ``ZarrSparseDataset`` over ``--store`` (``add_store``), spends ``pause``
seconds "building a model" (a sleep), then takes the first batch. It
reports, medians over ``--repeats`` processes:

- ``add_store``: building the dataset (the workers start, without waiting);
- ``workers up``: from the start of ``add_store`` until every worker has
  reported it started (imported and opened the store), watched from a
  thread of the measuring process;
- ``first batch``: from the first ``next()`` to the first batch;
- ``first epoch``: cells/s over the first epoch, set-up included, pause not.

``--cold`` evicts the store's pages first (``POSIX_FADV_DONTNEED``).

    python scripts/measure/first_batch.py --store /tmp/al-bench/store --workers 2 --pauses 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the benchmark's page-cache control
from benchmark import evict, warm  # noqa: E402

CHILD = """
import json, sys, threading, time
from arrayloaders import ZarrSparseDataset
store, workers, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
up = {}

def watch(ds):  # when every worker's "started" message is waiting in its pipe (peeked at, not read)
    while True:
        engine = ds._runtime.engine
        pool = engine.pool if engine is not None else None
        if pool is not None and all(t is not None or c.poll() for t, c in zip(pool.started_at, pool._replies)):
            up["s"] = time.monotonic() - start
            return
        if time.perf_counter() - start > 120:
            return
        time.sleep(0.002)

start = time.monotonic()
t = time.perf_counter()
ds = ZarrSparseDataset(4096, 32, 256, num_workers=workers).add_store(store, obs_keys="cell_type")
add = time.perf_counter() - t
watcher = threading.Thread(target=watch, args=(ds,), daemon=True)
watcher.start()
time.sleep(pause)
t1 = time.perf_counter()
it = iter(ds)
X, _ = next(it)
first = time.perf_counter() - t1
n = X.shape[0]
for X, _ in it:
    n += X.shape[0]
epoch = time.perf_counter() - t1
watcher.join(1)
print(json.dumps({"add_store_s": add, "workers_up_s": up.get("s"), "first_batch_s": first,
                  "first_epoch_cells_per_s": n / (add + epoch)}))
"""


def measure(store: Path, workers: int, pause: float, cold: bool) -> dict:
    (evict if cold else warm)(store)
    res = subprocess.run([sys.executable, "-c", CHILD, str(store), str(workers), str(pause)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--pauses", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="seconds of model building")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="evict the store's pages before each process")
    p.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = p.parse_args()
    rows = []
    print("| workers | model building (s) | add_store (s) | workers up (s) | first batch (s) | first epoch (cells/s) |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        for pause in args.pauses:
            runs = [measure(args.store, workers, pause, args.cold) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs if r[k] is not None) if any(r[k] is not None for r in runs)
                   else float("nan") for k in runs[0]}  # fmt: skip
            rows.append({"workers": workers, "pause_s": pause, "cold": args.cold, **med, "runs": runs})
            print(f"| {workers} | {pause:g} | {med['add_store_s']:.3f} | {med['workers_up_s']:.3f} | "
                  f"{med['first_batch_s']:.3f} | {med['first_epoch_cells_per_s']:,.0f} |", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
