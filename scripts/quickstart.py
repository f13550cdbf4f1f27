#!/usr/bin/env python
"""The main job end to end: example .h5ad files -> shuffled store -> one epoch of minibatches.

Data goes under ``--workdir`` (default ``/tmp/arrayloaders-quickstart``) and is
reused when it is already there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from arrayloaders import ZarrSparseDataset, create_store_from_h5ads, read_manifest
from arrayloaders.example_data import write_example_h5ads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/arrayloaders-quickstart"))
    p.add_argument("--n-files", type=int, default=4, help="number of .h5ad files to generate (default: %(default)s)")
    p.add_argument("--cells-per-file", type=int, default=10_000, help="(default: %(default)s)")
    p.add_argument("--n-vars", type=int, default=20_000, help="genes (default: %(default)s)")
    p.add_argument("--nnz-per-cell", type=int, default=2_500, help="(default: %(default)s)")
    args = p.parse_args()

    inputs = args.workdir / "h5ad"
    paths = sorted(inputs.glob("part_*.h5ad"))
    if len(paths) != args.n_files:
        t = time.perf_counter()
        paths = write_example_h5ads(
            inputs, [args.cells_per_file] * args.n_files, args.n_vars, nnz_per_cell=args.nnz_per_cell
        )
        print(f"generated {len(paths)} .h5ad files in {time.perf_counter() - t:.1f} s -> {inputs}")

    store = args.workdir / "store"
    t = time.perf_counter()
    create_store_from_h5ads(paths, store, overwrite=True, n_obs_per_file=2**16)
    took = time.perf_counter() - t
    m = read_manifest(store)
    print(f"converted {m.n_obs} cells x {m.n_vars} genes into {len(m.files)} files in {took:.1f} s "
          f"({m.n_obs / took:,.0f} cells/s) -> {store}")

    ds = ZarrSparseDataset(batch_size=4096, chunk_size=32, preload_nchunks=256).add_store(store, obs_keys="cell_type")
    with ds:
        for epoch in range(2):
            t = time.perf_counter()
            cells = 0
            for X, cell_type in ds:
                cells += X.shape[0]
            took = time.perf_counter() - t
            what = "starting the workers included" if epoch == 0 else "workers up"
            print(f"epoch {epoch} ({what}): {cells} cells in {len(ds)} batches of sparse {tuple(X.shape)} X + "
                  f"{len(ds.categories['cell_type'])} cell types, {ds.num_workers} workers, {took:.1f} s "
                  f"({cells / took:,.0f} cells/s)")


if __name__ == "__main__":
    main()
