"""scripts/measure/scale.py: memory per cell of conversion, the main process and each worker, and planning at 100M cells."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "measure" / "scale.py"


def test_scale_script_measures_both_sizes_and_reports_per_cell(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "30000", "10000", "--cells-per-input", "5000", "--data", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sizes"] == [10000, 30000]
    assert set(report["bytes_per_cell"]) == {"conversion", "loader main process", "loader, each worker"}
    assert all(math.isfinite(b) for b in report["bytes_per_cell"].values())
    assert "plan_100M_seconds" in report  # a duration: reported, not judged
    for run, cells in zip(report["runs"], (10000, 30000)):
        assert run["load"]["cells"] == cells  # a whole epoch of each store
        assert len(run["load"]["worker_uss_bytes"]) == 2
    assert "at 100M cells" in res.stdout and "planning one epoch of 100M cells (12,208 loads)" in res.stdout


def _scale_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_per_cell_stays_within_the_issues_bounds(tmp_path):
    """Growth per cell between 125k and 625k cells, each step in a fresh process (psutil), against the bounds:
    conversion <= 40 B, the loader's main process <= 24 B for one obs key, each worker <= 2 B.

    The smaller store has 15 loads: enough that each worker's tasks in flight and the ring's slots reach
    their steady state. With 25k cells (3 loads) they did not, and their bounded high-water mark (a few
    hundred KB, the same after 1 or 6 epochs of the larger store) showed as 1-2.5 B per cell of a worker.

    The conversion reads inputs and writes files of one size (25k cells) in both runs, so that reading an
    input and writing a file (bounded by their sizes) cancel out, and runs with one malloc arena
    (MALLOC_ARENA_MAX=1): glibc's per-thread arenas fragment a little more with each file written, which
    moved the peak of the 625k run by 12-17 MB (20-29 B per cell), noise that is not per cell. Holding obs or a per-cell int64 for every cell (the old converter: 304 B) fails it.
    The loader reads stores of one file each.
    """
    from arrayloaders.example_data import write_example_h5ads

    scale = _scale_module()
    scale.run_child("warm")  # numba's cache, as any earlier run leaves it (a fresh clone has none)
    runs = {}
    for size in (125_000, 625_000):
        h5ads = tmp_path / f"h5ad_{size}"  # inputs of one size too: reading one (bounded by its size) cancels out
        write_example_h5ads(h5ads, n_obs=[25_000] * (size // 25_000), n_vars=100, nnz_per_cell=10)
        convert = scale.run_child("convert", env={"MALLOC_ARENA_MAX": "1"}, h5ads=h5ads, store=tmp_path / f"files_{size}",
                                  n_obs_per_file=25_000, memory_budget="300MB")  # fmt: skip
        assert len(list((tmp_path / f"files_{size}").glob("chunk_*.zarr"))) == size // 25_000
        scale.run_child("convert", h5ads=h5ads, store=tmp_path / f"one_{size}", n_obs_per_file=2**20)
        runs[size] = {"cells": size, "conversion": convert, "load": scale.run_child("load", store=tmp_path / f"one_{size}")}
    small, large = runs[125_000], runs[625_000]
    assert small["load"]["cells"] == 125_000 and large["load"]["cells"] == 625_000
    conversion = scale.per_cell(small, large, lambda m: m["conversion"]["growth_bytes"])
    main = scale.per_cell(small, large, lambda m: m["load"]["main_growth_bytes"])
    worker = scale.per_cell(small, large, lambda m: max(m["load"]["worker_uss_bytes"]))
    figures = f"conversion {conversion:.1f}, main {main:.1f}, worker {worker:.1f} bytes per cell"
    print(figures)
    assert conversion <= 40 and main <= 24 and worker <= 2, figures
