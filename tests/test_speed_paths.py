"""The fused forward (one matmul adds the update to the base output) keeps the reference maths for every input
layout, dtype and memory format it meets, and its gradients are the reference formula's."""

import functools

import pytest
import torch
from torch import nn

import lily
from tests.helpers import randomize_adapter, reference_delta, reference_layer

MODES = list(lily.ROUTING_MODES)


def adapted_linear(mode: str, d_in: int = 12, d_out: int = 10) -> tuple[nn.Module, lily.layer.LilyLayer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    lily.inject(model, lily.LilyConfig(target_modules=["0"], r=4, num_A=1, num_B=3, scaling=0.7, routing=mode))
    randomize_adapter(model)
    return model.double(), model[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 7, 12), (2, 3, 4, 12)], ids=["1d", "2d", "3d", "4d"])
def test_every_input_layout_matches_the_reference(mode, shape):
    """Tokens are all leading positions; "sample" pools each example (first dim) over the positions after it."""
    _, layer = adapted_linear(mode)
    x = torch.randn(shape, dtype=torch.float64)
    as_examples = x.reshape(1 if x.dim() == 1 else x.shape[0], -1, x.shape[-1])  # (examples, positions, d_in)
    with torch.no_grad():
        out = layer(x)
        expected = reference_layer(layer, as_examples).reshape(*shape[:-1], -1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_the_reference_formula(mode):
    _, layer = adapted_linear(mode)
    branch = layer.adapters["default"]
    bank = branch.bank
    params = [p for p in (bank.A[0], bank.B, branch.router) if p is not None]
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 10, dtype=torch.float64)
    grads = torch.autograd.grad(((layer(x) - target) ** 2).sum(), [x, *params])
    expected = layer.base_layer(x) + branch.scaling * reference_delta(x, bank.A[0], bank.B, branch.router, mode)
    expected_grads = torch.autograd.grad(((expected - target) ** 2).sum(), [x, *params])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_a_base_output_in_another_dtype_keeps_its_dtype_and_gets_the_float32_update(mode):
    """A base layer computing in bfloat16 (like a quantized one): the float32 update is added to its output,
    rounded to bfloat16 once."""
    model, layer = adapted_linear(mode)
    model.float()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(2, 6, 12)
    out = layer(x.bfloat16())
    branch, bank = layer.adapters["default"], layer.adapters["default"].bank
    with torch.no_grad():
        update = branch.scaling * reference_delta(x.bfloat16().float(), bank.A[0], bank.B, branch.router, mode)
        expected = (layer.base_layer(x.bfloat16()).float() + update).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.detach(), expected, rtol=2**-7, atol=0)  # one bfloat16 rounding step
    out.float().sum().backward()
    assert bank.B.grad.dtype == torch.float32 and torch.isfinite(bank.B.grad).all()


@pytest.mark.parametrize("mode", MODES)
def test_cpu_autocast_computes_in_bfloat16_and_trains_float32_parameters(mode):
    """Forward and backward: the bfloat16 results are the float32 ones up to bfloat16 rounding."""
    model, _ = adapted_linear(mode)
    model.float()
    trained = list(lily.adapter_parameters(model).values())
    x = torch.randn(2, 6, 12)
    full = model(x)
    full_grads = torch.autograd.grad(full.sum(), trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in trained)
    for p, want in zip(trained, full_grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("mode", MODES)
def test_an_in_place_op_may_follow_an_adapted_layer(mode):
    """E.g. `nn.ReLU(inplace=True)` after an adapted Linear (torchvision's VGG): the output is no view made
    inside an autograd node, so modifying it in place is legal and its gradient is the reference one."""
    model, layer = adapted_linear(mode)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    torch.relu_(model(x)).sum().backward()
    want = torch.autograd.grad(torch.relu(reference_layer(layer, x)).sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_ad_vmap_and_func_grad_give_the_reference_results(mode):
    _, layer = adapted_linear(mode)
    x, tangent = torch.randn(2, 2, 5, 12, dtype=torch.float64).unbind(0)
    reference = functools.partial(reference_layer, layer)
    got = torch.func.jvp(layer, (x,), (tangent,))  # forward mode
    want = torch.autograd.functional.jvp(reference, x, tangent)  # reverse mode twice, on the reference maths
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(layer)(x), torch.stack([layer(row) for row in x]))
    got = torch.func.grad(lambda inputs: layer(inputs).sum())(x)
    want = torch.autograd.grad(reference(x.requires_grad_()).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_adapted_conv_keeps_the_memory_format_of_its_base_output(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    lily.inject(model, lily.LilyConfig(target_modules=["0"], r=4, num_A=1, num_B=2, routing="token"))
    randomize_adapter(model)
    x = torch.randn(2, 3, 6, 5)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
        base = model[0].base_layer(x)
    assert out.shape == base.shape and out.stride() == base.stride()
