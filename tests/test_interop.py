"""PEFT interoperability: PEFT Lily checkpoints import with the same outputs, our exports load in PEFT."""

import copy
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lily
from lily import CheckpointError
from tests.helpers import model_inputs, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama

CASES = {  # family: (base builder, targets, modules trained fully)
    "llama": (tiny_llama, ["q_proj", "v_proj"], []),
    "bert": (tiny_bert, ["query", "value"], ["classifier"]),
}


def outputs(model, family):
    model.eval()
    with torch.no_grad():
        return model(**model_inputs(family)).logits


def peft_lily(family, stride_A=2):
    build, targets, heads = CASES[family]
    torch.manual_seed(0)
    base = build()
    config = peft.LilyConfig(r=4, stride_A=stride_A, num_B=3, scaling=0.7, target_modules=targets,
                             modules_to_save=heads or None, init_weights=False)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5)  # a trained head differs from the base's
    return base, model


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_checkpoint_imports_with_identical_outputs(tmp_path, family):
    base, theirs = peft_lily(family)
    theirs.save_pretrained(tmp_path)
    ours = lily.from_peft(tmp_path, copy.deepcopy(base))
    assert lily.get_adapter(ours).routing == "batch"
    assert lily.get_adapter(ours).config.layers_per_A == 2
    torch.testing.assert_close(outputs(ours, family), outputs(theirs, family), rtol=0, atol=1e-5)
    assert not torch.allclose(outputs(ours, family), outputs(base, family), atol=1e-3)  # the adapter does something
    per_layer = sum(t.numel() for k, t in load_file(tmp_path / "adapter_model.safetensors").items() if ".lily_" in k)
    # 2 A groups of 4 x 32 per type + 3 experts of 4 x d_out per type + 8 routers of 3 x 4; v is 32 -> 16 in Llama
    assert lily.count_parameters(ours) == {"llama": 1184, "bert": 1376}[family] < per_layer / 2


@pytest.mark.parametrize("family", sorted(CASES))
def test_export_loads_in_peft_with_identical_outputs(tmp_path, family):
    build, targets, heads = CASES[family]
    torch.manual_seed(0)
    base = build()
    config = lily.LilyConfig(target_modules=targets, r=4, layers_per_A=3, num_B=3, scaling=0.7, routing="batch",
                             trainable_modules=heads)  # fmt: skip
    ours = lily.inject(copy.deepcopy(base), config)
    randomize_adapter(ours)
    with torch.no_grad():
        for param in lily.adapter_parameters(ours).values():
            param.mul_(0.5)
    lily.to_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["stride_A"] == 3
    torch.testing.assert_close(outputs(theirs, family), outputs(ours, family), rtol=0, atol=1e-5)
    back = lily.from_peft(tmp_path, copy.deepcopy(base), name="again")
    torch.testing.assert_close(outputs(back, family), outputs(ours, family), rtol=0, atol=1e-6)


def test_export_refuses_what_peft_cannot_express(tmp_path):
    model = lily.inject(tiny_llama(), lily.LilyConfig(target_modules=["q_proj"], r=4, routing="token"))
    with pytest.raises(CheckpointError, match=r"batch mean only; .* routing='token'"):
        lily.to_peft(model, tmp_path)
    model = lily.inject(tiny_llama(), lily.LilyConfig(target_modules=["q_proj"], r=4, num_A=3, routing="batch"))
    with pytest.raises(CheckpointError, match=r"one fixed length \(stride_A\).*\[2, 1, 1\]"):
        lily.to_peft(model, tmp_path)
    model = lily.inject(tiny_gpt2(), lily.LilyConfig(target_modules=["c_attn"], r=4, routing="batch"))
    with pytest.raises(CheckpointError, match=r"only nn.Linear; .* Conv1D"):
        lily.to_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_import_refuses_sharing_lily_cannot_express(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert()  # query and value have the same shape: a regex makes PEFT share across both
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(r=4, stride_A=2, num_B=3,
                                                                     target_modules=r".*\.(query|value)"))  # fmt: skip
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match="not expressible"):
        lily.from_peft(tmp_path, model)
    assert not hasattr(model, "lily_adapters")  # left as it was


def test_import_refuses_unshared_copies_and_other_methods(tmp_path):
    base, theirs = peft_lily("llama")
    theirs.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lily_A.weight"] += 1.0  # shared with layer 0's
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"layers.1.self_attn.q_proj.lily_A.weight' differs from .* not shared"):
        lily.from_peft(tmp_path, copy.deepcopy(base))
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a PEFT Lily checkpoint \(peft_type='LORA'"):
        lily.from_peft(tmp_path, copy.deepcopy(base))


def test_import_names_a_missing_config_field(tmp_path):
    base, theirs = peft_lily("llama")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["stride_A"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=r"lacks the field\(s\) \['stride_A'\]"):
        lily.from_peft(tmp_path, model)
    assert not hasattr(model, "lily_adapters")


def test_import_trains_modules_to_save_and_refuses_other_tensors(tmp_path):
    base, theirs = peft_lily("bert")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["classifier", "score"]  # what PEFT writes for sequence classifiers; BERT has no score
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = lily.from_peft(tmp_path, copy.deepcopy(base))
    assert lily.get_adapter(ours).trainable_modules == ["classifier"]
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)  # not under modules_to_save
    save_file(tensors, file)
    model = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=r"'base_model.model.bert.pooler.dense.weight' .* is neither a Lily"):
        lily.from_peft(tmp_path, model)
    assert not hasattr(model, "lily_adapters")


def test_export_refuses_one_expert_and_suffixes_peft_would_match_ambiguously(tmp_path):
    with pytest.raises(ValueError, match="`num_B` must be at least 2"):
        peft.LilyConfig(r=4, num_B=1, target_modules=["q_proj"])
    model = lily.inject(tiny_llama(), lily.LilyConfig(target_modules=["q_proj"], r=4, num_B=1, routing="batch"))
    with pytest.raises(CheckpointError, match=r"num_B=1 .*`num_B` must be at least 2"):
        lily.to_peft(model, tmp_path)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))  # fmt: skip
    lily.inject(t5, lily.LilyConfig(target_modules=["o", "wo"], r=4, layers_per_A=2, routing="batch"))
    with pytest.raises(CheckpointError, match=r"DenseReluDense.wo' ends with each of \['o', 'wo'\].*PYTHONHASHSEED"):
        lily.to_peft(t5, tmp_path)
    assert not any(tmp_path.iterdir())
