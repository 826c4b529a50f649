"""save_adapter/load_adapter: small files, exact round trips, clear errors, checks before the model is touched."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils.peft_utils import find_adapter_config_file

import lily
from lily import CheckpointError
from lily.adapter import saved_parameters
from lily.io import CONFIG_NAME, V1_CONFIG_NAME, V1_WEIGHTS_NAME, WEIGHTS_NAME, expected_tensors
from tests.helpers import (
    BUILDERS,
    TARGETS,
    assert_same_state,
    model_inputs,
    model_state,
    randomize_adapter,
    tiny_bert,
    tiny_llama,
    tiny_vit,
)


def adapted(family="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    cfg = {"target_modules": TARGETS[family], "r": 4, "num_A": 2, "num_B": 3, **overrides}
    lily.inject(model, lily.LilyConfig(**cfg))
    randomize_adapter(model, seed=seed)
    return model


def fresh(family="llama", seed=0):
    torch.manual_seed(seed)
    return BUILDERS[family]()


def edit_config(directory, edit):
    """Apply `edit` to the parsed lily_config.json of `directory` and write it back."""
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit(meta)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))


def replace_weights(directory, tensors):
    """Write other tensors as the adapter's weights, with a matching checksum (a well-formed but different file)."""
    save_file(tensors, directory / WEIGHTS_NAME)
    data = (directory / WEIGHTS_NAME).read_bytes()
    edit_config(directory, lambda m: m.update(weights={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))


def write_v1(directory):
    """Turn a saved adapter into the layout today's main writes (format version 1)."""
    meta = json.loads((directory / CONFIG_NAME).read_text())
    v1 = {"format": "lily-adapter", "format_version": 1, "config": meta["config"],
          "routing_reason": meta["routing_reason"], "target_types": meta["target_types"]}  # fmt: skip
    (directory / V1_CONFIG_NAME).write_text(json.dumps(v1, indent=2))
    (directory / WEIGHTS_NAME).rename(directory / V1_WEIGHTS_NAME)
    (directory / CONFIG_NAME).unlink()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_round_trip_gives_identical_outputs(tmp_path, family):
    model = adapted(family)
    lily.save_adapter(model, tmp_path / "ad")
    loaded = lily.load_adapter(fresh(family), tmp_path / "ad")
    inputs = model_inputs(family)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert lily.get_adapter(loaded).config == lily.get_adapter(model).config
    assert lily.get_adapter(loaded).routing_reason == lily.get_adapter(model).routing_reason


def test_file_holds_only_adapter_tensors_once_and_is_4_bytes_per_parameter(tmp_path):
    model = tiny_llama(num_layers=8)
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=16, num_A=2, num_B=4))
    lily.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["lily_adapter.safetensors", "lily_config.json"]
    size, n = (tmp_path / WEIGHTS_NAME).stat().st_size, lily.count_parameters(model)
    assert 4 * n <= size <= 1.01 * 4 * n + 8192, (size, 4 * n)


def test_config_records_the_plan_base_model_version_and_weights_checksum(tmp_path):
    model = adapted()
    model.config._name_or_path, model.config._commit_hash = "org/tiny-llama", "0123abc"
    lily.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (meta["format"], meta["format_version"], meta["lily_version"]) == ("lily-adapter", 2, lily.__version__)
    assert (meta["base_model_name_or_path"], meta["base_model_revision"]) == ("org/tiny-llama", "0123abc")
    assert meta["base_model_class"] == "LlamaForCausalLM"
    assert meta["config"]["routing"] == "token"
    assert [t["key"] for t in meta["target_types"]] == ["q_proj", "v_proj"]
    assert meta["target_types"][0]["groups"] == [0, 0, 1, 1]
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert meta["weights"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    lily.save_adapter(adapted(), tmp_path / "plain")
    meta = json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())
    assert (meta["base_model_name_or_path"], meta["base_model_revision"]) == (None, None)


