"""nn.Conv2d targets: A is a k x k conv with the base conv's geometry, each B expert a 1x1 conv, and the router
sees one r-vector per output position. Checked against a reference written with conv ops, in every routing mode."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lily
from lily import CheckpointError, TargetError
from lily.io import CONFIG_NAME
from tests.helpers import capture_layer_io, randomize_adapter

MODES = list(lily.ROUTING_MODES)


def conv_net() -> nn.Sequential:
    """Convs with every geometry a base conv can have: padding, dilation, stride, reflect padding, 1x1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect"), nn.SiLU(),
        nn.Conv2d(8, 6, 1),
    )  # fmt: skip


CONV_TARGETS = r"[0246]"  # one target name ("layer"): the two 8 -> 8 3x3 convs share their A and B


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))


class TinyUNet(nn.Module):
    """A diffusers-free UNet-like stack: down blocks, a strided downsample, a middle block, up blocks fed by skip
    concatenations, nearest upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.ModuleList([Block(8, 8), Block(8, 16)])
        self.downsample = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mid = Block(16, 16)
        self.up = nn.ModuleList([Block(32, 8), Block(16, 8)])
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.down[0](self.conv_in(x))
        h2 = self.down[1](self.downsample(h1))
        u = self.up[0](torch.cat([self.mid(h2), h2], dim=1))
        u = self.up[1](torch.cat([F.interpolate(u, scale_factor=2.0), h1], dim=1))
        return self.conv_out(u)


def reference_conv_delta(conv: nn.Conv2d, x, a, experts, router, mode):
    """Lily's update on a Conv2d written out with conv ops, one expert at a time.

    a: (r, in, k, k) applied with the base conv's stride, padding and dilation; experts (E, out, r) as 1x1 convs;
    router (E, r) as a 1x1 conv giving per-position logits, (E,) for "static", None for "uniform".
    """
    num_experts = experts.shape[0]
    padding = conv.padding
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        x, padding = F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode), 0
    h = F.conv2d(x, a, stride=conv.stride, padding=padding, dilation=conv.dilation)  # (N, r, H, W)
    per_expert = [F.conv2d(h, experts[e][:, :, None, None]) for e in range(num_experts)]  # each (N, out, H, W)
    if mode == "uniform":
        return sum(per_expert) / num_experts
    if mode == "static":
        w = torch.softmax(router, dim=0)
        return sum(w[e] * per_expert[e] for e in range(num_experts))
    probs = torch.softmax(F.conv2d(h, router[:, :, None, None]), dim=1)  # (N, E, H, W): per position
    if mode == "token":
        return sum(probs[:, e : e + 1] * per_expert[e] for e in range(num_experts))
    if mode == "batch":
        w = probs.mean(dim=(0, 2, 3))
        return sum(w[e] * per_expert[e] for e in range(num_experts))
    assert mode == "sample"
    w = probs.mean(dim=(2, 3))  # (N, E): one mix per image
    return sum(w[:, e, None, None, None] * per_expert[e] for e in range(num_experts))


def reference_conv_layer(layer, x):
    branch = layer.adapters[layer.active]
    bank = branch.bank
    delta = reference_conv_delta(layer.base_layer, x, bank.A[branch.group], bank.B, branch.router, branch.routing)
    return layer.base_layer(x) + branch.scaling * delta


def adapted(build, routing, seed=0, **overrides):
    model = build()
    cfg = {"target_modules": CONV_TARGETS, "r": 4, "num_A": 1, "num_B": 3, "scaling": 0.7, "routing": routing}
    lily.inject(model, lily.LilyConfig(**{**cfg, **overrides}))
    randomize_adapter(model, seed=seed)
    return model.double()


def images(batch=3, size=8, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_conv_net_end_to_end_matches_reference(mode):
    base = conv_net().double()
    model = adapted(conv_net, mode)
    x = images()
    expected = x
    for module, site in zip(base, model, strict=False):  # the adapted Sequential ends with its lily_adapters
        if isinstance(module, nn.Conv2d):
            branch = site.adapters["default"]
            bank = branch.bank
            delta = reference_conv_delta(module, expected, bank.A[branch.group], bank.B, branch.router, mode)
            expected = module(expected) + 0.7 * delta
        else:
            expected = module(expected)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_unet_like_stack_every_layer_matches_reference(mode):
    torch.manual_seed(0)
    model = adapted(TinyUNet, mode, target_modules=["conv1", "conv2", "skip", "downsample"], num_A=None,
                    layers_per_A=2)  # fmt: skip
    records = capture_layer_io(model, x=images())
    assert len(records) == 16  # 5 blocks x 3 convs + the downsample
    for layer, x, out in records:
        torch.testing.assert_close(out, reference_conv_layer(layer, x), rtol=1e-12, atol=1e-12)
    keys = {t.key: (t.in_features, t.out_features, t.kernel_size) for t in lily.get_adapter(model).plan}
    assert keys["conv1_32x8_k3x3"] == (32, 8, (3, 3)) and keys["skip_32x8_k1x1"] == (32, 8, (1, 1))
    assert keys["downsample"] == (8, 8, (3, 3))


def test_kernel_size_is_part_of_the_target_type():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1))
    lily.inject(model, lily.LilyConfig(target_modules=r"\d", r=2, num_A=1, num_B=2))
    plan = lily.get_adapter(model).plan
    assert [(t.key, t.module_names) for t in plan] == [("layer_4x4_k3x3", ("0", "2")), ("layer_4x4_k1x1", ("1",))]
    banks = lily.get_adapter(model).banks
    assert banks["layer_4x4_k3x3"].A[0].shape == (2, 4, 3, 3) and banks["layer_4x4_k1x1"].A[0].shape == (2, 4, 1, 1)
    assert banks["layer_4x4_k3x3"].B.shape == (2, 4, 2)  # E x out x r, like a Linear type's experts


def test_grouped_conv_is_refused_with_a_named_error():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(TargetError, match=r"module '1' is an nn\.Conv2d with groups=8"):
        lily.inject(model, lily.LilyConfig(target_modules=r"\d", num_A=1))


class Conv2dSame(nn.Conv2d):
    """TensorFlow-style "same" padding, computed in forward (as timm and EfficientNet ports do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def test_a_conv_with_its_own_forward_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Conv2dSame(4, 4, 2))
    with pytest.raises(TargetError, match=r"module '1' is a Conv2dSame, an nn\.Conv2d with its own forward"):
        lily.inject(model, lily.LilyConfig(target_modules=r"\d", num_A=1))


