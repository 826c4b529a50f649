"""The fused forward (one matmul adds the update to the base output) keeps the reference maths for every input
layout, dtype and memory format it meets, and its gradients are the reference formula's."""

import copy
import functools

import pytest
import torch
import transformers
from torch import nn

import lily
from tests.helpers import randomize_adapter, reference_delta, reference_layer, tiny_llama

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


QKV_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_with_siblings(mode: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(num_layers=2)
    config = lily.LilyConfig(target_modules=QKV_MLP, r=4, num_A=2, num_B=3, routing=mode, dropout=dropout)
    lily.inject(model, config)
    randomize_adapter(model)
    return model.double()


def down_matmuls(monkeypatch: pytest.MonkeyPatch, run) -> list[int]:
    """The rows of A in each A matmul (`lily.layer.linear_down` call) that `run()` makes, in order."""
    rows = []
    original = lily.layer.linear_down

    def counted(x, a):
        rows.append(a.shape[0])
        return original(x, a)

    monkeypatch.setattr(lily.layer, "linear_down", counted)
    run()
    monkeypatch.setattr(lily.layer, "linear_down", original)
    return rows


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    ids = torch.tensor([[5, 9, 2, 7, 7, 1], [3, 3, 8, 1, 0, 4]])
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in lily.adapter_parameters(model).items()}


@pytest.mark.parametrize("mode", MODES)
def test_siblings_reading_one_input_share_one_down_matmul_with_the_same_results(mode, monkeypatch):
    """q/k/v and gate/up each make one A matmul; loss and every gradient equal those of separate matmuls."""
    model = llama_with_siblings(mode).train()
    handles = model.lily_adapters.sibling_handles
    assert len(handles) == 2 * 2 * 2  # a pre-hook and a hook on self_attn and on mlp, in 2 blocks
    rows = down_matmuls(monkeypatch, lambda: loss_and_grads(model))
    assert rows == [12, 4, 8, 4] * 2  # q/k/v, o, gate/up, down (r=4)
    assert lily.calls._sibling_calls() == ()  # nothing kept after the calls
    fused = loss_and_grads(model)
    with lily.disable_adapters(model):  # switching adapters keeps the hooks (a compiled model keeps its guards)
        lily.set_adapter(model, "default")
    assert model.lily_adapters.sibling_handles is handles
    clone = copy.deepcopy(model)
    assert down_matmuls(monkeypatch, lambda: loss_and_grads(clone)) == [12, 4, 8, 4] * 2
    for handle in handles:
        handle.remove()
    assert down_matmuls(monkeypatch, lambda: loss_and_grads(model)) == [4] * 14
    separate = loss_and_grads(model)
    torch.testing.assert_close(fused[0], separate[0], rtol=1e-12, atol=1e-12)
    for name, grad in separate[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_blocks_of_one_a_group_concatenate_their_siblings_a_groups_once_per_call(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama(num_layers=4)
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, num_A=2, num_B=3))
    randomize_adapter(model)
    model.double().train()
    factors = []
    original = lily.layer.linear_down
    monkeypatch.setattr(lily.layer, "linear_down", lambda x, a: factors.append(a) or original(x, a))
    kept = loss_and_grads(model)
    assert [a.shape[0] for a in factors] == [12] * 4
    assert factors[0] is factors[1] and factors[2] is factors[3] and factors[1] is not factors[2]  # one per group
    monkeypatch.setattr(lily.layer, "per_call", lambda key, sources, make, device: make())
    factors.clear()
    rebuilt = loss_and_grads(model)
    assert len({id(a) for a in factors}) == 4
    torch.testing.assert_close(kept[0], rebuilt[0], rtol=1e-12, atol=1e-12)
    for name, grad in rebuilt[1].items():
        torch.testing.assert_close(kept[1][name], grad, rtol=1e-12, atol=1e-12, msg=name)


class Block(nn.Module):
    """q_proj, k_proj and v_proj, called as `calls(block, x)` says."""

    def __init__(self, calls) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 6) for _ in range(3))
        self.calls = calls

    def forward(self, x: torch.Tensor):
        return self.calls(self, x)


def block(calls, dtype: torch.dtype = torch.float64) -> Block:
    torch.manual_seed(0)
    model = Block(calls)
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, num_A=1, routing="token"))
    randomize_adapter(model)
    return model.to(dtype)


def test_a_parent_called_alone_shares_and_keeps_nothing_after_it_returns_or_raises(monkeypatch):
    model = llama_with_siblings("token")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert down_matmuls(monkeypatch, lambda: mlp(x)) == [8, 4]  # gate/up, down
    assert lily.calls._sibling_calls() == ()
    monkeypatch.setattr(mlp.act_fn, "forward", lambda h: 1 / 0)  # fails between gate/up and down
    with pytest.raises(ZeroDivisionError):
        mlp(x)
    assert lily.calls._sibling_calls() == ()


