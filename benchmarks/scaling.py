"""How the adapter overhead grows with sequence length, batch size, number of layers, r and num_B.

One knob at a time around a base setting (16 x Linear(576), batch 4 x 128 tokens, r=16, num_A=2, num_B=4),
the extra training-step time over the frozen stack for LoRA (rank r), and Lily with "sample" and "token"
routing, interleaved in one process. Writes a plot of the five sweeps.

    python -m benchmarks.scaling --quick     # fewer points and repeats (~1.5 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import (
    RESULTS,
    device_info,
    interleaved_medians,
    rank_contenders,
    steady_allocator,
    write_results,
)
from benchmarks.layer_overhead import Stack

BASE = {"tokens": 128, "batch": 4, "depth": 16, "r": 16, "num_B": 4}
SWEEPS = {"tokens": [32, 128, 512], "batch": [1, 4, 16], "depth": [4, 16, 32], "r": [4, 16, 64], "num_B": [2, 4, 8]}
WIDTH, NUM_A = 576, 2


def overheads(setting: dict[str, int], repeats: int, device: torch.device) -> dict[str, float]:
    """Training-step overhead (ms) over the frozen stack for each contender at `setting`."""
    torch.manual_seed(0)
    models = rank_contenders(Stack(setting["depth"], WIDTH), ["proj"], setting["r"], NUM_A, setting["num_B"],
                             modes=("sample", "token"), peft_lily=False)  # fmt: skip
    x = torch.randn(setting["batch"], setting["tokens"], WIDTH, device=device)

    def step(model: torch.nn.Module) -> None:
        model(x.clone().requires_grad_(True)).pow(2).mean().backward()

    models = {k: m.to(device) for k, m in models.items()}
    medians = interleaved_medians({k: (lambda m=m: step(m)) for k, m in models.items()}, repeats, device)
    return {k: 1e3 * (v - medians["frozen"]) for k, v in medians.items() if k != "frozen"}


def plot(rows: list[dict], knobs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(knobs), figsize=(3.2 * len(knobs), 3.2))
    for ax, knob in zip(axes, knobs, strict=True):
        sel = [r for r in rows if r["knob"] == knob]
        for name in ("lora", "lily-sample", "lily-token"):
            ax.plot([r["value"] for r in sel], [r[f"{name}_ms"] for r in sel], marker="o", label=name)
        ax.set(xscale="log", xlabel=knob, title=f"vs {knob}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks([r["value"] for r in sel], [str(r["value"]) for r in sel])
    axes[0].set_ylabel("training-step overhead (ms)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "scaling.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from results/scaling.json")
    args = parser.parse_args()
    if args.plot_only:
        rows = json.loads((RESULTS / "scaling.json").read_text())["rows"]
        return plot(rows, list(dict.fromkeys(r["knob"] for r in rows)))
    sweeps = {k: v[:2] for k, v in SWEEPS.items()} if args.quick else SWEEPS
    repeats = 3 if args.quick else args.repeats
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allocator = steady_allocator()
    rows = []
    for knob, values in sweeps.items():
        for value in values:
            setting = {**BASE, knob: value}
            result = overheads(setting, repeats, device)
            rows.append({"knob": knob, "value": value, **{f"{k}_ms": v for k, v in result.items()}})
            print(knob, value, {k: round(v, 2) for k, v in result.items()})

    plot(rows, list(sweeps))
    lines = ["| knob | value | LoRA ms | Lily sample ms | Lily token ms |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["knob"], str(r["value"]), *(f"{r[k]:.1f}" for k in ("lora_ms", "lily-sample_ms", "lily-token_ms"))]
        lines.append("| " + " | ".join(cells) + " |")
    write_results(
        "scaling",
        {"base": BASE, "machine": device_info(device), "allocator": allocator, "rows": rows},
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
