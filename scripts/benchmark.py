#!/usr/bin/env python
"""Throughput of shuffled epochs, side by side with baselines measured in the same run.

Generates (or reuses) a realistic dataset under ``--data``, converts it, and
measures each loader in a fresh subprocess while this process samples the
memory of that subprocess's whole tree (workers included):

- ``arrayloaders-wN``: ZarrSparseDataset with ``num_workers=N`` (sparse CSR
  tensors + cell_type labels); ``arrayloaders-wN-dense``: ZarrDenseDataset on
  the same store (densified batches), N the largest ``--workers``;
- ``arrayloaders-wN-cells50`` / ``-balanced`` / ``-permutation``: the same
  loader over a random half of the cells (``cells=``), with a class-balancing
  ``WeightedRandomSampler`` (``sampler=``, as many cells as the store) and
  with a random permutation as the sampler (full control over the order);
- ``arrayloaders-wN-genes2000`` / ``-genes2000-dense`` / ``-counts`` /
  ``-obsm50``: values chosen at load time: 2,000 genes (``var_names=``, in
  a random order) as sparse and as dense batches, ``layer="counts"``, and
  one 50-column obsm array (``obsm_keys=``). The last two read a second
  store converted from the same inputs with ``layers["counts"]`` (equal to
  X) and ``obsm["X_pca"]`` added; each row's ratio is to ``arrayloaders-wN``;
- ``annbatch-512x32`` / ``annbatch-32x256``: annbatch 0.3.1 (zarrs
  pipeline) on its own store of the same input, at its own defaults (chunk
  512, preload 32) and at the seed README's settings (chunk 32, preload
  256); the better of the two in each column is the baseline. Run by
  ``scripts/annbatch_runner.py`` in its own Python 3.12 venv;
- ``--loaders class-balanced``: class-balanced epochs three ways. The same
  cells sorted by cell type are converted without shuffling into a store of
  each (``store-by-class``, ``annbatch_store-by-class``):
  ``arrayloaders-wN-class-runs`` (``ds.class_run_sampler("cell_type")``:
  runs of one class) and ``annbatch-class-512x32`` / ``-32x256``
  (annbatch's ``WeightedClassSampler``, no workers: annbatch does not
  support them with it) read those; ``arrayloaders-wN-balanced`` (single
  cells by ``WeightedRandomSampler``) reads the shuffled store. The class
  rows' ratios are to the better annbatch class sampler;
- ``--chunk-elements N``: arrayloaders' store converted with inner chunks
  of N elements (``store-cN``) instead of the default, for every row that
  reads it;
- ``scdataset``: scDataset 0.3 (block shuffling with our chunk size, fetches
  the size of our loads) over the backed ``.h5ad`` files, in a torch
  DataLoader with one worker per core;
- ``anndata-backed``: random batches of the backed ``.h5ad`` files, each
  batch's indices sorted and read by anndata, in the same DataLoader;
- ``sequential-decode``: the whole store decoded in order through zarr and
  the zarrs pipeline (the I/O + decode limit of the machine);
- ``scipy-gather``: the whole X in memory, shuffled batches by scipy row
  indexing (the in-memory upper bound).

A peer that is not installed (no annbatch venv, no scdataset) is reported as
skipped with the reason. Conversion time and peak memory are measured when a
store is built and kept beside it (``<store>.conversion.json``), so reusing a
store still reports them; ``--reconvert`` rebuilds both stores.

Three figures per loader: the *first epoch* (cells over the time from
building the loader to the end of its first epoch: opening the store,
starting workers, everything), the *steady state* (the last epoch, workers
up) and the *first batch* (seconds from the first ``next()`` of the first
epoch). ``--model-s S`` puts S seconds of "building the model" (a sleep)
between building each loader and its first ``next()``, as a training
script does; they count in neither figure, so a loader that starts its
work in the background meanwhile (arrayloaders' workers) shows it. *Warm*: the store's files are read into the page cache first and
the loader runs ``--epochs`` epochs in one process. *Cold*: the store's
pages are evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` and the
loader runs one epoch (so steady is that epoch without the set-up). Each
figure is the median of ``--repeats`` runs.

With ``--to cuda`` (on a machine with a GPU) each loader's batches end on
the GPU: arrayloaders pins them and copies them (``non_blocking``), annbatch
runs in its own GPU mode (``preload_to_gpu=True``, ``to="torch"``); an epoch
ends when its last batch has landed.

Memory is the peak over the run of the summed PSS of the process tree: RSS
with shared pages (the ring's shared memory, mapped by the main process and
the workers) counted once, not once per process.

Output: a markdown table (``results.md``), every measurement
(``results.json``) and a bar chart (``results.png``, needs matplotlib: the
``bench`` extra) in ``--out``.

Examples::

    python scripts/benchmark.py --data /tmp/arrayloaders-bench   # ~200k cells, median of 3
    python scripts/benchmark.py --quick                           # 10k small cells, one run: ~1 minute
    python scripts/benchmark.py --remote --loaders arrayloaders annbatch   # from s3:// at 0 and 20 ms
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ANNBATCH_PYTHON = Path(os.environ.get("ANNBATCH_PYTHON", "/tmp/annbatch-venv/bin/python"))
# annbatch's own defaults (chunk 512, preload 32: its best on this machine) and the seed README's (32, 256).
ANNBATCH_SETTINGS = {"512x32": (512, 32), "32x256": (32, 256)}


# --------------------------------------------------------------------------- measurements (child processes)


def epochs_of(make_batches, n_epochs: int, n_cells_of, setup_s: float = 0.0, after_epoch=None) -> dict:
    """Iterate ``n_epochs`` epochs; per epoch: cells/s and time to first batch. ``setup_s``: building the loader;
    ``after_epoch(i)``: called after epoch ``i``."""
    out = []
    for epoch in range(n_epochs):
        start = time.perf_counter()
        first, cells = None, 0
        for b in make_batches():
            if first is None:
                first = time.perf_counter() - start
            cells += n_cells_of(b)
        wall = time.perf_counter() - start
        out.append({"cells": cells, "wall_s": wall, "cells_per_s": cells / wall, "first_batch_s": first})
        if after_epoch is not None:
            after_epoch(epoch)
    return {**out[-1], "epochs": out, "setup_s": setup_s}


SELECTIONS = ("cells50", "balanced", "permutation", "class-runs")  # class-runs: on the store grouped by class
VALUES = ("genes2000", "genes2000-dense", "counts", "obsm50")


def run_arrayloaders(store: Path, args) -> dict:
    import numpy as np
    import torch

    from arrayloaders import ZarrDenseDataset, ZarrSparseDataset, read_manifest

    setup = time.perf_counter()  # from here (imports done) to the first next(): the loader's set-up
    kind = ZarrDenseDataset if args.dense or args.values == "genes2000-dense" else ZarrSparseDataset
    cuda = args.to == "cuda"
    values = {}
    if args.values in ("genes2000", "genes2000-dense"):  # a fixed random choice, in random order (an HVG list)
        names = read_manifest(store).var_names
        values["var_names"] = [names[i] for i in np.random.default_rng(0).choice(len(names), 2000, replace=False)]
    elif args.values == "counts":
        values["layer"] = "counts"
    ds = kind(args.batch_size, args.chunk_size, args.preload_nchunks, num_workers=args.workers[0], pin_memory=cuda,
              **values)  # fmt: skip
    # a URL (--remote): the options come in the environment, not on the command line
    remote = {}
    if "://" in str(store):
        remote["storage_options"] = json.loads(os.environ.get("ARRAYLOADERS_BENCH_STORAGE_OPTIONS", "null"))
        remote["cache_dir"] = os.environ.get("ARRAYLOADERS_BENCH_CACHE_DIR") or None
    ds.add_store(store, obs_keys="cell_type", obsm_keys="X_pca" if args.values == "obsm50" else None, **remote)
    n = ds.n_obs
    if args.selection == "cells50":
        ds = ds.subset(cells=np.random.default_rng(0).random(n) < 0.5)
    elif args.selection == "balanced":
        ds = ds.subset(sampler=torch.utils.data.WeightedRandomSampler(ds.class_weights("cell_type"), num_samples=n))
    elif args.selection == "permutation":
        ds = ds.subset(sampler=torch.utils.data.RandomSampler(range(n)))
    elif args.selection == "class-runs":
        ds = ds.subset(sampler=ds.class_run_sampler("cell_type"))
    setup_s = time.perf_counter() - setup
    time.sleep(args.model_s)  # the user building a model: the workers start meanwhile
    with ds:
        # ds.stats() over the epochs after the first (the steady state): how busy the workers were
        counted = epochs_of(lambda: on_cuda(ds) if cuda else ds, args.epochs, lambda b: b[0].shape[0], setup_s,
                            lambda epoch: ds.stats(reset=True) if epoch == 0 else None)  # fmt: skip
        stats = ds.stats()
    busy = [w.busy_fraction for w in stats.workers]
    counted["workers_busy"] = sum(busy) / len(busy) if busy and args.epochs > 1 else None
    counted["loader_fraction"] = stats.loader_fraction if args.epochs > 1 else None
    return counted


def on_cuda(batches):
    """Batches copied to the GPU as a training loop would; the epoch ends when the last copy has landed."""
    import torch

    for X, y in batches:
        yield X.to("cuda", non_blocking=True), y.to("cuda", non_blocking=True)
    torch.cuda.synchronize()


def run_sequential(store: Path, args) -> dict:
    import zarr

    from arrayloaders import read_manifest
    from arrayloaders.store.format import use_zarrs

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

    setup = time.perf_counter()  # reading the whole X into memory
    files = read_manifest(store).files
    X = sp.vstack([ad.read_zarr(store / f["name"]).X for f in files], format="csr")
    labels = np.concatenate([ad.read_zarr(store / f["name"]).obs["cell_type"].cat.codes.to_numpy() for f in files])
    rng = np.random.default_rng(0)

    def batches():
        order = rng.permutation(X.shape[0])
        for i in range(0, X.shape[0], args.batch_size):
            rows = order[i : i + args.batch_size]
            yield X[rows], labels[rows]

    return epochs_of(batches, args.epochs, lambda b: b[0].shape[0], time.perf_counter() - setup)


class BackedH5ads:
    """Rows of several backed ``.h5ad`` files as one collection: ``collection[indices]`` -> (CSR, labels).

    Indices are sorted before reading (h5py reads sorted rows far faster), as
    both h5ad-based peers do; the files are opened lazily in each process that
    reads, so the collection can be handed to DataLoader workers.
    """

    def __init__(self, paths: list[Path]):
        import anndata as ad
        import numpy as np

        self.paths, self._files = paths, None
        obs = [ad.read_h5ad(p, backed="r").obs["cell_type"] for p in paths]
        self.offsets = np.cumsum([0] + [len(o) for o in obs])
        self.labels = np.concatenate([o.cat.codes.to_numpy() for o in obs])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, indices):
        import anndata as ad
        import numpy as np
        import scipy.sparse as sp

        if self._files is None:
            self._files = [ad.read_h5ad(p, backed="r") for p in self.paths]
        indices = np.sort(np.asarray(indices))
        cut = np.searchsorted(indices, self.offsets)
        parts = [f.X[indices[a:b] - off] for f, a, b, off in zip(self._files, cut[:-1], cut[1:], self.offsets) if b > a]
        return sp.vstack(parts, format="csr"), self.labels[indices]


def h5ad_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("part_*.h5ad"))


def run_anndata_backed(h5ad_dir: Path, args) -> dict:
    """Random batches from backed h5ad: each batch's indices sorted and read; DataLoader workers, one per core."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    setup = time.perf_counter()
    collection = BackedH5ads(h5ad_paths(h5ad_dir))
    batches = BatchSampler(RandomSampler(range(len(collection))), args.batch_size, drop_last=False)
    loader = DataLoader(collection, sampler=batches, batch_size=None, **dataloader_workers())
    return epochs_of(lambda: loader, args.epochs, lambda b: b[0].shape[0], time.perf_counter() - setup)


