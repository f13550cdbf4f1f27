#!/usr/bin/env python
"""Throughput of shuffled epochs, side by side with baselines measured in the same run.

Generates (or reuses) a realistic dataset under ``--data``, converts it, and
measures each loader in a fresh subprocess while this process samples the
memory of that subprocess's whole tree (workers included):

- ``arrayloaders-wN``: ZarrSparseDataset with ``num_workers=N`` (sparse CSR
  tensors + cell_type labels);
- ``sequential-decode``: the whole store decoded in order through zarr and
  the zarrs pipeline (the I/O + decode limit of the machine);
- ``scipy-gather``: the whole X in memory, shuffled batches by scipy row
  indexing (the in-memory upper bound);
- ``annbatch-<setting>``: annbatch 0.3.1 on its own store of the same input,
  run by ``scripts/annbatch_runner.py`` in its own Python 3.12 venv (reported
  as skipped, with the reason, when that venv is missing).

Each loader runs ``--epochs`` epochs per process. *Warm*: the store's files
are read into the page cache first, and the figures are the last epoch's
(workers up, caches warm). *Cold*: the store's pages are evicted with
``posix_fadvise(POSIX_FADV_DONTNEED)`` and the figures are the first epoch's,
start-up included. Each figure is the median of ``--repeats`` runs.

Memory is the peak over the run of the summed PSS of the process tree: RSS
with shared pages (the ring's shared memory, mapped by the main process and
the workers) counted once, not once per process.

Output: a markdown table (``results.md``), every measurement
(``results.json``) and a bar chart (``results.png``, needs matplotlib: the
``bench`` extra) in ``--out``.

Examples::

    python scripts/benchmark.py --data /tmp/arrayloaders-bench   # ~200k cells, median of 3
    python scripts/benchmark.py --quick                           # 10k small cells, one run: ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ANNBATCH_PYTHON = Path(os.environ.get("ANNBATCH_PYTHON", "/tmp/annbatch-venv/bin/python"))
ANNBATCH_SETTINGS = ("zarrs", "zarr-python")


# --------------------------------------------------------------------------- measurements (child processes)


def epochs_of(make_batches, n_epochs: int, n_cells_of) -> dict:
    """Iterate ``n_epochs`` epochs; per epoch: cells/s and time to first batch."""
    out = []
    for _ in range(n_epochs):
        start = time.perf_counter()
        first, cells = None, 0
        for b in make_batches():
            if first is None:
                first = time.perf_counter() - start
            cells += n_cells_of(b)
        wall = time.perf_counter() - start
        out.append({"cells": cells, "wall_s": wall, "cells_per_s": cells / wall, "first_batch_s": first})
    return {**out[-1], "epochs": out}


def run_arrayloaders(store: Path, args) -> dict:
    from arrayloaders import ZarrSparseDataset

    ds = ZarrSparseDataset(
        args.batch_size, args.chunk_size, args.preload_nchunks, num_workers=args.workers[0]
    ).add_store(store, obs_keys="cell_type")
    with ds:
        return epochs_of(lambda: ds, args.epochs, lambda b: b[0].shape[0])


def run_sequential(store: Path, args) -> dict:
    import zarr

    from arrayloaders import read_manifest
    from arrayloaders.store import use_zarrs

    use_zarrs()

    def blocks():
        for f in read_manifest(store).files:
            g = zarr.open_group(store / f["name"] / "X", mode="r")
            indptr = g["indptr"][:]
            step = g["data"].shards[0] * 4 if g["data"].shards else 2**24  # whole shards per read
            row_at = lambda e: int(indptr.searchsorted(e, side="right")) - 1  # noqa: E731
            for a in range(0, int(indptr[-1]), step):
                b = min(a + step, int(indptr[-1]))
                g["data"][a:b], g["indices"][a:b]
                yield (row_at(b) if b < indptr[-1] else f["n_obs"]) - row_at(a)

    return epochs_of(blocks, args.epochs, lambda n: n)


def run_scipy_gather(store: Path, args) -> dict:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from arrayloaders import read_manifest

    files = read_manifest(store).files
    X = sp.vstack([ad.read_zarr(store / f["name"]).X for f in files], format="csr")
    labels = np.concatenate([ad.read_zarr(store / f["name"]).obs["cell_type"].cat.codes.to_numpy() for f in files])
    rng = np.random.default_rng(0)

    def batches():
        order = rng.permutation(X.shape[0])
        for i in range(0, X.shape[0], args.batch_size):
            rows = order[i : i + args.batch_size]
            yield X[rows], labels[rows]

    return epochs_of(batches, args.epochs, lambda b: b[0].shape[0])


RUNNERS = {"arrayloaders": run_arrayloaders, "sequential-decode": run_sequential, "scipy-gather": run_scipy_gather}


# --------------------------------------------------------------------------- the parent: data, caches, memory


class TreeMemory:
    """Samples the summed PSS (and RSS) of a process and its descendants in a thread.

    Reading PSS walks every page table of every process (~30 ms for the
    engine's three processes), so sampling is sparse: every 0.5 s costs
    ~5 % of one core. The loaders' memory plateaus within the first epoch.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            pss = rss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    m = p.memory_full_info()
                    pss, rss = pss + m.pss, rss + m.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are clean: the store is only read)."""
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(path: Path) -> None:
    for f in files_under(path):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_measured(cmd: list[str], json_line: bool = True, interval: float = 0.5) -> dict:
    """Run a command (that prints one JSON line last); wall time and peak memory of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid, interval) as mem:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {proc.returncode}"
        return {"skipped": f"failed: {tail}"}
    out = json.loads(stdout.strip().splitlines()[-1]) if json_line else {"wall_s": wall}
    return {**out, "peak_pss_bytes": mem.peak_pss, "peak_rss_sum_bytes": mem.peak_rss}


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
        conversion = run_measured(cmd, json_line=False)
    return paths, store, conversion


