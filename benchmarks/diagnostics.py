"""Rank and expert diagnostics after real training: Lily vs LoRA at Lily's budget, on the default text task.

Per adapted layer: the effective rank (entropy-based and numerical) of the learned update (for Lily, the
typical update, mixed by the layer's mean routing weights on validation data); per target type: the mean
pairwise cosine similarity of the B experts; per layer: the router entropy against its maximum log(E).

    python -m benchmarks.diagnostics --quick     # 300 training tweets, 1 epoch (~1.5 min on 2 CPU cores)
    python -m benchmarks.diagnostics             # the default task as `lily train` runs it
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import mean

import torch

import lily
from benchmarks.common import RESULTS, write_results
from lily.train import TrainConfig, load_run, train


def lora_ranks(model: torch.nn.Module) -> list[dict[str, float]]:
    """Effective ranks of (alpha / r) B A for every LoRA layer of a PEFT model."""
    ranks = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            ranks.append({"layer": name, **lily.effective_rank(delta.detach())})
    return ranks


def plot(lily_layers: list[dict], lora: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([layer["rank_entropy"] for layer in lily_layers], marker="o", label="Lily (typical update)")
    ax.plot([layer["entropy"] for layer in lora], marker="s", label="LoRA at Lily's budget")
    ax.set(xlabel="adapted layer (model order)", ylabel="effective rank (entropy)", title="Rank of each layer's update")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = (
        {"max_train_samples": 300, "epochs": 1, "max_test_samples": 200, "max_eval_samples": 100} if args.quick else {}
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lily", "lora"):
            out = Path(tmp) / method
            train(TrainConfig(method=method, seed=args.seed, output_dir=str(out), **size), log=lambda *a: None)
            runs[method] = load_run(out)
        task = runs["lily"]
        examples = task.examples("validation")[:256]
        batches = [task.collate(examples[i : i + 32]) for i in range(0, len(examples), 32)]
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
        report = lily.diagnostics(task.model, lily.routing_statistics(task.model, batches))
        lora = lora_ranks(runs["lora"].model)
    lily_layers = report["layers"]
    summary = {
        "lily_rank_entropy_mean": mean(x["rank_entropy"] for x in lily_layers),
        "lily_rank_numerical_mean": mean(x["rank_numerical"] for x in lily_layers),
        "lora_rank_entropy_mean": mean(x["entropy"] for x in lora),
        "lora_rank_numerical_mean": mean(x["numerical"] for x in lora),
        "router_entropy_mean": mean(x["router_entropy"] for x in lily_layers if x["router_entropy"] is not None),
        "max_router_entropy": lily_layers[0]["max_entropy"],
        "expert_similarity": {k: v["mean_off_diagonal"] for k, v in report["expert_similarity"].items()},
    }
    RESULTS.mkdir(exist_ok=True)
    plot(lily_layers, lora, RESULTS / "diagnostics_rank.png")
    lines = [
        f"Default text task (MiniLM, tweets), seed {args.seed}{' (quick)' if args.quick else ''}; "
        f"Lily r={report['r']}, routing '{report['routing']}'; LoRA r={runs['lora'].model.peft_config['default'].r}.",
        "",
        "| measure | Lily | LoRA at Lily's budget |",
        "|---|---|---|",
        f"| effective rank of a layer's update, entropy (mean over layers) | {summary['lily_rank_entropy_mean']:.2f} | "
        f"{summary['lora_rank_entropy_mean']:.2f} |",
        f"| numerical rank (mean over layers) | {summary['lily_rank_numerical_mean']:.1f} | "
        f"{summary['lora_rank_numerical_mean']:.1f} |",
        f"| router entropy (mean over layers; max {summary['max_router_entropy']:.3f}) | "
        f"{summary['router_entropy_mean']:.3f} | - |",
    ]
    for key, value in summary["expert_similarity"].items():
        lines.append(f"| B-expert cosine similarity, {key} (mean off-diagonal) | {value:.3f} | - |")
    table = "\n".join(lines)
    print(table)
    write_results("diagnostics", {"summary": summary, "lily": report, "lora": lora}, table)


if __name__ == "__main__":
    main()
