#!/usr/bin/env python
"""What verifying checksums costs the loader: sequential decode with and without crc32c.

Converts the same generated ``.h5ad`` files twice, with ``XLayout(checksum=True)``
(the default) and ``checksum=False``, then decodes every row of each store in
runs of ``--run-rows`` rows through the loader's own reader (``arrayloaders.store.rows``:
one ``preadv`` per run of chunks, crc32c checked, blosc decoded into a buffer),
in one process, warm page cache. The two stores alternate, ``--repeats`` times
each, and the medians are compared::

    python scripts/measure/checksum_cost.py --data /tmp/al-crc                  # 200,000 cells x 33,538 genes
    python scripts/measure/checksum_cost.py --data /tmp/al-crc-q --quick        # 4,000 small cells

``--loader`` also times shuffled epochs of ``ZarrSparseDataset`` (needs torch) on
both stores, alternating, the second epoch of each dataset (workers up, warm cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import zarr

from arrayloaders import XLayout, create_store_from_h5ads, read_manifest
from arrayloaders.example_data import write_example_h5ads
from arrayloaders.store.disk_layout import XSource
from arrayloaders.store.format import use_zarrs
from arrayloaders.store.rows import CsrRows


def open_files(store: Path) -> list[tuple[XSource, np.ndarray]]:
    """(source, runs of ``run_rows`` rows) of each file of ``store``."""
    manifest = read_manifest(store)
    return [
        XSource(zarr.storage.LocalStore(store / f["name"], read_only=True), "X", "csr", f["n_obs"], manifest.n_vars,
                manifest.dtype)  # fmt: skip
        for f in manifest.files
    ]


def decode_file(source: XSource, run_rows: int) -> tuple[float, float, int]:
    """Decode every row of one file in order: (wall seconds, CPU seconds, bytes of X decoded)."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = CsrRows(source)
    assert rows.direct
    starts = np.arange(0, source.n_obs, run_rows)
    nbytes = 0
    for data, indices in rows.runs(np.stack([starts, np.minimum(starts + run_rows, source.n_obs)], axis=1)):
        nbytes += data.nbytes + indices.nbytes
    rows.close()
    return time.perf_counter() - wall, time.process_time() - cpu, nbytes


def loader_epochs(stores: dict[str, Path], repeats: int, workers: int) -> dict[str, list[float]]:
    """Cells/s of shuffled epochs (batch 4096, chunk 32, preload 256, cell_type labels), stores alternating."""
    from arrayloaders import ZarrSparseDataset

    speeds: dict[str, list[float]] = {name: [] for name in stores}
    datasets = {name: ZarrSparseDataset(4096, 32, 256, num_workers=workers).add_store(store, obs_keys="cell_type")
                for name, store in stores.items()}  # fmt: skip
    try:
        for ds in datasets.values():
            for _ in ds:  # first epoch: start the workers, warm the cache
                pass
        for r in range(repeats):
            for name in list(stores)[:: 1 if r % 2 == 0 else -1]:
                start, cells = time.perf_counter(), 0
                for X, _ in datasets[name]:
                    cells += X.shape[0]
                speeds[name].append(cells / (time.perf_counter() - start))
    finally:
        for ds in datasets.values():
            ds.close()
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="working directory (inputs and both stores)")
    p.add_argument("--n-files", type=int, default=8)
    p.add_argument("--cells-per-file", type=int, default=25_000)
    p.add_argument("--n-vars", type=int, default=33_538)
    p.add_argument("--nnz", type=int, default=2_500, help="mean non-zeros per cell")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--run-rows", type=int, default=32, help="rows per run, as the loader reads a chunk")
    p.add_argument("--quick", action="store_true", help="4 files of 1,000 cells x 2,000 genes")
    p.add_argument("--reuse", action="store_true", help="keep stores of an earlier run (no conversion times then)")
    p.add_argument("--loader", action="store_true", help="also time shuffled loader epochs (needs torch)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (with --loader)")
    args = p.parse_args()
    if args.quick:
        args.n_files, args.cells_per_file, args.n_vars, args.nnz = 4, 1_000, 2_000, 200
    use_zarrs()
    h5ad = args.data / "h5ad"
    paths = sorted(h5ad.glob("*.h5ad"))
    if len(paths) != args.n_files:
        paths = write_example_h5ads(h5ad, [args.cells_per_file] * args.n_files, args.n_vars, nnz_per_cell=args.nnz)
    stores, conversion = {}, {}
    for name, checksum in (("crc32c", True), ("none", False)):
        store = args.data / f"store-{name}"
        if not (args.reuse and (store / "arrayloaders.json").exists()):
            start = time.perf_counter()
            create_store_from_h5ads(paths, store, layout=XLayout(checksum=checksum), overwrite=True, progress=False)
            conversion[name] = time.perf_counter() - start
        stores[name] = store
    files = {name: open_files(store) for name, store in stores.items()}
    for name in stores:  # warm the page cache
        for source in files[name]:
            decode_file(source, args.run_rows)
    # File by file, the two stores alternate (and which goes first): load from
    # other processes on the machine hits both alike. CPU time is the steadier
    # figure where other processes compete for the cores.
    wall = {name: [0.0] * args.repeats for name in stores}
    cpu = {name: [0.0] * args.repeats for name in stores}
    for r in range(args.repeats):
        for i in range(len(files["crc32c"])):
            for name in list(stores)[:: 1 if (r + i) % 2 == 0 else -1]:
                w, c, nbytes = decode_file(files[name][i], args.run_rows)
                wall[name][r] += w
                cpu[name][r] += c
    cells = sum(s.n_obs for s in files["crc32c"])
    result = {
        "cells": cells,
        "repeats": args.repeats,
        "run_rows": args.run_rows,
        "wall_s": wall,
        "cpu_s": cpu,
        "cells_per_s": {n: cells / statistics.median(s) for n, s in wall.items()},
        "cells_per_cpu_s": {n: cells / statistics.median(s) for n, s in cpu.items()},
        "conversion_s": conversion,
        "store_bytes": {n: sum(f.stat().st_size for f in s.rglob("*") if f.is_file()) for n, s in stores.items()},
    }
    if args.loader:
        speeds = loader_epochs(stores, args.repeats, args.workers)
        result["loader_cells_per_s"] = speeds
        result["loader_median"] = {n: statistics.median(s) for n, s in speeds.items()}
        result["cost_loader"] = 1 - result["loader_median"]["crc32c"] / result["loader_median"]["none"]
    result["cost_wall"] = 1 - result["cells_per_s"]["crc32c"] / result["cells_per_s"]["none"]
    result["cost_cpu"] = 1 - result["cells_per_cpu_s"]["crc32c"] / result["cells_per_cpu_s"]["none"]
    print(json.dumps(result, indent=1))
    for figure, unit in (("cells_per_s", "cells/s"), ("cells_per_cpu_s", "cells per CPU second")):
        cost = result["cost_wall" if figure == "cells_per_s" else "cost_cpu"]
        print(
            f"sequential decode, median of {args.repeats}: {result[figure]['crc32c']:,.0f} {unit} with crc32c, "
            f"{result[figure]['none']:,.0f} without: verification costs {100 * cost:.1f} %"
        )
    if args.loader:
        print(
            f"shuffled loader epochs ({args.workers} workers), median of {args.repeats}: "
            f"{result['loader_median']['crc32c']:,.0f} cells/s with crc32c, {result['loader_median']['none']:,.0f} "
            f"without: verification costs {100 * result['cost_loader']:.1f} %"
        )


if __name__ == "__main__":
    main()
