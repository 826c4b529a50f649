"""Shared pieces of the benchmarks: contenders built the same way, interleaved timing, memory, result files."""

from __future__ import annotations

import copy
import ctypes
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lily

RESULTS = Path(__file__).parent / "results"
ROUTINGS = ("batch", "sample", "token", "static", "uniform")


def device_info(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


GLIBC_MALLOPT = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 64 << 20), "M_MMAP_THRESHOLD": (-3, 32 << 20)}
"""glibc `mallopt` parameters (number, value) that `steady_allocator` sets: keep up to 1 GiB of freed heap, grow
the heap 64 MiB at a time, and serve blocks under 32 MiB (glibc's most) from the heap rather than fresh mmaps."""


def steady_allocator() -> dict[str, int]:
    """Keep freed CPU memory in the process, so a timed step reuses it instead of faulting in fresh pages.

    With glibc's defaults, tensors over 128 KiB come from new mmaps or from heap the allocator has just handed
    back to the OS, and their pages fault in again on first touch. How many faults a step pays then depends on
    the heap's history more than on what the step computes (`python -m benchmarks.layer_overhead
    --default-malloc` counts them per contender). Returns the parameters set ({} where the C library is not
    glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc (or no C library to load by name)
        return {}
    return {name: value for name, (param, value) in GLIBC_MALLOPT.items() if mallopt(param, value) == 1}


def require_input_grad(model: nn.Module) -> None:
    """Make the embeddings' output require grad, so backward runs through every layer even with no adapter."""

    def hook(module, inputs, output):
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def rank_contenders(
    base: nn.Module,
    targets: list[str],
    r: int,
    num_A: int,
    num_B: int,
    modes: tuple[str, ...] = ROUTINGS,
    peft_lily: bool = True,
) -> dict[str, nn.Module]:
    """Copies of `base`: "frozen", "lora" (rank r, alpha 2r), "peft-lily" (rank r, the same A groups and experts),
    and "lily-<mode>" (ours at rank r) for each routing mode."""
    import peft

    def fresh() -> nn.Module:
        return copy.deepcopy(base).requires_grad_(False)

    out = {"frozen": fresh(), "lora": peft.get_peft_model(fresh(), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                                  target_modules=targets))}  # fmt: skip
    if peft_lily:
        num_layers = sum(1 for name, _ in base.named_modules() if name.endswith("." + targets[0]))
        stride = math.ceil(num_layers / num_A)
        out["peft-lily"] = peft.get_peft_model(
            fresh(), peft.LilyConfig(r=r, stride_A=stride, num_B=num_B, target_modules=targets)
        )
    for mode in modes:
        cfg = lily.LilyConfig(target_modules=targets, r=r, num_A=num_A, num_B=num_B, routing=mode)
        out[f"lily-{mode}"] = lily.inject(fresh(), cfg)
    return out


def contenders(base: nn.Module, targets: list[str], r: int, num_A: int, num_B: int) -> dict[str, nn.Module]:
    """`rank_contenders` labelled with their rank, plus LoRA at our Lily's budget, for whole transformers
    (backward runs through every layer, also for the frozen base)."""
    import peft

    out = {name if name == "frozen" else f"{name} r={r}": model
           for name, model in rank_contenders(base, targets, r, num_A, num_B).items()}  # fmt: skip
    budget = lily.count_parameters(out[f"lily-sample r={r}"])
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules()
                   if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets))  # fmt: skip
    matched = max(1, round(budget / per_rank))
    out[f"lora r={matched} (Lily budget)"] = peft.get_peft_model(
        copy.deepcopy(base).requires_grad_(False),
        peft.LoraConfig(r=matched, lora_alpha=2 * matched, target_modules=targets),
    )
    for model in out.values():
        require_input_grad(model)
    return out


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_for_backward_bytes(run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of `run()` (CPU memory proxy)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(seen.values())


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:  # fmt: skip
    """Median seconds of each step by `clock`, timing the contenders in turn (one warm-up round is dropped)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[name].append(clock() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def write_results(name: str, payload: dict[str, Any], table: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