def prepare_annbatch(paths: list[Path], args) -> tuple[Path | None, dict]:
    if not ANNBATCH_PYTHON.exists():
        return None, {"skipped": f"no annbatch venv at {ANNBATCH_PYTHON} (see scripts/annbatch_runner.py)"}
    store = args.data / "annbatch_store"
    conversion = {}
    if not store.exists():
        runner = str(REPO / "scripts" / "annbatch_runner.py")
        conversion = run_measured([str(ANNBATCH_PYTHON), runner, "convert", "--inputs", *map(str, paths), "--output", str(store)])
    return store, conversion


def command(name: str, store: Path, args) -> list[str]:
    sizes = ["--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
             "--preload-nchunks", str(args.preload_nchunks)]  # fmt: skip
    if name.startswith("annbatch-"):
        runner = str(REPO / "scripts" / "annbatch_runner.py")
        setting = name.removeprefix("annbatch-")
        return [str(ANNBATCH_PYTHON), runner, "load", "--store", str(store), *sizes, "--obs-key", "cell_type",
                "--setting", setting, "--epochs", str(args.epochs)]  # fmt: skip
    child, _, workers = name.partition("-w")
    return [sys.executable, __file__, "--child", child, "--store", str(store), *sizes, "--epochs", str(args.epochs),
            "--workers", workers or "0"]  # fmt: skip


def measure(name: str, store: Path, cache: str, args) -> dict:
    runs = []
    for _ in range(args.repeats):
        if cache == "cold":
            evict(store)
        else:
            warm(store)
        run = run_measured(command(name, store, args), interval=args.memory_interval)
        if "skipped" in run:
            return run
        if cache == "cold":  # the first epoch is the one that met the evicted cache
            run = {**run, **run["epochs"][0]}
        runs.append(run)
    keys = ("cells_per_s", "first_batch_s", "wall_s", "peak_pss_bytes", "peak_rss_sum_bytes")
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}