def run_scdataset(h5ad_dir: Path, args) -> dict:
    """scDataset over backed h5ad, with our block (chunk) and fetch (preload) sizes; DataLoader workers, one per core."""
    from scdataset import BlockShuffling, scDataset
    from torch.utils.data import DataLoader

    setup = time.perf_counter()
    fetch_factor = max(1, args.chunk_size * args.preload_nchunks // args.batch_size)
    ds = scDataset(
        BackedH5ads(h5ad_paths(h5ad_dir)), BlockShuffling(block_size=args.chunk_size), batch_size=args.batch_size,
        fetch_factor=fetch_factor, batch_callback=rows_of_pair, seed=0,
    )  # fmt: skip
    loader = DataLoader(ds, batch_size=None, **dataloader_workers())
    return epochs_of(lambda: loader, args.epochs, lambda b: b[0].shape[0], time.perf_counter() - setup)


def rows_of_pair(fetched: tuple, rows):
    """scDataset's batch_callback: the same rows of the fetched (X, labels)."""
    return fetched[0][rows], fetched[1][rows]


def dataloader_workers() -> dict:
    # Like ours: one worker per usable core, kept up across epochs.
    return {"num_workers": len(os.sched_getaffinity(0)), "persistent_workers": True}


RUNNERS = {
    "arrayloaders": run_arrayloaders,
    "sequential-decode": run_sequential,
    "scipy-gather": run_scipy_gather,
    "anndata-backed": run_anndata_backed,
    "scdataset": run_scdataset,
}


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
    out = json.loads(stdout.strip().splitlines()[-1]) if json_line else {}
    return {**out, "command_wall_s": wall, "peak_pss_bytes": mem.peak_pss, "peak_rss_sum_bytes": mem.peak_rss}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in files_under(path))


