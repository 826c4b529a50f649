"""transformers workflow: save_pretrained, Trainer checkpoints (resume, best model), TRL, the Hub, merged export,
and torch.compile handles."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import transformers

import lily
from lily import CheckpointError, MergeError
from lily.io import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers import randomize_adapter, torchrun

ADAPTER_FILES = {"README.md", CONFIG_NAME, WEIGHTS_NAME}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert-base")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    return str(d)


def bert(bert_dir, routing="static"):
    model = transformers.BertForSequenceClassification.from_pretrained(bert_dir)
    config = lily.LilyConfig(target_modules=["query", "value"], r=4, num_B=3, routing=routing,
                             trainable_modules=["classifier"])  # fmt: skip
    return lily.inject(model, config)


def examples(count=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (count, 8), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(i[0] % 3)} for i in ids]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_pretrained_writes_the_adapter_only_and_both_loads_restore_it(bert_dir, tmp_path):
    model = bert(bert_dir)
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == ADAPTER_FILES
    meta = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert meta["base_model_name_or_path"] == bert_dir and meta["base_model_class"] == "BertForSequenceClassification"
    with pytest.raises((OSError, ValueError), match=r"config\.json"):  # no model here, rather than a wrong one
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 64, (2, 8))
    reloaded = lily.load_adapter(transformers.BertForSequenceClassification.from_pretrained(bert_dir), tmp_path / "out")
    alone = lily.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert torch.equal(logits(alone, ids), logits(model, ids))
    assert not any(p.requires_grad for p in alone.parameters())  # loaded for inference
    trainable = lily.from_pretrained(tmp_path / "out", is_trainable=True)
    assert all(p.requires_grad for p in lily.adapter_parameters(trainable).values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: lily" in card and f"base_model: {bert_dir}" in card


def test_removing_the_adapter_gives_back_transformers_save_pretrained(bert_dir, tmp_path):
    model = lily.remove(bert(bert_dir))
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()


def trainer(model, out, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, seed=0, report_to=[],
        save_strategy="steps", save_steps=3, logging_steps=100, use_cpu=True, dataloader_num_workers=0, **kw,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=examples(), eval_dataset=examples(8, seed=1))


def adapter_tensors(directory):
    return lily.io.read_adapter_tensors(directory)


def test_trainer_checkpoints_are_adapter_only_and_resume_bit_identically(bert_dir, tmp_path):
    full = trainer(bert(bert_dir), tmp_path / "full", max_steps=6)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert {p.name for p in checkpoint.iterdir()} >= ADAPTER_FILES
    assert not any(n.startswith(("model.", "pytorch_model")) for n in os.listdir(checkpoint))
    full.save_model(tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == ADAPTER_FILES | {"training_args.bin"}

    resumed = trainer(bert(bert_dir), tmp_path / "resumed", max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = adapter_tensors(tmp_path / "full" / "checkpoint-6"), adapter_tensors(tmp_path / "resumed" / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_load_best_model_at_end_restores_the_best_adapter(bert_dir, tmp_path):
    run = trainer(bert(bert_dir), tmp_path, max_steps=9, eval_strategy="steps", eval_steps=3,
                  load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False)  # fmt: skip
    run.train()
    best = Path(run.state.best_model_checkpoint)
    saved = adapter_tensors(best)
    ours = lily.io.saved_parameters(run.model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k].detach()) for k in saved)


def test_trainer_model_card_stays_a_lily_card(bert_dir, tmp_path):
    run = trainer(bert(bert_dir), tmp_path, max_steps=3)
    run.train()
    run.save_model()
    run.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "library_name: lily" in card and "Lily adapter" in card and "tiny" in card


@pytest.mark.parametrize("imports", [
    "from transformers import Trainer",
    "import importlib; importlib.util.find_spec('transformers.trainer'); import transformers.trainer as t; "
    "importlib.reload(t)",
])  # fmt: skip
def test_inject_defers_the_trainer_guard_to_the_import_of_trainer(bert_dir, imports):
    """Importing transformers.trainer at injection would cost seconds and pull in peft and bitsandbytes (whose
    `kernels` lookup reaches the Hub). The guard still goes on when Trainer is imported, after a mere lookup of
    the module, and again after a reload."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.test_pretrained import bert
        bert({bert_dir!r})
        print(sorted(m for m in ("transformers.trainer", "peft", "bitsandbytes") if m in sys.modules))
        {imports}
        print(getattr(sys.modules["transformers.trainer"].Trainer, "_lily_guarded", False))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout


