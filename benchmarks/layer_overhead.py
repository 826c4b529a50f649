"""Adapter overhead where it lives: a stack of adapted Linear layers, timed without the rest of a transformer.

Whole-model timings on a small CPU bury the adapters' cost in noise; here the frozen stack (backward still
runs through it) is the baseline and each contender's extra time is compared with LoRA's at the same
rank, all interleaved in one process.

    python -m benchmarks.layer_overhead --quick     # < 1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.common import device_info, interleaved_medians, rank_contenders, write_results


class Stack(nn.Module):
    """depth x (Linear(width, width), tanh): a transformer's adapted projections without the rest."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(width, width)}) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["proj"](x))
        return x


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return rank_contenders(Stack(args.depth, args.width), ["proj"], args.r, args.num_A, args.num_B)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--num-A", type=int, default=2)
    parser.add_argument("--num-B", type=int, default=4)
    parser.add_argument("--shapes", default="1x16,4x128,8x512", help="batch x tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.repeats = "1x16,4x128", 15
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {k: m.to(device) for k, m in build(args).items()}
    rows = []
    for shape in args.shapes.split(","):
        batch, tokens = map(int, shape.split("x"))
        x = torch.randn(batch, tokens, args.width, device=device)
        for phase in ("train", "inference"):

            def step(model: nn.Module, x: torch.Tensor = x, train: bool = phase == "train") -> None:
                inputs = x.clone().requires_grad_(train)
                with torch.set_grad_enabled(train):
                    out = model(inputs).pow(2).mean()
                if train:
                    out.backward()

            medians = interleaved_medians({k: (lambda m=m: step(m)) for k, m in models.items()}, args.repeats, device)
            lora = medians["lora"] - medians["frozen"]
            for k in models:
                rows.append({"batch": batch, "tokens": tokens, "phase": phase, "contender": k, "ms": 1e3 * medians[k],
                             "overhead_vs_lora": (medians[k] - medians["frozen"]) / lora})  # fmt: skip
    names = [k for k in models if k not in ("frozen", "lora")]
    lines = [f"Adapter overhead / LoRA's overhead (same rank r={args.r}; {args.depth} x Linear({args.width}); "
             f"num_A={args.num_A}, num_B={args.num_B}; medians of {args.repeats} interleaved rounds)", "",
             "| batch x tokens | phase | LoRA overhead ms | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for shape in args.shapes.split(","):
        batch, tokens = map(int, shape.split("x"))
        for phase in ("train", "inference"):
            sel = {r["contender"]: r for r in rows if (r["batch"], r["tokens"], r["phase"]) == (batch, tokens, phase)}
            lora_ms = sel["lora"]["ms"] - sel["frozen"]["ms"]
            cells = [f"{sel[n]['overhead_vs_lora']:.2f}" for n in names]
            lines.append(f"| {shape} | {phase} | {lora_ms:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    write_results("layer_overhead", {"settings": vars(args), "machine": device_info(device), "rows": rows},
                  f"Device: {device_info(device)}\n\n{table}")  # fmt: skip


if __name__ == "__main__":
    main()