def build_store(store: Path, cmd: list[str], rebuild: bool, json_line: bool = True) -> dict:
    """Run the conversion ``cmd`` unless ``store`` exists; its measurement is kept beside the store for reuse."""
    record = store.with_name(store.name + ".conversion.json")
    if store.exists() and not rebuild:
        return json.loads(record.read_text()) if record.exists() else {"note": "store reused, conversion not measured"}
    conversion = run_measured(cmd, json_line)
    if "skipped" not in conversion:
        conversion["store_bytes"] = dir_bytes(store)
        record.write_text(json.dumps(conversion))
    return conversion


def prepare(args) -> tuple[list[Path], Path, dict]:
    from arrayloaders.example_data import write_example_h5ads

    h5ad_dir, store = args.data / "h5ad", args.data / "store"
    layout = []
    if args.chunk_elements is not None:  # another layout of the same cells: a store of its own
        store = args.data / f"store-c{args.chunk_elements}"
        layout = ["--chunk-elements", str(args.chunk_elements)]
    paths = h5ad_paths(h5ad_dir)
    if len(paths) != args.n_files:
        print(f"generating {args.n_files} x {args.cells_per_file} cells x {args.n_vars} genes -> {h5ad_dir}", flush=True)
        paths = write_example_h5ads(h5ad_dir, [args.cells_per_file] * args.n_files, args.n_vars, nnz_per_cell=args.nnz)
        args.reconvert = True  # new input: stores of the old one are stale
    if not (store / "arrayloaders.json").exists():
        args.reconvert = True
    from arrayloaders.store.format import XLayout

    # A store kept from a run with another default layout is rebuilt (alone), not measured as this one.
    stale = stored_chunk_elements(store) != (args.chunk_elements or XLayout().chunk_elements)
    cmd = [sys.executable, str(REPO / "scripts" / "convert.py"), *map(str, paths), "-o", str(store), "-q", "--overwrite",
           *layout]  # fmt: skip
    return paths, store, build_store(store, cmd, args.reconvert or stale, json_line=False)


