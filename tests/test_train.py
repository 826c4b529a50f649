"""`lily train`, `lily eval`, `lily predict` end to end on tiny random models and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lily.cli import main
from lily.train.config import TrainConfig
from lily.train.console import Interrupted
from lily.train.loop import train
from tests.helpers import torchrun

SMALL = {"epochs": 2, "batch_size": 8, "max_train_samples": None, "max_eval_samples": None, "max_test_samples": None}


def text_cfg(model_dir, data, out, **kw) -> TrainConfig:
    return TrainConfig(task="text-cls", model=model_dir, data=data, output_dir=str(out), **{**SMALL, "lr": 1e-2, **kw})


def quiet(*args):
    pass


def train_under_torchrun(model_dir, data, out, *flags) -> dict:
    """`lily train` with text_cfg's settings (plus `flags`) on 2 CPU processes under torchrun; its metrics."""
    torchrun("-m", "lily", "train", "--model", model_dir, "--data", data, "--output-dir", str(out),
             "--batch-size", "8", "--lr", "0.01", "--max-train-samples", "none", "--max-eval-samples", "none",
             "--max-test-samples", "none", *flags)  # fmt: skip
    return json.loads((Path(out) / "metrics.json").read_text())


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
    assert f"lily train --data {text_csv} " in card and f" --model {tiny_bert_dir} " in card and "--lr 0.01" in card
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
        with pytest.raises(Interrupted, match=r"checkpoint saved at step \d+ in .*; continue with --resume"):
            train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "b", **kw), log=quiet)
    resumed = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "b", resume=True, **kw), log=quiet)
    for curve in ("history", "loss_curve", "val_curve"):
        assert resumed[curve] == reference[curve], curve
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
    single = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "one", epochs=1), log=quiet)
    metrics = train_under_torchrun(tiny_bert_dir, text_csv, tmp_path / "two", "--epochs", "1")
    assert metrics["num_processes"] == 2
    assert metrics["steps"] == 5  # 73 examples / (2 processes x 8) per step
    assert metrics["test_before"] == pytest.approx(single["test_before"])  # same untrained model, same 9 examples


