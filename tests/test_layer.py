"""The adapted layer computes exactly y = W x + s * (x A^T) * sum_e w_e B_e^T, for every routing mode."""

import pytest
import torch

import lily
from tests.helpers import (
    BUILDERS,
    TARGETS,
    capture_layer_io,
    mlp_stack,
    model_inputs,
    randomize_adapter,
    reference_delta,
    reference_layer,
)

MODES = list(lily.ROUTING_MODES)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("mode", MODES)
def test_every_layer_matches_reference_formula(family, mode):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    cfg = lily.LilyConfig(target_modules=TARGETS[family], r=4, num_A=2, num_B=3, scaling=0.7, routing=mode)
    lily.inject(model, cfg)
    randomize_adapter(model)
    model.double()
    inputs = model_inputs(family)
    if "attention_mask" in inputs:
        inputs["attention_mask"][0, -3:] = 0  # one padded example: "sample" must leave those positions out
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    records = capture_layer_io(model, **inputs)
    assert len(records) == sum(1 for _ in lily.lily_layers(model))
    mask = inputs.get("attention_mask") if mode == "sample" and family != "vit" else None
    for layer, x, out in records:
        if x.dim() == 3 and mask is not None and x.shape[:2] == mask.shape:
            expected = reference_layer(layer, x, mask)
        else:
            expected = reference_layer(layer, x)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_plain_stack_end_to_end_matches_reference(mode):
    model = mlp_stack(width=16, depth=6)
    base = [block[0] for block in model]
    cfg = lily.LilyConfig(target_modules=r"\d+\.0", r=5, num_A=3, num_B=4, scaling=1.3, routing=mode)
    lily.inject(model, cfg)
    randomize_adapter(model)
    model.double()
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    expected = x
    bank = lily.get_adapter(model).banks["layer"]
    for i, (linear, block) in enumerate(zip(base, model, strict=False)):
        layer = block[0]
        delta = reference_delta(expected, bank.A[i // 2], bank.B, layer.adapters["default"].router, mode)
        expected = torch.tanh(linear(expected) + 1.3 * delta)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_fresh_adapter_equals_base_model():
    model = BUILDERS["llama"]()
    inputs = model_inputs("llama")
    with torch.no_grad():
        before = model(**inputs).logits
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=8, num_B=4))
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)


def test_dropout_applies_to_adapter_input_in_training_only():
    model = mlp_stack(width=8, depth=2)
    cfg = lily.LilyConfig(target_modules=r"\d+\.0", r=4, num_A=1, num_B=2, dropout=0.5, routing="batch")
    lily.inject(model, cfg)
    randomize_adapter(model)
    x = torch.randn(3, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x))
