"""create_store_from_h5ads(n_jobs=...): the same store byte for byte on 1, 2 and 3 processes; a failing or
dying process stops the conversion with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_bit_identical, read_sources, read_store

from arrayloaders import InputFileError, create_store_from_h5ads, read_manifest
from arrayloaders.convert.jobs import JobFailed, Jobs
from arrayloaders.example_data import make_example_adata


def files_of(store: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest's random store_id left out (each conversion gets its own)."""
    files = {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("arrayloaders.json"))
    assert len(manifest.pop("store_id")) == 32
    return {**files, "arrayloaders.json": json.dumps(manifest).encode()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """Three inputs with a layer, an obsm array and obs columns of several kinds."""
    d = tmp_path_factory.mktemp("parallel")
    paths = []
    for i, n in enumerate((300, 170, 231)):
        a = make_example_adata(n, 60, nnz_per_cell=12, seed=i, name_prefix=f"p{i}")
        a.layers["counts"] = a.X.copy()
        a.obsm["X_pca"] = np.random.default_rng(i).random((n, 5)).astype(np.float32)
        a.obs["score"] = np.random.default_rng(i).random(n)
        paths.append(d / f"in_{i}.h5ad")
        a.write_h5ad(paths[-1])
    return paths


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n_jobs", [2, 3])
def test_parallel_store_is_the_serial_store_byte_for_byte(inputs, tmp_path, n_jobs, shuffle):
    kw = dict(shuffle=shuffle, n_obs_per_file=128, progress=False)  # 6 output files
    serial = create_store_from_h5ads(inputs, tmp_path / "serial", n_jobs=1, **kw)
    parallel = create_store_from_h5ads(inputs, tmp_path / "parallel", n_jobs=n_jobs, **kw)
    a, b = files_of(serial), files_of(parallel)
    assert sorted(a) == sorted(b)
    assert len(read_manifest(parallel).files) == 6
    different = [name for name in a if a[name] != b[name]]
    assert different == []
    src = read_sources(inputs)
    assert_bit_identical(read_store(parallel)[src.obs_names].X, src.X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel", "serial"]  # no scratch left


def test_a_damaged_input_read_by_another_process_is_named(inputs, tmp_path):
    import shutil

    import h5py

    bad = tmp_path / "bad.h5ad"
    shutil.copy(inputs[1], bad)
    with h5py.File(bad, "r+") as f:
        indices = f["X/indices"][:]
        indices[5] = 10_000  # past the 60 genes: found only when the rows are read
        f["X/indices"][:] = indices
    with pytest.raises(InputFileError, match=r"bad\.h5ad: X/indices holds column 10000"):
        create_store_from_h5ads([inputs[0], bad], tmp_path / "s", n_jobs=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


def test_jobs_return_in_order_and_raise_what_a_task_raised():
    # tasks are builtins: the processes import a task's function by name
    with Jobs(2) as jobs:
        assert jobs.run(pow, [(2, k) for k in range(7)]) == [2**k for k in range(7)]
        assert jobs.run(divmod, [(7, 2)]) == [(3, 1)]  # one task runs here
        with pytest.raises(ValueError, match="invalid literal"):
            jobs.run(int, [("1",), ("x",), ("3",)])
        assert jobs.run(abs, [(-1,), (-2,)]) == [1, 2]  # new processes after a failure


def test_a_process_that_dies_is_an_error_naming_the_task():
    with Jobs(2) as jobs, pytest.raises(JobFailed, match=r"was killed by signal 6 while running abort \(task"):
        jobs.run(os.abort, [(), ()])


def test_a_process_killed_between_runs_is_an_error_naming_the_task():
    with Jobs(2) as jobs:
        assert jobs.run(pow, [(2, 1), (2, 2)]) == [2, 4]
        for p in jobs._processes:  # killed while idle (out of memory, an operator)
            p.process.kill()
            p.process.wait()
        with pytest.raises(JobFailed, match=r"was killed by signal 9 while running pow \(task"):
            jobs.run(pow, [(2, 3), (2, 4)])
        assert jobs.run(pow, [(3, 1), (3, 2)]) == [3, 9]  # new processes after it


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_n_jobs_must_be_a_positive_int(inputs, tmp_path, bad):
    with pytest.raises(ValueError, match="n_jobs must be a positive int"):
        create_store_from_h5ads(inputs, tmp_path / "s", n_jobs=bad, progress=False)


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory) -> list[Path]:
    """Inputs large enough (9,000 cells x 300 non-zeros) that a conversion can be stopped half-way."""
    from arrayloaders.example_data import write_example_h5ads

    return write_example_h5ads(tmp_path_factory.mktemp("slow"), (3000, 3000, 3000), 2000, nnz_per_cell=300)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGINT to the group (Ctrl-C)", "Ctrl-C twice"])
def test_a_stopped_parallel_conversion_leaves_no_process_and_no_partial_store(slow_inputs, tmp_path, how):
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "s"
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even when this suite runs in the background (where
    # the shell starts it with SIGINT ignored, and children inherit that)
    script = (
        "import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from arrayloaders import create_store_from_h5ads\n"
        "create_store_from_h5ads(sys.argv[1:-1], sys.argv[-1], progress=False, n_jobs=2, n_obs_per_file=100)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, slow_inputs), str(out)], start_new_session=True, stderr=subprocess.PIPE
    )
    pattern = f".{out.name}.arrayloaders-*/chunk_*.zarr/X/data/c/*"
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # Frozen while it is signalled, so that it cannot finish between the check that it has not and the signal.
    os.kill(proc.pid, signal.SIGSTOP)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2, "the conversion processes had not started"
    assert not out.exists(), "the conversion finished before it could be stopped"
    if how == "SIGKILL":
        os.kill(proc.pid, signal.SIGKILL)
    elif how == "SIGINT":
        os.kill(proc.pid, signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    if how == "Ctrl-C twice":  # the second while the first is being handled
        time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    _, stderr = proc.communicate(timeout=120)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"conversion processes outlived the conversion: {alive}"
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and len(left) == 1  # the staging directory, for the next run
        create_store_from_h5ads(slow_inputs[:1], out, n_jobs=2, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    else:
        assert b"KeyboardInterrupt" in stderr and left == []


def test_a_script_without_a_main_guard_converts_on_several_processes(inputs, tmp_path):
    """multiprocessing's spawn would run such a script again in every process (and convert again, recursively)."""
    import subprocess
    import sys

    script = tmp_path / "convert_script.py"
    script.write_text(
        "from arrayloaders import create_store_from_h5ads\n"
        f"create_store_from_h5ads({[str(p) for p in inputs]!r}, {str(tmp_path / 's')!r}, n_jobs=2, progress=False,"
        " n_obs_per_file=200)\n"
        "print('converted once')\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("converted once") == 1
    assert read_manifest(tmp_path / "s").n_obs == 701


def test_convert_speed_script_reports_each_n_jobs_and_checks_the_stores_agree(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "measure" / "convert_speed.py"
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, str(script), "--cells", "3000", "--genes", "40", "--nnz", "5", "--files", "3",
         "--n-obs-per-file", "1000", "--jobs", "1", "2", "--data", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["n_jobs"] for r in report["runs"]] == [1, 2] and report["identical"] is True
    assert all("cells_per_s" in r and "peak_growth_bytes" in r for r in report["runs"])  # reported, not judged
    assert len(read_manifest(tmp_path / "store_jobs2").files) == 3
    assert "stores identical across n_jobs: True" in res.stdout
