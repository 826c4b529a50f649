"""Diagnostics: effective ranks, expert similarity, routing statistics."""

import math

import pytest
import torch

import lily
from lily.analysis import layer_update
from tests.helpers import model_inputs, randomize_adapter, tiny_bert, tiny_llama


def test_effective_rank_of_known_matrices():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    equal = q[:, :3] @ q[:, 3:6].T  # three singular values of 1
    assert lily.effective_rank(equal) == pytest.approx({"entropy": 3.0, "numerical": 3.0})
    skewed = q[:, :2] @ torch.diag(torch.tensor([1.0, 1e-6], dtype=torch.float64)) @ q[:, 2:4].T
    assert lily.effective_rank(skewed)["numerical"] == 1.0 and 1.0 < lily.effective_rank(skewed)["entropy"] < 1.01
    assert lily.effective_rank(torch.zeros(4, 4)) == {"entropy": 0.0, "numerical": 0.0}


def test_expert_similarity():
    same = torch.ones(3, 4, 2)
    torch.testing.assert_close(lily.expert_similarity(same), torch.ones(3, 3, dtype=torch.float64))
    orthogonal = torch.eye(4).reshape(4, 2, 2)
    torch.testing.assert_close(lily.expert_similarity(orthogonal), torch.eye(4, dtype=torch.float64))


def test_routing_statistics_and_diagnostics_on_a_model():
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=["query", "value"], r=4, num_A=2, num_B=3))
    randomize_adapter(model)
    batches = [model_inputs("bert", seed=s) for s in range(2)]
    stats = lily.routing_statistics(model, batches)
    assert len(stats) == 8
    for entry in stats.values():
        assert sum(entry["mean_weights"]) == pytest.approx(1.0)
        assert 0 < entry["entropy"] <= math.log(3) + 1e-9
    report = lily.diagnostics(model, stats)
    assert report["routing"] == "sample" and len(report["layers"]) == 8
    for layer in report["layers"]:
        assert 1 <= layer["rank_numerical"] <= 4  # the update of one layer has rank <= r
    assert set(report["expert_similarity"]) == {"query", "value"}


def test_layer_update_is_what_merge_folds_in():
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj"], r=4, num_B=3, routing="static"))
    randomize_adapter(model)
    _, layer = next(iter(lily.lily_layers(model)))
    before = layer.base_layer.weight.detach().clone()
    branch = layer.adapters["default"]
    update = layer_update(branch, torch.softmax(branch.router.detach(), -1))
    lily.merge(model)
    torch.testing.assert_close(layer.base_layer.weight - before, update.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("routing", "collapsed"), [("uniform", True), ("static", False), ("sample", False)])
def test_zero_initialised_experts_stay_identical_only_under_uniform_routing(routing, collapsed):
    torch.manual_seed(0)
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=["query"], r=4, num_A=2, num_B=3, routing=routing))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = model_inputs("bert")
    for _ in range(5):
        model(**inputs, labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    similarity = lily.diagnostics(model)["expert_similarity"]["query"]["mean_off_diagonal"]
    assert (similarity > 1 - 1e-6) == collapsed, similarity