def test_two_families_under_one_parent_each_share_their_matmul(monkeypatch):
    torch.manual_seed(0)
    model = Block(lambda m, x: m.q_proj(x) + m.k_proj(x) + m.v_proj(x) + m.gate_proj(x) + m.up_proj(x))
    model.gate_proj, model.up_proj = nn.Linear(8, 6), nn.Linear(8, 6)
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    lily.inject(model, lily.LilyConfig(target_modules=targets, r=4, num_A=1, routing="token"))
    assert down_matmuls(monkeypatch, lambda: model(torch.randn(3, 8))) == [12, 8]


def test_siblings_share_in_any_call_order(monkeypatch):
    model = block(lambda m, x: (m.k_proj(x), m.v_proj(x), m.q_proj(x)))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    outputs = []
    rows = down_matmuls(monkeypatch, lambda: outputs.extend(model(x)))
    assert rows == [12]
    for layer, out in zip((model.k_proj, model.v_proj, model.q_proj), outputs, strict=True):
        torch.testing.assert_close(out, reference_layer(layer, x), rtol=1e-12, atol=1e-12)


def test_a_sibling_computes_its_own_hidden_for_another_or_changed_input_and_outside_its_parents_call(monkeypatch):
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    model = block(lambda m, x: (m.q_proj(x), m.k_proj(x + 1), m.v_proj(x.mul_(2))))
    q_expected, k_expected = reference_layer(model.q_proj, x), reference_layer(model.k_proj, x + 1)
    v_expected = reference_layer(model.v_proj, 2 * x)
    outputs = []
    assert down_matmuls(monkeypatch, lambda: outputs.extend(model(x))) == [12, 4, 4]
    for out, expected in zip(outputs, (q_expected, k_expected, v_expected), strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert down_matmuls(monkeypatch, lambda: (model.q_proj(x), model.k_proj(x))) == [4, 4]  # no parent call
    assert lily.calls._sibling_calls() == ()

    def switch_after_q(m, x):  # k's h was kept for the adapter that ran q
        m.q_proj(x)
        lily.set_adapter(m, "other")
        return m.k_proj(x)

    model = block(switch_after_q)
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, num_A=1), name="other")
    randomize_adapter(model.double(), seed=1)
    lily.set_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_layer(model.k_proj, x), rtol=1e-12, atol=1e-12)


def test_a_sibling_computes_its_own_hidden_under_other_grad_or_autocast_modes():
    def no_grad_q(m, x):
        with torch.no_grad():
            m.q_proj(x)
        return m.k_proj(x)

    model = block(no_grad_q)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    k = model.k_proj.adapters["default"]
    a_k = k.bank.A[k.group]
    (grad,) = torch.autograd.grad(model(x).sum(), a_k)  # with q's h, k's A would get no gradient
    (expected,) = torch.autograd.grad(reference_layer(model.k_proj, x).sum(), a_k)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)

    def autocast_q(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.q_proj(x)
        return m.k_proj(x)

    model = block(autocast_q, torch.float32)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_layer(model.k_proj, x), rtol=1e-6, atol=1e-6)


def test_siblings_under_inference_mode_equal_no_grad_and_keep_nothing_after_an_error():
    model = block(lambda m, x: torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], -1))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    def fails(m, x):
        m.q_proj(x)
        raise RuntimeError("in the block")

    model.calls = fails
    with pytest.raises(RuntimeError, match="in the block"):
        model(x)
    assert lily.calls._sibling_calls() == ()


def test_no_shared_matmul_under_training_dropout_for_a_merged_sibling_or_with_cross_attention(monkeypatch):
    model = llama_with_siblings("token", dropout=0.1)
    assert down_matmuls(monkeypatch, lambda: loss_and_grads(model.train())) == [4] * 14
    assert down_matmuls(monkeypatch, lambda: loss_and_grads(model.eval())) == [12, 4, 8, 4] * 2

    model = llama_with_siblings("static")
    model.model.layers[0].self_attn.k_proj.merge()
    with torch.no_grad():
        rows = down_matmuls(monkeypatch, lambda: model(torch.tensor([[5, 9, 2]])))
    assert rows == [8, 4, 8, 4, 12, 4, 8, 4]  # block 0: q and v in one matmul, k merged

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, is_decoder=True, add_cross_attention=True)  # fmt: skip
    bert = lily.inject(transformers.BertModel(config), lily.LilyConfig(target_modules=["query", "key", "value"], r=4))
    assert bert.lily_adapters.sibling_handles == []
