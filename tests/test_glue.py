"""`lily recipe glue-*`: the paper's per-task settings, GLUE's file formats, and runs end to end on a tiny RoBERTa."""

import json
import random

import pytest
import torch
import transformers

import lily
from lily.cli import main
from lily.errors import ConfigError
from lily.recipes import defaults, glue, names
from lily.train.config import TrainConfig
from lily.train.data import DataError, load_task_data
from lily.train.methods import lily_config
from lily.train.tasks import head_modules

from .conftest import LABEL_WORDS, WORDS

PAPER_PARAMETERS = {"cola": 396_288, "mrpc": 198_144, "qnli": 198_144, "rte": 297_216, "sst2": 198_144,
                    "stsb": 198_144}  # fmt: skip
"""Lily's adapter size per task on RoBERTa-base, as derived from the paper's settings (../shared/lily-method.md)."""


def words(rng: random.Random, n: int = 4) -> str:
    return " ".join(rng.choice(WORDS[9:]) for _ in range(n))


def write(path, lines: list[str], bom: bool = False) -> None:
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def cola_dir(tmp_path_factory):
    """CoLA as GLUE's download script writes it: header-less train/dev, a test file with a header and no labels."""
    root, rng = tmp_path_factory.mktemp("CoLA"), random.Random(0)

    def rows(n):
        out = []
        for i in range(n):
            label = i % 2
            cue = rng.choice(LABEL_WORDS["positive" if label else "negative"])
            out.append(f"src{i % 3}\t{label}\t{'' if label else '*'}\t{words(rng)} {cue}")
        return out

    write(root / "train.tsv", rows(32))
    write(root / "dev.tsv", rows(12))
    write(root / "test.tsv", ["index\tsentence"] + [f"{i}\t{words(rng)}" for i in range(5)])
    return root


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("STS-B"), random.Random(1)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"

    def rows(n):
        return [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{words(rng)}\t{words(rng)}\t{rng.uniform(0, 5):.3f}"
                for i in range(n)]  # fmt: skip

    write(root / "train.tsv", [header, *rows(24)])
    write(root / "dev.tsv", [header, *rows(10)])
    write(root / "test.tsv", [header.rsplit("\t", 1)[0]] + [r.rsplit("\t", 1)[0] for r in rows(4)])
    return root


@pytest.fixture(scope="module")
def mrpc_dir(tmp_path_factory):
    """MRPC: a byte-order mark before the header, '#1 String' columns, and quote characters left as they are."""
    root, rng = tmp_path_factory.mktemp("MRPC"), random.Random(2)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f'{i % 2}\t{i}\t{i + 100}\t"{words(rng)}\t{words(rng)}"' for i in range(20)]
    write(root / "train.tsv", [header, *rows[:14]], bom=True)
    write(root / "dev.tsv", [header, *rows[14:]], bom=True)
    return root


def test_recipes_hold_the_run_scripts_settings():
    assert [n for n in names() if n.startswith("glue-")] == [f"glue-{t}" for t in glue.SETTINGS]
    for task, (ne, scale, head_lr, lr, epochs, batch) in glue.SETTINGS.items():
        cfg = TrainConfig(**defaults(f"glue-{task}"))
        assert (cfg.num_A, cfg.num_B, cfg.scaling, cfg.head_lr, cfg.lr, cfg.epochs, cfg.batch_size) == (
            ne, ne, scale, head_lr, lr, epochs, batch)  # fmt: skip
        assert (cfg.r, cfg.max_length, cfg.warmup_ratio, cfg.weight_decay, cfg.schedule) == (32, 512, 0.06, 0, "linear")
        assert cfg.test_split == "validation" and cfg.select_on_test and cfg.dataset_config == task
    assert TrainConfig(**defaults("glue-cola")).metric == "mcc"
    assert TrainConfig(**defaults("glue-stsb")).task == "text-reg" and TrainConfig(**defaults("glue-stsb")).metric == (
        "pearson")  # fmt: skip
    assert TrainConfig(**defaults("glue-mrpc")).metric == "accuracy"  # the paper reports MRPC as accuracy
    assert glue.SETTINGS["sst2"] == (2, 0.01, 1e-2, 5e-3, 40, 32)  # spot check against the paper's table


