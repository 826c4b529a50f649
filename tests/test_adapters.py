"""Several named adapters on one base model: add, switch, disable, save/load by name, delete."""

import copy

import pytest
import torch
from torch import nn

import lily
from lily import InjectionError, MergeError
from tests.helpers import model_inputs, randomize_adapter, tiny_bert, tiny_llama

QV = lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_A=2, num_B=3, routing="token")
Q_STATIC = lily.LilyConfig(target_modules=["q_proj"], r=8, num_A=1, num_B=2, routing="static")


def logits(model):
    with torch.no_grad():
        return model(**model_inputs("llama")).logits


def two_adapters():
    """A tiny Llama with adapter "a" (q and v, token routing) and "b" (q only, its own sharing), both random."""
    torch.manual_seed(0)
    base = tiny_llama()
    model = copy.deepcopy(base)
    lily.inject(model, QV, name="a")
    randomize_adapter(model, seed=1)
    lily.inject(model, Q_STATIC, name="b")
    randomize_adapter(model, seed=2)
    return base, model


def single(base, config, model, name):
    """A fresh copy of `base` with only adapter `name`'s weights from `model`."""
    alone = lily.inject(copy.deepcopy(base), config)
    with torch.no_grad():
        for mine, theirs in zip(lily.adapter_parameters(alone).values(),
                                lily.adapter_parameters(model, name).values(), strict=True):  # fmt: skip
            mine.copy_(theirs)
    return alone


def test_each_adapter_runs_as_if_it_were_alone():
    base, model = two_adapters()
    assert lily.adapter_names(model) == ["a", "b"] and lily.get_adapter(model).name == "b"  # inject activates
    layer = model.model.layers[0].self_attn
    assert set(layer.q_proj.adapters) == {"a", "b"} and set(layer.v_proj.adapters) == {"a"}
    torch.testing.assert_close(logits(model), logits(single(base, Q_STATIC, model, "b")), rtol=0, atol=1e-6)
    lily.set_adapter(model, "a")
    torch.testing.assert_close(logits(model), logits(single(base, QV, model, "a")), rtol=0, atol=1e-6)
    assert lily.count_parameters(model, "a") == lily.count_parameters(single(base, QV, model, "a"))
    assert lily.count_parameters(model, "b") == 1 * 32 * 8 + 2 * 8 * 32 + 4 * 2  # 1 A, 2 experts, 4 static routers


def test_only_the_active_adapter_trains():
    _, model = two_adapters()
    lily.set_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lily.adapter_parameters(model, "a"))
    frozen_b = {n: p.detach().clone() for n, p in lily.adapter_parameters(model, "b").items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**model_inputs("llama")).logits.sum().backward()
    opt.step()
    assert all(torch.equal(p, frozen_b[n]) for n, p in lily.adapter_parameters(model, "b").items())


def test_an_adapter_loaded_for_inference_stays_frozen_when_activated_again(tmp_path):
    """load_adapter(is_trainable=False) freezes the adapter for good: switching away and back (or adding another
    adapter) does not make it trainable; set_adapter(inference_mode=False) does, True freezes a trained one."""
    _, model = two_adapters()
    lily.save_adapter(model, tmp_path / "b", name="b")
    lily.delete_adapter(model, "b")
    lily.load_adapter(model, tmp_path / "b", name="b")

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == set()
    lily.set_adapter(model, "a")
    assert trainable() == set(lily.adapter_parameters(model, "a"))
    lily.set_adapter(model, "b")
    assert trainable() == set()
    lily.set_adapter(model, "b", inference_mode=False)
    assert trainable() == set(lily.adapter_parameters(model, "b"))
    lily.set_adapter(model, "a", inference_mode=True)
    assert trainable() == set()
    lily.set_adapter(model, "b")
    assert trainable() == set(lily.adapter_parameters(model, "b"))
    lily.load_adapter(model, tmp_path / "b", name="c", is_trainable=True)
    assert trainable() == set(lily.adapter_parameters(model, "c"))


