"""Do workers wait at an epoch's end? Short epochs (two loads) against a long store, with and without decoding ahead.

With W workers and an epoch of about W loads, a worker that has no load
left waits for the next epoch's loop unless the engine decodes that
epoch's first loads ahead (``engine.py``, "Epochs flow into each other").
This runs, in one process and alternating, a short store (``--short``
cells: two loads of ``--chunk-size`` x ``--preload`` cells) and a long one,
each for several epochs, with the engine as it is and with decoding ahead
switched off (the engine's ``_ahead_of`` replaced, here only), and prints
the short store's steady cells/s over the long one's and the workers' busy
fraction from ``ds.stats()``::

    python scripts/measure/epoch_ends.py --h5ad /tmp/bench-remote/h5ad/part_0.h5ad --long /tmp/bench-remote/store

The short store is made from the first ``--short`` cells of ``--h5ad`` (under ``--work``, once).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import anndata as ad

from arrayloaders import ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.loading.engine import Engine


def short_store(h5ad: Path, n: int, work: Path) -> Path:
    store = work / f"short-{n}"
    if not (store / "arrayloaders.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        part = work / f"short-{n}.h5ad"
        ad.read_h5ad(h5ad, backed="r")[:n].to_memory().write_h5ad(part)
        create_store_from_h5ads([part], store, progress=False)
    return store


def steady(ds, epochs: int) -> tuple[float, float]:
    """(cells/s over ``epochs`` epochs after a first one, the workers' mean busy fraction over them)."""
    for _ in ds:  # the first epoch of a phase: the other store's loads are still in the ring
        pass
    ds.stats(reset=True)
    start, cells = time.perf_counter(), 0
    for _ in range(epochs):
        for X, _ in ds:
            cells += X.shape[0]
    wall = time.perf_counter() - start
    stats = ds.stats()
    return cells / wall, statistics.mean(w.busy_fraction for w in stats.workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5ad", type=Path, required=True, help="cells of the short store")
    p.add_argument("--long", type=Path, required=True, help="a long store of the same kind of cells")
    p.add_argument("--short", type=int, default=16384, help="cells of the short store")
    p.add_argument("--work", type=Path, default=Path("/tmp/arrayloaders-epoch-ends"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    short = short_store(args.h5ad, args.short, args.work)
    settings = {"batch_size": args.batch_size, "chunk_size": args.chunk_size, "preload_nchunks": args.preload,
                "num_workers": args.workers}  # fmt: skip
    ahead_of = Engine._ahead_of
    results: dict[str, list] = {}
    for mode in ("ahead", "no ahead"):
        Engine._ahead_of = ahead_of if mode == "ahead" else (lambda self, run: None)
        with ZarrSparseDataset(**settings).add_store(short, obs_keys="cell_type") as s, \
             ZarrSparseDataset(**settings).add_store(args.long, obs_keys="cell_type") as long:  # fmt: skip
            n_short, n_long = len(list(s)), len(list(long))  # workers up, numba loaded
            for _ in range(args.rounds):
                results.setdefault(f"{mode} short", []).append(steady(s, 16))
                results.setdefault(f"{mode} long", []).append(steady(long, 3))
    Engine._ahead_of = ahead_of
    print(f"{args.workers} workers; short store {args.short} cells ({n_short} batches an epoch), long store "
          f"{n_long} batches an epoch; median of {args.rounds} alternating rounds")  # fmt: skip
    print("| engine | short cells/s | long cells/s | short / long | workers busy, short | workers busy, long |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("ahead", "no ahead"):
        sr = statistics.median(r for r, _ in results[f"{mode} short"])
        lr = statistics.median(r for r, _ in results[f"{mode} long"])
        sb = statistics.median(b for _, b in results[f"{mode} short"])
        lb = statistics.median(b for _, b in results[f"{mode} long"])
        print(f"| {mode} | {sr:,.0f} | {lr:,.0f} | {sr / lr:.2f} | {sb:.0%} | {lb:.0%} |")


if __name__ == "__main__":
    main()