def _budget(task: str, config: transformers.RobertaConfig) -> int:
    with torch.device("meta"):
        model = transformers.RobertaForSequenceClassification(config)
    cfg = TrainConfig(**defaults(f"glue-{task}"))
    return lily.lily_parameters(model, lily_config(cfg, model, head_modules(model)))


@pytest.mark.parametrize("task", list(glue.SETTINGS))
def test_adapter_sizes_on_roberta_base_match_the_paper(task):
    assert _budget(task, transformers.RobertaConfig()) == PAPER_PARAMETERS[task]


def test_roberta_large_widths_are_read_from_the_model():
    large = transformers.RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096)  # fmt: skip
    # per target (query, value): 4 A of 1024 x 32, 4 B of 32 x 1024, 24 routers of 32 x 4
    assert _budget("cola", large) == 2 * (4 * 1024 * 32 + 4 * 32 * 1024 + 24 * 32 * 4)


def _cfg(name: str, data, **kw) -> TrainConfig:
    return TrainConfig(**{**defaults(name), "data": str(data), **kw})


def test_glue_tsv_folders_load_with_dev_as_the_test_split(cola_dir, stsb_dir, mrpc_dir):
    cola = load_task_data(_cfg("glue-cola", cola_dir))
    assert cola.sizes() == {"train": 32, "validation": 0, "test": 12} and cola.labels == ["0", "1"]
    (text, pair), label = cola.splits["test"][0]
    assert pair is None and label == 0 and len(text.split()) == 5
    stsb = load_task_data(_cfg("glue-stsb", stsb_dir))
    (_, pair), score = stsb.splits["train"][0]
    assert stsb.labels == [] and isinstance(score, float) and 0 <= score <= 5 and pair
    mrpc = load_task_data(_cfg("glue-mrpc", mrpc_dir))
    assert mrpc.sizes() == {"train": 14, "validation": 0, "test": 6} and mrpc.labels == ["0", "1"]
    (first, second), _ = mrpc.splits["train"][0]
    assert first.startswith('"') and second.endswith('"')  # quotes are text in GLUE's .tsv files
    held_out = load_task_data(_cfg("glue-cola", cola_dir, select_on_test=False))
    assert held_out.sizes() == {"train": 29, "validation": 3, "test": 12}  # validation carved from train


def test_glue_format_errors_name_the_fault(tmp_path, cola_dir):
    headed = tmp_path / "headed"
    headed.mkdir()
    for name in ("train.tsv", "dev.tsv"):  # CoLA saved again with a header row
        write(headed / name, ["source\tlabel\toriginal_label\tsentence", (cola_dir / name).read_text().strip()])
    with pytest.raises(DataError, match=r"has a header row .* but --columns"):
        load_task_data(_cfg("glue-cola", headed))
    assert load_task_data(_cfg("glue-cola", headed, columns=None)).sizes()["train"] == 32
    (tmp_path / "train.tsv").write_text((cola_dir / "train.tsv").read_text())
    with pytest.raises(DataError, match=r"--test-split validation, but .* has no validation split"):
        load_task_data(_cfg("glue-cola", tmp_path))
    (tmp_path / "dev.tsv").write_text("src\t1\t\n")
    with pytest.raises(DataError, match=r"dev.tsv, row 1: 3 fields where --columns names 4"):
        load_task_data(_cfg("glue-cola", tmp_path))
    (headed / "dev.tsv").write_text("source\tlabel\toriginal_label\tsentence\nsrc\t1\t\tgood day\textra\n")
    with pytest.raises(DataError, match=r"dev.tsv, row 1: 5 fields where the header names 4"):  # a tab in a text
        load_task_data(_cfg("glue-cola", headed, columns=None))
    (tmp_path / "single.tsv").write_text((cola_dir / "train.tsv").read_text())
    with pytest.raises(DataError, match=r"--test-split validation, but .*single.tsv' has no validation split"):
        load_task_data(_cfg("glue-cola", tmp_path / "single.tsv"))
    with pytest.raises(DataError, match="bundled dataset 'tweets' has no validation split"):
        load_task_data(_cfg("glue-sst2", "tweets"))
    with pytest.raises(ConfigError, match="--metric='pearson' does not fit --task text-cls"):
        TrainConfig(task="text-cls", metric="pearson")