def test_fsdp_under_torchrun_trains_like_ddp_and_resumes(tiny_bert_dir, text_csv, tmp_path):
    """--fsdp (FSDP2, 2 CPU processes) reaches the adapter DDP reaches; its checkpoint loads back with --resume."""

    def run(out, *extra):
        return train_under_torchrun(tiny_bert_dir, text_csv, out, "--epochs", "2", *extra)

    ddp, fsdp = run(tmp_path / "ddp"), run(tmp_path / "fsdp", "--fsdp")
    assert fsdp["steps"] == ddp["steps"] == 10 and fsdp["config"]["fsdp"]
    a, b = (load_file(tmp_path / d / "adapter" / "lily_adapter.safetensors") for d in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(a[k].abs().max().item() for k in a if k.endswith(".B")) > 1e-3  # B moved away from its zero start
    assert fsdp["test"] == pytest.approx(ddp["test"]) and fsdp["best_val"] == pytest.approx(ddp["best_val"])
    (tmp_path / "fsdp" / "metrics.json").unlink()  # as if stopped while testing: every step done and checkpointed
    resumed = run(tmp_path / "fsdp", "--fsdp", "--resume")  # loads the checkpoint, tests again
    assert resumed["test"] == pytest.approx(fsdp["test"])


def test_bf16_mixed_precision_and_gradient_checkpointing_options(tiny_bert_dir, text_csv, tmp_path):
    cfg = text_cfg(tiny_bert_dir, text_csv, tmp_path / "bf16", epochs=1, mixed_precision="bf16",
                   gradient_checkpointing=True)  # fmt: skip
    metrics = train(cfg, log=quiet)
    assert metrics["config"]["mixed_precision"] == "bf16" and 0 <= metrics["test"] <= 1
    assert all(h["train_loss"] == h["train_loss"] for h in metrics["history"])  # finite, not NaN


def test_first_run_after_building_a_bundled_model_equals_every_later_run(tiny_bert_dir, text_csv, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """The first use of a bundled model builds it (drawing random numbers, as a real conversion does); the run
    is seeded after that, so it equals the next run with the same seed, which finds the model built."""
    import random
    import shutil

    import numpy as np

    from lily import assets

    def tiny() -> Path:
        def build(out: Path, stage) -> None:
            stage("converting")
            torch.randn(1000), random.random(), np.random.rand(10)
            shutil.copytree(tiny_bert_dir, out, dirs_exist_ok=True)

        return assets._cached("tiny-bert", build, stages=1)

    monkeypatch.setenv("LILY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(assets.MODELS, "tiny", tiny)
    kw = {"epochs": 1, "adapter_dropout": 0.1, "max_train_samples": 32}
    first = train(text_cfg("tiny", text_csv, tmp_path / "first", **kw), log=quiet)
    assert (tmp_path / "cache" / "tiny-bert" / "config.json").is_file()
    later = train(text_cfg("tiny", text_csv, tmp_path / "later", **kw), log=quiet)
    for key in ("test_before", "loss_curve", "history", "test"):
        assert first[key] == later[key], key
    a, b = (load_file(tmp_path / d / "adapter" / "lily_adapter.safetensors") for d in ("first", "later"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plot_has_loss_per_logged_step_validation_and_reference_lines(tiny_bert_dir, text_csv, tmp_path):
    from lily.train.outputs import baseline_run, plot_figure, reference_runs

    few = {"epochs": 1, "max_train_samples": 16}
    lora = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "lora", method="lora", **few), log=quiet)
    said = []
    cfg = text_cfg(tiny_bert_dir, text_csv, tmp_path / "lily", max_train_samples=40, log_every=3, eval_every=2)
    metrics = train(cfg, log=said.append)
    logged = [3, 6, 9, 10]  # 5 steps per epoch, and the last step
    assert [p["step"] for p in metrics["loss_curve"]] == logged
    assert [p["step"] for p in metrics["val_curve"]] == [2, 4, 5, 6, 8, 10]  # step 10: once, not twice
    assert [h["val_metric"] for h in metrics["history"]] == [p["val_metric"] for p in metrics["val_curve"] if
                                                             p["step"] in (5, 10)]  # fmt: skip
    assert metrics["references"] == [{"method": "lora", "test": lora["test"], "run": str(tmp_path / "lora")}]
    assert sum(line.startswith("step ") and "training loss" in line for line in said) == len(logged)  # no terminal
    loss_axis, metric_axis = plot_figure(metrics, metrics["references"]).axes
    assert list(loss_axis.lines[0].get_xdata()) == logged
    assert list(metric_axis.lines[0].get_ydata()) == [p["val_metric"] for p in metrics["val_curve"]]
    legend = [t.get_text() for t in metric_axis.get_legend().get_texts()]
    assert f"test, untrained (step 0): {metrics['test_before']:.4f}" in legend
    assert f"test, lora: {lora['test']:.4f}" in legend
    assert (tmp_path / "lily" / "plot.png").stat().st_size > 20_000
    elsewhere = text_cfg(tiny_bert_dir, text_csv, tmp_path / "elsewhere" / "run",
                         baseline=str(tmp_path / "lora" / "metrics.json"))  # fmt: skip
    assert [r["test"] for r in reference_runs(Path(elsewhere.output_dir), elsewhere, baseline_run(elsewhere))] == [
        lora["test"]]  # fmt: skip


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tiny_bert_dir, text_csv, tmp_path):
    out, few = tmp_path / "run", {"epochs": 1, "max_train_samples": 16}
    first = train(text_cfg(tiny_bert_dir, text_csv, out, **few), log=quiet)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    said = []
    again = train(text_cfg(tiny_bert_dir, text_csv, out, resume=True, **few), log=said.append)
    assert again["test"] == first["test"] and again["history"] == first["history"]
    assert said == [f"the run in {out} is finished (test accuracy {first['test']:.4f}); nothing to resume, nothing "
                    "changed."]  # fmt: skip
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_broken_matplotlib_fails_before_anything_is_loaded_or_trained(tiny_bert_dir, text_csv, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    import sys

    from lily.train import loop
    from lily.train.outputs import PlotError

    loaded = []
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as an import that fails
    monkeypatch.setattr(loop, "load_task_data", loaded.append)
    with pytest.raises(PlotError, match=r"plot\.png needs matplotlib's Agg backend, which cannot be loaded"):
        train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "out"), log=quiet)
    assert not loaded and not (tmp_path / "out").exists()
