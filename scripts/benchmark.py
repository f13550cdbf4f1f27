#!/usr/bin/env python
"""Throughput of one shuffled epoch, side by side with baselines measured in the same run.

Generates (or reuses) a realistic dataset under ``--data``, converts it, and
measures each loader in a fresh subprocess (so peak RSS is its own):

- ``arrayloaders``: ZarrSparseDataset over the store (sparse CSR tensors + cell_type);
- ``sequential-decode``: every row of the store read in order (the I/O + decode limit);
- ``scipy-gather``: the whole X in memory, shuffled batches by scipy row indexing
  (the in-memory upper bound);
- ``annbatch``: annbatch 0.3.1 on its own store of the same input, run by
  ``scripts/annbatch_runner.py`` in its own Python 3.12 venv (skipped, with the
  reason, when that venv is missing).

Example::

    python scripts/benchmark.py --data /tmp/arrayloaders-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ANNBATCH_PYTHON = Path("/tmp/annbatch-venv/bin/python")


class PeakRSS:
    """Samples the RSS of this process and its children (the process tree) in a thread."""

    def __init__(self, interval: float = 0.02):
        self.peak, self._stop, self._interval = 0, threading.Event(), interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed_epoch(batches, n_cells_of) -> dict:
    """Iterate ``batches`` to the end; cells/s, first-batch latency, peak RSS."""
    with PeakRSS() as rss:
        start = time.perf_counter()
        first, cells, n = None, 0, 0
        for b in batches:
            if first is None:
                first = time.perf_counter() - start
            cells += n_cells_of(b)
            n += 1
        wall = time.perf_counter() - start
    return {"cells": cells, "batches": n, "wall_s": wall, "cells_per_s": cells / wall, "first_batch_s": first,
            "peak_rss_bytes": rss.peak}  # fmt: skip


# --------------------------------------------------------------------------- measurements (child processes)


def run_arrayloaders(store: Path, args) -> dict:
    from arrayloaders import ZarrSparseDataset

    ds = ZarrSparseDataset(args.batch_size, args.chunk_size, args.preload_nchunks).add_store(store, obs_keys="cell_type")
    return timed_epoch(ds, lambda b: b[0].shape[0])


def run_sequential(store: Path, args) -> dict:
    import zarr

    from arrayloaders import read_manifest
    from arrayloaders.store import use_zarrs

    use_zarrs()
    block = 65536

    def rows():
        for f in read_manifest(store).files:
            g = zarr.open_group(store / f["name"] / "X", mode="r")
            indptr = g["indptr"][:]
            for r in range(0, f["n_obs"], block):
                a, b = indptr[r], indptr[min(r + block, f["n_obs"])]
                g["data"][a:b], g["indices"][a:b]
                yield min(block, f["n_obs"] - r)

    return timed_epoch(rows(), lambda n: n)


def run_scipy_gather(store: Path, args) -> dict:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from arrayloaders import read_manifest

    X = sp.vstack([ad.read_zarr(store / f["name"]).X for f in read_manifest(store).files], format="csr")
    order = np.random.default_rng(0).permutation(X.shape[0])
    batches = (X[order[i : i + args.batch_size]] for i in range(0, X.shape[0], args.batch_size))
    return timed_epoch(batches, lambda b: b.shape[0])


RUNNERS = {"arrayloaders": run_arrayloaders, "sequential-decode": run_sequential, "scipy-gather": run_scipy_gather}


# --------------------------------------------------------------------------- orchestration


def prepare(args) -> tuple[list[Path], Path, dict]:
    from arrayloaders.example_data import write_example_h5ads

    h5ad_dir, store = args.data / "h5ad", args.data / "store"
    paths = sorted(h5ad_dir.glob("part_*.h5ad"))
    if len(paths) != args.n_files:
        print(f"generating {args.n_files} x {args.cells_per_file} cells x {args.n_vars} genes -> {h5ad_dir}", flush=True)
        paths = write_example_h5ads(h5ad_dir, [args.cells_per_file] * args.n_files, args.n_vars, nnz_per_cell=args.nnz)
    conversion = {}
    if not (store / "arrayloaders.json").exists() or args.reconvert:
        cmd = [sys.executable, str(REPO / "scripts" / "convert.py"), *map(str, paths), "-o", str(store), "-q", "--overwrite"]
        conversion = run_child(cmd)
    return paths, store, conversion


def run_child(cmd: list[str]) -> dict:
    """Run a command; wall time and peak RSS of its process tree (sampled)."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_bytes": peak, "stdout": out}


