"""Adapter overhead where it lives: a stack of adapted Linear layers, timed without the rest of a transformer.

Whole-model timings on a small CPU bury the adapters' cost in noise; here the frozen stack (backward still
runs through it) is the baseline and each contender's extra time is compared with LoRA's at the same
rank, all interleaved in one process. Also measured: each routing mode under `torch.compile` against the
same model in eager mode and against compiled LoRA (timed in the same rounds), the memory autograd keeps
for backward, and the page faults of a train step. On glibc, freed memory stays in the process
(`steady_allocator`), so no contender pays page faults for memory a previous step gave back;
`--default-malloc` times with malloc as it comes.

    python -m benchmarks.layer_overhead --quick     # a few minutes on 2 CPU cores

`--block qkv` makes each layer three projections of one input, like attention's q, k and v: Lily computes
their low-rank hidden in one matmul, and each mode is also timed with one A matmul per projection
("lily-<mode> separate").
"""

from __future__ import annotations

import argparse
import copy
import operator
import resource
import time
from functools import partial, reduce

import torch
from torch import nn

from benchmarks.common import device_info, interleaved_medians, rank_contenders, steady_allocator, write_results

BLOCKS = {"linear": ("proj",), "qkv": ("q_proj", "k_proj", "v_proj")}
"""A layer of the stack: one projection, or three that read the same input, like attention's q, k and v."""


