#!/usr/bin/env bash
# Every GPU check in one go, for a CUDA machine (about 6 minutes on one H200), each stage under its own time
# limit, so one that fails or hangs leaves the others' results:
#   1. the GPU tests (bf16/fp16, every routing mode on a bf16 base, siblings' shared matmul, inductor, no host-device
#      synchronisation in a train step, device moves, merge, save on GPU / load on CPU, 4-bit and 8-bit bases),
#   2. whole-model speed and memory in bf16 at Llama-class shapes: SmolLM2-135M's and Llama-3.2-1B's (random
#      weights: speed depends on the shapes), q/k/v/o and MLP targets, r=16 and r=64, against PEFT LoRA and
#      PEFT's Lily,
#   3. the layer-overhead benchmark on the GPU (fp32, 16 x Linear(576), r=16, and 8 q/k/v blocks), eager,
#   4. torch.compile against eager (8 x Linear(576), at 1x16 and 8x512 tokens).
# Results: benchmarks/results/{speed_r16,speed_r64,layer_overhead,layer_overhead_qkv,layer_overhead_compiled}_gpu
# .{json,md}. PYTHON picks the interpreter (default: the project's .venv); it needs a CUDA build of torch, and
# lily's imports (e.g. PYTHON=python3 PYTHONPATH=. with torch, transformers and peft installed; bitsandbytes for
# the quantized tests). Exits non-zero when any stage failed; stopped from outside, it stops the running stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU')" || exit 1
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', peft.__version__, '|', torch.cuda.get_device_name())"
failed=()

child=""
trap '[ -n "$child" ] && kill "$child" 2>/dev/null; exit 143' TERM INT  # stopped from outside: stop the stage too

stage() {  # stage SECONDS COMMAND...: run COMMAND for at most SECONDS
    local limit=$1 start=$SECONDS
    shift
    echo "=== $* (at most ${limit} s)"
    timeout "$limit" "$@" &
    child=$!
    wait "$child" || failed+=("$*")
    child=""
    echo "=== $((SECONDS - start)) s"
}

stage 240 "$PY" -m pytest -q tests/test_gpu.py tests/test_quantized.py
TARGETS=(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
for r in 16 64; do
    stage 240 "$PY" -m benchmarks.speed --dtype bfloat16 --models "smollm2-135m (random)" "llama-1b (random)" \
        --targets "${TARGETS[@]}" --r "$r" --batch 8 --length 512 --repeats 10 --name "speed_r${r}_gpu"
done
stage 180 "$PY" -m benchmarks.layer_overhead --no-compile --name layer_overhead_gpu
stage 180 "$PY" -m benchmarks.layer_overhead --no-compile --block qkv --depth 8 --name layer_overhead_qkv_gpu
stage 300 "$PY" -m benchmarks.layer_overhead --shapes 1x16,8x512 --depth 8 --repeats 20 --name layer_overhead_compiled_gpu
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
