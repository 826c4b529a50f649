"""`lily train` refuses bad input with a clear message and leaves earlier results intact."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import transformers

from lily.cli import main
from lily.train.config import TrainConfig
from lily.train.data import DataError
from lily.train.loop import TrainingError, train
from lily.train.outputs import RunDirError, load_checkpoint
from lily.train.tasks import ModelError
from tests.test_train import quiet, text_cfg


def test_unknown_model_path_is_named(text_csv, tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", text_csv, "--output-dir",
                 str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "cannot load model" in err and "no-such-model" in err


def test_missing_column_lists_the_columns(tiny_bert_dir, text_csv, tmp_path):
    with pytest.raises(DataError, match=r"no column 'sentence' \(columns: \['text', 'label'\]\).*--text-column"):
        train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "out", text_column="sentence"), log=quiet)


def test_unknown_label_in_test_split_is_named(tiny_bert_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, labels in (("train", ["pos", "neg"] * 10), ("test", ["pos", "neg", "maybe"])):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([["the car is good", y] for y in labels])
    with pytest.raises(DataError, match=r"label 'maybe' \(row 3 of the test split\) does not occur in the training"):
        train(text_cfg(tiny_bert_dir, str(folder), tmp_path / "out"), log=quiet)


def test_head_with_another_label_count_is_refused(tiny_bert_dir, text_csv, tmp_path):
    model_dir = tmp_path / "five-label-model"
    shutil.copytree(tiny_bert_dir, model_dir)
    model = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=5)
    model.save_pretrained(model_dir)
    with pytest.raises(ModelError, match="classification head"):
        train(text_cfg(str(model_dir), text_csv, tmp_path / "out"), log=quiet)


def test_output_dir_with_a_different_run_is_kept(tiny_bert_dir, text_csv, tmp_path):
    out = tmp_path / "out"
    first = train(text_cfg(tiny_bert_dir, text_csv, out, epochs=1), log=quiet)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match=r"holds a different run \(it differs in lr, r\)"):
        train(text_cfg(tiny_bert_dir, text_csv, out, epochs=1, r=4, lr=1e-3), log=quiet)
    with pytest.raises(RunDirError, match="already holds this finished run; pass --resume"):
        train(text_cfg(tiny_bert_dir, text_csv, out, epochs=1), log=quiet)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert json.loads((out / "metrics.json").read_text())["test"] == first["test"]
    with pytest.raises(RunDirError, match="no checkpoint to resume"):
        train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "empty", resume=True), log=quiet)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_bert_dir, text_csv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original, calls = transformers.BertForSequenceClassification.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 13:  # in the second epoch (10 batches per epoch)
                result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(transformers.BertForSequenceClassification, "forward", forward)
    with pytest.raises(TrainingError, match=r"loss became nan at step 13 \(epoch 2\); stopped.*Lower --lr"):
        train(text_cfg(tiny_bert_dir, text_csv, out), log=quiet)
    _, state = load_checkpoint(out)
    assert state["progress"]["step"] == 10  # the end of epoch 1, untouched by the NaN
    assert (out / "adapter" / "lily_adapter.safetensors").is_file()
    assert not (out / "metrics.json").exists()


def test_out_of_memory_names_the_knobs(tiny_bert_dir, text_csv, tmp_path, monkeypatch):
    import accelerate

    def backward(self, loss, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)
    with pytest.raises(TrainingError, match=r"out of memory at --batch-size 8: lower --batch-size.*--grad-accum"):
        train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "out"), log=quiet)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "prefix"}, "--method"), ({"epochs": 0}, "--epochs"), ({"lr": 0}, "--lr"), ({"task": "qa"}, "--task")],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(Exception, match=message):
        TrainConfig(**kwargs)


def test_dataset_for_another_task_is_refused(tmp_path):
    with pytest.raises(DataError, match="bundled dataset 'chat' is not for task text-cls"):
        train(TrainConfig(data="chat", output_dir=str(tmp_path / "o")), log=quiet)
