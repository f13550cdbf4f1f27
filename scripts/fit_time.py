#!/usr/bin/env python
"""Fit time of a small model against loading speed: why the loader's speed matters.

Trains ``scripts/train.py``'s logistic regression (20,000 genes -> 100 cell
types, Adam) for one epoch on an arrayloaders store while the loader is
throttled to several loading speeds, and plots the fit time against the
loading speed. Measured in the same run, on the same data:

- *model alone*: the same epoch from batches already in memory (the fit time
  a loader cannot beat: the model's own compute);
- *loading alone*: one epoch of the loader with no training (this project's
  speed, marked on the curve, and the fastest point of it);
- *annbatch*: annbatch 0.3.1's loading speed on its own store of the same
  data, also marked (needs its venv, see ``scripts/annbatch_runner.py``;
  reported as skipped without it).

The throttle hands out batch k no earlier than ``k * batch_size / speed``
seconds after the epoch started, so it behaves like a loader that produces
``speed`` cells/s in the background while the model trains. Every run is a
fresh model trained on a full epoch of real batches from the store; every
figure is the median of ``--repeats`` runs.

Output in ``--out`` (default DATA/results): ``fit_time.md``, ``fit_time.json``
and ``fit_time.png``.

Examples::

    python scripts/fit_time.py                 # 40,000 cells x 20,000 genes, 100 classes, median of 3: ~6 minutes here
    python scripts/fit_time.py --quick         # 4,000 small cells: ~20 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from argparse import Namespace
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from benchmark import measure, parse_args, prepare_annbatch
from train import LogisticRegression

from arrayloaders import ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.example_data import write_example_h5ads


def throttled(batches: Iterable, cells_per_s: float) -> Iterator:
    """Yield ``batches`` no faster than ``cells_per_s``: batch k once k batches' cells are due."""
    start, cells = time.perf_counter(), 0
    for batch in batches:
        cells += batch[0].shape[0]
        delay = start + cells / cells_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield batch


def fit_one_epoch(batches: Iterable, n_vars: int, n_classes: int, device: torch.device, seed: int = 0) -> dict:
    """Train a fresh model on one pass over ``batches``; wall time, cells, and the loss of the first and last batch."""
    torch.manual_seed(seed)
    model = LogisticRegression(n_vars, n_classes).to(device)
    # 1e-3: with ~1,500 non-zero inputs per cell, Adam at 1e-2 moves the logits too far per step and diverges.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, cells = [], 0
    start = time.perf_counter()
    for X, y in batches:
        X, y = X.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(X), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        cells += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    return {"fit_s": fit_s, "cells": cells, "first_loss": float(losses[0]), "last_loss": float(losses[-1])}