def stored_chunk_elements(store: Path) -> int | None:
    """The inner chunk length of X's data in ``store``'s first file (``None``: no such array)."""
    import zarr

    try:
        meta = zarr.open_array(store / "chunk_0.zarr" / "X" / "data", mode="r").metadata
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, ValueError):
        return None
    codecs = meta.codecs
    inner = getattr(codecs[0], "chunk_shape", None) if len(codecs) == 1 else None
    return int((inner or meta.chunk_grid.chunk_shape)[0])


def prepare_values(paths: list[Path], args) -> tuple[Path, dict]:
    """A store of the same inputs with ``layers["counts"]`` (= X) and a 50-column ``obsm["X_pca"]`` added."""
    import anndata as ad
    import numpy as np

    h5ad_dir, store = args.data / "h5ad-values", args.data / "store-values"
    if args.reconvert or not (store / "arrayloaders.json").exists():
        h5ad_dir.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            adata = ad.read_h5ad(path)
            adata.layers["counts"] = adata.X
            adata.obsm["X_pca"] = np.random.default_rng(i).standard_normal((adata.n_obs, 50)).astype(np.float32)
            adata.write_h5ad(h5ad_dir / path.name)
        args.reconvert_values = True
    values_paths = [h5ad_dir / p.name for p in paths]
    cmd = [sys.executable, str(REPO / "scripts" / "convert.py"), *map(str, values_paths), "-o", str(store), "-q",
           "--overwrite"]  # fmt: skip
    return store, build_store(store, cmd, getattr(args, "reconvert_values", False), json_line=False)


