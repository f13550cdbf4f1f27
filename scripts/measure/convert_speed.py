"""Conversion speed and memory at several ``n_jobs``: cells/s and peak RSS of the process tree.

Generates ``.h5ad`` inputs once (``--cells`` over ``--files`` files, ``--genes``
genes, ``--nnz`` non-zeros per cell on average), then converts them once per
``--jobs`` value, each in a fresh process, and checks that every store is the
same, byte for byte. Peak RSS is that of the converting process (the
kernel's peak) and its task processes (sampled every 50 ms), so it counts
each process's own copy of the libraries too.

Examples::

    python scripts/measure/convert_speed.py --jobs 1 2                     # 200k cells x 33,538 genes, 2,500 per cell
    python scripts/measure/convert_speed.py --cells 2000000 --genes 100 --nnz 10 --jobs 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def child(args) -> dict:
    from scale import peak_growth  # scripts/measure/scale.py, beside this file

    from arrayloaders import create_store_from_h5ads

    def convert() -> float:
        start = time.perf_counter()
        create_store_from_h5ads(sorted(Path(args.data).glob("part_*.h5ad")), args.store, overwrite=True,
                                progress=False, n_jobs=args.n_jobs, memory_budget=args.memory_budget,
                                n_obs_per_file=args.n_obs_per_file)  # fmt: skip
        return time.perf_counter() - start

    wall, growth = peak_growth(convert)
    return {"wall_s": wall, "peak_growth_bytes": growth}


def digest(store: Path) -> str:
    """Of every file's bytes, but the manifest's random store_id (each conversion gets its own)."""
    h = hashlib.sha256()
    for p in sorted(store.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(store)).encode())
            data = p.read_bytes()
            if p.name == "arrayloaders.json":
                manifest = json.loads(data)
                manifest.pop("store_id", None)
                data = json.dumps(manifest).encode()
            h.update(data)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--files", type=int, default=8, help="input files")
    p.add_argument("--genes", type=int, default=33_538)
    p.add_argument("--nnz", type=float, default=2_500, help="mean non-zeros per cell")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-obs-per-file", type=int, default=2**20,
                   help="cells per output file: output files are written in parallel, so fewer files than "
                        "processes leave some idle (default: the library's, %(default)s)")  # fmt: skip
    p.add_argument("--memory-budget", default=None, help="memory_budget of each conversion (default: the library's)")
    p.add_argument("--data", type=Path, default=Path("/tmp/arrayloaders-convert-speed"))
    p.add_argument("--out", type=Path, help="write the report as JSON here too")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--n-jobs", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from arrayloaders.example_data import write_example_h5ads

    inputs = args.data / f"h5ad_{args.cells}_{args.genes}_{args.nnz:g}"
    if not (inputs / f"part_{args.files - 1}.h5ad").exists():
        per = args.cells // args.files
        sizes = [per] * (args.files - 1) + [args.cells - per * (args.files - 1)]
        write_example_h5ads(inputs, n_obs=sizes, n_vars=args.genes, nnz_per_cell=args.nnz)
    rows, digests = [], {}
    for n in args.jobs:
        store = args.data / f"store_jobs{n}"
        cmd = [sys.executable, __file__, "--child", f"--data={inputs}", f"--store={store}", f"--n-jobs={n}",
               f"--n-obs-per-file={args.n_obs_per_file}"]  # fmt: skip
        if args.memory_budget:
            cmd.append(f"--memory-budget={args.memory_budget}")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"conversion with n_jobs={n} failed:\n{out.stderr[-3000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        digests[n] = digest(store)
        rows.append({"n_jobs": n, "cells_per_s": args.cells / run["wall_s"], **run})
        print(f"n_jobs={n:<3} {args.cells / run['wall_s']:>10,.0f} cells/s  {run['wall_s']:7.1f} s  "
              f"peak RSS +{run['peak_growth_bytes'] / 2**20:,.0f} MiB", flush=True)  # fmt: skip
    same = len(set(digests.values())) == 1
    print(f"stores identical across n_jobs: {same}")
    report = {"cells": args.cells, "genes": args.genes, "nnz_per_cell": args.nnz, "cores": psutil.cpu_count(),
              "n_obs_per_file": args.n_obs_per_file,
              "runs": rows, "identical": same}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if not same:
        raise SystemExit("the stores differ across n_jobs")


if __name__ == "__main__":
    main()