class Block(nn.Module):
    """tanh of the sum of its Linear(width, width) projections of x (siblings that read one input, like q, k, v)."""

    def __init__(self, width: int, projections: tuple[str, ...]) -> None:
        super().__init__()
        for name in projections:
            self.add_module(name, nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(reduce(operator.add, (projection(x) for projection in self.children())))


class Stack(nn.Module):
    """depth x `Block`: a transformer's adapted projections without the rest."""

    def __init__(self, depth: int, width: int, projections: tuple[str, ...] = BLOCKS["linear"]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width, projections) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The contenders; for a block of siblings also each Lily mode with one A matmul per projection
    ("<mode> separate": its siblings' hooks removed, see `lily.layer.Siblings`)."""
    torch.manual_seed(0)
    projections = BLOCKS[args.block]
    models = rank_contenders(Stack(args.depth, args.width, projections), list(projections), args.r, args.num_A,
                             args.num_B)  # fmt: skip
    if len(projections) > 1:
        for name in [k for k in models if k.startswith("lily-")]:
            models[f"{name} separate"] = separate = copy.deepcopy(models[name])
            for handle in separate.lily_adapters.sibling_handles:
                handle.remove()
    return models


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of the distinct storages autograd keeps for the backward pass of one train step: all of them, and
    those that are not parameters (activations and per-step copies; parameters are in memory anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x.clone().requires_grad_()).pow(2).mean()
    loss.backward()
    return sum(seen.values()), sum(n for ptr, n in seen.items() if ptr not in parameters)


def step(model: nn.Module, x: torch.Tensor, train: bool) -> None:
    """One timed step on input x: forward to a scalar loss, and backward when training."""
    inputs = x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = model(inputs).pow(2).mean()
    if train:
        out.backward()


def page_faults(model: nn.Module, x: torch.Tensor, steps: int = 5) -> float:
    """Minor page faults of the process per train step (after a warm-up step): memory touched for the first time."""
    step(model, x, True)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step(model, x, True)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / steps


def table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    return [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows), ""]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--block", choices=sorted(BLOCKS), default="linear",
                        help="qkv: three projections per layer read the same input (attention's q, k, v)")  # fmt: skip
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--num-A", type=int, default=2)
    parser.add_argument("--num-B", type=int, default=4)
    parser.add_argument("--shapes", default="1x16,4x128,8x512", help="batch x tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    parser.add_argument("--cpu-time", action="store_true", help="time by CPU time (a noisy host; with --threads 1)")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (freed memory returns to the OS and faults in again)",
    )
    parser.add_argument("--name", default="layer_overhead", help="result file stem in benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.repeats = "1x16,4x128", 15
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = {} if args.default_malloc else steady_allocator()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {k: m.to(device) for k, m in build(args).items()}
    modes = [k for k in models if k.startswith("lily-") and not k.endswith("separate")]
    compiled_names = [] if args.no_compile else ["frozen", "lora", *modes]
    compiled = {k: torch.compile(models[k], dynamic=False) for k in compiled_names}
    # process CPU time leaves out the time a shared host gives other tenants; with one thread, it is compute time
    cpu_clock = args.cpu_time and device.type == "cpu"
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    rows = []
    for batch, tokens in shapes:
        x = torch.randn(batch, tokens, args.width, device=device)
        memory = {k: saved_bytes(m, x) for k, m in models.items()}
        faults = {k: page_faults(m, x) for k, m in models.items()}
        for phase in ("train", "inference"):
            train = phase == "train"
            contenders = {**models, **{f"{k} compiled": m for k, m in compiled.items()}}
            torch._dynamo.reset()  # compile afresh in the warm-up round: one graph per model, no stale guards
            medians = interleaved_medians({k: partial(step, m, x, train) for k, m in contenders.items()}, args.repeats,
                                          device, time.process_time if cpu_clock else time.perf_counter)  # fmt: skip
            lora = medians["lora"] - medians["frozen"]
            compiled_lora = medians["lora compiled"] - medians["frozen compiled"] if compiled else None
            for k in models:
                row = {"batch": batch, "tokens": tokens, "phase": phase, "contender": k, "ms": 1e3 * medians[k],
                       "overhead_vs_lora": (medians[k] - medians["frozen"]) / lora}  # fmt: skip
                if k in compiled:
                    row["compiled_ms"] = 1e3 * medians[f"{k} compiled"]
                    row["compiled_vs_eager"] = medians[f"{k} compiled"] / medians[k]
                    overhead = medians[f"{k} compiled"] - medians["frozen compiled"]
                    row["compiled_overhead_vs_lora"] = overhead / compiled_lora
                if phase == "train":
                    row["saved_bytes"], row["saved_activation_bytes"] = memory[k]
                    row["saved_vs_lora"] = memory[k][0] / memory["lora"][0]
                    row["saved_activations_vs_lora"] = memory[k][1] / memory["lora"][1]
                    row["minor_faults_per_step"] = faults[k]
                rows.append(row)

    def cells(shape: tuple[int, int], phase: str) -> dict[str, dict]:
        return {r["contender"]: r for r in rows if (r["batch"], r["tokens"], r["phase"]) == (*shape, phase)}

    names = [k for k in models if k not in ("frozen", "lora")]
    clock = "process CPU time" if cpu_clock else "wall time"
    block = f"Linear({args.width})"
    if args.block != "linear":
        block = f"({' + '.join(BLOCKS[args.block])})(x), each {block}"
    setting = (f"r={args.r}; {args.depth} x {block}; num_A={args.num_A}, num_B={args.num_B}; "
               f"{torch.get_num_threads()} torch thread(s), {clock}")  # fmt: skip
    overhead, speedup, compiled_overhead, memory_rows, fault_rows = [], [], [], [], []
    for shape in shapes:
        label = "x".join(map(str, shape))
        for phase in ("train", "inference"):
            sel = cells(shape, phase)
            lora_ms = sel["lora"]["ms"] - sel["frozen"]["ms"]
            overhead.append([label, phase, f"{lora_ms:.2f}", *(f"{sel[n]['overhead_vs_lora']:.2f}" for n in names)])
            if compiled:
                speedup.append([label, phase, *(f"{sel[n]['compiled_vs_eager']:.2f}" for n in compiled_names)])
                compiled_lora_ms = sel["lora"]["compiled_ms"] - sel["frozen"]["compiled_ms"]
                compiled_overhead.append([label, phase, f"{compiled_lora_ms:.2f}",
                                          *(f"{sel[n]['compiled_overhead_vs_lora']:.2f}" for n in modes)])  # fmt: skip
        sel = cells(shape, "train")
        memory_rows.append([label, f"{sel['lora']['saved_bytes'] / 2**20:.2f}",
                            *(f"{sel[n]['saved_vs_lora']:.3f} / {sel[n]['saved_activations_vs_lora']:.3f}"
                              for n in names)])  # fmt: skip
        fault_rows.append([label, *(f"{sel[n]['minor_faults_per_step']:.0f}" for n in ("frozen", "lora", *names))])
    lines = table(f"Adapter overhead / LoRA's overhead (same rank; {setting}; medians of {args.repeats} interleaved "
                  "rounds)", ["batch x tokens", "phase", "LoRA overhead ms", *names], overhead)  # fmt: skip
    if compiled:
        lines += table("torch.compile (inductor) step time / eager step time, same model, same rounds (< 1: "
                       "compiled is faster)", ["batch x tokens", "phase", *compiled_names], speedup)  # fmt: skip
        lines += table("Compiled adapter overhead / compiled LoRA's overhead (both torch.compile'd, same rounds)",
                       ["batch x tokens", "phase", "compiled LoRA overhead ms", *modes], compiled_overhead)  # fmt: skip
    lines += table("Saved-for-backward memory of a train step / LoRA's: all saved storages / activations only "
                   "(parameters excluded)", ["batch x tokens", "LoRA MiB (all)", *names], memory_rows)  # fmt: skip
    lines += table(
        f"Minor page faults per train step (allocator: {allocator or 'as the C library sets it'})",
        ["batch x tokens", "frozen", "lora", *names],
        fault_rows,
    )
    text = "\n".join(lines).rstrip()
    print(text)
    write_results(args.name, {"settings": vars(args), "machine": device_info(device), "allocator": allocator,
                              "rows": rows},
                  f"Device: {device_info(device)}\n\n{text}")  # fmt: skip


if __name__ == "__main__":
    main()
