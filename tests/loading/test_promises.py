"""README promises that had no test of their own (issue "Trust III", item 15).

Each section names the promise it holds the code to. Real parts throughout:
worker processes, gloo ranks, stores converted in tmp_path, a 64 MiB tmpfs
mounted at ``/dev/shm`` in a mount namespace of its own; where a section
falls back to less (a patched ``statvfs``), it says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_bit_identical, batch_bytes, has_our_frame, read_store, worker_pids

from arrayloaders import ZarrDenseDataset, ZarrSparseDataset, create_store_from_h5ads
from arrayloaders.example_data import write_example_h5ads
from arrayloaders.loading.ring import SHM_DIR, segment_names

HERE = Path(__file__).parent
CHILD = HERE / "promises_child.py"
ENGINE_CHILD = HERE / "engine_child.py"
KW = {"batch_size": 50, "chunk_size": 8, "preload_nchunks": 12, "return_index": True}


def make(store, num_workers: int = 0, cls=ZarrSparseDataset, **kw):
    return cls(**{**KW, "num_workers": num_workers, **kw}).add_store(store, obs_keys="cell_type")


def loop_bytes(ds) -> list[bytes]:
    return [batch_bytes(b) for b in ds]


def csr_of(X: torch.Tensor) -> sp.csr_matrix:
    if X.layout == torch.sparse_csr:
        return sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=X.shape)
    return sp.csr_matrix(X.numpy())


def run_child(scenario: str, store: Path, outdir: Path, wrapper: list[str] = (), env=None, timeout=240, **args) -> dict:
    """``promises_child.py SCENARIO`` in one process (behind ``wrapper``, e.g. ``unshare``); its JSON findings."""
    outdir.mkdir(parents=True, exist_ok=True)
    cmd = [*wrapper, sys.executable, str(CHILD), scenario, str(store), str(outdir), json.dumps(args)]
    env = {**os.environ, **(env or {})}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{scenario} did not finish within {timeout} s (hang?)\n{e.stderr}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads((outdir / "rank0.json").read_text())


# =========================================================================== a. a /dev/shm too small
# README, "Memory": Docker's default /dev/shm (64 MiB) is too small for the defaults: the loader says so
# and how to fix it rather than crash. ring._check_room compares the ring's size with os.statvfs(/dev/shm).


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory) -> Path:
    """2,048 cells x 3,000 genes, few non-zeros: densified loads of 2,048 rows take ~23 MiB slots."""
    d = tmp_path_factory.mktemp("wide")
    h5ads = write_example_h5ads(d / "h5ad", (1024, 1024), 3000, nnz_per_cell=5)
    return create_store_from_h5ads(h5ads, d / "store", progress=False)


def small_shm_wrapper() -> list[str] | None:
    """A command prefix that runs a command with a fresh 64 MiB tmpfs on /dev/shm (a mount namespace of its
    own, so the machine's /dev/shm is not touched), or None where no such namespace can be made."""
    unshare = shutil.which("unshare")
    if unshare is None or not SHM_DIR.is_dir():
        return None
    mount = 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$@"'
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):  # as root; else a user namespace
        wrapper = [unshare, *flags, "sh", "-c", mount, "sh"]
        probe = subprocess.run([*wrapper, "sh", "-c", "df -B1 --output=size /dev/shm | tail -1"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(64 * 2**20):
            return wrapper
    return None


SHM_ADVICE = ("lower memory_budget or preload_nchunks", "docker run --shm-size", "/dev/shm has 64 MiB free")


def test_a_docker_sized_dev_shm_is_refused_saying_how_to_fix_it(wide_store, tmp_path):
    """For real: a 64 MiB tmpfs on /dev/shm, the loader at its default ring size for 2 workers (6 slots)."""
    wrapper = small_shm_wrapper()
    if wrapper is None:  # the test below covers the message through a patched statvfs
        pytest.skip("cannot mount a tmpfs in a mount namespace here (no unshare, or namespaces not allowed)")
    out = run_child("small_shm", wide_store, tmp_path, wrapper=wrapper)
    assert out["shm_bytes"] == 64 * 2**20  # the child really saw Docker's default
    assert len(out["workers_before"]) == 2
    error = out["error"]
    assert error is not None, "the loop ran although the ring cannot fit in /dev/shm"
    assert out["error_type"] == "RuntimeError" and re.search(r"the ring needs \d+ x 23 MiB of shared memory", error), error
    for advice in SHM_ADVICE:
        assert advice in error, error
    # Refused before anything was put in /dev/shm; the workers were stopped; the next loop is refused alike.
    assert out["after_error"] == {"segments": [], "workers": []}
    assert out["second_error"] == error
    # Following the advice works, with the same batches as reading in-process.
    assert out["fixed"]["memory_budget"] == {"equal": True, "slots": 2}
    assert out["fixed"]["preload_nchunks"]["equal"] and out["fixed"]["preload_nchunks"]["slots"] > 2
    # Batches held across epochs fill /dev/shm: the loader says so (not a worker killed by SIGBUS).
    assert out["held_error_type"] == "RuntimeError", out["held_error"]
    assert "batches you still hold keep their slots' memory" in out["held_error"], out["held_error"]
    for advice in ("hold fewer batches", "lower memory_budget or preload_nchunks", "docker run --shm-size"):
        assert advice in out["held_error"], out["held_error"]
    assert out["held_batches"] > 32  # more than the ring's slots hold: slots were replaced before it ran out
    assert out["held_unchanged"] and out["held_as_reference"]  # the held batches keep their values
    assert out["after_dropping"]  # once they are dropped, the next loop runs
    assert out["end"] == {"segments": [], "workers": []}
    assert not any(psutil.pid_exists(p) for p in out["workers_before"])


def test_a_small_dev_shm_is_refused_in_process_through_statvfs(wide_store, monkeypatch):
    """The same check on any machine: ``os.statvfs`` reports 64 MiB free for /dev/shm (patched, the rest is real)."""
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        if Path(path) != SHM_DIR:
            return st
        free = 64 * 2**20 // st.f_frsize
        return os.statvfs_result((st.f_bsize, st.f_frsize, free, free, free, *tuple(st)[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    kw = {"batch_size": 64, "chunk_size": 32, "preload_nchunks": 64, "return_index": True}
    ds = ZarrDenseDataset(num_workers=2, **kw).add_store(wide_store)
    workers = worker_pids()
    with pytest.raises(RuntimeError) as info:
        next(iter(ds))
    for advice in SHM_ADVICE:
        assert advice in str(info.value)
    assert segment_names(os.getpid()) == []
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids() == [] and not any(psutil.pid_exists(p) for p in workers)
    ds.close()


# =========================================================================== b. Ctrl-C to the process group
# README, "Ctrl-C": pressed once or again and again, stops the loop with a KeyboardInterrupt and leaves no
# worker and no shared-memory segment. A terminal sends SIGINT to the whole foreground process group:
# the main process and everything in its group (Python's resource tracker included), not just the main process.


def interrupt_group(store: Path, scenario: str, n_signals: int, gap: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run engine_child.py ``scenario`` as a terminal's foreground job (a process group of its own) and send
    SIGINT to the whole group ``n_signals`` times, ``gap`` seconds apart, once it iterates."""
    p = subprocess.Popen(
        [sys.executable, str(ENGINE_CHILD), scenario, str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        started = json.loads(p.stdout.readline())
        started["pgid"] = os.getpgid(p.pid)
        started["worker_pgids"] = [_pgid(w) for w in started["workers"]]
        for _ in range(n_signals):
            if p.poll() is not None:
                break
            os.killpg(p.pid, signal.SIGINT)
            time.sleep(gap)
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)  # the child's stacks, to stderr
            time.sleep(1)
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            pytest.fail(f"Ctrl-C to the process group did not stop the child within 60 s; its stderr:\n{stderr[-6000:]}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its group
        except ProcessLookupError:
            pass
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), started


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def assert_nothing_left(started: dict) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(w) for w in started["workers"]):
        time.sleep(0.1)
    assert not any(psutil.pid_exists(w) for w in started["workers"]), "a worker outlived Ctrl-C"
    assert segment_names(started["pid"]) == [], "a shared-memory segment outlived Ctrl-C"


@pytest.mark.parametrize("n_signals", [1, 2], ids=["once", "twice"])
def test_ctrl_c_to_the_whole_process_group_raises_keyboard_interrupt_and_leaves_nothing(store, n_signals):
    from test_engine import tracebacks

    res, started = interrupt_group(store, "interrupt_uncaught", n_signals, 0.03)
    assert len(started["workers"]) == 2
    # The workers are in a group of their own: the terminal's SIGINT does not reach them.
    assert all(g is not None and g != started["pgid"] for g in started["worker_pgids"]), started
    assert res.returncode != 0
    found = tracebacks(res.stderr)
    assert found and found[0].rstrip().endswith("KeyboardInterrupt"), res.stderr
    assert not any(has_our_frame(t) for t in found[1:]), res.stderr  # later presses: none of ours
    assert "BrokenPipeError" not in res.stderr and "leaked shared_memory" not in res.stderr, res.stderr
    assert_nothing_left(started)


def test_ctrl_c_to_the_whole_process_group_caught_then_the_next_loop_works(store):
    res, started = interrupt_group(store, "interrupt", 1, 0)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["interrupted"] and out["next_epoch_rows"] == list(range(1000)), res.stderr
    assert out["segments"] == [] and out["children"] == [], res.stderr
    assert "leaked shared_memory" not in res.stderr, res.stderr
    assert_nothing_left(started)


# =========================================================================== c. DDP ranks that disagree
# README, "DDP": at the start of each epoch the ranks compare their settings (seed, sizes, epoch, resume
# position): a mismatch raises a ValueError on every rank that names the setting and each rank's value.


def launch(scenario: str, store: Path, outdir: Path, world_size: int, timeout: float = 90, **args) -> list[dict]:
    """``promises_child.py SCENARIO`` on ``world_size`` gloo ranks; their findings by rank."""
    import test_distributed

    return test_distributed.launch(scenario, store, outdir, world_size, timeout, child=CHILD, **args)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_on_different_epochs_are_refused_on_every_rank(store, tmp_path, num_workers):
    results = launch("ddp_epoch_mismatch", store, tmp_path, 2, num_workers=num_workers)
    for r in results:
        assert r["error"] is not None, f"rank {r['rank']} iterated although the ranks' epochs differ"
        assert "disagree on ['epoch']" in r["error"] and "rank 0=0" in r["error"] and "rank 1=1" in r["error"], r["error"]
        assert r["barrier"]  # the group still works afterwards
        assert r["after"]["segments"] == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_with_different_batch_sizes_are_refused_on_every_rank(store, tmp_path, num_workers):
    results = launch("ddp_batch_size_mismatch", store, tmp_path, 2, num_workers=num_workers)
    for r in results:
        assert r["error"] is not None, f"rank {r['rank']} iterated although the ranks' batch sizes differ"
        assert "batch_size: rank 0=50, rank 1=40" in r["error"], r["error"]
        assert r["barrier"]
        assert r["after"]["segments"] == []


# =========================================================================== d. resuming with other sizes
# README, "Resume": a state saved with another world size, rank or other sizes is refused with a ValueError
# naming the difference. (batch_size is left out here: its rule is being changed.)


@pytest.fixture(scope="module")
def other_stores(h5ads, tmp_path_factory) -> dict[str, Path]:
    """The conftest store's inputs in files of other sizes (the same 1000 cells), and two of its inputs alone."""
    d = tmp_path_factory.mktemp("other_sizes")
    return {
        "other_files": create_store_from_h5ads(h5ads, d / "files", n_obs_per_file=500, progress=False),
        "fewer_cells": create_store_from_h5ads(h5ads[:2], d / "fewer", n_obs_per_file=256, progress=False),
    }


def _mid_epoch_state(ds, k: int = 3) -> dict:
    ds.set_epoch(1)
    it = iter(ds)
    for _ in range(k):
        next(it)
    state = ds.state_dict()
    it.close()
    return state


@pytest.mark.parametrize(
    ("other", "named"),
    [
        ("other_files", r"file_n_obs: saved \[250, 250, 250, 250\], now \[500, 500\]"),
        ("fewer_cells", r"n_obs: saved 1000, now 800"),
    ],
)
def test_a_state_of_a_store_of_other_sizes_is_refused_naming_the_difference(store, other_stores, other, named):
    with make(store, 2) as ds:
        state = _mid_epoch_state(ds)
    with make(other_stores[other], 2) as target:
        before = target.state_dict()
        with pytest.raises(ValueError, match=f"cannot resume: the state was saved with other settings .*{named}"):
            target.load_state_dict(state)
        assert target.state_dict() == before  # refused: nothing of the state was taken
        assert loop_bytes(target) == loop_bytes(make(other_stores[other], 0))  # still its own epoch 0


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [((0, 2), (1, 2)), ((1, 2), (1, 3)), ((0, 2), (None, None)), ((None, None), (0, 2))],
)
def test_a_state_of_another_rank_or_world_size_resumes(store, saved, loaded):
    """The state is the same whichever rank saved it; at another world size it resumes the rest of the epoch
    spread over the new ranks (what they yield: test_elastic.py), and the epoch after it is the next one."""
    with make(store, 0, rank=saved[0], world_size=saved[1]) as ds:
        state = _mid_epoch_state(ds)
    assert (state["rank"], state["world_size"]) == (saved[0] or 0, saved[1] or 1)
    with make(store, 0, rank=loaded[0], world_size=loaded[1]) as target:
        target.load_state_dict(state)
        resumed = target.state_dict()
        if (loaded[1] or 1) == (saved[1] or 1):  # the same position, whichever rank it was saved on
            assert (resumed["epoch"], resumed["batches_yielded"], resumed["elastic"]) == (1, 3, [])
        else:  # the rest of epoch 1, after 3 batches on each of the saved ranks
            assert (resumed["epoch"], resumed["batches_yielded"], resumed["elastic"]) == (1, 0, [[saved[1] or 1, 3]])
        n = len(target) - resumed["batches_yielded"]  # len: the batches of the epoch's plan (or of its rest)
        assert sum(1 for _ in target) == n and target.epoch == 2


# =========================================================================== e. X of other dtypes
# README, "Exact": X bit-identical (CSR stays CSR, dense stays dense, dtype kept). Inputs of several
# dtypes: X's dtype is promoted over the inputs as numpy promotes them (np.result_type; the docstring of
# create_store_from_h5ads says a layer's "dtype is promoted over the inputs as X's is"), values exact.

N_GENES = 24


def _values(rng: np.random.Generator, dtype: np.dtype, n: int) -> np.ndarray:
    """Values that only ``dtype`` holds exactly: ints past float32's (and, for int64, int32's) range, floats past float32's precision."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        hi = {1: 100, 2: 30_000, 4: 2**31 - 1, 8: 2**52}[dtype.itemsize]  # int64: still exact as float64
        return rng.integers(1, hi, n, endpoint=True).astype(dtype)
    return rng.standard_normal(n).astype(dtype) * dtype.type(1000)


def _write_h5ad(path: Path, X, names: list[str], **kw) -> Path:
    obs = pd.DataFrame({"cell": names}, index=names)
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]), **kw).write_h5ad(path)
    return path


def _dtype_inputs(d: Path, dtypes: tuple[str, ...], dense: bool) -> list[Path]:
    paths = []
    for i, dtype in enumerate(dtypes):
        rng = np.random.default_rng(i)
        n = 70 + 13 * i
        X = sp.random(n, N_GENES, density=0.3, format="csr", random_state=i, dtype=np.float64)
        X = sp.csr_matrix((_values(rng, dtype, X.nnz), X.indices, X.indptr), shape=X.shape)
        names = [f"f{i}_c{j}" for j in range(n)]
        paths.append(_write_h5ad(d / f"{i}.h5ad", X.toarray() if dense else X, names))
    return paths


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
@pytest.mark.parametrize(
    "dtypes",
    [("int32",), ("int64",), ("float64",), ("float32", "float64"), ("float32", "int32"), ("int16", "float32"),
     ("int32", "int64"), ("uint16", "int16")],  # fmt: skip
    ids=lambda d: "+".join(d),
)
def test_x_of_any_numeric_dtype_is_converted_and_loaded_exactly(tmp_path, dtypes, dense):
    from arrayloaders import read_manifest

    paths = _dtype_inputs(tmp_path, dtypes, dense)
    store = create_store_from_h5ads(paths, tmp_path / "store", n_obs_per_file=64, progress=False)
    want = np.result_type(*dtypes)
    assert read_manifest(store).dtype == str(want)
    sources = [ad.read_h5ad(p) for p in paths]
    source = ad.concat(sources)
    assert all(str(s.X.dtype) == d for s, d in zip(sources, dtypes))
    expected = source.X.astype(want)
    if len(dtypes) > 1:  # the promoted values are the sources' own: casting back gives every value again
        for s in sources:
            back = expected[source.obs_names.get_indexer(s.obs_names)].astype(s.X.dtype)
            assert_bit_identical(back, s.X)
    # The store, read by plain anndata.
    stored = read_store(store)
    assert sp.issparse(stored.X) != dense
    assert_bit_identical(stored.X, expected[source.obs_names.get_indexer(stored.obs_names)])
    # The loader, with workers, on every row once.
    cls = ZarrDenseDataset if dense else ZarrSparseDataset
    ds = cls(batch_size=16, chunk_size=4, preload_nchunks=4, num_workers=2, return_index=True).add_store(store)
    seen = []
    with ds:
        for X, _, index in ds:
            rows = source.obs_names.get_indexer(stored.obs_names[index.numpy()])
            assert X.dtype == getattr(torch, str(want)), X.dtype
            got = X.numpy() if dense else csr_of(X)
            assert_bit_identical(got, expected[rows])
            seen.append(index.numpy())
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(source.n_obs))


@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
@pytest.mark.parametrize("element", ["X", "layers/counts"])
def test_integers_the_promoted_float_cannot_hold_are_refused_not_rounded(tmp_path, dense, element):
    """int64 with float32 inputs promote to float64, which holds integers exactly only up to 2**53."""
    from arrayloaders import InputFileError

    def inputs(value: int) -> list[Path]:
        big = np.zeros((5, N_GENES), np.int64)
        big[3, 2] = value
        paths = []
        for i, values in enumerate((np.ones((4, N_GENES), np.float32), big)):
            values = values if dense else sp.csr_matrix(values)
            X, kw = values, {}
            if element != "X":  # X float32 in both; the layer holds the ints
                X, kw = values.astype(np.float32), {"layers": {"counts": values}}
            paths.append(_write_h5ad(tmp_path / f"{i}.h5ad", X, [f"f{i}_c{j}" for j in range(X.shape[0])], **kw))
        return paths

    with pytest.raises(InputFileError, match=rf"1\.h5ad: {element} holds the integer 9007199254740993 in rows 0-4, "
                                             r"which the store's float64 \(the inputs' dtypes promoted\) cannot hold"):  # fmt: skip
        create_store_from_h5ads(inputs(2**53 + 1), tmp_path / "store", progress=False)  # float64 would store 2**53
    assert not (tmp_path / "store").exists()
    store = create_store_from_h5ads(inputs(2**53), tmp_path / "store", progress=False)  # exact in float64
    stored = read_store(store)
    values = stored.X if element == "X" else stored.layers["counts"]
    assert (values.toarray() if sp.issparse(values) else values).max() == 2**53


# =========================================================================== f. numba's cache unusable
# README: "NUMBA_DISABLE_JIT=1 or a read-only cache keep the Python loop, with the same values (samplers
# too)". The compiled code (chunk_gather.py, kernels.py) is cached on disk (cache=True). Here numba may
# cache only in NUMBA_CACHE_DIR (NUMBA_CACHE_LOCATOR_CLASSES=UserProvidedCacheLocator: as in a container
# whose package directory and home are read-only), and that directory is read-only or unusable.


def _read_only_wrapper(directory: Path) -> list[str] | None:
    """A command prefix that makes ``directory`` read-only for the command, root included (a read-only bind
    mount in a mount namespace of its own), or None where that cannot be made."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    script = f'mount --bind "{directory}" "{directory}" && mount -o remount,bind,ro "{directory}" && exec "$@"'
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        wrapper = [unshare, *flags, "sh", "-c", script, "sh"]
        probe = subprocess.run([*wrapper, "sh", "-c", f'touch "{directory}/probe"'], capture_output=True)
        if probe.returncode != 0 and not (directory / "probe").exists():
            ok = subprocess.run([*wrapper, "true"], capture_output=True).returncode == 0
            if ok:
                return wrapper
    return None


@pytest.fixture(scope="module")
def numba_reference(store):
    from promises_child import numba_loops

    return numba_loops(str(store), 0)


@pytest.mark.parametrize("how", ["read-only", "unusable", "jit-disabled"])
def test_an_unusable_numba_cache_keeps_the_python_loop_with_the_same_values(store, tmp_path, numba_reference, how):
    env = {"NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator"}
    wrapper: list[str] = []
    if how == "read-only":
        cache = tmp_path / "numba-cache"
        cache.mkdir()
        cache.chmod(0o555)  # read-only for anyone but root
        if os.geteuid() == 0:  # root writes anywhere a mount allows: make it a read-only mount
            wrapper = _read_only_wrapper(cache)
            if wrapper is None:
                pytest.skip("running as root without mount namespaces: 'unusable' covers this")
        env["NUMBA_CACHE_DIR"] = str(cache)
    elif how == "unusable":
        (tmp_path / "a-file").write_text("")
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "a-file" / "numba-cache")  # under a file: no one can create it
    else:
        env["NUMBA_DISABLE_JIT"] = "1"
    out = run_child("numba_cache", store, tmp_path / "out", wrapper=wrapper, env=env, timeout=400)
    # The scenario took effect: no compiled gather in the child (else numba found a cache elsewhere).
    assert out["compiled_loop"] is False, f"numba compiled with {env}: NUMBA_CACHE_LOCATOR_CLASSES not honoured?"
    for num_workers, loops in out["loops"].items():
        for name, batches in loops.items():
            want = numba_reference[name]
            assert batches == want, f"{how}, num_workers={num_workers}: {name} differs from the compiled run"
    assert out["end"] == {"segments": [], "workers": []}


# =========================================================================== g. samplers: set_epoch, torch's RNG
# README, "Samplers and randomness": the loader runs the sampler with torch's global generator seeded from
# (seed, epoch) and restores it afterwards, and calls sampler.set_epoch(epoch) if the sampler has one.


class GlobalRandomSampler(torch.utils.data.Sampler):
    """``k`` random rows drawn from torch's global generator; records the epochs it is given."""

    def __init__(self, n: int, k: int):
        self.n, self.k, self.epochs = n, k, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(torch.randperm(self.n)[: self.k].tolist())

    def __len__(self) -> int:
        return self.k


def _rows(ds) -> list[int]:
    return torch.cat([index for _, _, index in ds]).tolist()


def test_a_sampler_gets_set_epoch_and_torchs_global_generator_is_restored(store):
    a_sampler, b_sampler = GlobalRandomSampler(1000, 300), GlobalRandomSampler(1000, 300)
    truth = read_store(store).X
    with make(store, 2, sampler=a_sampler) as a, make(store, 0, sampler=b_sampler) as b:
        torch.manual_seed(1)
        state = torch.get_rng_state()
        first = []
        for X, _, index in a:  # epoch 0
            assert_bit_identical(csr_of(X), truth[index.numpy()])
            first += index.tolist()
        assert torch.equal(torch.get_rng_state(), state), "iterating changed torch's global generator"
        second = _rows(a)  # epoch 1
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(1)
        want = torch.rand(5)
        torch.manual_seed(1)
        _rows(a)  # epoch 2
        assert torch.equal(torch.rand(5), want)  # the user's random stream goes on as if the loop had not run
        assert a_sampler.epochs == [0, 1, 2]
        assert len(first) == 300 and len(set(first)) == 300 and first != second

        # Another dataset, another sampler, the global generator elsewhere: the same sequence per epoch.
        torch.manual_seed(12345)
        torch.rand(17)
        assert _rows(b) == first
        b.set_epoch(1)
        assert _rows(b) == second
        b.set_epoch(7)
        seventh = _rows(b)
        assert b_sampler.epochs == [0, 1, 7]
        a.set_epoch(7)
        assert _rows(a) == seventh and a_sampler.epochs == [0, 1, 2, 7]


def test_a_peek_and_a_resumed_loop_call_set_epoch_with_their_epoch(store):
    sampler = GlobalRandomSampler(1000, 300)
    with make(store, 0, sampler=sampler) as ds:
        ds.set_epoch(3)
        next(iter(ds))  # a peek: epoch 3
        it = iter(ds)
        head = [next(it)[2] for _ in range(2)]
        state = ds.state_dict()
        it.close()
    assert sampler.epochs == [3, 3]
    resumed_sampler = GlobalRandomSampler(1000, 300)
    with make(store, 2, sampler=resumed_sampler) as resumed:
        resumed.load_state_dict(state)
        rest = _rows(resumed)
    assert resumed_sampler.epochs == [3]
    with make(store, 0, sampler=GlobalRandomSampler(1000, 300)) as full:
        full.set_epoch(3)
        assert torch.cat(head).tolist() + rest == _rows(full)


# =========================================================================== h. subset() and split() keep layer and obsm
# README, "Choosing values": subset() and split() keep the genes, the layer and the obsm keys.


@pytest.fixture(scope="module")
def layered_store(tmp_path_factory):
    """Two .h5ad inputs with layers "counts" (CSR) and "scaled" (dense float64) and obsm "X_pca", their store,
    and the inputs read back by anndata."""
    d = tmp_path_factory.mktemp("layered_promises")
    paths = []
    for i, n in enumerate((130, 110)):
        rng = np.random.default_rng(10 + i)
        X = sp.random(n, N_GENES, density=0.2, format="csr", dtype=np.float32, random_state=i)
        counts = sp.random(n, N_GENES, density=0.3, format="csr", dtype=np.float32, random_state=50 + i)
        counts.data = rng.integers(1, 60, counts.nnz).astype(np.float32)
        names = [f"in{i}_{j}" for j in range(n)]
        layers = {"counts": counts, "scaled": rng.standard_normal((n, N_GENES))}
        obsm = {"X_pca": rng.standard_normal((n, 5)).astype(np.float32)}
        paths.append(_write_h5ad(d / f"{i}.h5ad", X, names, layers=layers, obsm=obsm))
    store = create_store_from_h5ads(paths, d / "store", n_obs_per_file=100, progress=False)
    return store, ad.concat([ad.read_h5ad(p) for p in paths], merge="same")


@pytest.mark.parametrize("layer", ["counts", "scaled"])
def test_subset_and_split_keep_the_layer_and_the_obsm_keys(layered_store, layer):
    store, source = layered_store
    names = read_store(store).obs_names  # each store row's name, read by anndata
    n = source.n_obs
    cls = ZarrDenseDataset if layer == "scaled" else ZarrSparseDataset
    ds = cls(batch_size=16, chunk_size=4, preload_nchunks=4, num_workers=2, return_index=True, layer=layer)
    ds.add_store(store, obs_keys="cell", obsm_keys="X_pca")
    train, val = ds.split(0.6, seed=1)
    parts = {
        "subset": ds.subset(cells=np.arange(0, n, 3)),
        "train": train,
        "val": val,
        "sampled": ds.subset(sampler=[5, 200, 5, 17, 239, 0] * 5),
        "split of a subset": ds.subset(cells=np.arange(1, n, 2)).split(0.5, seed=2)[1],
    }
    with ds:
        for what, part in parts.items():
            seen = 0
            for X, obs, index in part:
                rows = source.obs_names.get_indexer(names[index.numpy()])
                want = source.layers[layer][rows]
                assert_bit_identical(X.numpy() if layer == "scaled" else csr_of(X), want)  # the layer, not X
                assert set(obs) == {"cell", "X_pca"}, what
                assert_bit_identical(obs["X_pca"].numpy(), source.obsm["X_pca"][rows])
                np.testing.assert_array_equal(np.asarray(part.categories["cell"], dtype=object)[obs["cell"].numpy()],
                                              source.obs["cell"].to_numpy()[rows])  # fmt: skip
                seen += index.numel()
            assert seen == (30 if what == "sampled" else part.n_cells), what


# =========================================================================== i. the conversion's defaults
# README, "Parallel": n_jobs defaults to every core once the inputs hold 2^25 values of X or more (one
# process below that). "Out-of-core": working memory bounded by memory_budget (default: a quarter of free
# RAM, at most 2 GiB). "Layers and obsm": they go through the same two passes as X, one element after the
# other, so working memory stays within memory_budget.


class _JobsMade(Exception):
    """Raised by the Jobs spy: the conversion is stopped once it has chosen its number of processes."""


def _unwritten_h5ad(path: Path, n_obs: int, n_vars: int, n_values: int, dense: bool = False, layer_values: int = 0):
    """An .h5ad whose X holds ``n_values`` stored values (CSR entries, or a dense n_obs x n_vars array) that were
    never written: HDF5 allocates no storage for them, so the file is small however many values it declares.
    ``layer_values``: a CSR layer "counts" of that many entries too."""
    import h5py

    names = [f"{path.stem}_{i}" for i in range(n_obs)]
    ad.AnnData(obs=pd.DataFrame(index=names), var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)])).write_h5ad(path)

    def csr(group, nnz):
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_obs, n_vars)})
        group.create_dataset("data", shape=(nnz,), dtype="f4", chunks=(min(nnz, 2**16),))
        group.create_dataset("indices", shape=(nnz,), dtype="i4", chunks=(min(nnz, 2**16),))
        group.create_dataset("indptr", data=np.linspace(0, nnz, n_obs + 1).astype(np.int64))

    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        if dense:
            assert n_values == n_obs * n_vars
            x = f.create_dataset("X", shape=(n_obs, n_vars), dtype="f4", chunks=(256, n_vars))
            x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        else:
            csr(f.create_group("X"), n_values)
        if layer_values:
            csr(f.require_group("layers").create_group("counts"), layer_values)
    assert path.stat().st_size < 8 * 2**20  # 2^25 values written would take 256 MiB
    return path


