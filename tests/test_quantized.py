"""Quantized bases: bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt stay quantized and frozen, the adapter's
update is added to their output, and merging is refused. Other quantized weights (torchao's tensor subclasses)
are refused. Runs on CPU (bitsandbytes >= 0.45 has a CPU backend)."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import lily
from lily import InjectionError, MergeError, TargetError
from tests.helpers import (
    assert_same_state,
    capture_layer_io,
    model_inputs,
    model_state,
    randomize_adapter,
    reference_delta,
    tiny_llama,
)

bnb = pytest.importorskip("bitsandbytes")

QUANTS = ["nf4", "fp4", "int8"]
TARGETS = ["q_proj", "v_proj"]


def quantized_copy(linear: nn.Linear, quant: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights, quantized on `linear`'s device."""
    bias = linear.bias is not None
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype, quant_type=quant
        )
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant)
        if bias:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantizes on the move


def quantize(model: nn.Module, quant: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the model's q/v projections by quantized copies; returns `model`."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if attr in TARGETS and type(child) is nn.Linear:
                setattr(parent, attr, quantized_copy(child, quant, compute_dtype))
    return model


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight a bitsandbytes layer stands for."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # the first forward moves them to the state
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def float_twin(model: nn.Module) -> nn.Module:
    """`tiny_llama()` whose layers adapted in `model` (all quantized) hold their dequantized weights in nn.Linear."""
    torch.manual_seed(0)
    twin = tiny_llama()
    with torch.no_grad():
        for name, layer in lily.lily_layers(model):
            twin.get_submodule(name).weight.copy_(dequantized(layer.base_layer))
    return twin


def quantized_llama(quant: str, routing: str = "token") -> nn.Module:
    torch.manual_seed(0)
    model = quantize(tiny_llama(), quant)
    lily.inject(model, lily.LilyConfig(target_modules=TARGETS, r=4, num_A=2, num_B=3, scaling=0.7, routing=routing))
    randomize_adapter(model, std=0.1)
    return model


@pytest.mark.parametrize("quant", QUANTS)
def test_base_stays_quantized_and_the_plan_uses_the_declared_sizes(quant):
    model = quantized_llama(quant)
    layers = dict(lily.lily_layers(model))
    kinds = {type(layer.base_layer) for layer in layers.values()}
    assert kinds == {bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit}
    assert all(layer.base_layer.weight.dtype in (torch.uint8, torch.int8) for layer in layers.values())
    plan = {t.key: (t.in_features, t.out_features) for t in lily.get_adapter(model).plan}
    assert plan == {"q_proj": (32, 32), "v_proj": (32, 16)}  # a 4-bit weight is stored as (out * in / 2, 1)


def test_summary_counts_the_values_a_4bit_weight_stands_for():
    model = quantized_llama("nf4")
    torch.manual_seed(0)
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert f"of the {total:,} base parameters)" in lily.summary(model)  # not half, as packed in bytes


CASES = [(q, "token") for q in QUANTS] + [("nf4", m) for m in ("batch", "sample", "static", "uniform")]


@pytest.mark.parametrize(("quant", "routing"), CASES)
def test_forward_is_the_dequantized_base_plus_the_adapter_update(quant, routing):
    model = quantized_llama(quant, routing)
    inputs = model_inputs("llama")
    inputs["attention_mask"][0, -2:] = 0
    records = capture_layer_io(model, **inputs)
    assert len(records) == 8
    mask = inputs["attention_mask"] if routing == "sample" else None
    for layer, x, out in records:
        branch = layer.adapters["default"]
        bank = branch.bank
        delta = reference_delta(x, bank.A[branch.group], bank.B, branch.router, routing, mask)
        expected = F.linear(x, dequantized(layer.base_layer), layer.base_layer.bias) + 0.7 * delta
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert delta.abs().max() > 1e-3  # the update is really there


@pytest.mark.parametrize("quant", QUANTS)
def test_backward_reaches_the_adapter_as_through_the_dequantized_model(quant):
    model = quantized_llama(quant)
    twin = float_twin(model)
    lily.inject(twin, lily.get_adapter(model).config)
    with torch.no_grad():
        for theirs, ours in zip(lily.adapter_parameters(twin).values(), lily.adapter_parameters(model).values(),
                                strict=True):  # fmt: skip
            theirs.copy_(ours)
    inputs = model_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    twin_loss = twin(**inputs, labels=inputs["input_ids"]).loss
    twin_loss.backward()
    torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-5)
    ours, theirs = lily.adapter_parameters(model), lily.adapter_parameters(twin)
    for name, param in ours.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)
    adapter_ids = {id(p) for p in ours.values()}
    assert all(not p.requires_grad and p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_save_load_round_trip_onto_a_quantized_base(tmp_path, quant):
    model = quantized_llama(quant)
    lily.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    loaded = lily.load_adapter(quantize(tiny_llama(), quant), tmp_path / "ad")
    inputs = model_inputs("llama")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_merge_is_refused_and_the_adapter_merges_onto_the_float_base(tmp_path):
    model = quantized_llama("nf4", routing="static")
    before = model_state(model)
    with pytest.raises(MergeError, match=r"'model\.layers\.0\.self_attn\.q_proj' is a bitsandbytes Linear4bit \(nf4\)"):
        lily.merge(model)
    with pytest.raises(MergeError, match="unquantized"):
        lily.remove(model, merge=True)
    assert_same_state(before, model_state(model))
    lily.save_adapter(model, tmp_path / "ad")  # what the message advises: merge into the float base instead
    torch.manual_seed(0)
    floating = lily.load_adapter(tiny_llama(), tmp_path / "ad")
    lily.merge(floating)
    assert all(layer.merged for _, layer in lily.lily_layers(floating))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved to disk, widths >= 64 (bitsandbytes' CPU inference kernel needs a whole 64-block)."""
    directory = tmp_path_factory.mktemp("llama-64")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load_4bit(directory) -> nn.Module:
    """The model in `directory` with every Linear but the head in 4 bits, through transformers' BitsAndBytesConfig."""
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.LlamaForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu")


def test_transformers_bitsandbytes_config_on_cpu(llama_dir):
    model = load_4bit(llama_dir)
    inputs = model_inputs("llama")
    lily.inject(model, lily.LilyConfig(target_modules=TARGETS, r=4, num_B=3))
    with torch.no_grad(), lily.disable_adapters(model):
        base = model(**inputs).logits
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)  # B starts at zero
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lily.adapter_parameters(model).values())
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, base)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for _, layer in lily.lily_layers(model))