def prepare_by_class(paths: list[Path], args) -> tuple[Path, dict, Path | None, dict]:
    """The same cells sorted by cell type, for class samplers that read runs of one class.

    Written as .h5ad parts (as many as the inputs), then converted without shuffling into an
    arrayloaders store and an annbatch collection: (store, its conversion, annbatch's, its conversion).
    """
    import anndata as ad
    import numpy as np

    h5ad_dir = args.data / "h5ad-by-class"
    parts = [h5ad_dir / p.name for p in paths]
    if args.reconvert or not all(p.exists() for p in parts):
        h5ad_dir.mkdir(parents=True, exist_ok=True)
        adata = ad.concat([ad.read_h5ad(p) for p in paths])
        adata = adata[np.argsort(adata.obs["cell_type"].cat.codes.to_numpy(), kind="stable")]
        for part, rows in zip(parts, np.array_split(np.arange(adata.n_obs), len(parts))):
            adata[rows].copy().write_h5ad(part)
        args.reconvert_by_class = True
    rebuild = getattr(args, "reconvert_by_class", False) or args.reconvert
    store = args.data / "store-by-class"
    cmd = [sys.executable, str(REPO / "scripts" / "convert.py"), *map(str, parts), "-o", str(store), "-q",
           "--overwrite", "--no-shuffle"]  # fmt: skip
    conversion = build_store(store, cmd, rebuild, json_line=False)
    if not ANNBATCH_PYTHON.exists():
        return store, conversion, None, {"skipped": f"no annbatch venv at {ANNBATCH_PYTHON} (see scripts/annbatch_runner.py)"}
    annbatch_store = args.data / "annbatch_store-by-class"
    if rebuild and annbatch_store.exists():
        shutil.rmtree(annbatch_store)  # annbatch appends to an existing collection
    cmd = [str(ANNBATCH_PYTHON), str(REPO / "scripts" / "annbatch_runner.py"), "convert", "--inputs", *map(str, parts),
           "--output", str(annbatch_store), "--no-shuffle"]  # fmt: skip
    annbatch_conversion = build_store(annbatch_store, cmd, rebuild, json_line=False)
    return store, conversion, (None if "skipped" in annbatch_conversion else annbatch_store), annbatch_conversion


def prepare_annbatch(paths: list[Path], args) -> tuple[Path | None, dict]:
    if not ANNBATCH_PYTHON.exists():
        return None, {"skipped": f"no annbatch venv at {ANNBATCH_PYTHON} (see scripts/annbatch_runner.py)"}
    store = args.data / "annbatch_store"
    if args.reconvert and store.exists():
        shutil.rmtree(store)  # annbatch appends to an existing collection
    runner = str(REPO / "scripts" / "annbatch_runner.py")
    cmd = [str(ANNBATCH_PYTHON), runner, "convert", "--inputs", *map(str, paths), "--output", str(store)]
    conversion = build_store(store, cmd, args.reconvert, json_line=False)
    return (None if "skipped" in conversion else store), conversion


def loader_names(args) -> list[str]:
    names = []
    for loader in args.loaders:
        if loader == "arrayloaders":
            names += [f"arrayloaders-w{w}" for w in args.workers]
        elif loader == "arrayloaders-dense":
            names.append(f"arrayloaders-w{max(args.workers)}-dense")
        elif loader == "arrayloaders-selection":
            names += [f"arrayloaders-w{max(args.workers)}-{s}" for s in SELECTIONS if s != "class-runs"]
        elif loader == "arrayloaders-values":
            names += [f"arrayloaders-w{max(args.workers)}-{v}" for v in VALUES]
        elif loader == "annbatch":
            names += [f"annbatch-{s}" for s in ANNBATCH_SETTINGS]
        elif loader == "class-balanced":
            w = max(args.workers)
            names += [f"arrayloaders-w{w}-balanced", f"arrayloaders-w{w}-class-runs"]
            names += [f"annbatch-class-{s}" for s in ANNBATCH_SETTINGS]
        else:
            names.append(loader)
    return list(dict.fromkeys(names))


