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


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
def test_every_routing_mode_trains_on_a_bfloat16_base_close_to_float32(routing):
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    reference = cuda_model(routing)
    with torch.no_grad():
        full = reference(**inputs).logits
    torch.manual_seed(0)
    model = tiny_llama().to("cuda", torch.bfloat16)  # a bf16 base, as from_pretrained(torch_dtype=bfloat16) gives
    lily.inject(model, lily.get_adapter(reference).config)
    randomize_adapter(model, std=0.1)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), full, atol=0.1, rtol=0.1)
    for name, p in lily.adapter_parameters(model).items():
        assert p.dtype == torch.float32 and p.is_cuda and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("routing", ["token", "sample"])
def test_siblings_share_one_matmul_on_cuda_with_the_results_of_separate_matmuls(routing):
    import copy

    torch.manual_seed(0)
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=8, num_B=4, routing=routing))
    randomize_adapter(model, std=0.1)
    model.to("cuda", torch.float64).train()
    separate = copy.deepcopy(model)
    assert separate.lily_adapters.sibling_handles
    for handle in separate.lily_adapters.sibling_handles:
        handle.remove()
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    results = []
    for run in (model, separate):
        out = run(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in lily.adapter_parameters(run).items()}))
    (logits, grads), (ref_logits, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-10, rtol=0, msg=name)


def test_inductor_compiled_model_on_cuda_has_no_graph_break_and_matches_eager():
    import torch._dynamo

    model = cuda_model("token").train()
    inputs = {k: v.cuda() for k, v in model_inputs("llama").items()}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    compiled = torch.compile(model)
    params = lily.adapter_parameters(model)
    results = []
    for run in (compiled, model):
        model.zero_grad()
        logits = run(**inputs).logits
        logits.pow(2).mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in params.items()}))
    (logits, grads), (eager_logits, eager_grads) = results
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_an_adapter_saved_from_cuda_loads_on_cpu_with_the_same_outputs(tmp_path):
    model = cuda_model("sample")
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    lily.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = lily.load_adapter(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


class QKV(torch.nn.Module):
    """tanh(q(x) + k(x) + v(x)): three projections of one input (siblings that share their A matmul)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))


class MaskedStack(torch.nn.Module):
    """`QKV` blocks taking an attention mask like a transformer (for "sample" routing)."""

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(QKV(width) for _ in range(depth))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
def test_a_train_step_never_makes_the_host_wait_for_the_gpu(routing):
    torch.manual_seed(0)
    model = MaskedStack()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, num_B=3, routing=routing))
    assert len(model.lily_adapters.sibling_handles) == 2 * 3
    model.cuda().train()
    x = torch.randn(2, 5, 32, device="cuda")
    mask = torch.ones(2, 5, dtype=torch.long, device="cuda")
    mask[1, 3:] = 0
    model(x, attention_mask=mask).pow(2).mean().backward()  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for autocast in (False, True):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                model(x, attention_mask=mask).float().pow(2).mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
