"""Memory per cell at scale: conversion, the loader's main process and each worker, extrapolated to 100M cells.

Generates stores of two sizes with few genes (so the cell count dominates),
and measures in fresh processes:

- **conversion**: peak RSS of ``create_store_from_h5ads`` above the
  process's RSS before it (the kernel's peak of this process on Linux, and
  sampled every 50 ms with its worker processes);
- **loader, main process**: private memory (USS) growth from before
  ``add_store`` to the end of two epochs (2 workers, ``obs_keys="cell_type"``);
- **loader, each worker**: its private memory at the end of the second epoch
  (the ring and the shared row pointers are shared memory, so not counted).
  A worker loads numba's compiled loop in a thread as it starts (~15 MB,
  seconds where numba's on-disk cache is cold); a small store's epochs can
  end before it has, which showed as 10-63 bytes per cell: numba's cache is
  filled first, and the loader runs epochs until every worker has numba,
  then one more;
- **planning**: seconds to plan one epoch of 100M cells (3M chunks of 32).

Bytes per cell are the growth between the two sizes divided by the cells
between them, so fixed costs (imports, buffers) cancel out; the
extrapolation multiplies them by 100M. Inputs and output files have one
size at both sizes (``--cells-per-input``, ``--n-obs-per-file``), so what
reading one input or writing one file costs cancels out too; what each
output file costs the loader (open arrays, ~0.25 MB per worker) does not,
and shows as per cell here (at the default of 2^20 cells per file, a tenth).

Examples::

    python scripts/measure/scale.py                          # 400k and 1.6M cells: a few minutes
    python scripts/measure/scale.py --sizes 20000 60000 --cells-per-input 10000 --n-obs-per-file 10000  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

TARGET = 100_000_000


def _tree_rss(proc: psutil.Process) -> int:
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def _reset_high_water_mark() -> bool:
    """Reset this process's peak RSS (Linux: ``/proc/self/clear_refs``), so that VmHWM reads the peak from now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_growth(run) -> tuple[object, int]:
    """``run()``'s result, and how far the RSS of this process and its children rose above where it was.

    The kernel's exact peak of this process where it keeps one; sampling
    (every 50 ms) adds the child processes and stands in elsewhere.
    """
    proc = psutil.Process()
    before, peak, stop = _tree_rss(proc), [0], threading.Event()
    exact = _reset_high_water_mark()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc))
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = run()
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _tree_rss(proc))
    if exact:
        peak[0] = max(peak[0], _high_water_mark())
    return result, peak[0] - before


def child_convert(args) -> dict:
    from arrayloaders import create_store_from_h5ads

    inputs = sorted(Path(args.h5ads).glob("part_*.h5ad"))
    _, growth = peak_growth(
        lambda: create_store_from_h5ads(inputs, args.store, overwrite=True, progress=False,
                                        n_obs_per_file=args.n_obs_per_file, memory_budget=args.memory_budget)
    )  # fmt: skip
    return {"growth_bytes": growth}


MAX_EPOCHS = 20


def _has_numba(worker: psutil.Process) -> bool:
    """Whether ``worker`` has loaded numba's compiler (llvmlite's library is mapped into it)."""
    return any("llvmlite" in m.path for m in worker.memory_maps())


def child_warm(args) -> dict:
    """Compile numba's loops into their on-disk cache, as any earlier run leaves them: a worker then loads them
    in a fraction of a second rather than compiling them for seconds while the epochs it is measured in run."""
    from arrayloaders.store.chunk_gather import warm

    warm()
    return {}


def child_load(args) -> dict:
    import torch  # noqa: F401 - imported before the baseline, as a training script has it

    from arrayloaders import ZarrSparseDataset

    proc = psutil.Process()
    before = proc.memory_full_info().uss
    ds = ZarrSparseDataset(4096, num_workers=2).add_store(args.store, obs_keys="cell_type")
    # Epochs until every worker has loaded numba (see above), then one more: the steady state at both sizes.
    seen = False
    for _ in range(MAX_EPOCHS):
        cells = 0
        for X, _ in ds:
            cells += X.shape[0]
        if seen:
            break
        workers = [c for c in proc.children(recursive=True) if "arrayloaders.loading.worker" in " ".join(c.cmdline())]
        seen = all(_has_numba(w) for w in workers)
    else:
        raise RuntimeError(f"the workers had not loaded numba after {MAX_EPOCHS} epochs")
    main = proc.memory_full_info().uss - before
    workers = [w.memory_full_info().uss for w in workers]
    ds.close()
    return {"cells": cells, "main_growth_bytes": main, "worker_uss_bytes": workers}


