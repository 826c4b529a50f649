"""Run by tests/test_pretrained.py under torchrun (gloo, CPU): transformers Trainer with DDP on a tiny BERT carrying a
Lily adapter, optionally resuming from a checkpoint.

    python -m torch.distributed.run --nproc_per_node 2 tests/trainer_worker.py BASE_DIR OUT [CHECKPOINT]
"""

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lily
from tests.helpers import exit_worker


def main() -> None:
    base, out, *resume = sys.argv[1:]
    model = transformers.BertForSequenceClassification.from_pretrained(base)
    lily.inject(model, lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3, routing="sample",
                                       trainable_modules=["classifier"]))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (32, 8), generator=g)
    data = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(i[0] % 3)} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, learning_rate=5e-2, seed=0, report_to=[], max_steps=4,
        save_strategy="steps", save_steps=2, logging_steps=100, use_cpu=True, ddp_backend="gloo",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    assert trainer.args.world_size == 2
    trainer.train(resume_from_checkpoint=resume[0] if resume else None)


if __name__ == "__main__":
    main()
    exit_worker()