def test_disable_runs_the_base_model_bit_identically():
    base, model = two_adapters()
    adapted = logits(model)
    with lily.disable_adapters(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)


def test_disable_unmerges_a_merged_adapter_and_merges_it_again():
    base, model = two_adapters()
    lily.merge(model)  # "b" is static: mergeable
    merged = logits(model)
    with lily.disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-5)
        with pytest.raises(MergeError, match="disabled"):
            lily.merge(model)
    assert all(layer.merged == "b" for _, layer in lily.lily_layers(model) if "b" in layer.adapters)
    torch.testing.assert_close(logits(model), merged, rtol=0, atol=1e-6)


def test_switching_away_from_a_merged_adapter_is_refused():
    _, model = two_adapters()
    lily.merge(model)
    with pytest.raises(MergeError, match=r"'b' is merged .* lily.unmerge"):
        lily.set_adapter(model, "a")
    with pytest.raises(MergeError, match="unmerge"):
        lily.inject(model, QV, name="c")
    lily.unmerge(model)
    lily.set_adapter(model, "a")


def test_save_and_load_by_name(tmp_path):
    base, model = two_adapters()
    lily.save_adapter(model, tmp_path / "a", name="a")
    lily.save_adapter(model, tmp_path / "b")  # the active one
    lily.set_adapter(model, "a")
    expected_a = logits(model)
    fresh = copy.deepcopy(base)
    lily.load_adapter(fresh, tmp_path / "b", name="first")
    lily.load_adapter(fresh, tmp_path / "a", name="second")
    assert torch.equal(logits(fresh), expected_a)
    with pytest.raises(lily.CheckpointError, match="already has an adapter named 'first'"):
        lily.load_adapter(fresh, tmp_path / "a", name="first")
    assert lily.adapter_names(fresh) == ["first", "second"] and lily.get_adapter(fresh).name == "second"


def test_delete_adapter_restores_layers_only_it_adapted():
    base, model = two_adapters()
    lily.set_adapter(model, "b")
    lily.delete_adapter(model, "a")
    assert lily.get_adapter(model).name == "b"
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear  # only "a" adapted v
    torch.testing.assert_close(logits(model), logits(single(base, Q_STATIC, model, "b")), rtol=0, atol=1e-6)
    lily.delete_adapter(model, "b")  # the last one: the base model comes back
    assert not hasattr(model, "lily_adapters") and torch.equal(logits(model), logits(base))


def test_deleting_the_active_adapter_activates_the_first_remaining():
    _, model = two_adapters()
    lily.delete_adapter(model, "b")
    assert lily.get_adapter(model).name == "a"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lily.adapter_parameters(model))


def test_trainable_modules_belong_to_one_adapter():
    model = tiny_bert()
    head = dict(trainable_modules=["classifier"])
    lily.inject(model, lily.LilyConfig(target_modules=["query"], r=4, **head), name="a")
    with pytest.raises(InjectionError, match=r"'classifier' .* already trained by adapter 'a'"):
        lily.inject(model, lily.LilyConfig(target_modules=["value"], r=4, **head), name="b")
    lily.inject(model, lily.LilyConfig(target_modules=["value"], r=4), name="b")
    assert not model.classifier.weight.requires_grad  # "a" is inactive
    lily.set_adapter(model, "a")
    assert model.classifier.weight.requires_grad


@pytest.mark.parametrize("name", ["", "has.dot", "3d", "active", "hook_handles"])
def test_bad_adapter_names_are_refused(name):
    with pytest.raises(InjectionError, match="must be a Python identifier"):
        lily.inject(tiny_llama(), QV, name=name)


def test_unknown_adapter_name_is_named():
    _, model = two_adapters()
    with pytest.raises(InjectionError, match=r"no Lily adapter named 'c'; it has \['a', 'b'\]"):
        lily.set_adapter(model, "c")
