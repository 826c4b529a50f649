"""Accuracy per trainable parameter: Lily against LoRA (and PEFT's Lily, PEFT's VeRA, head-only, full fine-tuning)
on real tasks, every configuration tuned the same way.

Protocol (the same for every configuration, Lily or not):
- learning rates on a x2 grid (5 points to start); the lr is selected on the validation split only, with seed 0;
  while the selected lr is at an end of the grid, the grid grows by one point on that side, so every selected lr
  is strictly inside its grid;
- the selected lr then trains with seeds 1 and 2; the test split is read once per run (at its best validation
  checkpoint);
- scale convention: LoRA's alpha = 2r (update scale alpha / r = 2) and Lily's s = 2, PEFT Lily's scaling = 2; since
  scale and lr trade one for one, sweeping lr at this fixed scale is enough;
- budgets: LoRA at ranks `LORA_RANKS`; Lily fitted to each of those budgets with `lily.fit_budget` (the largest r
  that costs at most what LoRA of that rank costs); PEFT's VeRA (rank 256, learned scales only) as a
  shared-parameter peer below LoRA r=1's cost; trainable parameters count everything trained (adapter + the task
  head every method trains);
- data (`BUDGETS`): 500 training examples for 2 epochs on the classification tasks; the causal LM (SmolLM2, 30
  layers, several times the compute per example) gets 160 examples for 2 epochs, capped at 64 tokens, so that its
  runs fit a few hours on 2 CPU cores. It has no head-only line (its head is the tied input embedding) and the
  paper's shape and the levers run on the classification tasks only (`--no-levers`).

    python -m benchmarks.pareto --task text-cls image-cls   # resumable: a rerun skips the runs results hold
    python -m benchmarks.pareto --task causal-lm --no-levers
    python -m benchmarks.pareto --task text-cls --report   # tables and plots from the results so far
    python -m benchmarks.pareto --quick                # tiny smoke run into pareto_quick* (about 5 min)

Results: benchmarks/results/pareto.json (`{"tasks": {task: {"higher_is_better", "runs": [...]}}}`, each run
`{"method", "config", "trainable_params", "lr", "seed", "val", "test"}`), pareto_details.json (wall times and, for
Lily runs, router entropy, B-expert cosine and effective update rank), pareto.md and pareto_<task>.png. Runs go two
at a time, one CPU thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from lily.train.outputs import write_json_atomic

SCALE = 2.0
"""LoRA's alpha / r and Lily's s (see the protocol above)."""
LORA_RANKS = (1, 4, 16)
MID_RANK = 4
"""The budget of the one-point contenders (PEFT's Lily, the paper's shape, the levers)."""
SEEDS = (0, 1, 2)
GRID_POINTS = 5
MAX_GROWTH = 4
"""How many points a grid may grow by on one side before the study gives up on an interior optimum."""
PLATEAU_FACTOR = 2
"""The plateau check trains for this many times the study's epochs."""

BUDGETS: dict[str, dict[str, Any]] = {
    "text-cls": {"max_train_samples": 500, "max_eval_samples": 200, "max_test_samples": 500, "epochs": 2,
                 "batch_size": 16},
    "image-cls": {"max_train_samples": 500, "max_eval_samples": 200, "max_test_samples": 500, "epochs": 2,
                  "batch_size": 16},
    "causal-lm": {"max_train_samples": 160, "max_eval_samples": 64, "max_test_samples": 64, "epochs": 2,
                  "batch_size": 8, "max_length": 64},
}  # fmt: skip
QUICK = {"max_train_samples": 64, "max_eval_samples": 32, "max_test_samples": 32, "epochs": 1, "batch_size": 16}
ADAPTER_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
START_LRS = {"full": (1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4), "head-only": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
             "peft-vera": (4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)}  # fmt: skip