def test_fresh_adapter_is_the_base_and_gradients_reach_only_the_adapter():
    model = lily.inject(conv_net(), lily.LilyConfig(target_modules=CONV_TARGETS, r=4, num_A=1, routing="token"))
    x = images().float()
    assert torch.equal(model(x), conv_net()(x))  # B starts at zero
    randomize_adapter(model)
    model(x).square().mean().backward()
    params = lily.adapter_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    adapter_ids = {id(p) for p in params.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_an_unbatched_image_is_a_batch_of_one(mode):
    model = adapted(conv_net, mode)
    x = images()
    torch.testing.assert_close(model(x[1]), model(x[1:2])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("routing", ["static", "uniform"])
def test_merge_folds_the_composed_kernel_and_unmerge_restores(routing):
    model = adapted(conv_net, routing)
    x = images()
    before = model(x)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lily.lily_layers(model)}
    expected = {}
    for name, layer in lily.lily_layers(model):
        branch = layer.adapters["default"]
        w = torch.full((3,), 1 / 3, dtype=torch.float64) if routing == "uniform" else torch.softmax(branch.router, 0)
        mixed = torch.einsum("e,eor->or", w, branch.bank.B)
        kernel = torch.einsum("or,rikl->oikl", mixed, branch.bank.A[branch.group])  # 1x1 conv after the A conv
        expected[name] = weights[name] + 0.7 * kernel
    with torch.no_grad():
        lily.merge(model)
        for name, layer in lily.lily_layers(model):
            torch.testing.assert_close(layer.base_layer.weight, expected[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
        lily.unmerge(model)
        for name, layer in lily.lily_layers(model):
            torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=0, atol=1e-12)
        lily.remove(model, merge=True)
        assert all(type(m) is nn.Conv2d for m in model if not isinstance(m, nn.SiLU))
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_save_load_round_trip_and_kernel_checked(tmp_path):
    model = adapted(conv_net, "sample").float()
    lily.save_adapter(model, tmp_path / "ad")
    types = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["target_types"]
    assert [t["kernel_size"] for t in types] == [[3, 3], [3, 3], [1, 1]]
    loaded = lily.load_adapter(conv_net(), tmp_path / "ad")
    x = images().float()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    torch.manual_seed(0)
    other = nn.Sequential(*[nn.Conv2d(m.in_channels, m.out_channels, 5 if m.kernel_size == (3, 3) else 1)
                            if isinstance(m, nn.Conv2d) else m for m in conv_net()])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"'layer_3x8_k3x3' in the file but 'layer_3x8_k5x5' in the model"):
        lily.load_adapter(other, tmp_path / "ad")


def test_count_parameters_and_summary():
    model = adapted(conv_net, "sample")
    r, num_B = 4, 3
    a = 3 * 9 * r + 8 * 9 * r + 8 * 1 * r  # one A per type: 3->8 3x3, 8->8 3x3 (two layers), 8->6 1x1
    b = num_B * r * (8 + 8 + 6)
    router = 4 * num_B * r  # one per conv
    assert lily.count_parameters(model) == a + b + router
    text = lily.summary(model)
    assert "3 -> 8 (3x3 kernel)" in text and "8 -> 6 (1x1 kernel)" in text
    assert f"trainable adapter parameters: {a + b + router:,}" in text


def test_routing_statistics_and_diagnostics_run_on_convs():
    model = adapted(conv_net, "token")
    stats = lily.routing_statistics(model, [{"input": images()}])
    assert sorted(stats) == ["0", "2", "4", "6"]
    assert all(abs(sum(s["mean_weights"]) - 1) < 1e-9 for s in stats.values())
    report = lily.diagnostics(model, stats)
    assert all(0 < layer["rank_numerical"] <= 4 for layer in report["layers"])


def test_peft_export_is_refused_with_a_message(tmp_path):
    model = adapted(conv_net, "batch")
    with pytest.raises(CheckpointError, match=r"PEFT's Lily adapts only nn\.Linear.*'0' is an nn\.Conv2d"):
        lily.to_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
