"""Checkpoint size: adapter file bytes against unique trainable parameters, ours vs PEFT's Lily vs LoRA.

PEFT writes every shared A and B once per layer; we write each tensor once.

    python -m benchmarks.size            # random-weight Llamas of SmolLM2's shape (30 layers) and a wider one
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import lily
from benchmarks.common import contenders, trainable_count, write_results

SHAPES = {
    "llama-576x30 (SmolLM2 shape)": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3),
    "llama-1024x16": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=4),
}  # fmt: skip


def weights_bytes(model: torch.nn.Module, name: str, directory: Path) -> int:
    if name.startswith("lily-"):
        lily.save_adapter(model, directory)
    else:
        model.save_pretrained(directory)
    weights = lily.io.WEIGHTS_NAME if name.startswith("lily-") else "adapter_model.safetensors"
    return (directory / weights).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--num-A", type=int, default=2)
    parser.add_argument("--num-B", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry; this script is always quick")
    args = parser.parse_args()
    rows = []
    for shape, dims in SHAPES.items():
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=1024, **dims))
        for name, model in contenders(base, ["q_proj", "v_proj"], args.r, args.num_A, args.num_B).items():
            if name == "frozen" or name.startswith(("lily-batch", "lily-token", "lily-uniform")):
                continue  # same tensors as lily-sample
            with tempfile.TemporaryDirectory() as tmp:
                size = weights_bytes(model, name, Path(tmp))
            params = trainable_count(model)
            rows.append({"model": shape, "contender": name, "unique_parameters": params, "file_bytes": size,
                         "bytes_per_fp32_parameter_ratio": size / (4 * params)})  # fmt: skip
    lines = ["| model | contender | unique trainable parameters | adapter file | file / (4 bytes x parameters) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['contender']} | {r['unique_parameters']:,} | {r['file_bytes'] / 1e6:.2f} MB "
                     f"| {r['bytes_per_fp32_parameter_ratio']:.2f} |")  # fmt: skip
    print("\n".join(lines))
    write_results("size", {"settings": vars(args), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
