#!/usr/bin/env bash
# Set up (or reuse) .venv with the package and its dev extras, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m ruff check .
python -m ruff format --check .
python -m pytest -q "$@"
