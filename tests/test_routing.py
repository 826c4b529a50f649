"""Routing semantics: batch/padding invariance of "sample", leak-freedom and KV-cache exactness of "token"."""

import pytest
import torch

import lily
from tests.helpers import model_inputs, randomize_adapter, tiny_bert, tiny_llama


def adapted(builder, targets, routing, seed=0):
    torch.manual_seed(seed)
    model = builder()
    lily.inject(model, lily.LilyConfig(target_modules=targets, r=4, num_A=2, num_B=3, routing=routing))
    randomize_adapter(model)
    return model


def bert_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def test_sample_routing_is_batch_invariant():
    model = adapted(tiny_bert, ["query", "value"], "sample")
    inputs = model_inputs("bert", batch=4)
    together, _ = bert_outputs(model, inputs["input_ids"], inputs["attention_mask"])
    for i in range(4):
        alone, _ = bert_outputs(model, inputs["input_ids"][i : i + 1], inputs["attention_mask"][i : i + 1])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad_to", [9, 16])
def test_sample_routing_is_padding_invariant(pad_to):
    model = adapted(tiny_bert, ["query", "value"], "sample")
    ids = model_inputs("bert", batch=1, length=6)["input_ids"]
    logits, hidden = bert_outputs(model, ids, torch.ones_like(ids))
    padded = torch.cat([ids, torch.zeros(1, pad_to - 6, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=ids.dtype), torch.zeros(1, pad_to - 6, dtype=ids.dtype)], dim=1)
    padded_logits, padded_hidden = bert_outputs(model, padded, mask)
    torch.testing.assert_close(padded_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_hidden[:, :6], hidden, rtol=1e-5, atol=1e-6)


def test_attention_mask_given_by_position_is_used():
    model = adapted(tiny_bert, ["query", "value"], "sample")
    ids = model_inputs("bert", batch=1, length=6)["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=ids.dtype), torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        by_position = model(padded, mask).logits
        by_keyword = model(input_ids=padded, attention_mask=mask).logits
    assert torch.equal(by_position, by_keyword)


def test_batch_routing_couples_examples_as_in_the_paper_code():
    model = adapted(tiny_bert, ["query", "value"], "batch")
    inputs = model_inputs("bert", batch=4)
    together, _ = bert_outputs(model, inputs["input_ids"], inputs["attention_mask"])
    alone, _ = bert_outputs(model, inputs["input_ids"][:1], inputs["attention_mask"][:1])
    assert not torch.allclose(alone[0], together[0], rtol=1e-5, atol=1e-6)


def changed_future(model):
    """Largest change of the logits at positions 0..4 when only tokens 5.. change."""
    ids = model_inputs("llama", batch=2, length=9)["input_ids"]
    other = ids.clone()
    other[:, 5:] = (other[:, 5:] + 7) % 61 + 3
    with torch.no_grad():
        a = model(input_ids=ids).logits[:, :5]
        b = model(input_ids=other).logits[:, :5]
    return (a - b).abs().max().item()


def test_token_routing_never_lets_a_position_see_later_tokens():
    assert changed_future(adapted(tiny_llama, ["q_proj", "v_proj"], "token")) == 0.0


@pytest.mark.parametrize("routing", ["sample", "batch"])
def test_pooled_routing_leaks_future_tokens_in_a_causal_model(routing):
    assert changed_future(adapted(tiny_llama, ["q_proj", "v_proj"], routing)) > 1e-4


def test_kv_cache_generation_equals_full_forward_with_default_routing():
    torch.manual_seed(0)
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, num_B=3))
    assert lily.get_adapter(model).routing == "token"
    randomize_adapter(model)
    prompt = model_inputs("llama", batch=2, length=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **kwargs)
        uncached = model.generate(**prompt, use_cache=False, **kwargs)
        full = model(input_ids=cached.sequences).logits
    assert torch.equal(cached.sequences, uncached.sequences)
    step_logits = torch.stack(cached.logits, dim=1)  # logits that chose each new token
    torch.testing.assert_close(step_logits, full[:, 4:-1], rtol=1e-5, atol=1e-5)
