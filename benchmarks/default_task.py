"""Lily vs LoRA at Lily's parameter budget on the default text task (MiniLM, tweet sentiment), several seeds.

Both methods use the same data split, steps, learning rate and schedule; only the adapter differs.

    python -m benchmarks.default_task            # 3 seeds, writes benchmarks/results/default_task.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lily.train.config import TrainConfig
from lily.train.loop import train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["lily", "lora"])
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as out:
                m = train(TrainConfig(method=method, seed=seed, output_dir=out), log=lambda *a: None)
            runs.append({"method": method, "seed": seed, "test": m["test"], "test_before": m["test_before"],
                         "adapter_params": m["parameters"]["adapter"], "lora_r": m["parameters"]["lora_r"],
                         "wall_time_s": m["wall_time_s"]})  # fmt: skip
            print(json.dumps(runs[-1]))
    lines = ["| method | adapter parameters | test accuracy (mean ± std over seeds) | per seed |", "|---|---|---|---|"]
    for method in args.methods:
        rows = [r for r in runs if r["method"] == method]
        scores = [r["test"] for r in rows]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        name = f"lora (r={rows[0]['lora_r']})" if method == "lora" else method
        lines.append(f"| {name} | {rows[0]['adapter_params']:,} | {statistics.mean(scores):.4f} ± {spread:.4f} | "
                     f"{', '.join(f'{s:.4f}' for s in scores)} |")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_task.json").write_text(json.dumps(runs, indent=2) + "\n")
    (RESULTS / "default_task.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
