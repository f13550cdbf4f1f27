"""scripts/test.sh and .ci/run: under CI a missing Python 3.12 fails the run instead of leaving its step out.

Only the script's look-up runs (``--find-py312``; .ci/run fails before any install
or test), with a PATH and a pyenv root that hold no Python 3.12 unless a test puts
a stand-in there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")


@pytest.fixture
def bare(tmp_path):
    """An environment whose PATH holds only the tools the scripts' start needs, and an empty pyenv root and home."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (tmp_path / "pyenv").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ARRAYLOADERS_REQUIRE_PY312")}
    env.update(PATH=str(bin_dir), PYENV_ROOT=str(tmp_path / "pyenv"), HOME=str(tmp_path))
    return env


def find(env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(ROOT / "scripts" / "test.sh"), "--find-py312"], env={**env, **extra},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def stand_in(path: Path) -> Path:
    """A "python" that passes the script's version check (exit status 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("ci", [{"CI": "true"}, {"ARRAYLOADERS_REQUIRE_PY312": "1"}, {"CI": "1"}])
def test_under_ci_a_missing_python_312_fails_with_a_clear_line(bare, ci):
    res = find(bare, **ci)
    assert res.returncode != 0
    assert "FAILED: no Python 3.12 found" in res.stderr and "must run" in res.stderr, res.stderr


@pytest.mark.parametrize("local", [{}, {"CI": "false"}, {"CI": "true", "ARRAYLOADERS_REQUIRE_PY312": "0"}])
def test_outside_ci_a_missing_python_312_leaves_its_step_out(bare, local):
    res = find(bare, **local)
    assert res.returncode == 0, res.stderr
    assert "no Python 3.12 found" in res.stdout and "is left out" in res.stdout


def test_a_python_312_on_the_path_or_in_pyenv_is_found_under_ci(bare, tmp_path):
    in_pyenv = stand_in(tmp_path / "pyenv" / "versions" / "3.12.7" / "bin" / "python")
    res = find(bare, CI="true")
    assert res.returncode == 0 and res.stdout.strip() == str(in_pyenv), res.stderr
    on_path = stand_in(tmp_path / "bin" / "python3.12")
    res = find(bare, CI="true")
    assert res.returncode == 0 and res.stdout.strip() == str(on_path), res.stderr


def test_ci_run_sets_ci_itself(bare):
    """.ci/run exports CI=true: without a Python 3.12 it fails before installing or testing anything."""
    res = subprocess.run([BASH, str(ROOT / ".ci" / "run")], env=bare, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "FAILED: no Python 3.12 found" in res.stderr and "CI=true" in res.stderr, res.stderr
    assert "== tests on" not in res.stdout


def test_the_files_left_out_on_python_312_exist_and_hold_no_value_checks():
    """scripts/test.sh's STACK_FREE: each a test file (a renamed one would silently run twice again), none comparing
    values with what anndata reads (those must run on the newer stack too)."""
    res = subprocess.run([BASH, str(ROOT / "scripts" / "test.sh"), "--stack-free"], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    listed = res.stdout.split()
    assert len(listed) >= 5 and len(set(listed)) == len(listed)
    for name in listed:
        path = ROOT / name
        assert path.is_file() and path.name.startswith("test_"), name
        if path != Path(__file__):  # this file names the helpers below
            text = path.read_text()
            assert not [c for c in ("assert_bit_identical", "read_store(", "read_sources(") if c in text], name
