"""merge/unmerge: exact for input-independent routing, a clear error otherwise."""

import copy

import pytest
import torch

import lily
from lily import MergeError
from tests.helpers import BUILDERS, TARGETS, model_inputs, randomize_adapter


def adapted(family, routing):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    lily.inject(model, lily.LilyConfig(target_modules=TARGETS[family], r=4, num_A=2, num_B=3, routing=routing))
    randomize_adapter(model)
    return model


def base_weights(model):
    return {name: layer.base_layer.weight.detach().clone() for name, layer in lily.lily_layers(model)}


def logits(model, family):
    with torch.no_grad():
        return model(**model_inputs(family)).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
@pytest.mark.parametrize("routing", ["static", "uniform"])
def test_merge_keeps_outputs_and_unmerge_restores_weights(family, routing):
    model = adapted(family, routing)
    before, weights = logits(model, family), base_weights(model)
    lily.merge(model)
    assert all(layer.merged for _, layer in lily.lily_layers(model))
    merged = logits(model, family)
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)
    assert any(not torch.equal(layer.base_layer.weight, weights[n]) for n, layer in lily.lily_layers(model))
    lily.unmerge(model)
    for name, layer in lily.lily_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, family), before, rtol=0, atol=1e-5)


def test_merged_model_costs_exactly_the_base_model():
    model = adapted("llama", "static")
    lily.merge(model)
    plain = copy.deepcopy(model)
    lily.remove(plain, merge=True)  # folded for good: plain nn.Linear layers
    assert not any(True for _ in lily.lily_layers(plain))
    torch.testing.assert_close(logits(plain, "llama"), logits(model, "llama"), rtol=0, atol=0)


def test_unmerge_is_exact_even_if_the_adapter_trained_while_merged():
    model = adapted("llama", "static")
    weights = base_weights(model)
    lily.merge(model)
    randomize_adapter(model, seed=5)  # e.g. an optimizer step taken by mistake while merged
    lily.unmerge(model)
    for name, layer in lily.lily_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-6)


def test_remove_with_merge_folds_the_update():
    model = adapted("gpt2", "uniform")
    before = logits(model, "gpt2")
    lily.remove(model, merge=True)
    assert not hasattr(model, "lily_adapters")
    torch.testing.assert_close(logits(model, "gpt2"), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("routing", ["batch", "sample", "token"])
def test_data_dependent_routing_refuses_to_merge_and_says_why(routing):
    model = adapted("llama", routing)
    weights = base_weights(model)
    with pytest.raises(MergeError, match=rf"routing='{routing}' mixes the B experts per input.*'static' or 'uniform'"):
        lily.merge(model)
    with pytest.raises(MergeError):
        lily.remove(model, merge=True)
    assert all(torch.equal(layer.base_layer.weight, weights[n]) for n, layer in lily.lily_layers(model))
    assert hasattr(model, "lily_adapters")


def test_merge_refuses_a_weight_tied_to_another_module():
    torch.manual_seed(0)
    model = BUILDERS["llama"]()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    lily.inject(model, lily.LilyConfig(target_modules=["lm_head"], r=4, num_A=1, routing="static"))
    randomize_adapter(model)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    for call in (lily.merge, lambda m: lily.remove(m, merge=True)):
        with pytest.raises(MergeError, match=r"weight of 'lm_head' is shared with \['model\.embed_tokens\.weight'\]"):
            call(model)
        assert torch.equal(model.model.embed_tokens.weight, embeddings)
        assert model.lm_head.merged is None
