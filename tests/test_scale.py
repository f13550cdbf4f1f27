"""scripts/scale.py: memory per cell of conversion, the main process and each worker, and planning at 100M cells."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scale.py"


def test_scale_script_measures_both_sizes_and_reports_per_cell(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "30000", "10000", "--files", "2", "--data", str(tmp_path), "--out", str(out)],
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