def median_fit(make_batches: Callable[[], Iterable], repeats: int, *model: object) -> dict:
    """The median of ``repeats`` fits (each a fresh model and a fresh pass); every run's fit time is kept."""
    runs = sorted((fit_one_epoch(make_batches(), *model) for _ in range(repeats)), key=lambda r: r["fit_s"])
    return {**runs[len(runs) // 2], "fit_s_runs": [r["fit_s"] for r in runs]}


def loading_speed(ds: ZarrSparseDataset) -> float:
    """Cells/s of one epoch of ``ds`` with nothing done to the batches."""
    start, cells = time.perf_counter(), 0
    for X, _ in ds:
        cells += X.shape[0]
    return cells / (time.perf_counter() - start)


def prepare(args: Namespace) -> Path:
    h5ad_dir, store = args.data / "h5ad", args.data / "store"
    paths = sorted(h5ad_dir.glob("part_*.h5ad"))
    if len(paths) != args.n_files:
        print(f"generating {args.n_files} x {args.cells_per_file} cells x {args.n_vars} genes -> {h5ad_dir}", flush=True)
        paths = write_example_h5ads(h5ad_dir, [args.cells_per_file] * args.n_files, args.n_vars,
                                    nnz_per_cell=args.nnz, n_cell_types=args.n_classes)  # fmt: skip
    if not (store / "arrayloaders.json").exists():
        create_store_from_h5ads(paths, store, overwrite=True, progress=False)
    return store


def annbatch_speed(args: Namespace) -> dict:
    """annbatch's warm loading speed on its own store of the same data (median of ``--repeats``).

    On a GPU, annbatch runs in its own GPU mode (batches arrive as CUDA tensors).
    """
    paths = sorted((args.data / "h5ad").glob("part_*.h5ad"))
    to = "cuda" if torch.device(args.device).type == "cuda" else "cpu"
    bench = Namespace(data=args.data, reconvert=False, batch_size=args.batch_size, chunk_size=args.chunk_size,
                      preload_nchunks=args.preload_nchunks, epochs=2, repeats=args.repeats, memory_interval=1.0,
                      to=to)  # fmt: skip
    store, conversion = prepare_annbatch(paths, bench)
    return conversion if store is None else measure("annbatch-zarrs", store, "warm", bench)


def plot(result: dict, path: Path, title: str) -> bool:
    """Fit time against loading speed (log-log), with the model-alone floor and the loaders' speeds marked."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    speeds = [p["speed"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(speeds, [p["fit_s"] for p in points], "o-", color="C0", label="fit time, one epoch (measured)")
    grid = [min(speeds), max(speeds)]
    ax.plot(grid, [result["cells"] / s for s in grid], ":", color="gray", label="cells / speed: the fit time if the model cost nothing")
    ax.axhline(result["model_alone_s"], ls="--", color="C2", label=f"model alone, data in memory: {result['model_alone_s']:.1f} s")
    ours = result["arrayloaders_cells_per_s"]
    ax.axvline(ours, color="C3", label=f"arrayloaders: {ours:,.0f} cells/s")
    annbatch = result["annbatch"].get("cells_per_s")
    if annbatch:
        ax.axvline(annbatch, color="C1", ls="-.", label=f"annbatch 0.3.1: {annbatch:,.0f} cells/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("loading speed (cells / s)")
    ax.set_ylabel("fit time of one epoch (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(result: dict) -> str:
    lines = ["| loading speed (cells/s) | fit time (s) | x the fastest | loss, first -> last batch |", "|---|---|---|---|"]
    best = min(p["fit_s"] for p in result["points"])
    for p in sorted(result["points"], key=lambda p: p["speed"]):
        speed = f"{p['speed']:,.0f}" + (" (unthrottled)" if p["unthrottled"] else "")
        lines.append(f"| {speed} | {p['fit_s']:.2f} | {p['fit_s'] / best:.1f} | {p['first_loss']:.2f} -> {p['last_loss']:.2f} |")
    annbatch = result["annbatch"].get("cells_per_s")
    lines += [
        "",
        f"Model alone (batches in memory): {result['model_alone_s']:.2f} s. "
        f"arrayloaders loading alone: {result['arrayloaders_cells_per_s']:,.0f} cells/s. "
        + (f"annbatch 0.3.1 loading alone: {annbatch:,.0f} cells/s." if annbatch
           else f"annbatch: skipped: {result['annbatch'].get('skipped')}."),
    ]  # fmt: skip
    return "\n".join(lines)


QUICK = {"n_files": 2, "cells_per_file": 2_000, "n_vars": 2_000, "nnz": 200, "n_classes": 100, "batch_size": 512,
         "preload_nchunks": 64, "speeds": [2_000, 20_000], "repeats": 1}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/tmp/arrayloaders-fit-time"), help="where data and store go")
    p.add_argument("--n-files", type=int, default=2)
    p.add_argument("--cells-per-file", type=int, default=20_000)
    p.add_argument("--n-vars", type=int, default=20_000, help="input features of the model")
    p.add_argument("--n-classes", type=int, default=100, help="cell types: output classes of the model")
    p.add_argument("--nnz", type=int, default=1_500, help="mean non-zeros per cell")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=None, help="loader worker processes (default: the package's)")
    p.add_argument("--speeds", type=float, nargs="+", default=[1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000],
                   help="throttled loading speeds in cells/s; those above the unthrottled speed are left out")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="results folder (default: DATA/results)")
    p.add_argument("--quick", action="store_true", help="4,000 cells x 2,000 genes, two speeds; data in "
                   "/tmp/arrayloaders-fit-time-quick unless --data is given")  # fmt: skip
    args = parse_args(p, QUICK, Path("/tmp/arrayloaders-fit-time-quick"))
    device = torch.device(args.device)

    store = prepare(args)
    ds = ZarrSparseDataset(args.batch_size, args.chunk_size, args.preload_nchunks, num_workers=args.num_workers,
                           pin_memory=device.type == "cuda").add_store(store, obs_keys="cell_type")  # fmt: skip
    n_vars, n_classes = ds.n_vars, len(ds.categories["cell_type"])
    model = (n_vars, n_classes, device)
    with ds:
        loading_speed(ds)  # starts the workers and warms the page cache: every point below sees a warm loader
        ours = statistics.median(loading_speed(ds) for _ in range(args.repeats))
        print(f"arrayloaders, loading alone: {ours:,.0f} cells/s", flush=True)
        in_memory = [(X.clone(), y.clone()) for X, y in ds]
        fit_one_epoch(in_memory[:2], *model)  # warms up torch's kernels and allocator
        model_alone = median_fit(lambda: in_memory, args.repeats, *model)
        in_memory.clear()
        print(f"model alone: {model_alone['fit_s']:.2f} s", flush=True)
        points = [{"speed": ours, "unthrottled": True, **median_fit(lambda: ds, args.repeats, *model)}]
        for speed in sorted((s for s in args.speeds if s < ours), reverse=True):
            fit = median_fit(lambda: throttled(ds, speed), args.repeats, *model)  # noqa: B023 (called at once)
            points.append({"speed": speed, "unthrottled": False, **fit})
            print(f"{speed:,.0f} cells/s: fit {fit['fit_s']:.2f} s", flush=True)
    annbatch = annbatch_speed(args)
    result = {"cells": ds.n_obs, "n_vars": n_vars, "n_classes": n_classes, "device": str(device),
              "arrayloaders_cells_per_s": ours, "model_alone_s": model_alone["fit_s"],
              "model_alone_runs_s": model_alone["fit_s_runs"], "points": points,
              "annbatch": annbatch, "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip

    out = args.out or args.data / "results"
    out.mkdir(parents=True, exist_ok=True)
    text = report(result)
    print("\n" + text)
    (out / "fit_time.md").write_text(text + "\n")
    (out / "fit_time.json").write_text(json.dumps(result, indent=1))
    title = (f"Logistic regression, {n_vars:,} genes -> {n_classes} classes, one epoch of {ds.n_obs:,} cells\n"
             f"batch {args.batch_size}, on {device.type} ({os.cpu_count()} cores), median of {args.repeats}")  # fmt: skip
    if not plot(result, out / "fit_time.png", title):
        print("no chart: matplotlib is not installed (pip install arrayloaders[bench])")
    print(f"\nwritten to {out}/: fit_time.md, fit_time.json, fit_time.png")


if __name__ == "__main__":
    main()
