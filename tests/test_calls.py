"""Per-call state: every forward routes with its own mask and parallel input, under checkpointing, threads, several
forwards before one backward, and direct submodule calls."""

import copy
import threading

import pytest
import torch
from torch import nn

import lily
from tests.helpers import randomize_adapter, reference_layer, tiny_bert

PARALLEL = ["intermediate>output.dense"]


def bert(parallel: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tiny_bert(num_layers=3)
    config = lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3, routing="sample",
                             parallel_modules=PARALLEL if parallel else [], parallel_r=4)  # fmt: skip
    lily.inject(model, config)
    randomize_adapter(model, seed=seed)
    return model


def padded_batches(count: int, batch: int = 3, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Batches whose masks all differ (each example has its own padding)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        ids = torch.randint(3, 64, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        for row in range(batch):
            mask[row, length - 1 - (i + row) % (length - 2) :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in lily.adapter_parameters(model).items()}


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_several_forwards_then_one_backward_with_checkpointing_gives_exact_gradients(reentrant, parallel):
    batches = padded_batches(2)
    labels = torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        model = bert(parallel).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        losses = [model(**b, labels=labels).loss for b in batches]
        sum(losses).backward()
        grads.append(adapter_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_backward_after_a_later_inference_call_uses_the_training_mask():
    """An inference forward between a training forward and its backward must not change the gradients."""
    first, second = padded_batches(2)
    labels = torch.tensor([0, 1, 2])
    grads = []
    for interleave in (False, True):
        model = bert().train()
        model.gradient_checkpointing_enable()
        loss = model(**first, labels=labels).loss
        if interleave:
            with torch.no_grad():
                model(**second)
        loss.backward()
        grads.append(adapter_grads(model))
    for k in grads[0]:
        assert torch.equal(grads[1][k], grads[0][k]), k


@pytest.mark.parametrize("parallel", [False, True])
def test_concurrent_inference_equals_sequential(parallel):
    model = bert(parallel).eval()
    batches = padded_batches(12)
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(worker: int) -> None:
        with torch.no_grad():
            for repeat in range(10):
                i = (worker * 5 + repeat) % len(batches)
                results[worker, repeat] = (i, model(**batches[i]).logits)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 120
    wrong = sum(not torch.equal(out, expected[i]) for i, out in results.values())
    assert wrong == 0


def test_direct_submodule_call_pools_over_every_position_not_the_last_mask():
    model = bert().eval()
    layer = model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(3, 8, 32)
    with torch.no_grad():
        model(**padded_batches(1)[0])  # a model call with padding must leave nothing behind
        direct = layer(x)
        unmasked = reference_layer(layer, x)
    torch.testing.assert_close(direct, unmasked, rtol=0, atol=1e-6)


def test_parallel_adapters_hold_no_activation_and_deepcopy_after_a_training_step():
    model = bert(parallel=True).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = padded_batches(1)[0]
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    optimizer.step()
    slots = [site for _, site in lily.lily_layers(model) if isinstance(site, lily.layer.ParallelSlot)]
    assert slots and not any(isinstance(v, torch.Tensor) for s in slots for v in vars(s).values())
    clone = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(clone(**batch).logits, model(**batch).logits)
    clone_slot = clone.bert.encoder.layer[0].output.dense.lily_parallel
    assert clone_slot.sink is clone.bert.encoder.layer[0].output.dense


def test_a_parallel_sink_called_alone_gets_no_update():
    model = bert(parallel=True).eval()
    dense = model.bert.encoder.layer[0].output.dense
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        model(**padded_batches(1)[0])
        assert torch.equal(dense(x), nn.functional.linear(x, dense.weight, dense.bias))


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
def test_compiled_model_has_no_graph_break_and_matches_eager_outputs_and_gradients(routing):
    import torch._dynamo

    model = bert()
    lily.inject(model, lily.LilyConfig(target_modules=["key", "value"], r=4, routing=routing), name="other")
    randomize_adapter(model)
    model.eval()
    assert len(model.lily_adapters.sibling_handles) == 2 * 3  # key and value share a matmul in each block
    batches = padded_batches(3)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batches[0])
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    compiled = torch.compile(model, backend="aot_eager")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert params and all(".other." in name for name in params)  # the active adapter's A, B and routers
    for batch in batches:  # each call routes with its own mask
        results = []
        for run in (compiled, model):
            model.zero_grad()
            logits = run(**batch).logits
            logits.pow(2).sum().backward()
            results.append((logits.detach(), {name: p.grad.clone() for name, p in params.items()}))
        (logits, grads), (eager_logits, eager_grads) = results
        torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
        for name in params:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def routed_bert(routing: str, scaling: float = 1.0) -> nn.Module:
    """A float64 tiny BERT whose query and value layers (two banks, three layers each) route with `routing`."""
    torch.manual_seed(0)
    model = tiny_bert(num_layers=3)
    lily.inject(model, lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3, routing=routing,
                                       scaling=scaling))  # fmt: skip
    randomize_adapter(model)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # deterministic in training mode, where checkpointing runs
    return model.double().train()


def loss_and_grads(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = sum(model(**b).logits.pow(2).mean() for b in batches)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in lily.adapter_parameters(model).items()}


def assert_same(result, reference) -> None:
    torch.testing.assert_close(result[0], reference[0], rtol=1e-12, atol=1e-12)
    for name, grad in reference[1].items():
        if grad is None:  # a parameter only a block without autograd used
            assert result[1][name] is None, name
        else:
            torch.testing.assert_close(result[1][name], grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("routing", ["token", "uniform"])
def test_a_banks_expert_map_is_built_once_per_call_with_the_results_of_one_per_layer(routing, monkeypatch):
    batches = padded_batches(2)
    model = routed_bert(routing, scaling=0.7)
    built = []
    build = lily.layer.expert_matrix
    monkeypatch.setattr(lily.layer, "expert_matrix", lambda *args: built.append(1) or build(*args))
    shared = loss_and_grads(model, batches)
    assert len(built) == 2 * len(batches)  # one per bank and model call, not one per layer
    monkeypatch.setattr(lily.layer, "per_call", lambda key, sources, make, device: make())
    assert_same(shared, loss_and_grads(model, batches))
    for reentrant in (False, True):  # checkpointed blocks replay after their call ended: they build their own
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        monkeypatch.setattr(lily.layer, "per_call", lily.calls.per_call)
        built.clear()
        assert_same(loss_and_grads(model, batches), shared)
        assert len(built) == 2 * len(batches) + 2 * 3 * len(batches)  # per call, then per replayed layer


def test_layers_of_one_bank_with_different_scales_keep_their_own_maps(monkeypatch):
    model = routed_bert("token")
    query = model.bert.encoder.layer[1].attention.self.query
    query.adapters[query.active].scaling = 2.5  # a public attribute: one layer scaled apart from its bank
    batches = padded_batches(1)
    kept = loss_and_grads(model, batches)
    monkeypatch.setattr(lily.layer, "per_call", lambda key, sources, make, device: make())
    assert_same(kept, loss_and_grads(model, batches))


def test_an_expert_map_is_rebuilt_under_another_grad_mode_and_after_an_in_place_change(monkeypatch):
    batches = padded_batches(1)
    model = routed_bert("token")
    first = model.bert.encoder.layer[0]
    no_grad_forward = first.forward
    first.forward = torch.no_grad()(no_grad_forward)  # the first block runs without autograd, the others with it
    shared = loss_and_grads(model, batches)
    monkeypatch.setattr(lily.layer, "per_call", lambda key, sources, make, device: make())
    assert_same(shared, loss_and_grads(model, batches))  # the later blocks' maps carry gradients to B
    del first.forward
    bank = lily.get_adapter(model).banks["query"]

    def nudge(module, args, output):
        with torch.no_grad():
            bank.B.mul_(1.5)

    first.attention.self.query.register_forward_hook(nudge)  # B changes in place after the first query layer
    with torch.no_grad():
        reference = model(**batches[0]).logits
        bank.B.div_(1.5)  # as before the reference call
        monkeypatch.setattr(lily.layer, "per_call", lily.calls.per_call)
        torch.testing.assert_close(model(**batches[0]).logits, reference, rtol=1e-12, atol=1e-12)


def test_what_a_call_keeps_is_released_when_it_returns_or_raises():
    model = routed_bert("token")
    calls = []
    model.bert.encoder.layer[1].register_forward_hook(lambda *args: calls.append(lily.calls._open_call()))
    model(**padded_batches(1)[0])
    assert calls[-1].derived == {}

    def fail(*args):
        raise RuntimeError("boom")

    model.bert.encoder.layer[2].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(**padded_batches(1)[0])
    assert calls[-1].derived == {} and lily.calls._open_call() is None


@pytest.mark.parametrize("routing", ["sample", "batch"])
def test_sample_routing_weighs_a_calls_positions_once_and_only_a_call_that_read_its_mask_tags_its_graph(
    routing, monkeypatch
):
    model = routed_bert(routing)
    made = []
    weights = lily.layer.position_weights
    monkeypatch.setattr(lily.layer, "position_weights", lambda *args: made.append(1) or weights(*args))
    out = model(**padded_batches(1)[0]).logits
    assert len(made) == (1 if routing == "sample" else 0)
    tagged = lily.calls.METADATA_KEY in out.grad_fn.metadata
    assert tagged == (routing == "sample")
