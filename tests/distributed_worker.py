"""Run by tests/test_distributed.py under torchrun (gloo, CPU): one SGD step on a tiny adapted BERT with DDP or
FSDP2, each rank on its half of the batch, then `lily.save_adapter` of the result.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py ddp OUT sample batch
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lily
from lily.distributed import fully_shard_blocks
from tests.helpers import exit_worker, randomize_adapter, tiny_bert

BATCH = 4


def adapted_bert(routing: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3, routing=routing))
    randomize_adapter(model, std=0.2)
    return model


def batch() -> dict[str, torch.Tensor]:
    """Four examples of different lengths (right padding), the same on every rank."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (BATCH, 9), generator=g)
    mask = (torch.arange(9) < torch.tensor([[9], [5], [7], [3]])).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def train_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """One SGD step on the cross-entropy to labels 0, 1, 0, 1 (a plain mean over the examples)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=50.0)  # a big step, so any gradient error shows in the weights
    logits = model(**inputs).logits
    labels = torch.arange(len(logits)) % 2
    torch.nn.functional.cross_entropy(logits, labels).backward()
    optimizer.step()


def main() -> None:
    engine, out, routings = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = BATCH // world
    inputs = {k: v[rank * share : (rank + 1) * share] for k, v in batch().items()}
    for routing in routings:
        model = adapted_bert(routing)
        # FSDP2: the shared banks (model.lily_adapters) stay in the root unit
        ddp = engine == "ddp"
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else fully_shard_blocks(model)
        train_step(wrapped, inputs)
        if engine == "ddp" and rank != 0:
            continue
        lily.save_adapter(model, out / routing)  # FSDP2: every rank gathers, rank 0 writes
    dist.barrier()  # no process exits while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()