VERA_RANK = 256
"""PEFT's default VeRA rank: the shared-parameter peer, at one point (its cost barely depends on the rank)."""
LEVERS: dict[str, dict[str, Any]] = {
    "experts init": {"lily_init": "experts"},
    "router init x4": {"router_init_scale": 4.0},
    "diversity 0.1": {"expert_diversity": 0.1},
    "B lr x4": {"lr_ratio_B": 4.0},
}
"""Opt-in levers, each measured alone on the paper's shape (2 A groups, 4 experts) at the mid budget."""


def configurations(task: str, levers: bool = True) -> dict[str, dict[str, Any]]:
    """label -> `lily train` options of every contender on `task` (lr and seed come from the protocol); `levers`
    adds the paper's shape and the levers on it. The causal LM has no head-only line: its head is the tied input
    embedding, so head-only would train nothing."""
    corner = {"method": "lily", "num_A": 2, "num_B": 2, "scaling": SCALE}
    paper = {"method": "lily", "num_A": 2, "num_B": 4, "scaling": SCALE, "budget_lora_rank": MID_RANK}
    out: dict[str, dict[str, Any]] = {}
    for rank in LORA_RANKS:
        out[f"lora r={rank}"] = {"method": "lora", "lora_r": rank, "lora_alpha": SCALE * rank}
        out[f"lily 2A/2B @lora{rank}"] = {**corner, "budget_lora_rank": rank}
    out[f"peft-lily 2A/2B @lora{MID_RANK}"] = {**corner, "method": "peft-lily", "budget_lora_rank": MID_RANK}
    if task != "causal-lm":
        out["head-only"] = {"method": "head-only"}
    out["full"] = {"method": "full"}
    out[f"peft-vera r={VERA_RANK}"] = {"method": "peft-vera", "vera_r": VERA_RANK}
    if levers:
        out[f"lily 2A/4B @lora{MID_RANK}"] = paper
        out.update({f"lily 2A/4B @lora{MID_RANK} + {name}": {**paper, **extra} for name, extra in LEVERS.items()})
    return out


def start_grid(options: dict[str, Any]) -> tuple[float, ...]:
    return START_LRS.get(options["method"], ADAPTER_LRS)


def grid(label: str, runs: list[dict[str, Any]], options: dict[str, Any], higher: bool) -> tuple[list[float], bool]:
    """(The lrs `label` must have with seed 0, whether its selected lr is inside them): the start grid, grown by one
    x2 step on each side whose end holds the best validation score so far."""
    lrs = sorted(start_grid(options))
    scores = sweep(label, runs)
    for _ in range(MAX_GROWTH + 1):
        if not all(_has(scores, lr) for lr in lrs):
            return lrs, False
        best = _select({lr: v for lr, v in scores.items() if _has(lrs, lr)}, higher)
        if _same(best, lrs[0]):
            lrs.insert(0, lrs[0] / 2)
        elif _same(best, lrs[-1]):
            lrs.append(lrs[-1] * 2)
        else:
            return lrs, True
    return lrs, False


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _has(lrs: Iterable[float], lr: float) -> bool:
    return any(_same(lr, have) for have in lrs)


def sweep(label: str, runs: list[dict[str, Any]]) -> dict[float, float]:
    """lr -> validation score of `label`'s seed-0 runs (the lr sweep)."""
    return {r["lr"]: r["val"] for r in runs if r["label"] == label and r["seed"] == SEEDS[0]}


def _select(scores: dict[float, float], higher: bool) -> float:
    """The lr with the best validation score (ties: the smaller lr)."""
    return sorted(scores.items(), key=lambda kv: ((-kv[1] if higher else kv[1]), kv[0]))[0][0]


def selected_lr(label: str, runs: list[dict[str, Any]], higher: bool) -> float | None:
    scores = sweep(label, runs)
    return _select(scores, higher) if scores else None