@pytest.mark.parametrize(
    ("inputs", "n_jobs", "expected"),
    [
        ([2**25 - 1], None, 1),  # below: one process
        ([2**25], None, "cores"),  # from 2^25 values of X: every core
        ([2**24, 2**24], None, "cores"),  # the inputs together
        ([2**24, 2**24 - 1], None, 1),
        (["dense 2**25"], None, "cores"),  # a dense X counts all its values
        ([(2**20, 2**26)], None, 1),  # a layer's values do not count: X's only
        ([2**25], 3, 3),  # an explicit n_jobs is kept
        ([2**10], 4, 4),
    ],
    ids=["below", "at", "two-inputs-at", "two-inputs-below", "dense-at", "big-layer", "explicit-big", "explicit-small"],
)
def test_n_jobs_defaults_to_every_core_from_2_to_the_25_values_of_x(tmp_path, monkeypatch, inputs, n_jobs, expected):
    import arrayloaders.convert.create as convert

    n_obs, n_vars = 2**15, 2**10  # 2^25 entries fill every row of 1,024 genes
    paths = []
    for i, spec in enumerate(inputs):
        path = tmp_path / f"in{i}.h5ad"
        if spec == "dense 2**25":
            paths.append(_unwritten_h5ad(path, n_obs, n_vars, n_obs * n_vars, dense=True))
        elif isinstance(spec, tuple):
            paths.append(_unwritten_h5ad(path, n_obs, n_vars, spec[0], layer_values=spec[1]))
        else:
            paths.append(_unwritten_h5ad(path, n_obs, n_vars, spec))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)  # a 5-core machine
    made = []

    class Jobs(convert.Jobs):  # the real class, stopped at once: the inputs' values were never written
        def __init__(self, n):
            made.append(n)
            raise _JobsMade

    monkeypatch.setattr(convert, "Jobs", Jobs)
    with pytest.raises(_JobsMade):
        create_store_from_h5ads(paths, tmp_path / "store", progress=False, n_jobs=n_jobs)
    assert made == [5 if expected == "cores" else expected]
    assert not (tmp_path / "store").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # the staging is gone


