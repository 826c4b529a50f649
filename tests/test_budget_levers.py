"""Budget and training levers: `fit_budget`, the "experts" init, router_init_scale, expert_diversity, and the
`lily train` options built on them (--budget, --budget-lora-rank, --lr-ratio-B, --method peft-lily / peft-vera)."""

import copy
import json
import math

import peft
import pytest
import torch

import lily
from lily import ConfigError, LilyConfig
from lily.adapter import branches
from lily.budget import lora_parameters_per_rank
from lily.cli import build_parser, main
from lily.io import CONFIG_NAME
from lily.train.config import TrainConfig, config_from_args
from lily.train.loop import train
from lily.train.methods import apply_method, lily_config, up_projections
from tests.helpers import model_inputs, randomize_adapter, tiny_bert, tiny_vit
from tests.test_io import edit_config
from tests.test_train import quiet, text_cfg

TARGETS = ["query", "value"]
BERT_MLP = "intermediate>output.dense"  # a parallel adapter on BERT's split MLP
TINY = {"epochs": 1, "max_train_samples": 16, "max_eval_samples": 8, "max_test_samples": 8}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_cost(model, r):
    """Trainable parameters of a real PEFT LoRA of rank r on TARGETS."""
    return trainable(peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, target_modules=TARGETS)))


def one_rank_more(cfg):
    """`cfg` at r + 1, parallel_r following r again when it was defaulted."""
    return LilyConfig(**{**cfg.to_dict(), "r": cfg.r + 1, "parallel_r": None})


# fit_budget


@pytest.mark.parametrize(
    "fields",
    [{}, {"routing": "static"}, {"routing": "uniform"}, {"routing": "token", "num_A": 3, "num_B": 5},
     {"routing": "sample", "parallel_modules": [BERT_MLP]}, {"routing": "static", "parallel_modules": [BERT_MLP]},
     {"layers_per_A": 3, "num_B": 3}],
)  # fmt: skip
def test_like_lora_rank_gives_the_largest_rank_within_loras_cost(fields):
    base = tiny_bert(4)
    for k in (2, 7):
        cost = lora_cost(base, k)
        assert cost == k * lora_parameters_per_rank(base, LilyConfig(TARGETS)) == k * 4 * 2 * (32 + 32)
        cfg = lily.fit_budget(base, TARGETS, like_lora_rank=k, **fields)
        assert cfg.num_B == fields.get("num_B", 2) and cfg.routing == fields.get("routing")
        if "parallel_modules" in fields:
            assert cfg.parallel_r == 2 * cfg.r
        counted = lily.lily_parameters(base, cfg)
        assert counted <= cost < lily.lily_parameters(base, one_rank_more(cfg))
        model = lily.inject(copy.deepcopy(base), cfg)
        assert lily.count_parameters(model) == counted == trainable(model)


def test_budget_is_met_exactly_when_it_can_be():
    base = tiny_bert(2)
    exact = lily.lily_parameters(base, LilyConfig(TARGETS, r=5, num_A=2, num_B=2))
    assert lily.fit_budget(base, TARGETS, budget=exact).r == 5
    assert lily.fit_budget(base, TARGETS, budget=exact - 1).r == 4
    assert lily.fit_budget(base, TARGETS, budget=exact, num_A=1, num_B=1).r > 5  # fewer groups: more rank


