"""`lily recipe mamba-commonsense`: the paper's Falcon-Mamba settings, and tiny random Mamba models end to end."""

import json

import pytest
import torch
import transformers

import lily
from lily.cli import main
from lily.recipes import commonsense, defaults, mamba, names
from lily.train.config import TrainConfig
from lily.train.data import TaskData
from lily.train.methods import lily_config
from lily.train.tasks import CausalLM

from .conftest import SPECIAL, WORDS, save_tokenizer
from .helpers import randomize_adapter
from .test_commonsense import record

MODELS = {"falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM),
          "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM)}  # fmt: skip


def tiny_mamba_dir(root, family: str) -> str:
    """A tiny random (Falcon-)Mamba with 4 layers (the recipe's 4 A groups) and the word-level test tokenizer."""
    tok = save_tokenizer(root)
    config_class, model_class = MODELS[family]
    torch.manual_seed(0)
    cfg = config_class(vocab_size=len(SPECIAL + WORDS), hidden_size=16, num_hidden_layers=4, state_size=4, expand=2,
                       conv_kernel=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.cls_token_id)  # fmt: skip
    model_class(cfg).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def falcon_mamba_dir(tmp_path_factory):
    return tiny_mamba_dir(tmp_path_factory.mktemp("tiny-falcon-mamba"), "falcon_mamba")


def test_recipe_holds_the_papers_settings():
    assert "mamba-commonsense" in names()
    cfg = TrainConfig(**defaults("mamba-commonsense"))
    assert (cfg.model, cfg.targets, cfg.r, cfg.num_A, cfg.num_B, cfg.scaling, cfg.routing) == (
        "tiiuae/falcon-mamba-7b", ["in_proj"], 40, 4, 4, 1.0, "token")  # fmt: skip
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.warmup_steps, cfg.max_length) == (
        5e-4, 1, 4, 4, 100, 256)  # fmt: skip
    assert (cfg.prompt_style, cfg.eval_every, cfg.max_eval_samples) == ("alpaca", 200, 120)  # the LLaMA recipe's


def test_adapter_size_on_falcon_mamba_7b_matches_the_paper():
    config = transformers.FalconMambaConfig(hidden_size=4096, num_hidden_layers=64, expand=2, state_size=16,
                                            vocab_size=65024)  # fmt: skip
    with torch.device("meta"):
        model = transformers.FalconMambaForCausalLM(config)
    cfg = TrainConfig(**defaults("mamba-commonsense"))
    # 4 A of 4096 x 40, 4 B of 40 x 16384, 64 routers of 40 x 4: the paper's "Lily (in) 3.3M"
    assert lily.lily_parameters(model, lily_config(cfg, model, [])) == mamba.PAPER_PARAMETERS == 3_287_040


@pytest.mark.parametrize("family", list(MODELS))
def test_cached_generation_equals_the_full_forward(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_mamba_dir(tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    lily.inject(model, lily.LilyConfig(target_modules=["in_proj"], r=4, num_A=2, num_B=3, routing="token"))
    randomize_adapter(model)
    task = CausalLM(TrainConfig(task="causal-lm", prompt_style="alpaca"), TaskData({}), model,
                    AutoTokenizer.from_pretrained(directory))  # fmt: skip
    ids = torch.tensor([task._prompt_ids("what is your name")])
    with lily.disable_adapters(model):
        base = model(input_ids=ids).logits
    assert not torch.allclose(base, model(input_ids=ids).logits)  # the adapter acts
    # the recurrent state and conv cache give the same tokens and scores as recomputing the whole sequence
    cached, full = (model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, use_cache=use, output_scores=True, return_dict_in_generate=True)
                    for use in (True, False))  # fmt: skip
    assert torch.equal(cached.sequences, full.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.scores, full.scores, strict=True)) < 1e-4
    # the evaluation batches prompts with left padding: the masked padding leaves each reply as generated alone
    prompts = ["hello", "what is your name there", ("how are you", "i am well")]
    assert task.generate(model, prompts, max_new_tokens=5, batch_size=3) == [
        task.generate(model, [p], max_new_tokens=5)[0] for p in prompts
    ]


def test_recipe_trains_and_scores_a_tiny_falcon_mamba(falcon_mamba_dir, tmp_path):
    train = [record(f"is the day good {i} answer format true/false", "true" if i % 2 else "false") for i in range(20)]
    (tmp_path / "commonsense_170k.json").write_text(json.dumps(train))
    (tmp_path / "dataset" / "boolq").mkdir(parents=True)
    (tmp_path / "dataset" / "boolq" / "test.json").write_text(json.dumps([record("how are you", "true")] * 2))
    out = tmp_path / "run"
    code = main(["recipe", "mamba-commonsense", "--model", falcon_mamba_dir, "--data",
                 str(tmp_path / "commonsense_170k.json"), "--output-dir", str(out), "--model-dtype", "float32",
                 "--mixed-precision", "no", "--grad-accum", "1", "--max-length", "64", "--r", "4",
                 "--warmup-steps", "1"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and metrics["config"]["targets"] == ["in_proj"]
    saved = json.loads((out / "adapter" / "lily_config.json").read_text())["config"]
    assert (saved["target_modules"], saved["num_A"], saved["routing"]) == (["in_proj"], 4, "token")
    results = commonsense.evaluate(out, tmp_path / "dataset", num_beams=2, max_new_tokens=4, log=lambda _: 0)
    assert list(results["sets"]) == ["boolq"] and results["sets"]["boolq"]["examples"] == 2
