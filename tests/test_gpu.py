"""CUDA checks: mixed precision, device moves, merge. Skipped on machines without a GPU."""

import pytest
import torch

import lily
from tests.helpers import model_inputs, randomize_adapter, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_model(routing: str):
    torch.manual_seed(0)
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=8, num_B=4, routing=routing))
    randomize_adapter(model, std=0.1)
    return model.to("cuda")


def test_model_to_moves_adapters():
    model = cuda_model("token")
    assert all(p.is_cuda for p in lily.adapter_parameters(model).values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("routing", ["token", "sample", "batch", "static"])
def test_autocast_forward_backward_matches_fp32(dtype, routing):
    model = cuda_model(routing)
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    with torch.no_grad():
        full = model(**inputs).logits
    with torch.autocast("cuda", dtype=dtype):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), full, atol=0.05, rtol=0.05)
    for name, p in lily.adapter_parameters(model).items():
        assert p.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_half_precision_base_with_fp32_adapter():
    model = cuda_model("token").half()
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.logits).all()


def test_merge_on_gpu():
    model = cuda_model("static")
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    with torch.no_grad():
        before = model(**inputs).logits
        lily.merge(model)
        torch.testing.assert_close(model(**inputs).logits, before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bitsandbytes_base_on_gpu(quant):
    pytest.importorskip("bitsandbytes")
    from tests.test_quantized import float_twin, quantize

    torch.manual_seed(0)
    model = quantize(tiny_llama().to("cuda"), quant, compute_dtype=torch.bfloat16)  # quantized on the GPU
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=8, num_B=4, routing="token"))
    randomize_adapter(model, std=0.1)
    twin = float_twin(model).to("cuda")  # nn.Linear layers holding the dequantized weights, in fp32
    lily.inject(twin, lily.get_adapter(model).config)
    ours, theirs = lily.adapter_parameters(model), lily.adapter_parameters(twin)
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    ref = twin(**inputs, labels=inputs["input_ids"])
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=0.05, rtol=0.05)
    grads = torch.cat([p.grad.flatten() for p in ours.values()])
    expected = torch.cat([theirs[n].grad.flatten() for n in ours])
    assert all(p.dtype == torch.float32 and p.is_cuda for p in ours.values())
    assert torch.isfinite(grads).all() and torch.nn.functional.cosine_similarity(grads, expected, dim=0) > 0.99
    adapter_ids = {id(p) for p in ours.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)
