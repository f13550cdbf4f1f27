#!/usr/bin/env bash
# Install into a fresh virtual environment and run the test suite.
# torch is installed first, pinned to the CPU build available here; letting
# pip resolve torch on its own pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pytest "$@"
