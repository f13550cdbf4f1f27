"""scripts/fit_time.py --quick: a real throttle, a model that learns, the loaders' speeds marked, the chart written."""

from __future__ import annotations

import json


def test_quick_fit_time_against_loading_speed(run_quick):
    out = run_quick("fit_time.py")
    result = json.loads((out / "fit_time.json").read_text())
    assert (result["cells"], result["n_vars"], result["n_classes"]) == (4_000, 2_000, 100)
    points = {p["speed"]: p for p in result["points"]}
    fastest = result["points"][0]
    assert fastest["unthrottled"] and fastest["speed"] == result["arrayloaders_cells_per_s"] > 20_000
    assert set(points) == {fastest["speed"], 2_000, 20_000}
    for speed, p in points.items():
        assert p["cells"] == 4_000  # a whole epoch at every speed
        assert p["last_loss"] < p["first_loss"]  # the model learns
        if not p["unthrottled"]:
            assert p["fit_s"] >= 4_000 / speed * 0.99  # the throttle really holds the loader back
    assert points[2_000]["fit_s"] > 2 * fastest["fit_s"]
    assert 0 < result["model_alone_s"] < points[2_000]["fit_s"]
    assert "no annbatch venv" in result["annbatch"]["skipped"]  # reported, never faked
    table = (out / "fit_time.md").read_text()
    assert "| 2,000 |" in table and "(unthrottled)" in table and "annbatch: skipped" in table
    assert (out / "fit_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