def pending(configs: dict[str, dict[str, Any]], runs: list[dict[str, Any]], higher: bool
            ) -> list[tuple[str, float, int]]:  # fmt: skip
    """(label, lr, seed) of the runs the protocol needs next, given the finished `runs`."""
    todo = []
    for label, options in configs.items():
        lrs, interior = grid(label, runs, options, higher)
        have = sweep(label, runs)
        todo += [(label, lr, SEEDS[0]) for lr in lrs if not _has(have, lr)]
        if interior:
            lr = selected_lr(label, runs, higher)
            finished = {r["seed"] for r in runs if r["label"] == label and _same(r["lr"], lr)}
            todo += [(label, lr, seed) for seed in SEEDS[1:] if seed not in finished]
    return todo


# ---- one run, in its own process ------------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration and measure it: the pareto.json fields plus details (Lily diagnostics)."""
    import torch

    import lily
    from lily.train import TrainConfig, load_run, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(task=spec["task"], lr=spec["lr"], seed=spec["seed"], output_dir=out, **spec["budget"],
                          **spec["options"])  # fmt: skip
        m = train(cfg, log=lambda *a: None)
        details: dict[str, Any] = {"wall_time_s": m["wall_time_s"], "best_step": m["best_step"], "steps": m["steps"],
                                   "val_curve": m["val_curve"], "test_before": m["test_before"]}  # fmt: skip
        if cfg.method == "lily":
            run = load_run(out)
            examples = run.examples("validation")[:64]
            batches = [run.collate(examples[i : i + 16]) for i in range(0, len(examples), 16)]
            batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
            report = lily.diagnostics(run.model, lily.routing_statistics(run.model, batches))
            entropies = [x["router_entropy"] for x in report["layers"] if x["router_entropy"] is not None]
            details.update({
                "r": report["r"],
                "router_entropy": statistics.mean(entropies) if entropies else None,
                "max_router_entropy": report["layers"][0]["max_entropy"],
                "expert_cosine": statistics.mean(v["mean_off_diagonal"] for v in report["expert_similarity"].values()),
                "rank_entropy": statistics.mean(x["rank_entropy"] for x in report["layers"]),
            })  # fmt: skip
    return {"val": m["best_val"], "test": m["test"], "trainable_params": m["parameters"]["trainable"],
            "higher_is_better": m["higher_is_better"], "details": details}  # fmt: skip


# ---- the driver ---------------------------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"tasks": {}}


def pool(todo: Callable[[], list[tuple[Any, dict[str, Any]]]], done: Callable[[Any, dict[str, Any]], None],
         workers: int) -> None:  # fmt: skip
    """Run worker specs, `workers` at a time, each in its own process: `todo()` lists the (key, spec) pairs still
    to run (asked again after each finished run), `done(key, result)` takes each result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: dict[Any, subprocess.Popen] = {}
    while True:
        for key, spec in todo():
            if len(running) >= workers:
                break
            if key not in running:
                running[key] = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.pareto", "--worker", json.dumps(spec)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                )  # fmt: skip
        if not running:
            return
        time.sleep(1)
        for key, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[key]
            if proc.returncode:
                raise SystemExit(f"run {key} failed:\n{err[-3000:]}")
            done(key, json.loads(out.strip().splitlines()[-1]))


def labelled(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A task's runs, each with its configuration's label."""
    return [{**r, "label": r["config"]["label"]} for r in entry["runs"]]


