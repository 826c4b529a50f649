"""Target discovery, target types and A-group splitting."""

import time

import pytest
import torch
from torch import nn

import lily
from lily import ConfigError, TargetError
from lily.plan import index_free_name, split_groups
from tests.helpers import tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    ("num_layers", "num_A", "sizes"),
    [(12, 4, [3, 3, 3, 3]), (12, 5, [3, 3, 2, 2, 2]), (30, 4, [8, 8, 7, 7]), (7, 7, [1] * 7), (5, 1, [5])],
)
def test_num_A_gives_exactly_num_A_near_equal_contiguous_groups(num_layers, num_A, sizes):
    groups = split_groups(num_layers, num_A, None, "t")
    assert list(groups) == sorted(groups)  # contiguous runs
    assert [groups.count(g) for g in range(num_A)] == sizes


@pytest.mark.parametrize(("num_layers", "per", "sizes"), [(12, 4, [4, 4, 4]), (10, 4, [4, 4, 2]), (3, 8, [3])])
def test_layers_per_A_gives_runs_of_that_length(num_layers, per, sizes):
    groups = split_groups(num_layers, None, per, "t")
    assert [groups.count(g) for g in range(groups[-1] + 1)] == sizes


def test_num_A_larger_than_layers_names_the_type():
    model = tiny_llama(num_layers=3)
    with pytest.raises(ConfigError, match=r"num_A=4 is larger than the 3 layer\(s\) of target type 'q_proj'"):
        lily.inject(model, lily.LilyConfig(target_modules=["q_proj"], num_A=4))


def test_target_types_never_share_across_names_and_follow_model_order():
    model = tiny_llama(num_layers=4)
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_A=2))
    plan = lily.get_adapter(model).plan
    assert [t.key for t in plan] == ["q_proj", "v_proj"]
    q = plan[0]
    assert q.module_names == tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(4))
    assert q.groups == (0, 0, 1, 1)
    assert (q.in_features, q.out_features) == (32, 32)
    v = plan[1]
    assert (v.in_features, v.out_features) == (32, 16)  # grouped-query attention: 2 KV heads of 8
    layers = dict(lily.lily_layers(model))
    bank = {name: layer.adapters["default"].bank for name, layer in layers.items()}
    assert bank["model.layers.0.self_attn.q_proj"] is not bank["model.layers.0.self_attn.v_proj"]
    assert bank["model.layers.0.self_attn.q_proj"] is bank["model.layers.3.self_attn.q_proj"]


def test_regex_targets_group_by_role_not_by_pattern():
    # PEFT keys a regex by the pattern itself, so q and v (same shape) would share A and B; we do not.
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=r".*attention\.self\.(query|value)", r=4))
    plan = lily.get_adapter(model).plan
    assert [t.target for t in plan] == [
        "bert.encoder.layer.attention.self.query",
        "bert.encoder.layer.attention.self.value",
    ]
    assert all(t.num_layers == 4 for t in plan)


def test_same_name_with_different_shapes_forms_separate_types():
    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.proj = nn.Linear(d, d)

    model = nn.ModuleDict({"a": nn.ModuleList([Block(8), Block(8)]), "b": nn.ModuleList([Block(4), Block(4)])})
    lily.inject(model, lily.LilyConfig(target_modules=["proj"], r=2, num_A=1))
    plan = lily.get_adapter(model).plan
    assert [(t.key, t.num_layers) for t in plan] == [("proj_8x8", 2), ("proj_4x4", 2)]


def test_overlapping_suffixes_pick_the_longest_deterministically():
    model = tiny_bert()
    lily.inject(model, lily.LilyConfig(target_modules=["dense", "output.dense"], r=2, num_A=1))
    targets = {t.target for t in lily.get_adapter(model).plan}
    assert targets == {"dense", "output.dense"}  # attention.output.dense / output.dense vs pooler.dense etc.


def test_no_match_lists_existing_module_names():
    with pytest.raises(
        TargetError, match=r"matched no module.*'q_proj' \(e\.g\. 'model\.layers\.0\.self_attn\.q_proj'\)"
    ):
        lily.inject(tiny_llama(), lily.LilyConfig(target_modules=["query"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(TargetError, match=r"'model.embed_tokens' of type Embedding"):
        lily.inject(tiny_llama(), lily.LilyConfig(target_modules=["embed_tokens"]))


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True))
    with pytest.raises(TargetError, match=r"nn\.MultiheadAttention"):
        lily.inject(model, lily.LilyConfig(target_modules=["out_proj"], num_A=1))


def test_non_float_weight_is_refused():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TargetError, match="quantized or non-float"):
        lily.inject(nn.Sequential(layer), lily.LilyConfig(target_modules=["0"], num_A=1))


def test_conv1d_layers_are_adapted_with_their_transposed_shape():
    model = tiny_gpt2()
    lily.inject(model, lily.LilyConfig(target_modules=["c_attn"], r=4))
    (t,) = lily.get_adapter(model).plan
    assert (t.in_features, t.out_features) == (32, 96)


def test_index_free_name():
    assert index_free_name("model.layers.3.self_attn.q_proj") == "model.layers.self_attn.q_proj"
    assert index_free_name("down.0.attn.to_out.0") == "down.attn.to_out"
    assert index_free_name("2.0") == "layer"


def test_a_backtracking_regex_is_cut_off_with_a_named_error(monkeypatch):
    monkeypatch.setattr("lily.plan.REGEX_BUDGET_S", 0.3)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"regex '\(\.\|\\\\w\)\*\[xyz\]' took too long"):
        lily.inject(tiny_llama(), lily.LilyConfig(target_modules=r"(.|\w)*[xyz]"))
    with pytest.raises(TargetError, match="matched no module"):  # exponential for `re`: minutes
        lily.inject(tiny_llama(), lily.LilyConfig(target_modules=r"(\w+\.?)*zz"))
    assert time.monotonic() - start < 10
