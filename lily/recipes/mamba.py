"""Commonsense reasoning on Falcon-Mamba: in_proj adapters, commonsense_170k, 8 sets scored by generation.

The paper's settings (`commonsense-reasoning/finetune_mamba.sh` and `finetune_mamba.py` of the official code):
tiiuae/falcon-mamba-7b, Lily on `in_proj` (the input projection of every Mamba mixer, 4096 -> 16384 on 64 layers)
with r = 40 and ne_1 = ne_2 = 4 (16 layers per A), scale 1 (the code ignores it); batch 16 as micro-batch 4 x 4
accumulation steps, 1 epoch, lr 5e-4 after 100 warm-up steps, linear decay, sequences cut at 256 tokens, 120
held-out examples checked every 200 steps. That is 3,287,040 adapter parameters, the paper's "Lily (in) 3.3M".
Everything else (data, Alpaca prompts, the evaluation with 4 beams) is the LLaMA recipe's, `lily.recipes.commonsense`:

    lily recipe mamba-commonsense --data commonsense_170k.json --output-dir out/falcon-mamba
    python -m lily.recipes.commonsense evaluate out/falcon-mamba --data LLM-Adapters/dataset

It runs on transformers' `FalconMambaForCausalLM` and `MambaForCausalLM` (any model whose mixers have `in_proj`).
Differences, stated: those of the LLaMA recipe (per-token routing, so cached generation equals a full forward;
the loss on the response only; bf16 weights); and the paper's Mamba evaluation matches option words
case-insensitively, where `evaluate` is case-sensitive as the paper's LLaMA evaluation is.
"""

from __future__ import annotations

from typing import Any

from lily.recipes.commonsense import DEFAULTS as COMMONSENSE

DEFAULTS: dict[str, Any] = {
    **COMMONSENSE,
    "model": "tiiuae/falcon-mamba-7b",
    "targets": ["in_proj"],
    "r": 40,
    "lr": 5e-4,
    "epochs": 1,
}
"""`lily train` options of the recipe: the LLaMA commonsense recipe's, with the Falcon-Mamba script's changes."""

RECIPES = {"mamba-commonsense": DEFAULTS}

PAPER = {"lily_in": 59.5, "lily_delta_in": 57.0, "lora": 32.7}
"""The paper's 8-set average accuracies on Falcon-Mamba-7B (x 100; a third-party note, per-set numbers not
available): Lily on in_proj (3.3M parameters, this recipe), Lily on in_proj and the dt projection (3.7M), LoRA
(3.7M)."""

PAPER_PARAMETERS = 3_287_040
"""Lily's adapter size with this recipe on Falcon-Mamba-7B: 4 A of 4096 x 40, 4 B of 40 x 16384, 64 routers of
40 x 4."""