def test_transformers_does_not_take_a_lily_folder_for_a_peft_adapter(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    assert find_adapter_config_file(str(tmp_path)) is None  # with adapter_config.json it raised KeyError later


def test_config_from_pretrained(tmp_path):
    model = adapted(scaling=0.5)
    lily.save_adapter(model, tmp_path)
    assert lily.LilyConfig.from_pretrained(tmp_path) == lily.get_adapter(model).config
    with pytest.raises(CheckpointError, match=r"lily_config\.json is missing"):
        lily.LilyConfig.from_pretrained(tmp_path / "nope")


def test_version_1_folder_loads_and_a_new_save_replaces_it(tmp_path):
    model = adapted("bert", trainable_modules=["classifier"])
    lily.save_adapter(model, tmp_path)
    write_v1(tmp_path)
    assert lily.LilyConfig.from_pretrained(tmp_path) == lily.get_adapter(model).config
    loaded = lily.load_adapter(fresh("bert"), tmp_path)
    inputs = model_inputs("bert")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    lily.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["lily_adapter.safetensors", "lily_config.json"]


def test_newer_format_and_peft_folders_are_named(tmp_path):
    lily.save_adapter(adapted(), tmp_path / "new")
    edit_config(tmp_path / "new", lambda m: m.update(format_version=3))
    with pytest.raises(CheckpointError, match=r"written by a newer lily \(format_version 3.*upgrade lily"):
        lily.load_adapter(fresh(), tmp_path / "new")
    model = adapted(routing="batch", num_A=1)
    lily.to_peft(model, tmp_path / "peft")
    with pytest.raises(CheckpointError, match=r"PEFT checkpoint \(peft_type='LILY'\).*lily.from_peft"):
        lily.load_adapter(fresh(), tmp_path / "peft")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("routing_reason"), r"missing field\(s\) \['routing_reason'\]"),
        (lambda m: m.update(stride_A=2), r"unknown field\(s\) \['stride_A'\]"),
        (lambda m: m.update(target_types="q_proj"), "field 'target_types' must be list, got str"),
        (lambda m: m.update(target_types=[1]), "'target_types' must be a list of objects"),
        (lambda m: m.update(config=[]), "field 'config' must be dict, got list"),
        (lambda m: m.update(base_model_revision=3), "field 'base_model_revision' must be str or null, got int"),
        (lambda m: m.update(format_version=True), "format_version True"),
        (lambda m: m["weights"].update(sha256="zz"), "'weights.sha256' must be 64 lowercase hex digits"),
        (lambda m: m["weights"].pop("size"), r"missing field\(s\) \['size'\]"),
        (lambda m: m["config"].pop("target_modules"), r"lacks the required field\(s\) \['target_modules'\]"),
        (lambda m: m["config"].update(trainable_modules=None), "trainable_modules must be a list"),
        (lambda m: m["config"].update(r=3000000), "r=3000000 is above 65536"),
        (lambda m: m["target_types"][0].update(groups=[0, 0, 0, 1]), r"'q_proj' has groups=\[0, 0, 0, 1\] in the file"),
    ],
)
def test_bad_config_fields_are_named_and_the_model_is_untouched(tmp_path, edit, message):
    lily.save_adapter(adapted(), tmp_path)
    edit_config(tmp_path, edit)
    model = fresh()
    before = model_state(model)
    with pytest.raises(CheckpointError, match=message):
        lily.load_adapter(model, tmp_path)
    assert_same_state(before, model_state(model))


def test_everything_is_checked_before_the_model_is_touched(tmp_path, monkeypatch):
    lily.save_adapter(adapted(r=4), tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(r=60000, num_B=4000))  # ~60 GB of banks if allocated

    def no_inject(*args, **kwargs):
        raise AssertionError("inject was called before the file was checked")

    monkeypatch.setattr("lily.io.inject", no_inject)
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape .* in the file but .*60000"):
        lily.load_adapter(fresh(), tmp_path)


