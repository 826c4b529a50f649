"""GLUE on RoBERTa: q/v adapters, per-task settings of the paper's run script, best epoch on the dev set.

The paper's settings (`natural-language-understanding/run.sh` and `glue.py` of the official code, built on
FourierFT's GLUE scripts): RoBERTa-base, Lily on attention query and value with dim (r) 32 and one `ne`
for both the A groups and the B experts; AdamW without weight decay, a separate learning rate for the
classification head, linear schedule with 6 % warm-up, sequences up to 512 tokens, seed 0; validation on
the dev set after every epoch and the best epoch's dev score reported (MCC for CoLA, Pearson for STS-B,
accuracy otherwise). The model's widths and depth are read from the model, so RoBERTa-large runs as is
(the paper's code hard-codes 768 and 12 layers).

Data: the Hub's `nyu-mll/glue` (the default; its configuration is set per task) or a GLUE task folder as
the official download script writes it (train.tsv and dev.tsv; CoLA's files have no header row).

Differences, stated: routing is per sequence ("sample"); the paper's code averages the router over the
whole batch and its padding ("batch"), which makes a sentence's prediction depend on its batch-mates.

    lily recipe glue-rte --output-dir out/rte                      # RoBERTa-base and GLUE from the Hub
    lily recipe glue-cola --model FacebookAI/roberta-large --data glue_data/CoLA --output-dir out/cola-large
"""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = {
    "task": "text-cls",
    "method": "lily",
    "model": "FacebookAI/roberta-base",
    "data": "nyu-mll/glue",
    "targets": ["query|q_proj", "value|v_proj"],
    "r": 32,
    "routing": "sample",
    "weight_decay": 0.0,
    "warmup_ratio": 0.06,
    "schedule": "linear",
    "max_length": 512,
    "seed": 0,
    "test_split": "validation",
    "select_on_test": True,
    "max_train_samples": None,
    "max_eval_samples": None,
    "max_test_samples": None,
}

SETTINGS = {
    #        ne  scale  head_lr  lr     epochs batch
    "cola": (4, 0.01, 5e-3, 5e-3, 100, 64),
    "mrpc": (2, 0.1, 5e-3, 5e-3, 100, 50),
    "qnli": (2, 0.01, 5e-3, 5e-3, 40, 32),
    "rte": (3, 0.1, 5e-3, 5e-3, 100, 32),
    "sst2": (2, 0.01, 1e-2, 5e-3, 40, 32),
    "stsb": (2, 0.1, 1e-2, 5e-3, 100, 64),
}
"""Per task, from the paper's run.sh: ne (A groups = B experts), scale s, head lr, adapter lr, epochs, batch."""

COLUMNS: dict[str, dict[str, Any]] = {
    "cola": {"text_column": "sentence", "columns": ["source", "label", "original_label", "sentence"], "metric": "mcc"},
    "mrpc": {"text_column": "sentence1|#1 String", "text_pair_column": "sentence2|#2 String", "label_column":
             "label|Quality"},
    "qnli": {"text_column": "question", "text_pair_column": "sentence"},
    "rte": {"text_column": "sentence1", "text_pair_column": "sentence2"},
    "sst2": {"text_column": "sentence"},
    "stsb": {"task": "text-reg", "text_column": "sentence1", "text_pair_column": "sentence2", "label_column":
             "label|score", "metric": "pearson"},
}  # fmt: skip
"""Where each task's texts and labels are, in the Hub's columns or (after the '|') the GLUE .tsv files' columns."""

PAPER = {"sst2": 95.0, "mrpc": 90.2, "cola": 66.0, "qnli": 92.5, "rte": 81.6, "stsb": 90.8}
"""The paper's RoBERTa-base dev scores (x 100; MRPC as accuracy)."""


def _recipe(name: str) -> dict[str, Any]:
    ne, scale, head_lr, lr, epochs, batch = SETTINGS[name]
    return {**COMMON, "dataset_config": name, "num_A": ne, "num_B": ne, "scaling": scale, "head_lr": head_lr,
            "lr": lr, "epochs": epochs, "batch_size": batch, **COLUMNS[name]}  # fmt: skip


RECIPES = {f"glue-{name}": _recipe(name) for name in SETTINGS}


def _describe(name: str) -> str:
    ne, scale, head_lr, lr, epochs, batch = SETTINGS[name]
    metric = COLUMNS[name].get("metric", "accuracy")
    return (f"GLUE {name} on RoBERTa, q/v: ne {ne}, s {scale}, lr {lr:g} (head {head_lr:g}), {epochs} epochs, batch "
            f"{batch}, best dev {metric}.")  # fmt: skip


DESCRIPTIONS = {f"glue-{name}": _describe(name) for name in SETTINGS}