def test_fit_budget_refuses_bad_requests():
    base = tiny_bert(2)
    smallest = lily.lily_parameters(base, LilyConfig(TARGETS, r=1, num_A=2, num_B=2))
    for kw, message in [
        ({}, "give a parameter budget or like_lora_rank"),
        ({"budget": 10**6, "like_lora_rank": 2}, "one of the two"),
        ({"budget": 10**6, "r": 4}, "chooses r itself"),
        ({"budget": 0}, "budget must be a whole number of parameters >= 1, got 0"),
        ({"budget": True}, "got True"),
        ({"budget": 2.5e3}, "got 2500.0"),
        ({"like_lora_rank": 0}, "like_lora_rank must be an integer >= 1, got 0"),
        ({"like_lora_rank": 1.5}, "got 1.5"),
        ({"budget": smallest - 1}, f"below Lily's smallest adapter here \\({smallest:,} at r=1 with num_A=2, num_B=2"),
        ({"budget": 10**6, "init": "nope"}, "LilyConfig.init='nope'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            lily.fit_budget(base, TARGETS, **kw)
    assert lily.fit_budget(base, TARGETS, budget=smallest).r == 1  # the minimum named is one that fits


# init


def test_experts_init_starts_at_the_base_model_with_distinct_experts():
    base = tiny_bert(2)
    cfg = LilyConfig(TARGETS, r=4, num_B=3, init="experts", parallel_modules=[BERT_MLP], parallel_activation="gelu")
    model = lily.inject(copy.deepcopy(base), cfg)
    banks = lily.get_adapter(model).banks
    assert len(banks) == 3
    for bank in banks.values():
        assert all(not a.any() for a in bank.A)
        assert all(e.abs().min() > 0 for e in bank.B)
        off = lily.expert_similarity(bank.B)[~torch.eye(3, dtype=torch.bool)]
        assert off.abs().max() < 0.9  # independent draws, not copies
    inputs = model_inputs("bert")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    model(**inputs).logits.square().sum().backward()
    for bank in banks.values():
        assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in bank.A)  # A learns first
        assert not bank.B.grad.any()  # h = x A = 0: no gradient reaches B yet


def test_experts_init_is_refused_behind_a_relu_parallel_adapter():
    """init="experts" zeroes A; behind relu (relu'(0) = 0) a parallel adapter would stay at zero forever."""
    with pytest.raises(ConfigError, match="relu of parallel_modules' adapters has no gradient at zero"):
        LilyConfig([], r=4, num_B=3, init="experts", parallel_modules=[BERT_MLP])
    model = lily.inject(tiny_bert(2), LilyConfig([], r=4, num_B=3, init="experts", parallel_modules=[BERT_MLP],
                                                 parallel_activation="gelu"))  # fmt: skip
    model(**model_inputs("bert")).logits.square().sum().backward()
    (bank,) = lily.get_adapter(model).banks.values()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in bank.A)


def test_default_init_is_lora_and_bad_inits_are_refused():
    model = lily.inject(tiny_bert(2), LilyConfig(TARGETS, r=4, num_B=3))
    assert lily.get_adapter(model).config.init == "lora"
    for bank in lily.get_adapter(model).banks.values():
        assert not bank.B.any() and all(a.abs().min() > 0 for a in bank.A)
    for bad in ("kaiming", "LORA", None, ""):
        with pytest.raises(ConfigError, match=r"LilyConfig.init=.*choose one of 'lora', 'experts'"):
            LilyConfig(TARGETS, init=bad)


def test_new_fields_round_trip_and_old_configs_still_load(tmp_path):
    base = tiny_bert(2)
    model = lily.inject(copy.deepcopy(base), LilyConfig(TARGETS, r=4, num_B=3, init="experts", router_init_scale=2.5))
    randomize_adapter(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    lily.save_adapter(model, tmp_path / "new")
    loaded = lily.load_adapter(copy.deepcopy(base), tmp_path / "new")
    assert lily.get_adapter(loaded).config == lily.get_adapter(model).config
    assert (lily.get_adapter(loaded).config.init, lily.get_adapter(loaded).config.router_init_scale) == ("experts", 2.5)
    lily.save_adapter(model, tmp_path / "old")
    edit_config(tmp_path / "old", lambda meta: [meta["config"].pop(k) for k in ("init", "router_init_scale")])
    assert "init" not in json.loads((tmp_path / "old" / CONFIG_NAME).read_text())["config"]
    old = lily.load_adapter(copy.deepcopy(base), tmp_path / "old")  # written before the fields existed
    assert (lily.get_adapter(old).config.init, lily.get_adapter(old).config.router_init_scale) == ("lora", 1.0)
    with torch.no_grad():
        for again in (loaded, old):
            torch.testing.assert_close(again(**inputs).logits, expected, rtol=0, atol=0)
    cfg = LilyConfig.from_dict({"target_modules": TARGETS, "r": 8, "num_A": 2, "num_B": 4, "routing": "static"})
    assert (cfg.init, cfg.router_init_scale) == ("lora", 1.0)


# router_init_scale


@pytest.mark.parametrize("routing", ["sample", "token", "batch", "static", "uniform"])
def test_router_init_scale_multiplies_the_initial_routers(routing):
    base = tiny_bert(2)
    made = []
    for scale in (1, 4):
        torch.manual_seed(0)
        cfg = LilyConfig(TARGETS, r=4, num_B=3, routing=routing, router_init_scale=scale, parallel_modules=[BERT_MLP])
        made.append(lily.adapter_parameters(lily.inject(copy.deepcopy(base), cfg)))
    one, four = made
    assert one.keys() == four.keys()
    routers = [n for n in one if n.endswith(".router")]
    assert len(routers) == (0 if routing == "uniform" else 2 * 2 + 2)
    for name, p in one.items():
        assert torch.equal(four[name], 4 * p if name in routers else p), name  # x4 is exact in floating point
    if routing != "uniform":
        assert one[routers[0]].abs().max() > 0


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, 1e9, "2", None])
def test_bad_router_init_scale_is_refused(bad):
    with pytest.raises(ConfigError, match=r"router_init_scale must be a number in \(0, 1000\]"):
        LilyConfig(TARGETS, router_init_scale=bad)