def _run(name: str, model: str, data, out, *extra: str) -> dict:
    code = main(["recipe", name, "--model", model, "--data", str(data), "--output-dir", str(out), "--epochs", "3",
                 "--batch-size", "8", "--max-length", "24", "--r", "4", *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_cola_recipe_runs_end_to_end_and_reports_mcc(tiny_roberta_dir, cola_dir, tmp_path, capsys):
    metrics = _run("glue-cola", tiny_roberta_dir, cola_dir, tmp_path / "cola", "--lr", "1e-2", "--head-lr", "1e-2")
    assert metrics["metric"] == "mcc" and metrics["selected_on"] == "test"
    assert metrics["data"] == {"train": 32, "validation": 0, "test": 12}
    assert len(metrics["history"]) == 3 and -1 <= metrics["test"] <= 1
    assert metrics["test"] == pytest.approx(metrics["best_val"])  # dev is both: the best epoch's dev score
    adapter = json.loads((tmp_path / "cola" / "adapter" / "lily_config.json").read_text())["config"]
    assert adapter["target_modules"] == ["query", "value"] and adapter["num_A"] == 4 and adapter["scaling"] == 0.01
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "cola")]) == 0
    assert f"test mcc: {metrics['test']:.4f}" in capsys.readouterr().out


def test_stsb_recipe_trains_a_regression_head(tiny_roberta_dir, stsb_dir, tmp_path, capsys):
    metrics = _run("glue-stsb", tiny_roberta_dir, stsb_dir, tmp_path / "stsb")
    assert metrics["metric"] == "pearson" and metrics["task"] == "text-reg" and -1 <= metrics["test"] <= 1
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "stsb"), "good day\tbad day"]) == 0
    text, score = capsys.readouterr().out.strip().split("\t")[-2:]
    assert text == "bad day" and float(score) == pytest.approx(float(score))
    assert main(["predict", str(tmp_path / "stsb"), "no tab here"]) == 2  # a pair task needs two texts


def test_bfloat16_weights_keep_lily_and_the_head_in_float32(tiny_roberta_dir, cola_dir, tmp_path):
    _run("glue-rte", tiny_roberta_dir, cola_dir, tmp_path / "bf16", "--model-dtype", "bfloat16", "--epochs", "1",
         "--dataset-config", "none", "--text-pair-column", "none", "--columns", "source", "label", "x", "sentence",
         "--text-column", "sentence")  # fmt: skip
    from lily.train.runs import load_run

    model = load_run(tmp_path / "bf16").model
    query = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query"))
    assert query.weight.dtype == torch.bfloat16
    assert {p.dtype for p in lily.adapter_parameters(model).values()} == {torch.float32}
    assert {p.dtype for p in model.classifier.parameters()} == {torch.float32}


class _ClassLabel:
    def __init__(self, names):
        self.names = names


class _Table(list):
    """What the code reads of a `datasets` split: its rows and its features."""

    def __init__(self, rows, features):
        super().__init__(rows)
        self.features = features


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` serving MRPC as nyu-mll/glue lays it out: ClassLabel ids, a test split labelled -1.
    HF_HUB_OFFLINE=1, as a user with a populated cache has it, so no network probe runs."""
    import sys
    import types

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def load_dataset(name, config=None):
        calls.append((name, config))
        features = {"sentence1": None, "sentence2": None, "label": _ClassLabel(["not_equivalent", "equivalent"])}

        def rows(n, label):
            return [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": label(i), "idx": i} for i in range(n)]

        return {"train": _Table(rows(10, lambda i: i % 2), features),
                "validation": _Table(rows(4, lambda i: 1), features),
                "test": _Table(rows(3, lambda i: -1), features)}  # fmt: skip

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_glue_keeps_class_order_and_refuses_hidden_labels(fake_hub):
    data = load_task_data(TrainConfig(**defaults("glue-mrpc")))
    assert fake_hub == [("nyu-mll/glue", "mrpc")]
    assert data.labels == ["not_equivalent", "equivalent"]  # the dataset's order: F1's positive class is index 1
    assert data.sizes() == {"train": 10, "validation": 0, "test": 4}
    assert data.splits["test"][0] == (("a 0", "b 0"), 1)
    with pytest.raises(DataError, match=r"test split of 'nyu-mll/glue' has unlabelled rows \(label -1\)"):
        load_task_data(TrainConfig(**{**defaults("glue-mrpc"), "test_split": "test"}))