def table(results: dict[str, dict], cache: str) -> str:
    annbatch = [r["cells_per_s"] for n, r in results.items() if n.startswith("annbatch-") and "cells_per_s" in r]
    base = max(annbatch, default=None)
    gather = results.get("scipy-gather", {}).get("cells_per_s")
    lines = [
        f"| loader ({cache}) | cells/s | x best annbatch | x scipy gather | first batch (s) | peak memory, PSS (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        cps = r["cells_per_s"]
        ratio = lambda b: f"{cps / b:.2f}" if b else "n/a"  # noqa: E731
        lines.append(
            f"| {name} | {cps:,.0f} | {ratio(base)} | {ratio(gather)} | {r['first_batch_s']:.2f} | "
            f"{r['peak_pss_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], path: Path, title: str) -> bool:
    """Horizontal bars of cells/s per loader, warm and cold side by side; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for res in results.values() for n in res))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    height = 0.8 / max(1, len(results))
    for i, (cache, res) in enumerate(results.items()):
        values = [res.get(n, {}).get("cells_per_s", 0) for n in names]
        bars = ax.barh([k + i * height for k in range(len(names))], values, height, label=cache)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=7, padding=2)
    skipped = {n for n in names if all("skipped" in res.get(n, {"skipped": ""}) for res in results.values())}
    labels = [f"{n} (skipped)" if n in skipped else n for n in names]
    ax.set_yticks([k + height * (len(results) - 1) / 2 for k in range(len(names))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("cells / s (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


QUICK = {"n_files": 2, "cells_per_file": 5_000, "n_vars": 2_000, "nnz": 200, "batch_size": 1024,
         "preload_nchunks": 64, "repeats": 1, "workers": [0, 2], "memory_interval": 0.05}  # fmt: skip


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
    p.add_argument("--epochs", type=int, default=2, help="epochs per process (warm figures: the last one)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers settings of arrayloaders")
    p.add_argument(
        "--loaders", nargs="+", default=["arrayloaders", "sequential-decode", "scipy-gather", "annbatch"],
        help="which to measure",
    )  # fmt: skip
    p.add_argument("--cache", nargs="+", choices=["warm", "cold"], default=["warm", "cold"])
    p.add_argument("--reconvert", action="store_true", help="rebuild the store even if it exists")
    p.add_argument("--memory-interval", type=float, default=0.5, help="seconds between memory samples (default 0.5)")
    p.add_argument("--out", type=Path, help="results folder (default: DATA/results)")
    p.add_argument("--quick", action="store_true",
                   help="small data (2 x 5,000 cells x 2,000 genes), one repeat, num_workers 0 and 2: about a minute; "
                   "data in /tmp/arrayloaders-bench-quick unless --data is given")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        if args.data == p.get_default("data"):
            args.data = Path("/tmp/arrayloaders-bench-quick")
    if args.child:
        print(json.dumps(RUNNERS[args.child](args.store, args)))
        return

    paths, store, conversion = prepare(args)
    annbatch_store, annbatch_conversion = prepare_annbatch(paths, args) if "annbatch" in args.loaders else (None, {})
    names = []
    for loader in args.loaders:
        if loader == "arrayloaders":
            names += [f"arrayloaders-w{w}" for w in args.workers]
        elif loader == "annbatch":
            names += [f"annbatch-{s}" for s in ANNBATCH_SETTINGS]
        else:
            names.append(loader)
    results: dict[str, dict[str, dict]] = {}
    for cache in args.cache:
        results[cache] = {}
        for name in names:
            if name.startswith("annbatch-") and annbatch_store is None:
                results[cache][name] = annbatch_conversion
            elif name == "scipy-gather" and cache == "cold":
                continue  # in memory: no cache to be cold
            else:
                results[cache][name] = measure(name, annbatch_store if name.startswith("annbatch-") else store, cache, args)
            r = results[cache][name]
            print(f"{cache} {name}: " + (r.get("skipped") or f"{r['cells_per_s']:,.0f} cells/s"), flush=True)

    report = [f"Data: {args.n_files} x {args.cells_per_file} cells x {args.n_vars} genes, ~{args.nnz} non-zeros per cell; "
              f"batch {args.batch_size}, chunk {args.chunk_size}, preload {args.preload_nchunks}; "
              f"median of {args.repeats}; {os.cpu_count()} cores."]  # fmt: skip
    for name, conv in (("arrayloaders", conversion), ("annbatch", annbatch_conversion)):
        if conv.get("wall_s"):
            report.append(f"{name} conversion: {conv['wall_s']:.1f} s, peak PSS {conv['peak_pss_bytes'] / 2**30:.2f} GiB")
    for cache, res in results.items():
        report += ["", table(res, cache)]
    text = "\n".join(report)
    print("\n" + text)
    out = args.out or args.data / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    title = (f"{args.n_files * args.cells_per_file:,} cells x {args.n_vars:,} genes, batch {args.batch_size}, "
             f"{os.cpu_count()} cores (median of {args.repeats})")  # fmt: skip
    if not plot(results, out / "results.png", title):
        print("no chart: matplotlib is not installed (pip install arrayloaders[bench])")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "conversion": conversion, "annbatch_conversion": annbatch_conversion,
                                                  "results": results}, indent=1))  # fmt: skip
    print(f"\nwritten to {out}/: results.md, results.json, results.png")


if __name__ == "__main__":
    main()
