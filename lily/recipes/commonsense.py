"""Commonsense reasoning on LLaMA-family decoders: q/k/v adapters, commonsense_170k, 8 sets scored by generation.

The paper's settings (`commonsense-reasoning/finetune_llama.sh` of the official code, built on
LLM-Adapters): Meta-Llama-3-8B, Lily on q, k and v with r = 16 and ne_1 = ne_2 = 4 (A groups and B
experts), scale 1; batch 16 as micro-batch 4 x 4 accumulation steps, 3 epochs, lr 3e-4 (AdamW, linear
decay) after 100 warm-up steps, sequences cut at 256 tokens, the Alpaca prompt template, 120 held-out
examples for validation (checked every 200 steps; the best checkpoint by loss is kept). Evaluation: each
of BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA in LLM-Adapters' `dataset/<set>/test.json`,
an answer generated with 4 beams and at most 32 new tokens, the first option word in it (`true`,
`solution2`, `answer3`, ...) compared with the record's `answer`.

Differences, stated: routing is per token ("token"), so no position sees later tokens and cached
generation equals a full forward (the paper's code averages the router over the batch and the sequence);
the loss covers the response tokens only (LLM-Adapters also trains on the prompt by default); the
evaluation prompt is the training template (LLM-Adapters' evaluation copy of it is indented); the
pretrained weights load in bfloat16 under bf16 autocast, Lily's tensors in float32 (the paper uses fp16).

    lily recipe commonsense --data commonsense_170k.json --output-dir out/llama3   # zwhe99/commonsense_170k
    python -m lily.recipes.commonsense evaluate out/llama3 --data LLM-Adapters/dataset
    lily recipe commonsense --model smollm2 --data commonsense-mini ...            # the hand-written analogue
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from lily import assets
from lily.errors import DataError, LilyError
from lily.train.data import record_prompt
from lily.train.files import read_records, require_columns

DEFAULTS: dict[str, Any] = {
    "task": "causal-lm",
    "method": "lily",
    "model": "meta-llama/Meta-Llama-3-8B",
    "data": "zwhe99/commonsense_170k",
    "prompt_style": "alpaca",
    "prompt_column": "instruction",
    "input_column": "input",
    "response_column": "output",
    "targets": ["q_proj", "k_proj", "v_proj"],
    "r": 16,
    "num_A": 4,
    "num_B": 4,
    "scaling": 1.0,
    "routing": "token",
    "lr": 3e-4,
    "weight_decay": 0.0,
    "warmup_steps": 100,
    "schedule": "linear",
    "epochs": 3,
    "batch_size": 4,
    "grad_accum": 4,
    "max_length": 256,
    "model_dtype": "bfloat16",
    "mixed_precision": "bf16",
    "eval_every": 200,
    "val_fraction": 0.001,
    "test_fraction": 0.001,
    "max_train_samples": None,
    "max_eval_samples": 120,
    "max_test_samples": 1000,
}
"""`lily train` options of the recipe. Validation and test are carved from the training file (0.1 % each,
validation capped at the paper's 120); the test perplexity is on held-out training-format examples, the
benchmark score comes from `evaluate`."""

RECIPES = {"commonsense": DEFAULTS}

SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
"""The 8 evaluation sets, under their LLM-Adapters folder names."""

ANSWER_WORDS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
"""The option words LLM-Adapters' evaluation looks for in a generated answer, per set."""

PAPER = {"boolq": 72.9, "piqa": 85.6, "social_i_qa": 77.8, "hellaswag": 92.7, "winogrande": 83.3,
         "ARC-Easy": 89.7, "ARC-Challenge": 77.6, "openbookqa": 82.8}  # fmt: skip
"""The paper's Lily accuracies on LLaMA3-8B (x 100; average 82.8)."""

RESULTS_FILE = "commonsense.json"


def answer_words(set_name: str, instruction: str) -> tuple[str, ...]:
    """The option words of a set: LLM-Adapters' table for the 8 sets, else the instruction's 'Answer format: a/b'."""
    if set_name in ANSWER_WORDS:
        return ANSWER_WORDS[set_name]
    found = re.search(r"Answer format:\s*(\S+)", instruction)
    if not found:
        raise DataError(f"set '{set_name}' is not one of {SETS} and its instruction names no 'Answer format: a/b'.")
    return tuple(found.group(1).split("/"))


def extract_answer(text: str, words: tuple[str, ...]) -> str:
    """The first option word in a generated answer, as LLM-Adapters extracts it ('' when there is none)."""
    found = re.findall("|".join(re.escape(w) for w in words), text.strip())
    return found[0] if found else ""


def read_set(data_dir: Path, set_name: str) -> list[dict[str, Any]]:
    """The records of `<data_dir>/<set>/test.json` (instruction, input, output, answer)."""
    path = data_dir / set_name / "test.json"
    if not path.is_file():
        raise DataError(f"evaluation set '{set_name}' not found: expected {path} (LLM-Adapters' dataset/ layout).")
    rows = read_records(path)
    require_columns(rows, ["instruction", "answer"], str(path))
    return rows


def evaluate(run_dir: str | Path, data: str | Path, sets: list[str] | None = None, num_beams: int = 4,
             max_new_tokens: int = 32, batch_size: int = 8, limit: int | None = None,
             base: bool = False, log=print) -> dict[str, Any]:  # fmt: skip
    """Accuracy per set of a finished run (or, with `base`, of its model without the adapter), written with every
    prediction to `<run_dir>/commonsense.json` (`commonsense-base.json` for `base`)."""
    from contextlib import nullcontext

    import lily
    from lily.train.outputs import write_json_atomic
    from lily.train.runs import load_run

    data_dir = assets.COMMONSENSE_MINI if str(data) == "commonsense-mini" else Path(data)
    sets = sets or [s for s in SETS if (data_dir / s / "test.json").is_file()]
    if not sets:
        raise DataError(f"{data_dir} holds none of the evaluation sets {SETS} as <set>/test.json.")
    records = {name: read_set(data_dir, name)[:limit] for name in sets}
    task = load_run(run_dir)
    if task.cfg.task != "causal-lm":
        raise DataError(f"run {run_dir} is a {task.cfg.task} run; commonsense evaluation needs a causal-lm run.")
    if base and task.cfg.method != "lily":
        raise DataError("--base needs a Lily run (its adapter is switched off to score the base model).")
    results: dict[str, Any] = {"run": str(run_dir), "data": str(data_dir), "adapter": not base,
                               "num_beams": num_beams, "max_new_tokens": max_new_tokens, "sets": {}}  # fmt: skip
    with lily.disable_adapters(task.model) if base else nullcontext():
        for name, rows in records.items():
            prompts = [record_prompt(r["instruction"], r.get("input")) for r in rows]
            replies = task.generate(task.model, prompts, max_new_tokens, num_beams, batch_size, progress=name)
            predictions = [extract_answer(reply, answer_words(name, r["instruction"]))
                           for reply, r in zip(replies, rows, strict=True)]  # fmt: skip
            correct = sum(p == str(r["answer"]) for p, r in zip(predictions, rows, strict=True))
            scored = [{"answer": r["answer"], "reply": reply, "prediction": p}
                      for r, reply, p in zip(rows, replies, predictions, strict=True)]  # fmt: skip
            results["sets"][name] = {"accuracy": correct / len(rows), "examples": len(rows), "predictions": scored}
            log(f"{name:<14} {correct / len(rows):.4f}  ({correct}/{len(rows)})")
    results["average"] = sum(s["accuracy"] for s in results["sets"].values()) / len(results["sets"])
    log(f"{'average':<14} {results['average']:.4f}")
    write_json_atomic(Path(run_dir) / ("commonsense-base.json" if base else RESULTS_FILE), results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Commonsense-reasoning evaluation (LLM-Adapters protocol).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="score a finished run on the evaluation sets")
    run.add_argument("run_dir", help="the --output-dir of a finished `lily recipe commonsense` run")
    run.add_argument("--data", required=True,
                     help="LLM-Adapters' dataset/ folder (<set>/test.json), or commonsense-mini")  # fmt: skip
    run.add_argument("--sets", nargs="+", help=f"sets to score (default: those of {SETS} present)")
    run.add_argument("--num-beams", type=int, default=4)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    run.add_argument("--limit", type=int, help="score at most this many examples per set")
    run.add_argument("--base", action="store_true", help="score the model without the adapter")
    args = parser.parse_args(argv)
    try:
        evaluate(args.run_dir, args.data, args.sets, args.num_beams, args.max_new_tokens, args.batch_size,
                 args.limit, args.base)  # fmt: skip
    except LilyError as exc:
        print(f"commonsense evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
