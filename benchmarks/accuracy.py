"""Accuracy at equal parameter budget: Lily (per routing mode) vs LoRA vs head-only, with an equal lr sweep.

Every method gets the same data split, steps, schedule and the same small grid of learning rates. Each
method is trained at every lr with the first seed; its lr is the one with the best *validation* metric
there; the other seeds then train at that lr. The table reports the test metric at the chosen lr over
all seeds, plus every cell of the sweep, so nothing hides. LoRA runs at the rank whose parameter count
is closest to Lily's (alpha = 2r).

    python -m benchmarks.accuracy --task text-cls     # MiniLM on tweets: 7 methods x (3 lrs + 2 more seeds)
    python -m benchmarks.accuracy --task causal-lm    # SmolLM2 on chat turns: held-out perplexity
    python -m benchmarks.accuracy --quick             # 2 methods, 1 lr, 1 seed, small data (< 2 min)

Results go to benchmarks/results/accuracy_<task>.{json,md}; the JSON is rewritten after every run and
a rerun skips the runs it already holds (delete the file to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

from benchmarks.common import RESULTS, write_results
from lily.train.config import TrainConfig
from lily.train.loop import train
from lily.train.outputs import write_json_atomic

# The training budget of each task: the same for every method and lr (the CPU sets how big it can be).
BUDGETS: dict[str, dict[str, Any]] = {
    "text-cls": {"max_train_samples": 1000, "max_eval_samples": 250, "max_test_samples": 1000, "epochs": 2},
    "causal-lm": {"max_train_samples": 96, "max_eval_samples": 32, "max_test_samples": 64, "epochs": 1,
                  "batch_size": 8},
}  # fmt: skip
METHODS = {
    "text-cls": ["lily:sample", "lily:batch", "lily:token", "lily:static", "lily:uniform", "lora", "head-only"],
    # Decoders: "sample"/"batch" routing would let a position see later tokens, so only leak-free modes run.
    # LoRA's matched rank rounds up here (r=2: 28% more parameters than Lily), so r=1 runs too.
    "causal-lm": ["lily:token", "lily:static", "lora", "lora:1"],
}
LRS = {"text-cls": [5e-4, 2e-3, 8e-3], "causal-lm": [2.5e-4, 1e-3, 4e-3]}
QUICK = {"max_train_samples": 200, "max_eval_samples": 100, "max_test_samples": 200, "epochs": 1}


def run_config(task: str, method: str, lr: float, seed: int, budget: dict[str, Any], out: str) -> TrainConfig:
    """`method` is "lora" (rank matched to Lily's budget), "lora:<rank>", "head-only", "full", or "lily:<routing>"."""
    name, _, option = method.partition(":")
    extra = {"lora_r": int(option)} if name == "lora" and option else {"routing": option or None}
    return TrainConfig(task=task, method=name, lr=lr, seed=seed, output_dir=out, **extra, **budget)


def select(runs: list[dict[str, Any]], method: str, seed: int) -> float:
    """The lr with the best validation metric of `method` trained with `seed`."""
    swept = [r for r in runs if r["method"] == method and r["seed"] == seed]
    sign = 1 if swept[0]["higher_is_better"] else -1
    return max(swept, key=lambda r: sign * r["best_val"])["lr"]


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(runs: list[dict[str, Any]], methods: list[str], lrs: list[float], seed: int) -> list[str]:
    metric, higher = runs[0]["metric"], runs[0]["higher_is_better"]
    before = mean_std([r["test_before"] for r in runs if r["method"] == methods[0]])
    lines = [f"Test {metric} at each method's lr chosen on validation ({'higher' if higher else 'lower'} is better; "
             f"untrained model: {before}).", "",
             f"| method | trainable parameters | chosen lr | test {metric} (mean ± std) | per seed |",
             "|---|---|---|---|---|"]  # fmt: skip
    for method in methods:
        if not any(r["method"] == method for r in runs):
            continue
        lr = select(runs, method, seed)
        chosen = [r for r in runs if r["method"] == method and r["lr"] == lr]
        name = f"lora (r={chosen[0]['lora_r']})" if method == "lora" else method
        lines.append(f"| {name} | {chosen[0]['trainable_params']:,} | {lr:g} | {mean_std([r['test'] for r in chosen])} "
                     f"| {', '.join(format(r['test'], '.4f') for r in chosen)} |")  # fmt: skip
    lines += ["", f"The sweep: validation / test {metric} with seed {seed}.", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]  # fmt: skip
    for method in methods:
        cells = []
        for lr in lrs:
            row = [r for r in runs if (r["method"], r["lr"], r["seed"]) == (method, lr, seed)]
            cells.append(f"{row[0]['best_val']:.4f} / {row[0]['test']:.4f}" if row else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(BUDGETS), default="text-cls")
    parser.add_argument("--methods", nargs="+", help="Default: every method that fits the task.")
    parser.add_argument("--lrs", type=float, nargs="+", help="Default: the task's grid.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", help="Result file stem (default: accuracy_<task>, or accuracy_quick).")
    parser.add_argument("--quick", action="store_true", help="Small data, 1 lr, 1 seed, lily:sample vs lora.")
    args = parser.parse_args()
    methods = args.methods or (["lily:sample", "lora"] if args.quick else METHODS[args.task])
    lrs = args.lrs or ([2e-3] if args.quick else LRS[args.task])
    seeds = [0] if args.quick else args.seeds
    budget = {**BUDGETS[args.task], **(QUICK if args.quick else {})}
    path = RESULTS / f"{args.name or ('accuracy_quick' if args.quick else f'accuracy_{args.task}')}.json"

    done = json.loads(path.read_text())["runs"] if path.exists() else []
    done = [r for r in done if r["budget"] == budget]
    for seed in seeds:
        cells = ([(m, lr) for lr in lrs for m in methods] if seed == seeds[0]
                 else [(m, select(done, m, seeds[0])) for m in methods])  # fmt: skip
        for method, lr in cells:
            if any((r["method"], r["lr"], r["seed"]) == (method, lr, seed) for r in done):
                continue
            with tempfile.TemporaryDirectory() as out:
                m = train(run_config(args.task, method, lr, seed, budget, out), log=lambda *a: None)
            done.append({"method": method, "lr": lr, "seed": seed, "budget": budget, "metric": m["metric"],
                         "higher_is_better": m["higher_is_better"], "best_val": m["best_val"], "test": m["test"],
                         "test_before": m["test_before"], "trainable_params": m["parameters"]["trainable"],
                         "lora_r": m["parameters"]["lora_r"], "wall_time_s": m["wall_time_s"],
                         "device": m["device"]})  # fmt: skip
            print(json.dumps(done[-1]), flush=True)
            write_json_atomic(path, {"runs": done})
    lines = table(done, methods, lrs, seeds[0])
    write_results(path.stem, {"runs": done}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