def test_an_eval_pass_without_gradients_leaves_every_adapter_trainable(llama_dir):
    inputs = model_inputs("llama")
    grads = []
    for evaluate_first in (False, True):
        model = load_4bit(llama_dir)
        lily.inject(model, lily.LilyConfig(target_modules=TARGETS, r=4, num_B=3))
        randomize_adapter(model, std=0.1)
        if evaluate_first:  # on an AVX512-BF16 CPU bitsandbytes would repack every 4-bit weight, adapted or not, for
            with torch.no_grad():  # a kernel without backward: every gradient would be lost
                model(**inputs)
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in lily.adapter_parameters(model).items()})
    assert all(grads[1][n] is not None and torch.equal(grads[1][n], g) for n, g in grads[0].items())
    layer = model.model.layers[0].mlp.down_proj  # not adapted
    assert layer.support_avx512bf16_for_cpu is False
    lily.remove(model)
    assert layer.support_avx512bf16_for_cpu == bnb.functional.has_avx512bf16()  # bitsandbytes' own setting again


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="repacking needs an AVX512-BF16 CPU")
def test_a_model_repacked_before_injection_is_refused(llama_dir):
    model = load_4bit(llama_dir)
    with torch.no_grad():
        model(**model_inputs("llama"))
    with pytest.raises(InjectionError, match=r"repacked the 4-bit weight of 'model\.layers\.0\.self_attn\.q_proj'"):
        lily.inject(model, lily.LilyConfig(target_modules=["o_proj"], r=4))  # (a state_dict() would unpack it)
    assert not hasattr(model, "lily_adapters") and not any(True for _ in lily.lily_layers(model))


class AffineQuantizedTensor(torch.Tensor):
    """Stands for torchao's quantized weights: a tensor subclass inside an ordinary nn.Linear."""


def test_a_tensor_subclass_weight_is_refused_with_a_named_error():
    torch.manual_seed(0)
    model = tiny_llama()
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.weight = nn.Parameter(q_proj.weight.detach().as_subclass(AffineQuantizedTensor), requires_grad=False)
    before = model_state(model)
    with pytest.raises(
        TargetError, match=r"'model\.layers\.1\.self_attn\.q_proj' \(Linear\) has a quantized or non-float weight "
        r"\(AffineQuantizedTensor, torch\.float32\)"
    ):  # fmt: skip
        lily.inject(model, lily.LilyConfig(target_modules=TARGETS))
    assert_same_state(before, model_state(model))