def command(name: str, source: Path, args, epochs: int) -> list[str]:
    sizes = ["--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
             "--preload-nchunks", str(args.preload_nchunks), "--epochs", str(epochs)]  # fmt: skip
    if name.startswith("annbatch-"):
        runner = str(REPO / "scripts" / "annbatch_runner.py")
        setting = name.removeprefix("annbatch-")
        chunk, preload = ANNBATCH_SETTINGS[setting.removeprefix("class-")]
        sizes = ["--batch-size", str(args.batch_size), "--chunk-size", str(chunk), "--preload-nchunks", str(preload),
                 "--epochs", str(epochs)]  # fmt: skip
        gpu = ["--gpu"] if args.to == "cuda" else []
        gpu += ["--class-sampler"] if setting.startswith("class-") else []
        return [str(ANNBATCH_PYTHON), runner, "load", "--store", str(source), *sizes, "--obs-key", "cell_type",
                "--setting", "zarrs", "--pause-s", str(args.model_s), *gpu]  # fmt: skip
    child, workers, extra = name, "0", []
    if name.startswith("arrayloaders-w"):
        child, _, variant = name.removeprefix("arrayloaders-").partition("-")
        workers, child = child.removeprefix("w"), "arrayloaders"
        if variant in VALUES:
            extra = ["--values", variant]
        else:
            extra = ["--dense"] if variant == "dense" else ["--selection", variant] if variant else []
    return [sys.executable, __file__, "--child", child, "--store", str(source), *sizes, "--workers", workers, *extra,
            "--to", args.to, "--model-s", str(args.model_s)]  # fmt: skip


def measure(name: str, source: Path, cache: str, args) -> dict:
    runs = []
    for _ in range(args.repeats):
        if cache == "cold":
            evict(source)
        else:
            warm(source)
        # Cold figures are the first epoch (the one that met the evicted cache): one epoch is enough.
        run = run_measured(command(name, source, args, args.epochs if cache == "warm" else 1), interval=args.memory_interval)
        if "skipped" in run:
            return run
        first = run["epochs"][0]
        run["first_epoch_cells_per_s"] = first["cells"] / (run.get("setup_s", 0.0) + first["wall_s"])
        run["first_batch_s"] = first["first_batch_s"]  # of the first epoch (the last one's is in "epochs")
        runs.append(run)
    keys = ("cells_per_s", "first_epoch_cells_per_s", "first_batch_s", "wall_s", "peak_pss_bytes", "peak_rss_sum_bytes")
    busy = [r["workers_busy"] for r in runs if r.get("workers_busy") is not None]  # arrayloaders' (ds.stats())
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs,
            "workers_busy": statistics.median(busy) if busy else None}  # fmt: skip


def best_annbatch(results: dict[str, dict], key: str, prefix: str = "annbatch-") -> tuple[str, float] | None:
    """The annbatch setting named ``prefix...`` with the highest ``key`` in ``results``, and that figure.

    Shuffled chunks (``annbatch-<setting>``) and the class sampler (``annbatch-class-<setting>``) are
    baselines of their own: each row is compared with its kind.
    """
    measured = [(n, r[key]) for n, r in results.items()
                if n.startswith(prefix) and (prefix != "annbatch-" or not n.startswith("annbatch-class-")) and key in r]
    return max(measured, key=lambda m: m[1], default=None)


