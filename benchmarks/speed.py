"""Speed and memory of Lily against LoRA and PEFT's Lily, measured side by side in one process.

For each model: a training step (forward + backward + AdamW), an inference forward, and merged inference
(`lily.remove(merge=True)` / PEFT's `merge_and_unload`),
for the frozen base (backward still runs through every layer), LoRA at rank r, PEFT's Lily at rank r, our
Lily in every routing mode at rank r, and LoRA at our Lily's parameter budget. Reported: medians, the
adapter overhead over the frozen base, its ratio to LoRA's at the same rank, and memory (on GPU the peak CUDA
memory a train step allocates above the resident weights and optimizer state, on CPU the bytes saved for
backward).

    python -m benchmarks.speed --quick      # < 2 min on 2 CPU cores: one random SmolLM2-sized Llama
    python -m benchmarks.speed              # bundled MiniLM / SmolLM2 / DINOv2 where installed, random Llamas
    bash benchmarks/gpu.sh                  # on a CUDA machine: bf16, q/k/v/o + MLP targets, r 16 and 64
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
import transformers

import lily
from benchmarks.common import (
    contenders,
    device_info,
    interleaved_medians,
    saved_for_backward_bytes,
    steady_allocator,
    trainable_count,
    write_results,
)

LLAMA_SHAPES = {  # random-weight Llamas: SmolLM2-135M's width, a 1B-class width with few layers, two real shapes
    "llama-576x8 (random)": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                                 num_attention_heads=9, num_key_value_heads=3),
    "llama-2048x4 (random)": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                  num_attention_heads=16, num_key_value_heads=4),
    "smollm2-135m (random)": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,  # SmolLM2-135M
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                  tie_word_embeddings=True),
    "llama-1b (random)": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,  # Llama-3.2-1B
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              tie_word_embeddings=True),
}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(name: str, device: torch.device) -> tuple[torch.nn.Module, list[str], str]:
    """(model, targets, kind) where kind is 'causal' or 'encoder' or 'image'; random Llamas are built on `device`."""
    if name in LLAMA_SHAPES:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**{"vocab_size": 4096, "max_position_embeddings": 1024, **LLAMA_SHAPES[name]})
        with device:
            return transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj"], "causal"
    from lily import assets

    transformers.logging.set_verbosity_error()
    if name == "smollm2":
        return transformers.AutoModelForCausalLM.from_pretrained(assets.smollm2()), ["q_proj", "v_proj"], "causal"
    if name == "minilm":
        return transformers.AutoModel.from_pretrained(assets.minilm()), ["query", "value"], "encoder"
    return transformers.AutoModel.from_pretrained(assets.dinov2()), ["q_proj", "v_proj"], "image"


def make_batch(kind: str, model: torch.nn.Module, batch: int, length: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 56, 56, generator=g).to(device)}
    ids = torch.randint(0, min(model.config.vocab_size, 4096), (batch, length), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {**inputs, "labels": ids} if kind == "causal" else inputs


def loss_of(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    return out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.float().pow(2).mean()


def merged_copy(name: str, model: torch.nn.Module) -> torch.nn.Module | None:
    """The contender with its update folded into the weights, where that exists."""
    if name == "frozen":
        return model
    if name.startswith(("lily-static", "lily-uniform")):
        return lily.remove(copy.deepcopy(model), merge=True)  # plain Linear layers, like merge_and_unload
    if name.startswith("lora"):
        return copy.deepcopy(model).merge_and_unload()
    return None  # data-dependent routing (ours and PEFT's) cannot merge


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    base, targets, kind = load_model(name, device)
    targets = args.targets or targets
    base.to(device=device, dtype=DTYPES[args.dtype])  # adapter tensors stay float32 (ours and PEFT's)
    models = {k: m.to(device) for k, m in contenders(base, targets, args.r, args.num_A, args.num_B).items()}
    inputs = make_batch(kind, base, args.batch, args.length, device)
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad] or [torch.zeros(1)], lr=1e-5)
                  for k, m in models.items()}  # fmt: skip

    def train_step(k: str):
        def step() -> None:
            loss_of(models[k], inputs).backward()
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)

        return step

    def infer_step(model: torch.nn.Module):
        def step() -> None:
            with torch.no_grad():
                model(**{k: v for k, v in inputs.items() if k != "labels"})

        return step

    for m in models.values():
        m.train()
    train = interleaved_medians({k: train_step(k) for k in models}, args.repeats, device)
    for m in models.values():
        m.eval()
    infer = interleaved_medians({k: infer_step(m) for k, m in models.items()}, args.repeats, device)
    merged_models = {k: m for k, m in ((k, merged_copy(k, m)) for k, m in models.items()) if m is not None}
    merged = interleaved_medians({k: infer_step(m) for k, m in merged_models.items()}, args.repeats, device)

    memory = {}
    for k, m in models.items():
        m.train()
        if device.type == "cuda":  # every contender is resident: count what the step allocates above that
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            train_step(k)()
            memory[k] = torch.cuda.max_memory_allocated(device) - resident
        else:
            memory[k] = saved_for_backward_bytes(lambda m=m: loss_of(m, inputs))
            m.zero_grad(set_to_none=True)

    lora = f"lora r={args.r}"
    rows = []
    for k, m in models.items():
        t_over = train[k] - train["frozen"]
        rows.append({
            "model": name, "contender": k, "trainable": trainable_count(m) if k != "frozen" else 0,
            "train_ms": 1e3 * train[k], "train_overhead_ms": 1e3 * t_over,
            "train_tokens_per_s": args.batch * args.length / train[k],
            "train_overhead_vs_lora": t_over / (train[lora] - train["frozen"]) if k != "frozen" else None,
            "train_vs_lora": train[k] / train[lora],
            "infer_ms": 1e3 * infer[k], "infer_vs_frozen": infer[k] / infer["frozen"],
            "merged_infer_vs_frozen": merged[k] / merged["frozen"] if k in merged else None,
            "memory_bytes": memory[k], "memory_vs_lora": memory[k] / memory[lora],
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], memory_label: str) -> str:
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"**{model}**", "",
                  "| contender | trainable | train step ms | train tokens/s | train step / LoRA's | "
                  "train overhead / LoRA's | inference ms | inference / base | merged inference / base | "
                  f"{memory_label} MB | memory / LoRA's |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in (r for r in rows if r["model"] == model):
            cells = [r["contender"], f"{r['trainable']:,}", f"{r['train_ms']:.1f}", f"{r['train_tokens_per_s']:,.0f}",
                     f"{r['train_vs_lora']:.2f}", f(r["train_overhead_vs_lora"], ".2f"), f"{r['infer_ms']:.1f}",
                     f(r["infer_vs_frozen"], ".2f"), f(r["merged_infer_vs_frozen"], ".2f"),
                     f"{r['memory_bytes'] / 1e6:.1f}", f"{r['memory_vs_lora']:.2f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small model, few repeats (< 2 min on 2 CPUs)")
    parser.add_argument("--models", nargs="+", help="models to run (default: all that are available)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--num-A", type=int, default=2)
    parser.add_argument("--num-B", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the base model's weights")
    parser.add_argument("--targets", nargs="+", help="module-name suffixes to adapt (default: query and value)")
    parser.add_argument("--name", default="speed", help="result file stem in benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.quick:
        args.models, args.repeats, args.batch, args.length = ["llama-576x8 (random)"], 3, 2, 64
    names = args.models or ["minilm", "smollm2", "dinov2", *(n for n in LLAMA_SHAPES if n != "llama-1b (random)")]
    allocator = steady_allocator()
    rows = []
    for name in names:
        try:
            rows += bench_model(name, args, device)
        except lily.LilyError as exc:  # a bundled asset that is not installed
            print(f"skipping {name}: {exc}")
            continue
        print(table([r for r in rows if r["model"] == name], "step peak" if device.type == "cuda" else "saved"))
    memory_label = "train step's peak CUDA memory above the weights" if device.type == "cuda" else "saved-for-backward"
    settings = {k: v for k, v in vars(args).items() if k != "models"}
    write_results(args.name, {"settings": settings, "machine": device_info(device), "allocator": allocator,
                              "rows": rows},
                  f"Device: {device_info(device)}; settings: {settings}\n\n" + table(rows, memory_label))  # fmt: skip


if __name__ == "__main__":
    main()
