#!/usr/bin/env bash
# Every GPU check in one go, for a CUDA machine (about 10 minutes on one H100/H200):
#   1. the GPU tests (bf16/fp16 autocast, device moves, merge, 4-bit bases),
#   2. the layer-overhead benchmark on the GPU (fp32, 16 x Linear(576), r=16),
#   3. whole-model speed and memory in bf16 at Llama-class shapes: SmolLM2-135M (bundled, if installed) and a random
#      Llama-3.2-1B-shaped model, q/k/v/o and MLP targets, r=16 and r=64, against PEFT LoRA and PEFT's Lily.
# Results: benchmarks/results/{layer_overhead,speed_r16,speed_r64}_gpu.{json,md}. PYTHON picks the interpreter
# (default: the project's .venv); it needs a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU')"
"$PY" -m pytest -q tests/test_gpu.py tests/test_quantized.py
"$PY" -m benchmarks.layer_overhead --name layer_overhead_gpu
TARGETS="q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"
for r in 16 64; do
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.speed --dtype bfloat16 --models smollm2 "llama-1b (random)" --targets $TARGETS --r "$r" \
        --batch 8 --length 512 --repeats 10 --name "speed_r${r}_gpu"
done