def measure(name: str, store: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--store", str(store), "--batch-size", str(args.batch_size),
           "--chunk-size", str(args.chunk_size), "--preload-nchunks", str(args.preload_nchunks)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"skipped": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_annbatch(paths: list[Path], args) -> tuple[dict, dict]:
    if not ANNBATCH_PYTHON.exists():
        reason = f"no annbatch venv at {ANNBATCH_PYTHON} (see scripts/annbatch_runner.py)"
        return {"skipped": reason}, {"skipped": reason}
    runner = str(REPO / "scripts" / "annbatch_runner.py")
    store = args.data / "annbatch_store"
    conversion = {}
    if not store.exists():
        res = run_child([str(ANNBATCH_PYTHON), runner, "convert", "--inputs", *map(str, paths), "--output", str(store)])
        conversion = {**json.loads(res["stdout"].strip().splitlines()[-1]), "peak_rss_bytes": res["peak_rss_bytes"]}
    out = subprocess.run(
        [str(ANNBATCH_PYTHON), runner, "load", "--store", str(store), "--batch-size", str(args.batch_size),
         "--chunk-size", str(args.chunk_size), "--preload-nchunks", str(args.preload_nchunks), "--obs-key", "cell_type"],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        return {"skipped": f"annbatch failed: {out.stderr.strip()[-300:]}"}, conversion
    return json.loads(out.stdout.strip().splitlines()[-1]), conversion


def table(results: dict[str, dict]) -> str:
    base = results.get("annbatch", {}).get("cells_per_s")
    gather = results.get("scipy-gather", {}).get("cells_per_s")
    lines = ["| loader | cells/s | x annbatch | x scipy gather | first batch (s) | peak RSS (GiB) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        cps = r["cells_per_s"]
        ratio = lambda b: f"{cps / b:.2f}" if b else "n/a"  # noqa: E731
        lines.append(
            f"| {name} | {cps:,.0f} | {ratio(base)} | {ratio(gather)} | {r['first_batch_s']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/tmp/arrayloaders-bench"), help="where data and stores go")
    p.add_argument("--n-files", type=int, default=8)
    p.add_argument("--cells-per-file", type=int, default=25_000)
    p.add_argument("--n-vars", type=int, default=33_538)
    p.add_argument("--nnz", type=int, default=2_500, help="mean non-zeros per cell")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument("--loaders", nargs="+", default=[*RUNNERS, "annbatch"], help="which to measure")
    p.add_argument("--reconvert", action="store_true", help="rebuild the store even if it exists")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(RUNNERS[args.child](args.store, args)))
        return
    paths, store, conversion = prepare(args)
    if conversion:
        print(f"arrayloaders conversion: {conversion['wall_s']:.1f} s, peak RSS {conversion['peak_rss_bytes'] / 2**30:.2f} GiB")
    results = {}
    for name in args.loaders:
        if name == "annbatch":
            results[name], ab_conv = measure_annbatch(paths, args)
            if ab_conv.get("wall_s"):
                print(f"annbatch conversion: {ab_conv['wall_s']:.1f} s, peak RSS {ab_conv['peak_rss_bytes'] / 2**30:.2f} GiB")
        else:
            results[name] = measure(name, store, args)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