def study(task: str, budget: dict[str, Any], configs: dict[str, dict[str, Any]], path: Path, details_path: Path,
          workers: int) -> None:  # fmt: skip
    """Run every pending run of `task`, `workers` at a time, saving after each."""
    results, details = load(path), load(details_path)
    entry = results["tasks"].setdefault(task, {"higher_is_better": task != "causal-lm", "runs": []})
    extra = details["tasks"].setdefault(task, {})
    higher = entry["higher_is_better"]
    started = time.time()

    def todo() -> list[tuple[Any, dict[str, Any]]]:
        return [((label, lr, seed), {"task": task, "lr": lr, "seed": seed, "budget": budget, "options": configs[label]})
                for label, lr, seed in pending(configs, labelled(entry), higher)]  # fmt: skip

    def done(key: tuple[str, float, int], got: dict[str, Any]) -> None:
        label, lr, seed = key
        run = {"method": configs[label]["method"], "config": {"label": label, **configs[label], **budget},
               "trainable_params": got["trainable_params"], "lr": lr, "seed": seed, "val": got["val"],
               "test": got["test"]}  # fmt: skip
        entry["runs"].append(run)
        extra[f"{label}|{lr:g}|{seed}"] = got["details"]
        write_json_atomic(path, results)
        write_json_atomic(details_path, details)
        print(f"[{time.time() - started:7.0f} s] {label} lr={lr:g} seed={seed}: val {got['val']:.4f} "
              f"test {got['test']:.4f} ({got['details']['wall_time_s']:.0f} s)", flush=True)  # fmt: skip

    pool(todo, done, workers)


def best_configs(entry: dict[str, Any]) -> dict[str, tuple[dict[str, Any], float]]:
    """label -> (options, selected lr) of the best LoRA and the best Lily configuration, by seed-0 validation at
    their selected lr (the study's own selection rule, applied across configurations)."""
    runs, sign = labelled(entry), 1 if entry["higher_is_better"] else -1
    configs = {r["label"]: r["config"] for r in runs}
    out = {}
    for method in ("lora", "lily"):
        chosen = {label: selected_lr(label, runs, sign > 0) for label, c in configs.items() if c["method"] == method}
        if not chosen:
            continue
        # min keeps the first of equal scores: the earlier, cheaper configuration
        label = min(chosen, key=lambda name: -sign * sweep(name, runs)[chosen[name]])
        out[label] = ({k: v for k, v in configs[label].items() if k != "label"}, chosen[label])
    return out