def test_non_float_tensors_are_refused(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["lily_adapter.banks.q_proj.A.0"] = tensors["lily_adapter.banks.q_proj.A.0"].to(torch.int32)
    replace_weights(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"'lily_adapter.banks.q_proj.A.0' has dtype I32"):
        lily.load_adapter(fresh(), tmp_path)


def test_weights_of_another_save_are_refused(tmp_path):
    lily.save_adapter(adapted(seed=0), tmp_path / "a")
    lily.save_adapter(adapted(seed=1), tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_NAME).replace(tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"interrupted save: .*lily_adapter.safetensors does not match"):
        lily.load_adapter(fresh(), tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"lily_adapter\.safetensors is missing beside"):
        lily.load_adapter(fresh(), tmp_path / "a")


def test_truncated_or_corrupt_files_are_reported(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    model = fresh()
    with pytest.raises(CheckpointError, match="does not match the sha256 and size"):
        lily.load_adapter(model, tmp_path)
    assert not hasattr(model, "lily_adapters")
    (tmp_path / WEIGHTS_NAME).write_bytes(data)
    write_v1(tmp_path)  # no checksum: the safetensors header catches it
    (tmp_path / V1_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lily.load_adapter(model, tmp_path)
    (tmp_path / V1_CONFIG_NAME).write_text((tmp_path / V1_CONFIG_NAME).read_text()[:40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lily.load_adapter(model, tmp_path)
    assert not hasattr(model, "lily_adapters")


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match=r"no adapter at .*nope': no such directory"):
        lily.load_adapter(fresh(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"lily_config\.json is missing"):
        lily.load_adapter(fresh(), tmp_path / "empty")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    lily.save_adapter(adapted(r=4), tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(r=8))  # config says r=8, tensors hold r=4
    model = fresh()
    with pytest.raises(
        CheckpointError, match=r"tensor '.*' has shape \([\d, ]+\) in the file but \([\d, ]+\) in the model"
    ):
        lily.load_adapter(model, tmp_path)
    assert not hasattr(model, "lily_adapters")  # the model is left as it was
    assert not any(True for _ in lily.lily_layers(model))


def test_adapter_for_another_model_is_refused(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        lily.load_adapter(tiny_llama(num_layers=6), tmp_path)
    with pytest.raises(CheckpointError, match=r"does not fit this model.*matched no module"):
        lily.load_adapter(BUILDERS["bert"](), tmp_path)


def test_loading_into_an_adapted_model_is_refused(tmp_path):
    model = adapted()
    lily.save_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match="already has an adapter named 'default'"):
        lily.load_adapter(model, tmp_path)


def test_failed_load_leaves_a_model_with_adapters_exactly_as_it_was(tmp_path, monkeypatch):
    lily.save_adapter(adapted(seed=1), tmp_path / "good")
    lily.save_adapter(adapted(seed=1, r=8), tmp_path / "bad")
    edit_config(tmp_path / "bad", lambda m: m["config"].update(r=4))
    model = adapted()
    lily.inject(model, lily.LilyConfig(target_modules=["k_proj"], r=4), name="other")
    before = model_state(model)
    with pytest.raises(CheckpointError, match="has shape"):  # caught from the header, before injection
        lily.load_adapter(model, tmp_path / "bad", name="new")
    assert_same_state(before, model_state(model))
    calls = []

    def failing_assign(param, value):
        calls.append(param)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        param.data.copy_(value)

    monkeypatch.setattr("lily.io.assign", failing_assign)  # fails half-way through the copy, after injection
    with pytest.raises(RuntimeError, match="device lost"):
        lily.load_adapter(model, tmp_path / "good", name="new", is_trainable=True)
    assert_same_state(before, model_state(model))


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    lily.save_adapter(adapted("bert", trainable_modules=["classifier"]), tmp_path)
    frozen = lily.load_adapter(fresh("bert"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = lily.load_adapter(fresh("bert"), tmp_path, is_trainable=True)
    grads = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert grads == set(lily.adapter_parameters(trainable)) | {"classifier.weight", "classifier.bias"}


def test_load_adapter_weights_refuses_another_config_and_a_merged_adapter(tmp_path):
    model = adapted(routing="static")
    lily.save_adapter(adapted(routing="static", scaling=0.5), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"saved with scaling=0\.5, but adapter 'default' has scaling=1\.0"):
        lily.load_adapter_weights(model, tmp_path / "other")
    lily.save_adapter(adapted(routing="static", seed=1), tmp_path / "same")
    lily.merge(model)
    before = model_state(model)
    with pytest.raises(CheckpointError, match=r"merged into the weights .* lily.unmerge\(model\)"):
        lily.load_adapter_weights(model, tmp_path / "same")
    assert_same_state(before, model_state(model))
    lily.unmerge(model)
    lily.load_adapter_weights(model, tmp_path / "same")
    assert torch.equal(model.lily_adapters["default"].banks["q_proj"].B, load_file(
        tmp_path / "same" / WEIGHTS_NAME)["lily_adapter.banks.q_proj.B"])  # fmt: skip


def test_trainable_modules_are_saved_and_loaded(tmp_path):
    model = adapted("bert", trainable_modules=["classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    lily.save_adapter(model, tmp_path)
    loaded = lily.load_adapter(fresh("bert"), tmp_path)  # same base; its head differs by the +1 above
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    inputs = model_inputs("bert")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize(
    ("build", "first", "config"),
    [
        (tiny_llama, ["k_proj"], {"target_modules": ["q_proj", "v_proj"], "routing": "token"}),
        (tiny_llama, ["q_proj"], {"target_modules": ["q_proj"], "routing": "static", "layers_per_A": 3}),
        (tiny_llama, ["k_proj"], {"target_modules": ["q_proj"], "routing": "uniform"}),
        (tiny_bert, ["key"], {"target_modules": ["query"], "trainable_modules": ["classifier"]}),
        (tiny_vit, ["q_proj"], {"target_modules": ["v_proj"], "parallel_modules": ["mlp"]}),
        (tiny_vit, ["fc2"], {"target_modules": ["v_proj"], "parallel_modules": ["fc1>fc2"]}),  # sink wrapped before
        (tiny_vit, ["q_proj"], {"target_modules": ["fc2"], "parallel_modules": ["fc1>fc2"]}),  # and by this adapter
    ],
)
def test_expected_tensors_are_what_injection_creates(build, first, config):
    model = lily.inject(build(), lily.LilyConfig(target_modules=first, r=2))
    cfg = lily.LilyConfig(r=4, num_B=3, **config)
    plan, expected = expected_tensors(model, cfg, "here")
    lily.inject(model, cfg, "second")
    assert expected == {k: tuple(p.shape) for k, p in saved_parameters(model, "second").items()}
    assert [t.to_dict() for t in plan] == [t.to_dict() for t in lily.get_adapter(model, "second").plan]