def child_plan(args) -> dict:
    from arrayloaders.loading.plan import PlanConfig, plan_epoch

    config = PlanConfig(tuple([100_000] * (TARGET // 100_000)), 4096, 32, 256)
    start = time.perf_counter()
    plan = plan_epoch(config, 0)
    return {"seconds": time.perf_counter() - start, "loads": len(plan.loads)}


CHILDREN = {"convert": child_convert, "load": child_load, "plan": child_plan, "warm": child_warm}


def run_child(kind: str, env: dict | None = None, **kw) -> dict:
    """One measurement in a fresh process (``env``: extra environment variables)."""
    given = {k: v for k, v in kw.items() if v is not None}
    cmd = [sys.executable, __file__, "--child", kind, *(f"--{k.replace('_', '-')}={v}" for k, v in given.items())]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(size: int, data: Path, per_input: int, n_obs_per_file: int, budget: str | None = None) -> dict:
    from arrayloaders.example_data import write_example_h5ads

    h5ads, store = data / f"h5ad_{size}", data / f"store_{size}"
    if not h5ads.exists():
        n_inputs = -(-size // per_input)
        write_example_h5ads(h5ads, n_obs=[per_input] * (n_inputs - 1) + [size - per_input * (n_inputs - 1)], n_vars=100,
                            nnz_per_cell=10)  # fmt: skip
    conversion = run_child("convert", h5ads=h5ads, store=store, n_obs_per_file=n_obs_per_file, memory_budget=budget)
    load = run_child("load", store=store)
    return {"cells": size, "conversion": conversion, "load": load}


def per_cell(small: dict, large: dict, get) -> float:
    return (get(large) - get(small)) / (large["cells"] - small["cells"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[400_000, 1_600_000], help="cells of the two stores")
    p.add_argument("--cells-per-input", type=int, default=100_000,
                   help="cells per input .h5ad: inputs of one size at both sizes, so that reading one (bounded by "
                        "its size) cancels out")  # fmt: skip
    p.add_argument("--data", type=Path, default=Path("/tmp/arrayloaders-scale"), help="where data and stores go")
    p.add_argument("--out", type=Path, help="write the report as JSON here too")
    p.add_argument("--n-obs-per-file", type=int, default=100_000,
                   help="cells per output file: both sizes must span several, so that the memory of writing one "
                        "file (bounded by this, not by the cell count) cancels out")  # fmt: skip
    p.add_argument("--memory-budget", help="the conversion's memory_budget (default: the library's)")
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--h5ads", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    run_child("warm")
    small, large = (
        measure(n, args.data, args.cells_per_input, args.n_obs_per_file, args.memory_budget) for n in sorted(args.sizes)
    )
    figures = {
        "conversion": per_cell(small, large, lambda m: m["conversion"]["growth_bytes"]),
        "loader main process": per_cell(small, large, lambda m: m["load"]["main_growth_bytes"]),
        "loader, each worker": per_cell(small, large, lambda m: max(m["load"]["worker_uss_bytes"])),
    }
    plan = run_child("plan")
    report = {"sizes": sorted(args.sizes), "bytes_per_cell": figures, "plan_100M_seconds": plan["seconds"],
              "runs": [small, large]}  # fmt: skip
    print(f"{'what':<22} {'bytes per cell':>15} {'at 100M cells':>15}")
    for what, b in figures.items():
        print(f"{what:<22} {b:>15.1f} {b * TARGET / 2**30:>12.1f} GiB")
    print(f"planning one epoch of 100M cells ({plan['loads']:,} loads): {plan['seconds']:.2f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
