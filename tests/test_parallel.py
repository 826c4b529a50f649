"""Parallel adapters on blocks: y = block(x) + s * sum_e w_e phi(x A_g) B_e^T, matched against a float64 loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

import lily
from lily import ConfigError, InjectionError, MergeError, TargetError
from tests.helpers import assert_same_state, model_inputs, model_state, randomize_adapter, tiny_bert, tiny_vit

BERT_MLP = "intermediate>output.dense"  # BERT splits its MLP: read the input here, add there


def tiny_dinov2() -> torch.nn.Module:
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4)  # fmt: skip
    return transformers.Dinov2Model(cfg).eval()


def reference_update(x, a, experts, router, routing, activation):
    """s-free update of one parallel adapter, one expert and one token at a time (float64)."""
    h = F.linear(x.double(), a.double())
    h = torch.relu(h) if activation == "relu" else h
    if routing == "static":
        weights = torch.softmax(router.double(), -1).expand(*h.shape[:-1], -1)
    else:  # token
        weights = torch.softmax(F.linear(h, router.double()), -1)
    out = torch.zeros(*h.shape[:-1], experts.shape[1], dtype=torch.float64)
    for e in range(experts.shape[0]):
        out += weights[..., e : e + 1] * F.linear(h, experts[e].double())
    return out


def check_blocks(model, source_suffix, sink_suffix, inputs, scaling):
    """Every sink's output equals its base output plus s * the reference update of its source's input."""
    seen = {}

    def keep(name, what):
        def hook(module, args, *output):
            seen.setdefault(name, {})[what] = output[0] if output else args[0]

        return hook

    handles = []
    for name, module in model.named_modules():
        if name.endswith("." + source_suffix):
            handles.append(module.register_forward_pre_hook(keep(name[: -len(source_suffix) - 1], "x")))
        if name.endswith("." + sink_suffix):
            handles.append(module.register_forward_pre_hook(keep(name[: -len(sink_suffix) - 1], "sink_in")))
            handles.append(module.register_forward_hook(keep(name[: -len(sink_suffix) - 1], "out")))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    slots = dict(lily.lily_layers(model))
    seen = {parent: got for parent, got in seen.items() if "x" in got}  # e.g. not BERT's attention.output.dense
    for parent, got in seen.items():
        sink = model.get_submodule(f"{parent}.{sink_suffix}")
        branch = slots[f"{parent}.{sink_suffix}.lily_parallel"].adapters["default"]
        base = sink.base_layer if isinstance(sink, lily.layer.LilyLayer) else sink
        with torch.no_grad(), lily.disable_adapters(model):  # the sink's own output, without our hook's update
            expected = base(got["sink_in"]).double() + scaling * reference_update(
                got["x"], branch.bank.A[branch.group], branch.bank.B, branch.router, branch.routing, "relu"
            )
        torch.testing.assert_close(got["out"].double(), expected, rtol=1e-5, atol=1e-5)
    return len(seen)


@pytest.mark.parametrize("routing", ["token", "static"])
def test_vit_mlp_parallel_adapter_matches_the_formula(routing):
    """The paper's ViT placement: k and v adapted, plus a parallel adapter on each MLP block."""
    torch.manual_seed(0)
    model = tiny_vit()
    config = lily.LilyConfig(target_modules=["k_proj", "v_proj"], parallel_modules=["mlp"], r=4, num_A=2, num_B=3,
                             scaling=0.7, routing=routing)  # fmt: skip
    lily.inject(model, config)
    randomize_adapter(model)
    assert check_blocks(model, "mlp", "mlp", model_inputs("vit"), 0.7) == 4


@pytest.mark.parametrize("build, family", [(tiny_dinov2, "vit"), (tiny_bert, "bert")])
def test_other_blocks_match_the_formula(build, family):
    """DINOv2's MLP block, and BERT's MLP split in two modules (source>sink)."""
    torch.manual_seed(0)
    model = build()
    entry = "mlp" if family == "vit" else BERT_MLP
    lily.inject(model, lily.LilyConfig(target_modules=[], parallel_modules=[entry], r=4, num_B=3, routing="token"))
    randomize_adapter(model)
    source, _, sink = entry.partition(">")
    assert check_blocks(model, source, sink or source, model_inputs(family), 1.0) == 4


