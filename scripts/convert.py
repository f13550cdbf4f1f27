#!/usr/bin/env python
"""Command line front end of ``arrayloaders.create_store_from_h5ads``.

Example::

    python scripts/convert.py data/*.h5ad -o store/ --seed 0 --memory-budget 2GiB
"""

from __future__ import annotations

import argparse
import sys
import time

from arrayloaders import ArrayloadersError, XLayout, create_store_from_h5ads, read_manifest


def build_parser() -> argparse.ArgumentParser:
    default = XLayout()
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert .h5ad files into one globally shuffled arrayloaders store "
        "(a directory of chunk_{i}.zarr AnnData files plus arrayloaders.json).",
    )
    p.add_argument("inputs", nargs="+", metavar="H5AD", help="input .h5ad files (X as CSR or dense)")
    p.add_argument("-o", "--output", required=True, help="store directory to create")
    p.add_argument("--no-shuffle", action="store_true", help="keep input order instead of shuffling cells globally")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: %(default)s)")
    p.add_argument(
        "--n-obs-per-file", type=int, default=2**20, help="at most this many cells per chunk_{i}.zarr (default: %(default)s)"
    )
    p.add_argument(
        "--var-join",
        choices=["same", "inner", "outer"],
        default="same",
        help="same: inputs must have identical var_names; inner: genes in all inputs; outer: all genes, "
        "missing ones are zeros (default: %(default)s)",
    )
    p.add_argument("--obs-columns", nargs="+", metavar="COL", help="obs columns to keep (default: all)")
    p.add_argument(
        "--source-key",
        default="source_file",
        help="name of the obs column recording each cell's input file; '' to leave it out (default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget",
        help="working memory of the conversion, e.g. 512MB or 2GiB (default: a quarter of available memory, at most 2 GiB)",
    )
    p.add_argument(
        "--compressor", choices=["zstd", "blosc-lz4", "none"], default=default.compressor, help="codec of X (default: %(default)s)"
    )
    p.add_argument("--level", type=int, default=default.level, help="compression level (default: %(default)s)")
    p.add_argument(
        "--chunk-elements",
        type=int,
        default=default.chunk_elements,
        help="inner zarr chunk length of X data/indices (default: %(default)s)",
    )
    p.add_argument(
        "--shard-elements", type=int, default=default.shard_elements, help="zarr shard length of X data/indices (default: %(default)s)"
    )
    p.add_argument("--tmp-dir", help="where temporary files go (about the size of the input X; default: inside the output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        layout = XLayout(
            compressor=args.compressor,
            level=args.level,
            chunk_elements=args.chunk_elements,
            shard_elements=args.shard_elements,
        )
        store = create_store_from_h5ads(
            args.inputs,
            args.output,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            n_obs_per_file=args.n_obs_per_file,
            var_join=args.var_join,
            obs_columns=args.obs_columns,
            source_key=args.source_key or None,
            memory_budget=args.memory_budget,
            layout=layout,
            overwrite=args.overwrite,
            progress=not args.quiet,
            tmp_dir=args.tmp_dir,
        )
    except (ArrayloadersError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 1
    manifest = read_manifest(store)
    if not args.quiet:
        print(
            f"wrote {store}: {manifest.n_obs} cells x {manifest.n_vars} genes in {len(manifest.files)} file(s), "
            f"{time.perf_counter() - start:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
