#!/usr/bin/env bash
# Set up .venv, lint, and run the test suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/install_assets.sh text  # small real assets, so their loaders are tested too
"$VENV/bin/python" -m ruff check lily tests benchmarks
"$VENV/bin/python" -m ruff format --check lily tests benchmarks
"$VENV/bin/python" -m pytest -q "$@"
