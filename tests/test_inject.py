"""inject/remove: freezing, one copy of each shared tensor, parameter counts, defaults, dtypes, checkpointing."""

import copy

import pytest
import torch
import transformers
from torch import nn

import lily
from lily import InjectionError
from tests.helpers import BUILDERS, TARGETS, mlp_stack, model_inputs, randomize_adapter, tiny_bert, tiny_llama


def expected_count(model, cfg, routing):
    total = 0
    for t in lily.get_adapter(model).plan:
        n = t.num_layers
        router = {"static": n * cfg.num_B, "uniform": 0}.get(routing, n * cfg.r * cfg.num_B)
        total += t.num_A * t.in_features * cfg.r + cfg.num_B * cfg.r * t.out_features + router
    return total


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("routing", list(lily.ROUTING_MODES))
def test_parameter_count_matches_formula(family, routing):
    model = BUILDERS[family]()
    cfg = lily.LilyConfig(target_modules=TARGETS[family], r=6, num_A=3, num_B=5, routing=routing)
    lily.inject(model, cfg)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    assert lily.count_parameters(model) == expected_count(model, cfg, routing)
    assert sum(p.numel() for p in trainable.values()) == expected_count(model, cfg, routing)


def test_llama_formula_by_hand():
    # q: 4 layers 32->32, v: 4 layers 32->16; num_A=2, num_B=4, r=8
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=8, num_A=2, num_B=4, routing="token"))
    q = 2 * 32 * 8 + 4 * 8 * 32 + 4 * 8 * 4
    v = 2 * 32 * 8 + 4 * 8 * 16 + 4 * 8 * 4
    assert lily.count_parameters(model) == q + v == 2816


def test_each_shared_tensor_appears_once_in_state_dict_and_optimizer():
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_A=2, num_B=3))
    keys = [k for k in model.state_dict() if ".A." in k or k.endswith(".B")]
    assert sorted(keys) == sorted(
        f"lily_adapters.default.banks.{t}.{p}" for t in ("q_proj", "v_proj") for p in ("A.0", "A.1", "B")
    )
    params = [p for p in model.parameters() if p.requires_grad]
    assert len({id(p) for p in params}) == len(params) == 6 + 8  # 2 A + 1 B per type, 8 routers
    opt = torch.optim.AdamW(params)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == lily.count_parameters(model)


def test_optimizer_step_changes_adapter_only():
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lily_" not in k and "router" not in k}
    adapter_before = {k: v.detach().clone() for k, v in lily.adapter_parameters(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # frozen ones included on purpose
    inputs = model_inputs("bert")
    for _ in range(2):  # B is zero at step 0, so A and routers get their first gradient at step 1
        loss = model(**inputs, labels=torch.tensor([0, 1, 2])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    for k, p in lily.adapter_parameters(model).items():
        assert not torch.equal(p, adapter_before[k]), f"{k} did not train"


def test_default_routing_is_token_for_causal_and_sample_otherwise():
    causal, bidirectional = tiny_llama(), tiny_bert()
    lily.inject(causal, lily.LilyConfig(target_modules=["q_proj"]))
    lily.inject(bidirectional, lily.LilyConfig(target_modules=["query"]))
    assert lily.get_adapter(causal).routing == "token"
    assert lily.get_adapter(bidirectional).routing == "sample"
    assert "routing='token' (default for causal models" in lily.summary(causal)
    assert "routing='sample'" in lily.summary(bidirectional)
    plain = mlp_stack()
    lily.inject(plain, lily.LilyConfig(target_modules=r"\d+\.0"))
    assert lily.get_adapter(plain).routing == "sample"


def test_gpt2_base_model_and_llama_backbone_are_treated_as_causal():
    gpt2 = BUILDERS["gpt2"]().transformer  # GPT2Model: cannot generate, still causal
    lily.inject(gpt2, lily.LilyConfig(target_modules=["c_attn"]))
    assert lily.get_adapter(gpt2).routing == "token"
    backbone = tiny_llama().model
    lily.inject(backbone, lily.LilyConfig(target_modules=["q_proj"]))
    assert lily.get_adapter(backbone).routing == "token"


def test_summary_reports_every_type():
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=8, num_A=3, num_B=4))
    text = lily.summary(model)
    assert "q_proj" in text and "v_proj" in text
    assert "3 (2+1+1)" in text  # 4 layers in 3 groups
    assert f"trainable adapter parameters: {lily.count_parameters(model):,}" in text


def test_inject_twice_is_an_error():
    model = tiny_llama()
    cfg = lily.LilyConfig(target_modules=["q_proj"])
    lily.inject(model, cfg)
    with pytest.raises(InjectionError, match=r"already has an adapter named 'default'; pick another name"):
        lily.inject(model, cfg)


def test_calls_on_a_model_without_adapter_explain():
    with pytest.raises(InjectionError, match=r"call lily\.inject"):
        lily.count_parameters(tiny_llama())


def test_remove_restores_the_base_model_bit_identically():
    model = tiny_bert()
    model.classifier.weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    lily.inject(model, lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3, routing="static"))
    randomize_adapter(model)
    lily.remove(model)
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert not hasattr(model, "lily_adapters") and not model._forward_pre_hooks
    sd, ref = model.state_dict(), reference.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    inputs = model_inputs("bert")
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_module_registered_twice_is_adapted_at_both_paths():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": shared})
    lily.inject(model, lily.LilyConfig(target_modules=["a"], num_A=1))
    assert model["a"] is model["b"]
    lily.remove(model)
    assert model["a"] is shared and model["b"] is shared


