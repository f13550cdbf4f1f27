"""scripts/benchmark.py --quick: every loader measured or skipped with its reason, tables, JSON and chart written."""

from __future__ import annotations

import json
import math

import numpy as np

MEASURED = ("arrayloaders-w0", "arrayloaders-w2", "arrayloaders-w2-dense", "arrayloaders-w2-cells50",
            "arrayloaders-w2-balanced", "arrayloaders-w2-permutation", "arrayloaders-w2-genes2000",
            "arrayloaders-w2-genes2000-dense", "arrayloaders-w2-counts", "arrayloaders-w2-obsm50", "scdataset",
            "anndata-backed", "sequential-decode")  # fmt: skip


CELLS_PER_FILE = 1_000  # x 2 files: a loader's run is mostly its process starting, not its cells


def test_quick_benchmark_measures_and_reports(run_quick, tmp_path):
    # Every loader once, warm; then warm and cold (after evicting the files) in one run, for a loader reading
    # the store, one reading the .h5ad files and the in-memory gather (which has no cold figure). The second
    # run reuses the first one's inputs and stores.
    out = run_quick("benchmark.py", "--cells-per-file", str(CELLS_PER_FILE), "--cache", "warm")
    run_quick("benchmark.py", "--cells-per-file", str(CELLS_PER_FILE), "--loaders", "arrayloaders", "anndata-backed",
              "scipy-gather", "--workers", "2", "--out", str(tmp_path / "both"))  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    report, both = saved["results"], json.loads((tmp_path / "both" / "results.json").read_text())["results"]
    assert set(report) == {"warm"} and set(both) == {"warm", "cold"}
    assert set(both["warm"]) == {"arrayloaders-w2", "anndata-backed", "scipy-gather"}
    measured = [("warm", name, report["warm"][name]) for name in MEASURED]
    measured += [(cache, name, both[cache][name]) for cache in both for name in ("arrayloaders-w2", "anndata-backed")]
    n_cells = 2 * CELLS_PER_FILE
    for cache, name, r in measured:
        assert math.isfinite(r["cells_per_s"]) and r["peak_pss_bytes"] > 0, (cache, name, r)
        assert math.isfinite(r["first_epoch_cells_per_s"]) and math.isfinite(r["first_batch_s"]), (cache, name, r)
        for run in r["runs"]:  # the first epoch's figures, set-up included
            first = run["epochs"][0]
            assert run["first_batch_s"] == first["first_batch_s"]
            assert run["first_epoch_cells_per_s"] == first["cells"] / (run["setup_s"] + first["wall_s"])
        cells = int((np.random.default_rng(0).random(n_cells) < 0.5).sum()) if name.endswith("cells50") else n_cells
        assert all(run["cells"] == cells for run in r["runs"])  # a whole epoch (of the subset) each time
    for name in ("annbatch-512x32", "annbatch-32x256"):  # its defaults and the seed's settings
        assert "no annbatch venv" in report["warm"][name]["skipped"]  # reported, never faked
    assert [len(run["epochs"]) for run in both["warm"]["arrayloaders-w2"]["runs"]] == [2]  # warm: the 2nd epoch
    assert [len(run["epochs"]) for run in both["cold"]["arrayloaders-w2"]["runs"]] == [1]  # cold: the 1st
    assert math.isfinite(both["warm"]["scipy-gather"]["cells_per_s"]) and "scipy-gather" not in both["cold"]
    conversion = saved["conversion"]
    assert math.isfinite(conversion["command_wall_s"]) and conversion["peak_pss_bytes"] > 0 and conversion["store_bytes"] > 0
    table = (out / "results.md").read_text()
    assert "| arrayloaders-w2-dense |" in table and "| scdataset |" in table
    assert "| arrayloaders-w2-permutation |" in table and "x chunked access" in table
    assert "| first epoch (cells/s) | x best annbatch | steady (cells/s) | x best annbatch |" in table
    assert "skipped: no annbatch venv" in table
    assert "| arrayloaders store | arrayloaders, sequential decode, scipy gather |" in table
    assert "| arrayloaders store + layer + obsm | the counts and obsm50 rows |" in table
    assert "| loader (warm) |" in (tmp_path / "both" / "results.md").read_text()
    assert "| loader (cold) |" in (tmp_path / "both" / "results.md").read_text()
    for folder in (out, tmp_path / "both"):
        assert (folder / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_batch_script_measures_each_step(store, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "measure" / "first_batch.py"
    out = tmp_path / "first.json"
    res = subprocess.run(
        [sys.executable, str(script), "--store", str(store), "--workers", "2", "--pauses", "0", "0.5", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["workers"], r["pause_s"]) for r in rows] == [(2, 0.0), (2, 0.5)]
    for r in rows:  # durations: reported, not judged
        for key in ("add_store_s", "workers_up_s", "first_batch_s", "first_epoch_cells_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert res.stdout.count("\n| 2 |") == 2


def test_worker_load_script_reports_every_process(store):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "measure" / "worker_load.py"
    res = subprocess.run(
        [sys.executable, str(script), "--store", str(store), "--workers", "2", "--epochs", "1", "--to", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["workers_cpu"]) == 2  # shares of the wall time: reported, not judged
    assert out["cells_per_s"] > 0  # it ran: a figure, not a speed bound
    assert 0 <= out["main_in_next"] <= 1.0  # a share of the wall time


def test_load_paths_script_reads_the_same_bytes_on_both_loops(store):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "measure" / "load_paths.py"
    res = subprocess.run([sys.executable, str(script), "--store", str(store), "--chunk-size", "8", "--preload-nchunks", "12",
                          "--batch-size", "48", "--loads", "3"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]  # it exits non-zero if the loops' bytes differ
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loads"] == 3 and out["cells_per_load"] == 96
    assert out["python_ms_per_load"] > 0 and out["compiled_ms_per_load"] > 0  # reported, not judged


def test_the_remote_benchmark_reads_the_store_from_a_real_s3_server(run_quick, s3_server):
    """scripts/benchmark.py --remote: its own SeaweedFS, the store on disk and from s3:// (with and without a cache)
    measured in one run, with requests and bytes per epoch."""
    results = run_quick("benchmark.py", "--remote", "--loaders", "arrayloaders", "--latency-ms", "0", "--epochs", "2")
    report = json.loads((results / "remote.json").read_text())
    rows = report["results"]
    assert set(rows) == {"arrayloaders-w2 disk", "arrayloaders-w2 s3 +0 ms", "arrayloaders-w2 s3 +0 ms, cache_dir"}
    assert all(r["cells_per_s"] > 0 and r["runs"][0]["epochs"][-1]["cells"] == 10_000 for r in rows.values())
    fetched = rows["arrayloaders-w2 s3 +0 ms"]["bytes_per_epoch"] / report["x_bytes"]
    assert 1.0 <= fetched < 3, fetched  # every chunk, plus indexes and metadata
    assert "| arrayloaders-w2 s3 +0 ms |" in (results / "remote.md").read_text()