def table(results: dict[str, dict], cache: str) -> str:
    first_base, steady_base = best_annbatch(results, "first_epoch_cells_per_s"), best_annbatch(results, "cells_per_s")
    class_first = best_annbatch(results, "first_epoch_cells_per_s", "annbatch-class-")
    class_steady = best_annbatch(results, "cells_per_s", "annbatch-class-")
    gather = results.get("scipy-gather", {}).get("cells_per_s")
    lines = [
        f"| loader ({cache}) | first epoch (cells/s) | x best annbatch | steady (cells/s) | x best annbatch | "
        "x scipy gather | x chunked access | first batch (s) | peak memory, PSS (GiB) | workers busy, steady |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        steady, first = r["cells_per_s"], r["first_epoch_cells_per_s"]
        ratio = lambda v, b: f"{v / b:.2f}" if b else "n/a"  # noqa: E731
        # Class-balanced rows against annbatch's class sampler, the others against its shuffled chunks.
        by_class = name.endswith("-class-runs") or name.startswith("annbatch-class-")
        f_base, s_base = (class_first, class_steady) if by_class else (first_base, steady_base)
        # A selection or values row against chunked access over every cell and gene, same workers, this run.
        head, _, variant = name.partition("-w")[2].partition("-")
        known = variant in SELECTIONS + VALUES
        chunked = results.get(f"arrayloaders-w{head}", {}).get("cells_per_s") if known else None
        lines.append(
            f"| {name} | {first:,.0f} | {ratio(first, f_base and f_base[1])} | {steady:,.0f} | "
            f"{ratio(steady, s_base and s_base[1])} | "
            f"{ratio(steady, gather)} | {ratio(steady, chunked) if chunked else ''} | "
            f"{r['first_batch_s']:.2f} | {r['peak_pss_bytes'] / 2**30:.2f} | "
            f"{f'{busy:.0%}' if (busy := r.get('workers_busy')) is not None else ''} |"
        )
    if first_base or steady_base:
        lines += ["", "Best annbatch: " + "; ".join(f"{what} {b[0]} ({b[1]:,.0f} cells/s)" for what, b in
                                                    (("first epoch", first_base), ("steady", steady_base)) if b)]  # fmt: skip
    if class_first or class_steady:
        lines += ["", "Best annbatch WeightedClassSampler (the baseline of the class-balanced rows, on the store "
                  "grouped by class): " + "; ".join(f"{what} {b[0]} ({b[1]:,.0f} cells/s)" for what, b in
                                                   (("first epoch", class_first), ("steady", class_steady)) if b)]  # fmt: skip
    return "\n".join(lines)


def stores_table(stores: list[tuple[str, str, Path, dict]]) -> str:
    """What each loader reads from: size on disk, and the time and peak memory (PSS) of building it."""
    lines = ["| store | read by | size on disk | conversion (s) | conversion peak PSS (GiB) |", "|---|---|---|---|---|"]
    for label, readers, path, conv in stores:
        if "skipped" in conv:
            lines.append(f"| {label} | {readers} | skipped: {conv['skipped']} | | |")
            continue
        size = conv.get("store_bytes") or dir_bytes(path)
        built = (f"{conv['command_wall_s']:.1f} | {conv['peak_pss_bytes'] / 2**30:.2f}" if "command_wall_s" in conv
                 else conv.get("note", "none: read as written") + " | ")  # fmt: skip
        shown = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        lines.append(f"| {label} | {readers} | {shown} | {built} |")
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
    ax.set_xlabel("cells / s, steady state (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


LOADERS = ("arrayloaders", "arrayloaders-dense", "arrayloaders-selection", "arrayloaders-values", "annbatch",
           "class-balanced", "scdataset", "anndata-backed", "sequential-decode", "scipy-gather")  # fmt: skip
QUICK = {"n_files": 2, "cells_per_file": 5_000, "n_vars": 2_000, "nnz": 200, "batch_size": 1024,
         "preload_nchunks": 64, "repeats": 1, "workers": [0, 2], "memory_interval": 0.05}  # fmt: skip


def parse_args(p: argparse.ArgumentParser, quick: dict, quick_data: Path) -> argparse.Namespace:
    """Parse; ``--quick`` sets the ``quick`` settings that were left at their defaults (an option given
    explicitly, e.g. ``--quick --cells-per-file 1000``, wins), and ``quick_data`` unless ``--data`` was given."""
    args = p.parse_args()
    if args.quick:
        for k, v in quick.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
        if args.data == p.get_default("data"):
            args.data = quick_data
    return args


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
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS), help="which to measure (default: all)")
    p.add_argument("--cache", nargs="+", choices=["warm", "cold"], default=["warm", "cold"])
    p.add_argument("--reconvert", action="store_true", help="rebuild the stores even if they exist")
    p.add_argument("--chunk-elements", type=int,
                   help="inner chunk length of X's data/indices in arrayloaders' store (convert.py --chunk-elements; "
                   "default: the converter's), kept in DATA/store-cN")  # fmt: skip
    p.add_argument("--model-s", type=float, default=0.0,
                   help="seconds between building each loader and its first batch, as if building a model (default 0)")
    p.add_argument("--memory-interval", type=float, default=0.5, help="seconds between memory samples (default 0.5)")
    p.add_argument("--to", choices=["cpu", "cuda"], default="cpu",
                   help="where batches are delivered: 'cuda' pins arrayloaders' batches and copies them to the GPU, "
                   "and runs annbatch in its GPU mode (the other loaders stay on the CPU)")  # fmt: skip
    p.add_argument("--out", type=Path, help="results folder (default: DATA/results)")
    p.add_argument("--quick", action="store_true",
                   help="small data (2 x 5,000 cells x 2,000 genes), one repeat, num_workers 0 and 2: about a minute; "
                   "data in /tmp/arrayloaders-bench-quick unless --data is given")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--remote", action="store_true",
                   help="read the store from s3:// instead: starts SeaweedFS here (the test extra), adds --latency-ms "
                   "per request, and compares with the store on disk and annbatch remote (scripts/benchmark_remote.py)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20], help="with --remote: added per request")
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--selection", choices=SELECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--values", choices=VALUES, help=argparse.SUPPRESS)
    args = parse_args(p, QUICK, Path("/tmp/arrayloaders-bench-quick"))
    if args.child:
        store = args.store if "://" in args.store else Path(args.store)  # a URL stays a string
        print(json.dumps(RUNNERS[args.child](store, args)))
        return

    paths, store, conversion = prepare(args)
    annbatch_store, annbatch_conversion = prepare_annbatch(paths, args) if "annbatch" in args.loaders else (None, {})
    if args.remote:
        import benchmark_remote

        benchmark_remote.run(args, store, annbatch_store)
        return
    values_store, values_conversion = (
        prepare_values(paths, args) if "arrayloaders-values" in args.loaders else (None, {})
    )
    by_class = prepare_by_class(paths, args) if "class-balanced" in args.loaders else (None, {}, None, {})
    h5ad_dir = args.data / "h5ad"
    missing_scdataset = {"skipped": "scdataset is not installed (pip install 'arrayloaders[bench]')"}

    def source(name: str) -> Path | dict:
        if name.startswith("annbatch-class-"):
            return by_class[2] or by_class[3]
        if name.endswith("-class-runs"):
            return by_class[0]
        if name.startswith("annbatch-"):
            return annbatch_store or annbatch_conversion
        if name == "scdataset" and importlib.util.find_spec("scdataset") is None:
            return missing_scdataset
        if name.endswith(("-counts", "-obsm50")):
            return values_store
        return h5ad_dir if name in ("scdataset", "anndata-backed") else store

    results: dict[str, dict[str, dict]] = {}
    for cache in args.cache:
        results[cache] = {}
        for name in loader_names(args):
            if name == "scipy-gather" and cache == "cold":
                continue  # in memory: no cache to be cold
            src = source(name)
            results[cache][name] = src if isinstance(src, dict) else measure(name, src, cache, args)
            r = results[cache][name]
            print(f"{cache} {name}: " + (r.get("skipped") or f"{r['cells_per_s']:,.0f} cells/s"), flush=True)

    stores = [("arrayloaders store", "arrayloaders, sequential decode, scipy gather", store, conversion),
              ("the .h5ad files", "scDataset, anndata backed", h5ad_dir, {})]  # fmt: skip
    if "annbatch" in args.loaders:
        stores.insert(1, ("annbatch store", "annbatch", annbatch_store, annbatch_conversion))
    if values_store is not None:
        stores.insert(1, ("arrayloaders store + layer + obsm", "the counts and obsm50 rows", values_store,
                          values_conversion))  # fmt: skip
    if by_class[0] is not None:
        stores.insert(1, ("arrayloaders store grouped by class", "class-runs", by_class[0], by_class[1]))
        stores.insert(2, ("annbatch store grouped by class", "annbatch-class", by_class[2], by_class[3]))
    report = [f"Data: {args.n_files} x {args.cells_per_file} cells x {args.n_vars} genes, ~{args.nnz} non-zeros per cell; "
              f"batch {args.batch_size}, chunk {args.chunk_size}, preload {args.preload_nchunks}; "
              f"median of {args.repeats}; {os.cpu_count()} cores; batches delivered to {args.to}; "
              f"{args.model_s:g} s of model building between each loader's set-up and its first batch.", "",
              stores_table(stores)]  # fmt: skip
    for cache, res in results.items():
        report += ["", table(res, cache)]
    text = "\n".join(report)
    print("\n" + text)
    out = args.out or args.data / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    title = (f"{args.n_files * args.cells_per_file:,} cells x {args.n_vars:,} genes, batch {args.batch_size}, "
             f"{os.cpu_count()} cores, batches to {args.to} (median of {args.repeats})")  # fmt: skip
    if not plot(results, out / "results.png", title):
        print("no chart: matplotlib is not installed (pip install arrayloaders[bench])")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "conversion": conversion, "annbatch_conversion": annbatch_conversion,
                                                  "results": results}, indent=1))  # fmt: skip
    print(f"\nwritten to {out}/: results.md, results.json, results.png")


if __name__ == "__main__":
    main()
