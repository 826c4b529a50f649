"""Multi-process training on CPU (gloo, 2 processes): DDP and FSDP2 agree with one process on the whole batch."""

from pathlib import Path

import torch

import lily
from lily.adapter import saved_parameters
from lily.io import read_adapter_tensors
from tests.distributed_worker import adapted_bert, batch, train_step
from tests.helpers import torchrun

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(engine: str, out: Path, *routings: str) -> None:
    torchrun(str(WORKER), engine, str(out), *routings)


def single_process(routing: str, tmp_path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The same step in one process on the concatenated batch; the model and its saved tensors."""
    model = adapted_bert(routing)
    train_step(model, batch())
    lily.save_adapter(model, tmp_path / f"single-{routing}")
    return model, read_adapter_tensors(tmp_path / f"single-{routing}")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_step_equals_one_process_for_sample_routing_and_not_for_batch(tmp_path):
    launch("ddp", tmp_path, "sample", "batch")
    untrained = {n: p.detach() for n, p in saved_parameters(adapted_bert("sample")).items()}
    _, sample = single_process("sample", tmp_path)
    assert max_difference(read_adapter_tensors(tmp_path / "sample"), sample) < 1e-6
    assert max_difference(sample, untrained) > 1e-3  # the step did move the weights
    _, pooled = single_process("batch", tmp_path)
    # "batch" pools the router over each process's own examples, so the split changes the result
    assert max_difference(read_adapter_tensors(tmp_path / "batch"), pooled) > 1e-5


def test_fsdp2_trains_and_saves_an_adapter_that_loads_in_one_process(tmp_path):
    launch("fsdp", tmp_path, "token")
    reference, expected = single_process("token", tmp_path)
    assert max_difference(read_adapter_tensors(tmp_path / "token"), expected) < 1e-6
    torch.manual_seed(0)
    loaded = lily.load_adapter(lily.remove(adapted_bert("token")), tmp_path / "token")
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, rtol=0, atol=1e-6)
