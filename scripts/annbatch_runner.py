"""Baseline harness that drives annbatch 0.3.1 for the arrayloaders benchmarks.

annbatch 0.3.1 needs Python >= 3.12 while arrayloaders targets 3.11, so this script
runs in its own virtual environment (``/tmp/annbatch-venv``, without torch) and is
called as a subprocess. It must therefore import neither arrayloaders nor torch
(torch only in annbatch's GPU mode, ``load --gpu``, on a machine with CUDA).
Each subcommand prints exactly one JSON line on stdout; progress and warnings go
to stderr.

Examples
--------
/tmp/annbatch-venv/bin/python scripts/annbatch_runner.py convert \
    --inputs a.h5ad b.h5ad --output /tmp/store.zarr
/tmp/annbatch-venv/bin/python scripts/annbatch_runner.py load --store /tmp/store.zarr
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

# annbatch reports progress through tqdm; silence it so stderr stays readable in logs.
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # noqa: E402

# zarr configurations worth comparing. annbatch's README says the zarrs (Rust) codec
# pipeline "is necessary for local filesystem performance", so it is the default.
# annbatch has no worker-thread/process option of its own: all parallelism comes from
# zarr's asyncio event loop plus the codec pipeline's thread pool (zarrs uses one
# Rust thread per core), so on a 2-core machine the pipeline is the only real knob.
SETTINGS: dict[str, dict[str, Any]] = {
    "zarrs": {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"},
    "zarrs-direct-io": {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.direct_io": True},
    "zarr-python": {},  # zarr's default pure-Python BatchedCodecPipeline
}
SETTINGS_HELP = (
    "zarr codec pipeline configuration: "
    "'zarrs' = zarrs.ZarrsCodecPipeline, annbatch's documented recommendation for local disks (default); "
    "'zarrs-direct-io' = zarrs with O_DIRECT reads that bypass the page cache (cold-cache-like I/O); "
    "'zarr-python' = zarr's built-in BatchedCodecPipeline (what annbatch does without the [zarrs] extra)."
)


class PeakRSS:
    """Track the peak resident set size of this process and all of its children.

    A background thread samples the summed RSS of the process tree every
    ``interval`` seconds. The reported peak is the larger of that and the kernel's
    own ``ru_maxrss`` for this process, which catches short spikes between samples.

    Parameters
    ----------
    interval
        Sampling period in seconds.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._peak = 0

    def _tree_rss(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # the child may exit between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._tree_rss())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._tree_rss())

    @property
    def peak_bytes(self) -> int:
        """Peak RSS in bytes observed so far (``ru_maxrss`` is in KiB on Linux)."""
        return max(self._peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def apply_setting(name: str) -> None:
    """Set the global zarr configuration for the named setting before any store is opened."""
    import zarr

    zarr.config.set(SETTINGS[name])


def dir_bytes(path: Path) -> int:
    """Return the total size on disk of the regular files below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def convert(inputs: list[str], output: str, setting: str, dataset_size: str, shuffle: bool = True) -> dict[str, Any]:
    """Build an annbatch ``DatasetCollection`` from ``.h5ad`` files with annbatch's defaults.

    Parameters
    ----------
    inputs
        Paths of the source ``.h5ad`` files.
    output
        Directory of the new zarr collection; it must not exist or be empty, because
        ``add_adatas`` on a non-empty collection appends instead of creating.
    setting
        Key of :data:`SETTINGS` used for writing.
    dataset_size
        annbatch's ``dataset_size``: uncompressed bytes (e.g. ``"20GB"``) or a cell count
        per output dataset. Each dataset is shuffled fully in memory, so peak RSS is a
        few times this value.
    shuffle
        annbatch's ``shuffle``; ``False`` keeps the inputs' order (a collection grouped
        by class, for its class samplers).

    Returns
    -------
    dict
        ``wall_s``, ``peak_rss_bytes`` and ``store_bytes``.
    """
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"refusing to write into non-empty {out}")
    apply_setting(setting)
    from annbatch import DatasetCollection

    with PeakRSS() as mon:
        t0 = time.perf_counter()
        # annbatch defaults on purpose (64 obs per chunk, 1 GB shards, blosc-lz4, shuffled),
        # except dataset_size, which the caller may lower to fit the machine's memory.
        size: int | str = int(dataset_size) if dataset_size.isdigit() else dataset_size
        DatasetCollection(out).add_adatas(inputs, dataset_size=size, shuffle=shuffle)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_rss_bytes": mon.peak_bytes, "store_bytes": dir_bytes(out)}


def load(args: argparse.Namespace) -> dict[str, Any]:
    """Iterate shuffled epochs of an annbatch collection with scipy CSR output.

    Parameters
    ----------
    args
        Parsed ``load`` arguments (see ``--help``).

    Returns
    -------
    dict
        ``cells``, ``batches``, ``wall_s``, ``cells_per_s``, ``first_batch_s`` of the
        last epoch, ``epochs`` (the same for each), ``peak_rss_bytes`` plus
        ``setup_s``, ``n_obs`` and ``setting`` for context.
    """
    apply_setting(args.setting)
    import anndata as ad
    import numpy as np
    import pandas as pd
    from annbatch import DatasetCollection, Loader

    def label_frame(g: Any) -> pd.DataFrame:
        # Only the label column: annbatch warns that by default *all* obs columns are
        # read and yielded, which would penalise it for work the benchmark never uses.
        # A RangeIndex (not the string obs_names) keeps setup RSS proportional to labels.
        return pd.DataFrame({args.obs_key: ad.io.read_elem(g["obs"][args.obs_key])})

    epochs = []
    with PeakRSS() as mon, ad.settings.override(remove_unused_categories=False):
        t_setup = time.perf_counter()
        # Equivalent to ``use_collection(collection, load_adata=...)`` minus building an
        # AnnData per dataset, which would materialise a string obs index we never use.
        if args.storage_options:  # a URL: annbatch's remote path, zarr's ObjectStore over obstore
            import zarr
            from obstore.store import from_url

            remote = zarr.storage.ObjectStore(from_url(args.store, **json.loads(args.storage_options)), read_only=True)
            groups = list(DatasetCollection(zarr.open_group(remote, mode="r"), mode="r"))
        else:
            groups = list(DatasetCollection(args.store, mode="r"))
        obs = [label_frame(g) for g in groups]
        # CPU: scipy CSR in host memory, torch never imported. GPU: annbatch's own GPU mode (cupy
        # gathers the preloaded chunks on the device and batches arrive as CUDA torch tensors).
        where = {"preload_to_gpu": args.gpu, "to": "torch" if args.gpu else None}
        rng = np.random.default_rng(args.seed)
        if args.class_sampler:
            from annbatch.samplers import WeightedClassSampler

            # Class-balanced chunks: each chunk one class, classes drawn uniformly (its default weights),
            # rows of a preload window shuffled together; needs a collection grouped by class.
            classes = pd.Categorical(pd.concat([o[args.obs_key] for o in obs], ignore_index=True))
            sampler = WeightedClassSampler(args.chunk_size, args.preload_nchunks, args.batch_size, classes=classes,
                                           num_samples=len(classes), rng=rng)  # fmt: skip
            loader = Loader(batch_sampler=sampler, **where)
        else:
            loader = Loader(batch_size=args.batch_size, chunk_size=args.chunk_size, preload_nchunks=args.preload_nchunks,
                            shuffle=True, drop_last=False, rng=rng, **where)  # fmt: skip
        loader.add_datasets([ad.io.sparse_dataset(g["X"]) for g in groups], obs=obs)
        setup_s = time.perf_counter() - t_setup
        time.sleep(args.pause_s)  # the benchmark's "building the model": the same for every loader
        for _ in range(args.epochs):
            cells = batches = 0
            first_batch_s = None
            t0 = time.perf_counter()
            for batch in loader:
                x = batch["X"]
                # Materialise the labels as a consumer would (codes array), not just a view.
                labels = batch["obs"][args.obs_key].cat.codes.to_numpy()
                assert labels.shape[0] == x.shape[0]
                if first_batch_s is None:
                    first_batch_s = time.perf_counter() - t0
                cells += x.shape[0]
                batches += 1
                if args.max_batches and batches >= args.max_batches:
                    break
            if args.gpu:
                import torch

                torch.cuda.synchronize()  # the epoch ends when its last batch is on the device
            wall = time.perf_counter() - t0
            epochs.append(
                {"cells": cells, "batches": batches, "wall_s": wall, "first_batch_s": first_batch_s,
                 "cells_per_s": cells / wall if wall > 0 else 0.0}
            )  # fmt: skip
    # Top-level figures are the last epoch's; ``epochs`` has each one.
    return {
        **epochs[-1],
        "epochs": epochs,
        "peak_rss_bytes": mon.peak_bytes,
        "setup_s": setup_s,
        "n_obs": loader.n_obs,
        "setting": args.setting,
    }


def build_parser() -> argparse.ArgumentParser:
    """Build the command line parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="build an annbatch collection from .h5ad files")
    c.add_argument("--inputs", nargs="+", required=True, help="source .h5ad files")
    c.add_argument("--output", required=True, help="new collection directory (a '.zarr' suffix avoids a warning)")
    c.add_argument("--setting", choices=SETTINGS, default="zarrs", help=SETTINGS_HELP)
    c.add_argument(
        "--dataset-size",
        default="20GB",
        help="cells or uncompressed bytes per shuffled output dataset (annbatch default '20GB'); "
        "it is held in memory several times over while converting, so lower it on small machines",
    )
    c.add_argument("--no-shuffle", action="store_true", help="keep the inputs' order (annbatch's shuffle=False)")

    ld = sub.add_parser("load", help="iterate one shuffled epoch over a collection")
    ld.add_argument("--store", required=True, help="collection directory written by 'convert', or its URL")
    ld.add_argument("--storage-options", help="with a URL: obstore.store.from_url's options as JSON")
    ld.add_argument("--batch-size", type=int, default=4096, help="cells per yielded batch (default 4096)")
    ld.add_argument("--chunk-size", type=int, default=32, help="contiguous cells per random read (default 32)")
    ld.add_argument(
        "--preload-nchunks", type=int, default=256, help="chunks fetched and shuffled together (default 256)"
    )
    ld.add_argument("--obs-key", default="cell_type", help="categorical obs column yielded as labels")
    ld.add_argument("--setting", choices=SETTINGS, default="zarrs", help=SETTINGS_HELP)
    ld.add_argument(
        "--gpu", action="store_true",
        help="annbatch's GPU mode: preload_to_gpu=True (needs cupy) and to='torch' (imports torch)",
    )  # fmt: skip
    ld.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = full epoch)")
    ld.add_argument("--pause-s", type=float, default=0.0, help="seconds between building the loader and the first batch")
    ld.add_argument("--epochs", type=int, default=1, help="epochs to iterate; figures are the last one's")
    ld.add_argument("--seed", type=int, default=0, help="seed of the shuffling RNG")
    ld.add_argument(
        "--class-sampler", action="store_true",
        help="annbatch's WeightedClassSampler (class-balanced chunks of one class; the collection must be grouped "
        "by --obs-key) instead of shuffled chunks",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the subcommand and print its JSON result line."""
    args = build_parser().parse_args(argv)
    if args.cmd == "convert":
        result = convert(args.inputs, args.output, args.setting, args.dataset_size, shuffle=not args.no_shuffle)
    else:
        result = load(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