@pytest.mark.parametrize(("available", "budget"), [(4 * 2**30, 2**30), (64 * 2**30, 2 * 2**30), (2**30, 2**28)])
def test_the_conversion_budget_defaults_to_a_quarter_of_free_memory_at_most_2_gib(monkeypatch, available, budget):
    import types

    import arrayloaders.convert.create as convert

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))
    assert convert._default_budget() == budget


# Small shards, so that a small memory_budget is allowed and every element spans many row blocks.
SMALL_LAYOUT_KW = {"chunk_elements": 64, "shard_elements": 256, "dense_chunk_bytes": 4 * N_GENES * 8,
                   "dense_shard_bytes": 16 * N_GENES * 8}  # fmt: skip


def _shards(layout, obsm_k: int = 5) -> dict[str, int]:
    """Uncompressed bytes of one shard of each element of the layered_store inputs, as the conversion sizes them."""
    return {
        "X": layout.shard_bytes("csr", N_GENES, 4),
        "layers/counts": layout.shard_bytes("csr", N_GENES, 4),
        "layers/scaled": layout.shard_bytes("dense", N_GENES, 8),
        "obsm/X_pca": layout.shard_bytes("dense", obsm_k, 4),
    }


@pytest.mark.parametrize(
    ("kept", "largest"),
    [({"layers": None, "obsm_keys": None}, "layers/scaled"), ({"layers": [], "obsm_keys": None}, "obsm/X_pca"),
     ({"layers": [], "obsm_keys": []}, "X")],  # fmt: skip
)
def test_the_budget_must_hold_the_largest_shard_of_x_layers_and_obsm(layered_store, tmp_path, kept, largest):
    """The smallest budget allowed is 64 MiB + 8 shards of the largest element carried, a layer or obsm too."""
    import arrayloaders.convert.create as convert
    from arrayloaders import XLayout

    store, _ = layered_store
    inputs = sorted(store.parent.glob("*.h5ad"))
    layout = XLayout(**SMALL_LAYOUT_KW)
    carried = {"X": True, "layers": kept["layers"] is None, "obsm": kept["obsm_keys"] is None}
    shards = {k: v for k, v in _shards(layout).items() if carried[k.split("/")[0]]}
    others = [v for k, v in shards.items() if k != largest]
    assert all(shards[largest] > v for v in others)  # the element named is the one with the largest shard
    minimum = convert._RESERVE + 8 * shards[largest]
    message = f"memory_budget={minimum - 1} bytes is too small for {largest} shards of {shards[largest]} bytes: it must be at least {minimum}"
    kw = {"layout": layout, "progress": False, **kept}
    with pytest.raises(ValueError, match=message):
        create_store_from_h5ads(inputs, tmp_path / "refused", memory_budget=minimum - 1, **kw)
    assert not (tmp_path / "refused").exists()
    create_store_from_h5ads(inputs, tmp_path / "store", memory_budget=minimum, **kw)


