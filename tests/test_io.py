"""save_adapter/load_adapter: small files, exact round trips, clear errors, nothing half-written."""

import json
import os

import pytest
import torch

import lily
from lily import CheckpointError
from lily.io import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers import BUILDERS, TARGETS, model_inputs, randomize_adapter, tiny_llama


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
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    size, n = (tmp_path / WEIGHTS_NAME).stat().st_size, lily.count_parameters(model)
    assert 4 * n <= size <= 1.01 * 4 * n + 8192, (size, 4 * n)


def test_config_is_readable_json_with_the_plan(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format"] == "lily-adapter" and meta["config"]["routing"] == "token"
    assert [t["key"] for t in meta["target_types"]] == ["q_proj", "v_proj"]
    assert meta["target_types"][0]["groups"] == [0, 0, 1, 1]


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lily.io.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lily.save_adapter(adapted(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CONFIG_NAME).write_text("earlier run")
    with pytest.raises(OSError):
        lily.save_adapter(adapted(), tmp_path / "old")
    assert os.listdir(tmp_path / "old") == [CONFIG_NAME]
    assert (tmp_path / "old" / CONFIG_NAME).read_text() == "earlier run"


def test_truncated_weights_file_is_reported(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    model = fresh()
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lily.load_adapter(model, tmp_path)
    assert not hasattr(model, "lily_adapters")


def test_corrupt_config_is_reported(tmp_path):
    lily.save_adapter(adapted(), tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(text[:40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lily.load_adapter(fresh(), tmp_path)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match=r"adapter_config\.json is missing"):
        lily.load_adapter(fresh(), tmp_path / "nope")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    lily.save_adapter(adapted(r=4), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["r"] = 8  # config says r=8, tensors hold r=4
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
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