def test_deepcopy_gives_an_independent_adapter():
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj"], r=4, routing="sample"))
    clone = copy.deepcopy(model)
    layer = clone.model.layers[0].self_attn.q_proj
    branch = layer.adapters["default"]
    assert branch.bank is clone.lily_adapters["default"].banks["q_proj"]
    assert branch.bank is not model.lily_adapters["default"].banks["q_proj"]


def test_adapters_stay_fp32_on_a_bf16_model_and_follow_model_to():
    model = tiny_llama().to(torch.bfloat16)
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4))
    assert all(p.dtype == torch.float32 for p in lily.adapter_parameters(model).values())
    randomize_adapter(model)
    out = model(**model_inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in lily.adapter_parameters(model).values())


@pytest.mark.parametrize("routing", ["token", "sample", "batch"])
def test_bf16_autocast_on_cpu_trains_and_matches_fp32(routing):
    model = tiny_llama()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, routing=routing))
    randomize_adapter(model, std=0.1)
    inputs = model_inputs("llama")
    with torch.no_grad():
        full = model(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), full, atol=0.1, rtol=0.05)
    for name, p in lily.adapter_parameters(model).items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """Recomputed layers must see the same attention mask (padded batch, "sample" routing)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = BUILDERS[family]()
        lily.inject(model, lily.LilyConfig(target_modules=TARGETS[family], r=4, routing="sample"))
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        inputs = model_inputs(family)
        inputs["attention_mask"][1, 4:] = 0
        labels = torch.tensor([0, 1, 1]) if family == "bert" else inputs["input_ids"]
        model(**inputs, labels=labels).loss.backward()
        grads.append({k: p.grad.clone() for k, p in lily.adapter_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_trainable_modules_train_fully_and_are_counted_apart():
    model = tiny_bert()
    cfg = lily.LilyConfig(target_modules=["query", "value"], r=4, trainable_modules=["classifier"])
    lily.inject(model, cfg)
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert not model.bert.pooler.dense.weight.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lily.count_parameters(model) + 32 * 3 + 3
    assert "plus 99 parameters in fully trained modules: classifier" in lily.summary(model)


def test_trainable_modules_errors():
    with pytest.raises(lily.TargetError, match="'head' matched no module"):
        lily.inject(tiny_bert(), lily.LilyConfig(target_modules=["query"], trainable_modules=["head"]))
    with pytest.raises(lily.TargetError, match="both trainable_modules and target_modules"):
        lily.inject(tiny_bert(), lily.LilyConfig(target_modules=["query"], trainable_modules=["self"]))
    with pytest.raises(lily.ConfigError, match="trainable_modules"):
        lily.LilyConfig(target_modules=["query"], trainable_modules="classifier")


def test_clip_towers_with_the_same_names_at_different_widths_get_separate_types(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_A=1, routing="sample"))
    plan = {(t.target, t.in_features) for t in lily.get_adapter(model).plan}
    assert plan == {("q_proj", 32), ("q_proj", 48), ("v_proj", 32), ("v_proj", 48)}
    randomize_adapter(model)
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)), "pixel_values": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        out = model(**inputs).logits_per_image
    lily.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = lily.load_adapter(transformers.CLIPModel(cfg).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits_per_image, out)