# expert_diversity


def set_experts(model, make):
    with torch.no_grad():
        for bank in lily.get_adapter(model).banks.values():
            bank.B.copy_(make(bank.B.shape))


def test_expert_diversity_is_0_for_orthogonal_and_1_for_identical_experts():
    model = lily.inject(tiny_bert(2), LilyConfig(TARGETS, r=4, num_B=3))
    set_experts(model, lambda shape: torch.eye(math.prod(shape[1:]))[: shape[0]].reshape(shape))  # disjoint
    assert lily.expert_diversity(model).item() == pytest.approx(0.0, abs=1e-12)
    set_experts(model, lambda shape: torch.randn(shape[1:]).expand(shape) * 3)
    assert lily.expert_diversity(model).item() == pytest.approx(1.0, abs=1e-5)
    set_experts(
        model, lambda shape: torch.randn(shape[1:]).expand(shape) * torch.tensor([1.0, -2.0, 0.5])[:, None, None]
    )
    assert lily.expert_diversity(model).item() == pytest.approx(1.0, abs=1e-5)  # squared cosine: sign and scale free


def test_expert_diversity_matches_expert_similarity_and_is_differentiable():
    model = lily.inject(tiny_bert(2), LilyConfig(TARGETS, r=4, num_B=3))
    set_experts(model, torch.randn)
    banks = lily.get_adapter(model).banks.values()
    off = ~torch.eye(3, dtype=torch.bool)
    expected = sum(lily.expert_similarity(b.B)[off].square().mean() for b in banks) / len(banks)
    penalty = lily.expert_diversity(model)
    assert 0 < penalty.item() < 1 and penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    assert all(b.B.grad is not None and b.B.grad.isfinite().all() and b.B.grad.abs().sum() > 0 for b in banks)
    with torch.no_grad():
        for b in banks:
            b.B -= 0.05 * b.B.grad
    assert lily.expert_diversity(model).item() < penalty.item()  # a step down the gradient pushes experts apart


def test_expert_diversity_of_zero_and_single_experts():
    model = lily.inject(tiny_bert(2), LilyConfig(TARGETS, r=4, num_B=3))  # "lora" init: every expert zero
    penalty = lily.expert_diversity(model)
    assert penalty.item() == 0.0
    penalty.backward()
    assert all(b.B.grad is not None and b.B.grad.isfinite().all() for b in lily.get_adapter(model).banks.values())
    single = lily.inject(tiny_bert(2), LilyConfig(TARGETS, r=4, num_B=1, init="experts"))
    assert lily.expert_diversity(single).item() == 0.0


# training: up-projections, options, end to end


def test_up_projections_of_lily_and_peft_models():
    base = tiny_bert(2)
    for routing in ("sample", "static", "uniform"):
        cfg = LilyConfig(TARGETS, r=4, num_B=3, routing=routing, parallel_modules=[BERT_MLP],
                         trainable_modules=["classifier"])  # fmt: skip
        model = lily.inject(copy.deepcopy(base), cfg)
        expected = {id(b.B) for b in lily.get_adapter(model).banks.values()}
        expected |= {id(branch.router) for _, branch in branches(model) if branch.router is not None}
        assert len(expected) == 3 + (0 if routing == "uniform" else 6)
        assert up_projections(model) == expected
    named = {
        "lora": (peft.LoraConfig(r=2, target_modules=TARGETS, modules_to_save=["classifier"]), ("lora_B",)),
        "peft-lily": (peft.LilyConfig(r=2, stride_A=1, num_B=3, target_modules=TARGETS), ("lily_B", "lily_router")),
        "peft-vera": (peft.VeraConfig(r=8, target_modules=TARGETS), ("vera_lambda_b",)),
    }
    for config, parts in named.values():
        model = peft.get_peft_model(copy.deepcopy(base), config)
        expected = {id(p) for n, p in model.named_parameters() if any(f".{part}." in n for part in parts)}
        assert expected and up_projections(model) == expected
        assert all(p.requires_grad for p in model.parameters() if id(p) in expected)
    assert up_projections(copy.deepcopy(base)) == set()  # full fine-tuning: no up-projections