def test_a_conversion_with_layers_and_obsm_under_the_smallest_budget_is_exact(layered_store, tmp_path, monkeypatch):
    """Every element (X, each layer, each obsm array) is read in row blocks of at most 1/16 of the working
    memory (the budget less 64 MiB kept for the libraries), one element after the other; the store is exact."""
    import itertools

    import arrayloaders.convert.buckets as buckets
    import arrayloaders.convert.create as convert
    from arrayloaders import XLayout

    store, source = layered_store
    inputs = sorted(store.parent.glob("*.h5ad"))
    layout = XLayout(**SMALL_LAYOUT_KW)
    budget = convert._RESERVE + 8 * max(_shards(layout).values())
    block_bytes = (budget - convert._RESERVE) // 16
    blocks = []  # (element, rows, bytes in memory) of every block read in pass 1
    real = buckets._read_block

    def read_block(inp, m, indptr, f, r0, r1, n_cols, dtype):
        block = real(inp, m, indptr, f, r0, r1, n_cols, dtype)
        size = block.nbytes if m.format == "dense" else block[0].nbytes + 4 * block[1].size + 8 * (r1 - r0)
        blocks.append((m.path, r1 - r0, size))
        return block

    monkeypatch.setattr(buckets, "_read_block", read_block)
    out = create_store_from_h5ads(inputs, tmp_path / "store", layout=layout, memory_budget=budget, n_jobs=1,
                                  n_obs_per_file=100, progress=False)  # fmt: skip
    elements = [k for k, _ in itertools.groupby(path for path, _, _ in blocks)]
    assert elements == ["X", "layers/counts", "layers/scaled", "obsm/X_pca"]  # one after the other, each once
    for element in elements:
        mine = [(rows, size) for path, rows, size in blocks if path == element]
        assert sum(rows for rows, _ in mine) == source.n_obs
        assert len(mine) >= 4, element  # the budget binds: many blocks per element
        # _blocks cuts at multiples of block_bytes of the rows' running total: a block is at most one row over
        row = N_GENES * 8 + 8 if element != "obsm/X_pca" else 5 * 4
        assert all(size <= block_bytes + row for _, size in mine), (element, block_bytes, mine)
        assert max(size for _, size in mine) > block_bytes // 2, element  # each element has the whole budget

    stored = read_store(out)
    rows = source.obs_names.get_indexer(stored.obs_names)
    assert sorted(rows) == list(range(source.n_obs))
    assert_bit_identical(stored.X, source.X[rows])
    for name in ("counts", "scaled"):
        assert_bit_identical(stored.layers[name], source.layers[name][rows])
    assert_bit_identical(stored.obsm["X_pca"], source.obsm["X_pca"][rows])