def test_parallel_rank_defaults_to_2r_and_counts_follow_the_formula():
    model = tiny_vit()
    lily.inject(model, lily.LilyConfig(target_modules=["v_proj"], parallel_modules=["mlp"], r=4, num_A=2, num_B=3,
                                       routing="token"))  # fmt: skip
    _, mlp = lily.get_adapter(model).plan
    assert (mlp.placement, mlp.r, mlp.in_features, mlp.out_features) == ("parallel", 8, 32, 32)
    layers, r, e = 4, 8, 3
    value_count = 2 * 32 * 4 + e * 4 * 32 + layers * 4 * e
    assert lily.count_parameters(model) == value_count + 2 * 32 * r + e * r * 32 + layers * r * e
    assert "parallel_mlp" in lily.summary(model)


def test_save_load_remove_and_merge_refusal(tmp_path):
    torch.manual_seed(0)
    base = tiny_vit()
    model = copy.deepcopy(base)
    lily.inject(model, lily.LilyConfig(target_modules=["v_proj"], parallel_modules=["mlp"], r=4, routing="static"))
    randomize_adapter(model)
    inputs = model_inputs("vit")
    with torch.no_grad():
        adapted = model(**inputs).logits
    assert not torch.allclose(adapted, base(**inputs).logits, atol=1e-3)
    lily.save_adapter(model, tmp_path)
    loaded = lily.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, adapted)
        with lily.disable_adapters(model):
            assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    with pytest.raises(MergeError, match=r"parallel adapters \(\['mlp'\]\)"):
        lily.merge(model)
    lily.remove(model)
    assert not any("lily" in name for name, _ in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)  # hooks are gone too


def test_gradients_reach_the_parallel_adapter():
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=[], parallel_modules=[BERT_MLP], r=4, routing="sample"))
    randomize_adapter(model)
    model(**model_inputs("bert")).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lily.adapter_parameters(model).values())


def test_parallel_errors_name_the_entry():
    with pytest.raises(ConfigError, match="'a>b>c' must be 'block' or 'source>sink'"):
        lily.LilyConfig(target_modules=[], parallel_modules=["a>b>c"])
    with pytest.raises(ConfigError, match="nothing to adapt"):
        lily.LilyConfig(target_modules=[])
    with pytest.raises(ConfigError, match="parallel_activation='tanh'"):
        lily.LilyConfig(target_modules=[], parallel_modules=["mlp"], parallel_activation="tanh")
    with pytest.raises(TargetError, match=r"has no sibling .bert\.encoder\.layer\.0\.nope."):
        lily.inject(tiny_bert(), lily.LilyConfig(target_modules=[], parallel_modules=["intermediate>nope"]))
    with pytest.raises(TargetError, match=r"cannot tell the input width of .*layernorm_after"):
        lily.inject(tiny_vit(), lily.LilyConfig(target_modules=[], parallel_modules=["layernorm_after"]))
    with pytest.raises(InjectionError, match="is a ModuleList"):
        lily.inject(tiny_bert(), lily.LilyConfig(target_modules=[], parallel_modules=["encoder>encoder.layer"],
                                                 num_A=1))  # fmt: skip


def test_merging_another_adapter_skips_inactive_parallel_slots():
    torch.manual_seed(0)
    model = tiny_vit()
    lily.inject(model, lily.LilyConfig(target_modules=[], parallel_modules=["mlp"], r=4, num_A=1), name="blocks")
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj"], r=4, routing="static"), name="linear")
    randomize_adapter(model)
    inputs = model_inputs("vit")
    with torch.no_grad():
        before = model(**inputs).logits
        lily.merge(model)  # "linear" is active; the "blocks" slots do not run and are left alone
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=1e-5)


def test_a_failing_inject_leaves_the_model_as_it_was():
    model = tiny_bert()
    before = model_state(model)
    config = lily.LilyConfig(target_modules=["query"], parallel_modules=["encoder>encoder.layer"], num_A=1)
    with pytest.raises(InjectionError, match="is a ModuleList"):
        lily.inject(model, config)
    assert_same_state(before, model_state(model))
    lily.inject(model, lily.LilyConfig(target_modules=["query"], r=4), name="first")
    before = model_state(model)
    with pytest.raises(InjectionError, match="is a ModuleList"):
        lily.inject(model, config, name="second")
    assert_same_state(before, model_state(model))


def test_a_module_both_adapted_and_a_parallel_sink_removes_cleanly():
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    config = lily.LilyConfig(target_modules=["output.dense"], parallel_modules=["intermediate>output.dense"], r=4,
                             routing="static")  # fmt: skip
    lily.inject(model, config)
    randomize_adapter(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        adapted = model(**inputs).logits
        assert not torch.allclose(adapted, reference(**inputs).logits)
    lily.remove(model)
    assert_same_state(model_state(reference), model_state(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
