"""scripts/fit_time.py --quick: every speed measured over a whole epoch, a model that learns, the chart written.

No assertion here compares timings: on a busy machine any duration can stretch.
"""

from __future__ import annotations

import json


def test_quick_fit_time_against_loading_speed(run_quick):
    out = run_quick("fit_time.py")
    result = json.loads((out / "fit_time.json").read_text())
    assert (result["cells"], result["n_vars"], result["n_classes"]) == (4_000, 2_000, 100)
    points = {p["speed"]: p for p in result["points"]}
    fastest = result["points"][0]
    # The unthrottled point is the loader's own measured speed (the same number, reported twice).
    assert fastest["unthrottled"] and fastest["speed"] == result["arrayloaders_cells_per_s"]
    # Throttled to each of --quick's speeds below the measured one (a busy machine may measure less than 20,000).
    assert set(points) == {fastest["speed"]} | {s for s in (2_000, 20_000) if s < fastest["speed"]}
    for p in points.values():
        assert p["cells"] == 4_000  # a whole epoch at every speed
        assert p["last_loss"] < p["first_loss"]  # the model learns
        assert "fit_s" in p  # recorded; durations are the script's to report, not ours to judge
    assert "model_alone_s" in result
    assert "no annbatch venv" in result["annbatch"]["skipped"]  # reported, never faked
    table = (out / "fit_time.md").read_text()
    assert "| 2,000 |" in table and "(unthrottled)" in table and "annbatch: skipped" in table
    assert (out / "fit_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