def test_trl_sft_trainer_trains_and_saves_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "hello", "there", "how", "are", "you", "fine", "thanks"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                               eos_token="[PAD]")  # fmt: skip
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = lily.inject(transformers.LlamaForCausalLM(cfg), lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4))
    data = Dataset.from_list([{"text": "hello there how are you fine thanks"}] * 8)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=100)  # fmt: skip
    run = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    before = {k: v.detach().clone() for k, v in lily.adapter_parameters(model).items()}
    run.train()
    assert any(not torch.equal(before[k], v) for k, v in lily.adapter_parameters(model).items())
    run.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} >= ADAPTER_FILES
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_load_by_repo_id_reads_the_offline_cache(bert_dir, tmp_path, monkeypatch):
    model = bert(bert_dir)
    randomize_adapter(model)
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--someone--lily-bert" / "snapshots" / revision
    lily.save_adapter(model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = transformers.BertForSequenceClassification.from_pretrained(bert_dir)
    loaded = lily.load_adapter(base, "someone/lily-bert", revision=revision)
    ids = torch.randint(3, 64, (2, 8))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        lily.load_adapter(transformers.BertForSequenceClassification.from_pretrained(bert_dir), "someone/missing")


class FakeApi:
    uploads: ClassVar[list] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.repo = repo_id

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeApi.uploads.append((repo_id, revision, commit_message, files))
        return f"https://hub.example/{repo_id}"


def test_push_to_hub_uploads_the_adapter_and_a_lily_card(bert_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.uploads.clear()
    model = bert(bert_dir)
    lily.push_to_hub(model, "me/lily-bert", training={"command": "lily train ...", "test accuracy": 0.5})
    model.push_to_hub("me/other", commit_message="second")
    (repo, _, _, files), (repo2, _, message2, _) = FakeApi.uploads
    assert (repo, repo2, message2) == ("me/lily-bert", "me/other", "second")
    assert set(files) == ADAPTER_FILES
    card = files["README.md"].decode()
    assert "library_name: lily" in card and "lily train ..." in card and "test accuracy: 0.5" in card
    assert f"{lily.count_parameters(model):,}" in card and 'lily.from_pretrained("me/lily-bert")' in card


def test_export_merged_is_a_plain_transformers_model(bert_dir, tmp_path):
    model = bert(bert_dir)
    randomize_adapter(model)
    lily.export_merged(model, tmp_path)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ids = torch.randint(3, 64, (2, 8))
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert lily.lily_layers(model) and model.bert.encoder.layer[0].attention.self.query.merged is None
    with pytest.raises(MergeError, match="routing='sample'"):
        lily.export_merged(bert(bert_dir, routing="sample"), tmp_path / "no")


def test_verbs_on_a_compiled_handle_act_on_the_original_module(bert_dir, tmp_path):
    model = transformers.BertForSequenceClassification.from_pretrained(bert_dir)
    compiled = torch.compile(model, backend="eager")
    assert lily.inject(compiled, lily.LilyConfig(target_modules=["query"], r=4, routing="static")) is compiled
    randomize_adapter(compiled)
    lily.save_adapter(compiled, tmp_path)
    assert not any(k.startswith("_orig_mod") for k in lily.io.read_adapter_tensors(tmp_path))
    ids = torch.randint(3, 64, (2, 8))
    expected = logits(model, ids)
    other = torch.compile(transformers.BertForSequenceClassification.from_pretrained(bert_dir), backend="eager")
    lily.load_adapter(other, tmp_path)
    assert torch.equal(logits(other, ids), expected)
    lily.merge(other)
    torch.testing.assert_close(logits(other, ids), expected, rtol=1e-5, atol=1e-6)
    lily.remove(other)
    assert "lily_adapters" not in dict(other._orig_mod.named_children())


def test_trainer_under_ddp_saves_adapter_only_checkpoints_and_resumes_exactly(bert_dir, tmp_path):
    worker = Path(__file__).with_name("trainer_worker.py")

    def launch(out, *resume):
        torchrun(str(worker), bert_dir, str(out), *map(str, resume))

    launch(tmp_path / "full")
    for step in (2, 4):
        files = {p.name for p in (tmp_path / "full" / f"checkpoint-{step}").iterdir()}
        assert files >= ADAPTER_FILES and not any(n.startswith(("model.", "pytorch_model")) for n in files)
    launch(tmp_path / "resumed", tmp_path / "full" / "checkpoint-2")
    a, b = adapter_tensors(tmp_path / "full" / "checkpoint-4"), adapter_tensors(tmp_path / "resumed" / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