def plateau(task: str, path: Path, details_path: Path, workers: int) -> None:
    """Does validation still improve after the study's budget? The best LoRA and the best Lily train seed 0 at
    their selected lr for PLATEAU_FACTOR x the study's epochs, validating twice per epoch; the curves go to
    pareto_details.json ("plateau")."""
    entry, details = load(path)["tasks"][task], load(details_path)
    found = details.setdefault("plateau", {}).setdefault(task, {})
    budget = BUDGETS[task]
    steps = math.ceil(budget["max_train_samples"] / budget["batch_size"])
    longer = {**budget, "epochs": budget["epochs"] * PLATEAU_FACTOR}
    specs = {label: {"task": task, "lr": lr, "seed": SEEDS[0], "budget": longer,
                     "options": {**{k: v for k, v in config.items() if k not in budget}, "eval_every": steps // 2}}
             for label, (config, lr) in best_configs(entry).items()}  # fmt: skip

    def done(label: str, got: dict[str, Any]) -> None:
        found[label] = {"lr": specs[label]["lr"], "epochs": longer["epochs"], "test": got["test"], **got["details"]}
        write_json_atomic(details_path, details)
        print(f"plateau {task} {label}: {got['details']['val_curve']}", flush=True)

    pool(lambda: [(k, s) for k, s in specs.items() if k not in found], done, workers)


# ---- report -------------------------------------------------------------------------------------------------------


def summarise(task: str, entry: dict[str, Any], details: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration: budget, selected lr, interior or not, test per seed at the selected lr, diagnostics."""
    runs = [{**r, "label": r["config"]["label"]} for r in entry["runs"]]
    higher = entry["higher_is_better"]
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        options = next(r["config"] for r in runs if r["label"] == label)
        lrs, interior = grid(label, runs, options, higher)
        lr = selected_lr(label, runs, higher)
        chosen = sorted((r for r in runs if r["label"] == label and _same(r["lr"], lr)), key=lambda r: r["seed"])
        diag = [details.get(f"{label}|{lr:g}|{r['seed']}", {}) for r in chosen]
        wall = sum(d.get("wall_time_s", 0) for k, d in details.items() if k.startswith(label + "|"))
        rows.append({"label": label, "method": options["method"], "params": chosen[0]["trainable_params"], "lr": lr,
                     "grid": lrs, "interior": interior, "seeds": [r["seed"] for r in chosen],
                     "test": [r["test"] for r in chosen], "val": chosen[0]["val"], "wall_s": wall,
                     **{key: _mean_of(diag, key) for key in DIAGNOSTICS}})  # fmt: skip
    return rows


DIAGNOSTICS = ("r", "router_entropy", "expert_cosine", "rank_entropy")


def _mean_of(entries: list[dict[str, Any]], key: str) -> float | None:
    values = [e[key] for e in entries if e.get(key) is not None]
    return statistics.mean(values) if values else None


def paired(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Mean ± std over seeds of test(a) - test(b), paired by seed."""
    diffs = [x - y for s, x in zip(a["seeds"], a["test"], strict=True) for t, y in zip(b["seeds"], b["test"],
             strict=True) if s == t]  # fmt: skip
    if len(diffs) < 2:
        return "-"
    return f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (n={len(diffs)})"


def fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f} (1 seed)" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(path: Path, details_path: Path) -> str:
    results, details = load(path), load(details_path)
    protocol = "Protocol" + __doc__.split("Protocol")[1].split("    python")[0].rstrip()
    lines = ["# Accuracy per trainable parameter (benchmarks/pareto.py)", "", protocol, ""]
    for task, entry in results["tasks"].items():
        rows = summarise(task, entry, details["tasks"].get(task, {}))
        budget = {k: v for k, v in entry["runs"][0]["config"].items() if k in BUDGETS[task]}
        hours = sum(d.get("wall_time_s", 0) for d in details["tasks"].get(task, {}).values()) / 3600
        metric = "accuracy" if entry["higher_is_better"] else "perplexity"
        lines += [f"## {task} ({metric}, {'higher' if entry['higher_is_better'] else 'lower'} is better)", "",
                  f"Data and schedule: {budget}. {len(entry['runs'])} runs, {hours:.2f} h of run time (one CPU "
                  "thread each, two at a time).", "",
                  "| configuration | trainable | lr (grid) | val (seed 0) | test, mean ± std over seeds | r | router "
                  "entropy | expert cosine | update rank |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in sorted(rows, key=lambda r: (r["method"] != "lora", r["params"])):
            span = f"{row['lr']:g} ({row['grid'][0]:g} to {row['grid'][-1]:g}, {len(row['grid'])} pts" + (
                ")" if row["interior"] else "; NOT interior)"
            )
            show = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            lines.append(f"| {row['label']} | {row['params']:,} | {span} | {row['val']:.4f} | {fmt(row['test'])} | "
                         f"{show(row['r'], '.0f')} | {show(row['router_entropy'], '.3f')} | "
                         f"{show(row['expert_cosine'], '.3f')} | {show(row['rank_entropy'], '.2f')} |")  # fmt: skip
        lines += ["", "Lily against the best LoRA at no more than 1.1x its trainable parameters (paired by seed; "
                  "positive: Lily better" + (")" if entry["higher_is_better"] else ", in perplexity: negative is "
                  "better)"), "", "| Lily configuration | trainable | LoRA | trainable | Lily - LoRA |",
                  "|---|---|---|---|---|"]  # fmt: skip
        loras = [r for r in rows if r["method"] == "lora" and len(r["test"]) == len(SEEDS)]
        sign = 1 if entry["higher_is_better"] else -1
        for row in (r for r in rows if r["method"] == "lily" and len(r["test"]) == len(SEEDS)):
            fits = [r for r in loras if r["params"] <= 1.1 * row["params"]]
            if not fits and loras:  # below LoRA r=1's cost: compare with the cheapest LoRA, and say so
                fits = [min(loras, key=lambda r: r["params"])]
            if fits:
                best = max(fits, key=lambda r: sign * statistics.mean(r["test"]))
                over = "" if best["params"] <= 1.1 * row["params"] else " (more than 1.1x: the cheapest LoRA)"
                lines.append(f"| {row['label']} | {row['params']:,} | {best['label']}{over} | {best['params']:,} | "
                             f"{paired(row, best)} |")  # fmt: skip
        lines += plateau_table(entry, details.get("plateau", {}).get(task, {}))
        plot(task, rows, entry["higher_is_better"], metric)
        lines += ["", f"![{task}](pareto_{task}.png)", ""]
    return "\n".join(lines)


def plateau_table(entry: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """The plateau check's rows: the study's seed-0 run against the same configuration trained longer."""
    if not found:
        return []
    runs, sign = labelled(entry), 1 if entry["higher_is_better"] else -1
    lines = ["", "Plateau check: the best LoRA and the best Lily by validation, seed 0 at the selected lr, "
             f"trained {PLATEAU_FACTOR}x as many epochs (the lr schedule stretched to match) and validated twice per "
             f"epoch. Untrained, the test score is {next(iter(found.values()))['test_before']:.4f}.", "",
             "| configuration | lr | study: val / test | longer: validation by step | longer: best val "
             "(step) / test |", "|---|---|---|---|---|"]  # fmt: skip
    for label, got in found.items():
        study = next(r for r in runs if r["label"] == label and r["seed"] == SEEDS[0] and _same(r["lr"], got["lr"]))
        curve = ", ".join(f"{p['step']}: {p['val_metric']:.4f}" for p in got["val_curve"])
        best = max(got["val_curve"], key=lambda p: sign * p["val_metric"])
        lines.append(f"| {label} | {got['lr']:g} | {study['val']:.4f} / {study['test']:.4f} | {curve} | "
                     f"{best['val_metric']:.4f} ({best['step']}) / {got['test']:.4f} |")  # fmt: skip
    return lines


def plot(task: str, rows: list[dict[str, Any]], higher: bool, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        family = "lora" if row["method"] == "lora" else row["label"].split(" @")[0]
        families.setdefault(family if "+" not in row["label"] else row["label"], []).append(row)
    for family, members in families.items():
        members.sort(key=lambda r: r["params"])
        means = [statistics.mean(r["test"]) for r in members]
        errs = [statistics.stdev(r["test"]) if len(r["test"]) > 1 else 0.0 for r in members]
        if family in ("head-only", "full"):
            ax.axhline(means[0], linestyle="--", color="0.5" if family == "head-only" else "0.2",
                       label=f"{family} ({members[0]['params']:,} params)")  # fmt: skip
            continue
        ax.errorbar([r["params"] for r in members], means, yerr=errs, marker="o", capsize=3, label=family,
                    linestyle="-" if len(members) > 1 else "none")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log)", ylabel=f"test {metric}",
           title=f"{task}: test {metric} vs trainable parameters (mean ± std over seeds)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"pareto_{task}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(BUDGETS), nargs="+", default=["text-cls"])
    parser.add_argument("--no-levers", action="store_true", help="Leave out the paper's shape and the levers on it.")
    parser.add_argument("--workers", type=int, default=2, help="Runs at a time (each uses one CPU thread).")
    parser.add_argument("--report", action="store_true", help="Only write pareto.md and the plots.")
    parser.add_argument("--quick", action="store_true", help="A tiny smoke study into pareto_quick*.json.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    stem = "pareto_quick" if args.quick else "pareto"
    path, details_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}_details.json"
    if not args.report:
        for task in args.task:
            configs = configurations(task, levers=not args.no_levers and not args.quick)
            if args.quick:
                configs = {k: v for k, v in configs.items() if k in ("lora r=1", "lily 2A/2B @lora1")}
            study(task, QUICK if args.quick else BUDGETS[task], configs, path, details_path, args.workers)
            if not args.quick:
                plateau(task, path, details_path, args.workers)
    text = report(path, details_path)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
