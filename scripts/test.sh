#!/usr/bin/env bash
# Install into fresh virtual environments and run the test suite twice:
#
# 1. on this machine's python3 (3.11 or newer), in .venv. torch is installed
#    first, pinned to the CPU build available here; letting pip resolve
#    torch on its own pulls several GB of CUDA packages.
# 2. on Python 3.12, again, the tests whose outcome the data stack can change
#    (anndata 0.13, zarr 3.4, pandas 3, numba, obstore) plus the scvi-tools
#    test (scvi-tools >= 1.4, annbatch and anndata 0.13 / pandas 3 need 3.12).
#    The files in STACK_FREE check what no data library decides (the plan's
#    arithmetic, worker processes and signals, gloo ranks, shared memory,
#    remote faults, cache and secrets, the benchmark and CI scripts, the
#    package layout; values are checked
#    by the other files): they ran in step 1, and their second run (half of
#    this step's time) is left out to keep CI within 30 minutes.
#    pip finds only the CUDA build of torch there (several GB, runs on the
#    CPU), so that venv is kept between runs in one place:
#    ${ARRAYLOADERS_PY312_VENV:-~/.cache/arrayloaders/venv-py312}.
#    Without a Python 3.12 (python3.12 on PATH or pyenv's 3.12.*) this step
#    says so and is left out, except under CI (CI=true, as CI services and
#    .ci/run set it) or with ARRAYLOADERS_REQUIRE_PY312=1: there a missing
#    3.12 fails the run at once, before any test (ARRAYLOADERS_REQUIRE_PY312=0
#    allows it under CI).
#
# Arguments go to both pytest runs (e.g. `bash scripts/test.sh -k lightning`);
# `bash scripts/test.sh --stack-free` lists the files step 2 leaves out.
# `bash scripts/test.sh --find-py312` only looks for the Python 3.12 (as the
# run would) and prints it, or says why the run would go without it or fail.
set -euo pipefail
cd "$(dirname "$0")/.."

STACK_FREE=(
    tests/loading/test_plan.py tests/loading/test_plan_selection.py tests/loading/test_engine.py
    tests/loading/test_iteration.py tests/loading/test_pinned_slots.py tests/loading/test_distributed.py
    tests/store/test_open_files.py tests/convert/test_scale.py tests/test_benchmark.py tests/test_ci_script.py
    tests/test_layout.py tests/test_s3_server.py tests/store/test_remote_faults.py tests/loading/test_epochs_ahead.py
    tests/loading/test_elastic.py
)
if [ "${1:-}" = "--stack-free" ]; then
    printf '%s\n' "${STACK_FREE[@]}"
    exit 0
fi

find_py312() {
    local candidate
    for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
        if [ -x "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
}

py312_required() {
    case "${ARRAYLOADERS_REQUIRE_PY312:-}" in
        1) return 0 ;;
        0) return 1 ;;
    esac
    case "${CI:-}" in
        true | TRUE | True | 1) return 0 ;;
    esac
    return 1
}

py312=$(find_py312)
if [ -z "$py312" ]; then
    if py312_required; then
        echo "== FAILED: no Python 3.12 found (python3.12 on PATH or \${PYENV_ROOT:-~/.pyenv}/versions/3.12.*), and under CI" \
             "(CI=${CI:-}, ARRAYLOADERS_REQUIRE_PY312=${ARRAYLOADERS_REQUIRE_PY312:-}) the Python 3.12 step (and the scvi-tools test) must run" >&2
        exit 1
    fi
    missing_py312="== no Python 3.12 found (python3.12 or pyenv's 3.12.*): the Python 3.12 step (and the scvi-tools test) is left out"
fi
if [ "${1:-}" = "--find-py312" ]; then
    echo "${py312:-$missing_py312}"
    exit 0
fi

echo "== tests on $(python3 --version)"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pytest "$@"

if [ -z "$py312" ]; then
    echo "$missing_py312"
    exit 0
fi
venv312=${ARRAYLOADERS_PY312_VENV:-$HOME/.cache/arrayloaders/venv-py312}
echo "== tests on $("$py312" --version), venv $venv312"
if [ ! -x "$venv312/bin/python" ]; then
    mkdir -p "$(dirname "$venv312")"
    "$py312" -m venv "$venv312"
    "$venv312/bin/python" -m pip install -q --upgrade pip
fi
"$venv312/bin/python" -m pip install -q -e ".[test]"
"$venv312/bin/python" -m pytest -p no:cacheprovider "${STACK_FREE[@]/#/--ignore=}" "$@"
