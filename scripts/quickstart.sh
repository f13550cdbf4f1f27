#!/usr/bin/env bash
# Install into a virtual environment and run the main job: generate an example
# dataset, convert it into a shuffled store, load one epoch, print throughput.
# Extra arguments go to scripts/quickstart.py (see --help there).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e .
.venv/bin/python scripts/quickstart.py "$@"
