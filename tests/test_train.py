"""`lily train`, `lily eval`, `lily predict` end to end on tiny random models and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lily.cli import main
from lily.train.config import TrainConfig
from lily.train.loop import train

SMALL = {"epochs": 2, "batch_size": 8, "max_train_samples": None, "max_eval_samples": None, "max_test_samples": None}


def text_cfg(model_dir, data, out, **kw) -> TrainConfig:
    return TrainConfig(task="text-cls", model=model_dir, data=data, output_dir=str(out), **{**SMALL, "lr": 1e-2, **kw})


def quiet(*args):
    pass


def test_text_classification_end_to_end(tiny_bert_dir, text_csv, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train(text_cfg(tiny_bert_dir, text_csv, out), log=quiet)
    assert metrics["data"] == {"test": 9, "validation": 8, "train": 73}
    assert metrics["labels"] == ["negative", "neutral", "positive"]
    assert len(metrics["history"]) == 2 and all(h["train_loss"] > 0 for h in metrics["history"])
    assert 0 <= metrics["test"] <= 1 and metrics["test_before"] is not None
    assert metrics["parameters"]["adapter"] == metrics["parameters"]["lily_budget"]
    assert metrics["parameters"]["head"] == 32 * 3 + 3
    for name in ("run.json", "metrics.json", "plot.png", "adapter/lily_config.json", "checkpoint/current.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    card = (out / "adapter" / "README.md").read_text()
    assert "library_name: lily" in card and f"test accuracy: {metrics['test']:.4f}" in card
    assert f"lily train --model {tiny_bert_dir} --data {text_csv}" in card and "--lr 0.01" in card
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"test accuracy: {metrics['test']:.4f}"
    assert main(["predict", str(out), "the car is good", "what a bad day"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("the car is good\t")
    assert lines[0].split("\t")[1].split()[0] in metrics["labels"]


@pytest.mark.parametrize("method", ["lora", "full", "head-only"])
def test_other_methods_train_and_reload(method, tiny_bert_dir, text_csv, tmp_path, capsys):
    out = tmp_path / method
    metrics = train(text_cfg(tiny_bert_dir, text_csv, out, method=method, epochs=1), log=quiet)
    params = metrics["parameters"]
    if method == "lora":
        assert (
            params["lora_r"] >= 1
            and abs(params["adapter"] - params["lily_budget"]) <= params["adapter"] / params["lora_r"]
        )
    if method == "head-only":
        assert params["trainable"] == params["head"]
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"test accuracy: {metrics['test']:.4f}"


def test_causal_lm_end_to_end(tiny_llama_dir, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "lm"
    cfg = TrainConfig(task="causal-lm", model=tiny_llama_dir, data=chat_jsonl, output_dir=str(out), lr=1e-2, **SMALL)
    metrics = train(cfg, log=quiet)
    assert metrics["metric"] == "perplexity" and not metrics["higher_is_better"]
    assert metrics["test"] < metrics["test_before"]  # learning the three canned replies is easy
    assert json.loads((out / "adapter" / "lily_config.json").read_text())["config"]["routing"] == "token"
    assert main(["predict", str(out), "hello there"]) == 0
    assert capsys.readouterr().out.startswith("hello there\t")


def test_image_classification_end_to_end(tiny_vit_dir, image_folder, tmp_path, capsys):
    """DINOv2 with the paper's ViT placement: q/v adapters plus a parallel adapter on every MLP block."""
    out = tmp_path / "img"
    cfg = TrainConfig(task="image-cls", model=tiny_vit_dir, data=image_folder, output_dir=str(out), image_size=16,
                      lr=1e-2, parallel_modules=["mlp"], **SMALL)  # fmt: skip
    metrics = train(cfg, log=quiet)
    saved = load_file(out / "adapter" / "lily_adapter.safetensors")
    assert sum(".mlp.lily_parallel.router" in k for k in saved) == 2  # one router per block
    assert metrics["parameters"]["adapter"] == metrics["parameters"]["lily_budget"]  # parallel part counted
    assert metrics["labels"] == ["circle", "square", "stripe"]
    assert sum(metrics["data"].values()) == 36
    image = next(Path(image_folder, "square").iterdir())
    assert main(["predict", str(out), str(image)]) == 0
    assert capsys.readouterr().out.split("\t")[1].split()[0] in metrics["labels"]


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the `calls`-th backward pass raise KeyboardInterrupt, as Ctrl-C would."""
    import accelerate

    original, seen = accelerate.Accelerator.backward, {"n": 0}

    def backward(self, loss, **kwargs):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
        return original(self, loss, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_after_ctrl_c_equals_uninterrupted_run(tiny_bert_dir, text_csv, tmp_path, monkeypatch, grad_accum):
    kw = {"adapter_dropout": 0.1, "grad_accum": grad_accum, "epochs": 3}  # dropout: the RNG state must be restored
    reference = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "a", **kw), log=quiet)
    with monkeypatch.context() as m:
        _interrupt_after(m, 14)  # mid second epoch (10 batches per epoch)
        with pytest.raises(SystemExit) as stop:
            train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "b", **kw), log=quiet)
    assert stop.value.code == 130
    resumed = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "b", resume=True, **kw), log=quiet)
    assert resumed["history"] == reference["history"]
    assert resumed["test"] == reference["test"]
    a, b = (load_file(tmp_path / d / "adapter" / "lily_adapter.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_yaml_config_and_flags(tmp_path):
    from lily.cli import build_parser
    from lily.train.config import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("task: causal-lm\nr: 8\nnum-B: 2\ntargets: [q_proj, k_proj]\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--r", "4", "--max-steps", "none"])
    cfg = config_from_args(args)
    assert (cfg.task, cfg.r, cfg.num_B, cfg.targets, cfg.max_steps) == ("causal-lm", 4, 2, ["q_proj", "k_proj"], None)
    assert (cfg.model, cfg.data, cfg.max_length) == ("smollm2", "chat", 128)


def test_module_entry_point_help():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lily", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--num-A" in result.stdout and "--method" in result.stdout


def test_shipped_accelerate_config_is_valid():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(Path(__file__).resolve().parent.parent / "configs/accelerate/multi_gpu.yaml")
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes > 1


def test_torchrun_two_processes_train_and_evaluate_every_example_once(tiny_bert_dir, text_csv, tmp_path):
    """The same command under torchrun (2 CPU processes, gloo); evaluation counts each example exactly once."""
    import subprocess
    import sys

    single = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "one", epochs=1), log=quiet)
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lily", "train",
               "--model", tiny_bert_dir, "--data", text_csv, "--output-dir", str(out), "--epochs", "1",
               "--batch-size", "8", "--max-train-samples", "none", "--max-eval-samples", "none",
               "--max-test-samples", "none", "--lr", "0.01"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["steps"] == 5  # 73 examples / (2 processes x 8) per step
    assert metrics["test_before"] == pytest.approx(single["test_before"])  # same untrained model, same 9 examples


def test_fsdp_under_torchrun_trains_like_ddp_and_resumes(tiny_bert_dir, text_csv, tmp_path):
    """--fsdp (FSDP2, 2 CPU processes) reaches the adapter DDP reaches; its checkpoint loads back with --resume."""
    import subprocess
    import sys

    def run(out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lily", "train",
                   "--model", tiny_bert_dir, "--data", text_csv, "--output-dir", str(out), "--epochs", "2",
                   "--batch-size", "8", "--max-train-samples", "none", "--max-eval-samples", "none",
                   "--max-test-samples", "none", "--lr", "0.01", *extra]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    ddp, fsdp = run(tmp_path / "ddp"), run(tmp_path / "fsdp", "--fsdp")
    assert fsdp["steps"] == ddp["steps"] == 10 and fsdp["config"]["fsdp"]
    a, b = (load_file(tmp_path / d / "adapter" / "lily_adapter.safetensors") for d in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(a[k].abs().max().item() for k in a if k.endswith(".B")) > 1e-3  # B moved away from its zero start
    assert fsdp["test"] == pytest.approx(ddp["test"]) and fsdp["best_val"] == pytest.approx(ddp["best_val"])
    resumed = run(tmp_path / "fsdp", "--fsdp", "--resume")  # every step done: loads the checkpoint, tests again
    assert resumed["test"] == pytest.approx(fsdp["test"])


def test_bf16_mixed_precision_and_gradient_checkpointing_options(tiny_bert_dir, text_csv, tmp_path):
    cfg = text_cfg(tiny_bert_dir, text_csv, tmp_path / "bf16", epochs=1, mixed_precision="bf16",
                   gradient_checkpointing=True)  # fmt: skip
    metrics = train(cfg, log=quiet)
    assert metrics["config"]["mixed_precision"] == "bf16" and 0 <= metrics["test"] <= 1
    assert all(h["train_loss"] == h["train_loss"] for h in metrics["history"])  # finite, not NaN
