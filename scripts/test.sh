#!/usr/bin/env bash
# Install into fresh virtual environments and run the test suite twice:
#
# 1. on this machine's python3 (3.11 or newer), in .venv. torch is installed
#    first, pinned to the CPU build available here; letting pip resolve
#    torch on its own pulls several GB of CUDA packages.
# 2. on Python 3.12, the whole suite again plus the scvi-tools test
#    (scvi-tools >= 1.4, annbatch and anndata 0.13 / pandas 3 need 3.12).
#    pip finds only the CUDA build of torch there (several GB, runs on the
#    CPU), so that venv is kept between runs in one place:
#    ${ARRAYLOADERS_PY312_VENV:-~/.cache/arrayloaders/venv-py312}.
#    Without a Python 3.12 (python3.12 on PATH or pyenv's 3.12.*) this step
#    says so and is left out.
#
# Arguments go to both pytest runs (e.g. `bash scripts/test.sh -k lightning`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== tests on $(python3 --version)"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pytest "$@"

find_py312() {
    local candidate
    for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
        if [ -x "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
            echo "$candidate"
            return
        fi
    done
}

py312=$(find_py312)
if [ -z "$py312" ]; then
    echo "== no Python 3.12 found (python3.12 or pyenv's 3.12.*): the Python 3.12 step (and the scvi-tools test) is left out"
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
"$venv312/bin/python" -m pytest -p no:cacheprovider "$@"
