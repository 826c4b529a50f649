#!/usr/bin/env bash
# Set up .venv, lint, and run the test suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python -m ruff check lily tests examples
python -m ruff format --check lily tests examples
python -m pytest -q "$@"