def test_train_options_are_checked():
    for kw, message in [
        ({"budget": 1000, "budget_lora_rank": 2}, "give --budget or --budget-lora-rank, not both"),
        ({"expert_diversity": 0.1, "method": "lora"}, "--expert-diversity needs --method lily"),
        ({"expert_diversity": 0.1, "method": "peft-lily"}, "--expert-diversity needs --method lily"),
        ({"lr_ratio_B": 0}, "--lr-ratio-B must be a number > 0"),
        ({"budget": 0}, "--budget must be a whole number >= 1"),
        ({"budget_lora_rank": 1.5}, "--budget-lora-rank must be a whole number >= 1"),
        ({"lily_init": "zeros"}, "--lily-init must be one of lora, experts"),
        ({"router_init_scale": 2000}, r"--router-init-scale must be a number in \(0, 1000\]"),
        ({"expert_diversity": -1}, "--expert-diversity must be a number >= 0"),
        (
            {"method": "peft-vera", "budget_lora_rank": 2, "lora_r": 4},
            r"^--method peft-vera sizes VeRA by --vera-r alone; leave out --budget-lora-rank, --lora-r\.$",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(task="text-cls", data="x.csv", **kw)
    flags = "--budget-lora-rank 3 --lily-init experts --router-init-scale 2 --expert-diversity 0.5 --lr-ratio-B 16"
    args = build_parser().parse_args(["train", "--data", "x.csv", *flags.split()])
    cfg = config_from_args(args)
    assert (cfg.budget_lora_rank, cfg.lily_init, cfg.router_init_scale, cfg.expert_diversity, cfg.lr_ratio_B) == (
        3, "experts", 2.0, 0.5, 16.0)  # fmt: skip


def test_train_budget_sets_lilys_rank():
    base = tiny_bert(4)
    cfg = TrainConfig(task="text-cls", data="x.csv", budget_lora_rank=3, num_A=2, num_B=3, lily_init="experts",
                      router_init_scale=2.0, routing="static")  # fmt: skip
    config = lily_config(cfg, base, ["classifier"])
    assert (config.init, config.router_init_scale, config.num_B, config.routing) == ("experts", 2.0, 3, "static")
    assert lily.lily_parameters(base, config) <= lora_cost(base, 3) < lily.lily_parameters(base, one_rank_more(config))
    model, info = apply_method(cfg, copy.deepcopy(base), ["classifier"])
    assert info.adapter == info.lily_budget == lily.count_parameters(model) and info.head == 32 * 3 + 3
    tight = TrainConfig(task="text-cls", data="x.csv", budget=100)
    with pytest.raises(ConfigError, match=r"^--budget/--budget-lora-rank: fit_budget: a budget of 100 parameters"):
        lily_config(tight, base, ["classifier"])


def test_peft_lily_has_lilys_a_groups_or_refuses():
    """--method peft-lily promises Lily's r, A groups and experts; 4 layers in 3 groups is not a PEFT stride."""
    cfg = TrainConfig(task="text-cls", data="x.csv", method="peft-lily", r=4, num_A=3, num_B=3)
    with pytest.raises(ConfigError, match="cannot make --num-A 3 groups of 4 layers"):
        apply_method(cfg, tiny_bert(4), ["classifier"])
    cfg = TrainConfig(task="text-cls", data="x.csv", method="peft-lily", r=4, num_A=2, num_B=3, routing="batch")
    _, info = apply_method(cfg, tiny_bert(4), ["classifier"])
    assert info.adapter == info.lily_budget
    for bad in ({"routing": "token"}, {"lily_init": "experts"}, {"router_init_scale": 2.0}, {"adapter_dropout": 0.1}):
        with pytest.raises(ConfigError, match=r"--method peft-lily .* has no"):
            TrainConfig(task="text-cls", data="x.csv", method="peft-lily", **bad)


def record_optimizer_groups(monkeypatch):
    """Record each AdamW's groups (lr, parameter ids) and the model `up_projections` is asked about."""
    seen = {}

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            seen.setdefault("groups", [(g["lr"], {id(p) for p in g["params"]}) for g in self.param_groups])

    def recording_up(model):
        seen.setdefault("model", model)
        return up_projections(model)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr("lily.train.loop.up_projections", recording_up)
    return seen


def test_peft_lily_run_scales_its_up_projections_and_reloads(tiny_bert_dir, text_csv, tmp_path, monkeypatch, capsys):
    seen = record_optimizer_groups(monkeypatch)
    out = tmp_path / "peft-lily"
    metrics = train(text_cfg(tiny_bert_dir, text_csv, out, method="peft-lily", lr_ratio_B=4.0, r=3, **TINY), log=quiet)
    params = metrics["parameters"]
    # 2 layers x (query, value): A 2 x 2 x 3 x 32, B 2 x 4 x 3 x 32, routers 4 x 4 x 3
    assert params["adapter"] == params["lily_budget"] == 384 + 768 + 48 and params["head"] == 32 * 3 + 3
    names = {id(p): n for n, p in seen["model"].named_parameters()}
    by_lr = {lr: {names[i] for i in ids} for lr, ids in seen["groups"]}
    assert sorted(by_lr) == [1e-2, 4e-2]  # adapter A and head at --lr, up-projections at 4 x --lr
    up = by_lr[4e-2]
    assert len(up) == 2 + 4 and all(".lily_B." in n or ".lily_router." in n for n in up)
    assert all(".lily_B." not in n and ".lily_router." not in n for n in by_lr[1e-2])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"test accuracy: {metrics['test']:.4f}"


def test_peft_vera_run_trains_per_layer_scales_and_reloads(tiny_bert_dir, text_csv, tmp_path, monkeypatch, capsys):
    """--method peft-vera: PEFT's VeRA at --vera-r, its random projections seeded by --seed and saved with it."""
    seen = record_optimizer_groups(monkeypatch)
    out = tmp_path / "vera"
    metrics = train(text_cfg(tiny_bert_dir, text_csv, out, method="peft-vera", vera_r=8, lr_ratio_B=2.0, **TINY),
                    log=quiet)  # fmt: skip
    params = metrics["parameters"]
    assert params["adapter"] == 4 * (8 + 32) and params["head"] == 32 * 3 + 3  # 4 layers x (lambda_d r + lambda_b d)
    names = {id(p): n for n, p in seen["model"].named_parameters()}
    by_lr = {lr: {names[i] for i in ids} for lr, ids in seen["groups"]}
    assert sorted(by_lr) == [1e-2, 2e-2] and all(".vera_lambda_b." in n for n in by_lr[2e-2]) and len(by_lr[2e-2]) == 4
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "VERA"
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"test accuracy: {metrics['test']:.4f}"


def test_peft_vera_refuses_conv_targets():
    cfg = TrainConfig(task="image-cls", data="x", method="peft-vera", targets=["projection"], num_A=1)
    with pytest.raises(ConfigError, match=r"^--method peft-vera: PEFT's VeRA adapts Linear layers only, not the convs"):
        apply_method(cfg, tiny_vit(1), ["classifier"])


def test_budget_lora_rank_run_with_experts_init_and_diversity(tiny_bert_dir, text_csv, tmp_path, monkeypatch):
    seen = record_optimizer_groups(monkeypatch)
    calls = []
    penalty = lily.expert_diversity
    monkeypatch.setattr(lily, "expert_diversity", lambda model: calls.append(1) or penalty(model))
    out = tmp_path / "budget"
    cfg = text_cfg(tiny_bert_dir, text_csv, out, budget_lora_rank=2, lily_init="experts", expert_diversity=0.1,
                   lr_ratio_B=2.0, **TINY)  # fmt: skip
    metrics = train(cfg, log=quiet)
    params = metrics["parameters"]
    # LoRA r=2 on 2 layers x (query, value) of width 32: 2 x 4 x 64 = 512. Lily (num_A=2, num_B=4, sample routing)
    # costs 400 per rank (A 128 + B 256 + routers 16), so r=1 is the largest that fits.
    assert params["lora_params"] // params["lora_r"] == 256
    assert params["adapter"] == params["lily_budget"] == 400 <= 2 * 256
    saved = json.loads((out / "adapter" / CONFIG_NAME).read_text())["config"]
    assert (saved["r"], saved["init"], saved["num_B"]) == (1, "experts", 4)
    assert metrics["data"]["train"] == 16 and len(calls) == 2  # one penalty per step: 16 examples, batch 8
    names = {id(p): n for n, p in seen["model"].named_parameters()}
    up = {names[i] for lr, ids in seen["groups"] if lr == 2e-2 for i in ids}
    assert len(up) == 2 + 4 and all(n.endswith((".B", ".router")) for n in up)
