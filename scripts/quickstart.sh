#!/usr/bin/env bash
# Set up .venv and run the main job: `lily train` with Lily on the bundled MiniLM encoder and tweet-sentiment
# data, offline, on CPU or GPU. Extra arguments go to `lily train` (e.g. --method lora --seed 1). Each method
# writes to its own directory, out/quickstart-<method>, so Lily's and LoRA's results sit side by side (each
# plot draws the other's test metric as a reference line); running the same method again replaces its results.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
bash scripts/install_assets.sh text
method=lily
previous=""
for arg in "$@"; do
    case "$previous" in --method) method="$arg" ;; esac
    case "$arg" in --method=*) method="${arg#--method=}" ;; esac
    previous="$arg"
done
"$VENV/bin/python" -m lily train --output-dir "out/quickstart-$method" --overwrite "$@"
