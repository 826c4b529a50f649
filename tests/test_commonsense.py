"""`lily recipe commonsense`: paper settings, LLM-Adapters formats, answer extraction, a tiny LLaMA end to end."""

import json

import pytest
import torch

import lily
from lily import assets
from lily.cli import main
from lily.errors import LilyError
from lily.recipes import commonsense, defaults
from lily.train.config import TrainConfig
from lily.train.data import DataError, TaskData, load_task_data
from lily.train.runs import load_run
from lily.train.tasks import ALPACA, ALPACA_WITH_INPUT, CausalLM

from .helpers import randomize_adapter


def record(instruction: str, answer: str, extra: str = "") -> dict:
    return {"instruction": instruction, "input": extra, "output": f"the correct answer is {answer}", "answer": answer}


@pytest.fixture(scope="module")
def commonsense_files(tmp_path_factory):
    """A commonsense_170k-format training file and an LLM-Adapters dataset/ folder with two sets."""
    root = tmp_path_factory.mktemp("commonsense")
    train = [record(f"is the day good {i} answer format true/false", "true" if i % 2 else "false") for i in range(20)]
    train += [record("what is your name", "solution1", extra="hello there") for _ in range(4)]
    (root / "commonsense_170k.json").write_text(json.dumps(train))
    for name, answers in (("boolq", ["true", "false", "true"]), ("piqa", ["solution1", "solution2"])):
        (root / "dataset" / name).mkdir(parents=True)
        rows = [record(f"how are you {i}", a) for i, a in enumerate(answers)]
        (root / "dataset" / name / "test.json").write_text(json.dumps(rows))
    return root


def test_recipe_holds_the_papers_settings():
    cfg = TrainConfig(**defaults("commonsense"))
    assert (cfg.r, cfg.num_A, cfg.num_B, cfg.routing) == (16, 4, 4, "token")
    assert cfg.targets == ["q_proj", "k_proj", "v_proj"]
    assert (cfg.lr, cfg.epochs, cfg.batch_size * cfg.grad_accum, cfg.warmup_steps, cfg.max_length) == (
        3e-4, 3, 16, 100, 256)  # fmt: skip
    assert (cfg.prompt_style, cfg.eval_every, cfg.max_eval_samples) == ("alpaca", 200, 120)


def test_answers_are_extracted_as_llm_adapters_does():
    words = commonsense.ANSWER_WORDS
    assert commonsense.extract_answer("the correct answer is solution2", words["piqa"]) == "solution2"
    assert commonsense.extract_answer("answer3, not answer1", words["ARC-Easy"]) == "answer3"  # the first one
    assert commonsense.extract_answer("  it is true.", words["boolq"]) == "true"
    assert commonsense.extract_answer("True", words["boolq"]) == ""  # case-sensitive, as the original
    assert commonsense.extract_answer("ending5", words["hellaswag"]) == ""
    assert commonsense.answer_words("mine", "Pick one.\n\nAnswer format: yes/no") == ("yes", "no")
    with pytest.raises(DataError, match="names no 'Answer format"):
        commonsense.answer_words("mine", "Pick one.")


def test_alpaca_prompts_frame_instruction_and_input(tiny_llama_dir, commonsense_files):
    cfg = TrainConfig(**{**defaults("commonsense"), "model": tiny_llama_dir,
                         "data": str(commonsense_files / "commonsense_170k.json")})  # fmt: skip
    data = load_task_data(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    task = CausalLM(cfg, data, model=None, processor=tok)
    assert task._prompt_ids("is it") == tok(ALPACA.format(instruction="is it"))["input_ids"]
    with_input = ALPACA_WITH_INPUT.format(instruction="what is your name", input="hello there")
    assert task._prompt_ids(("what is your name", "hello there")) == tok(with_input)["input_ids"]
    prompts = [p for split in data.splits.values() for p, _ in split]
    assert ("what is your name", "hello there") in prompts  # the record's input travels with its instruction
    ids, labels = task.examples("train")[0]
    head = len(task._prompt_ids(data.splits["train"][0][0]))
    assert all(t == -100 for t in labels[:head]) and labels[head:] == ids[head:]  # loss on the response only


def test_batched_generation_equals_one_prompt_at_a_time(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_A=1, num_B=2, routing="token"))
    randomize_adapter(model)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    task = CausalLM(TrainConfig(task="causal-lm", prompt_style="alpaca"), TaskData({}), model, tok)
    prompts = ["hello", "what is your name there", ("how are you", "i am well")]
    batched = task.generate(model, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [task.generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    beams = task.generate(model, prompts, max_new_tokens=6, num_beams=3, batch_size=3)
    assert beams == [task.generate(model, [p], max_new_tokens=6, num_beams=3)[0] for p in prompts]
    # the recipe's token routing is leak-free: generating with the KV cache equals recomputing every step
    ids = torch.tensor([task._prompt_ids("what is your name")])
    cached, full = (model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, use_cache=use, output_scores=True, return_dict_in_generate=True)
                    for use in (True, False))  # fmt: skip
    assert torch.equal(cached.sequences, full.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.scores, full.scores, strict=True)) < 1e-5


def _train(model: str, files, out, epochs: int) -> None:
    code = main(["recipe", "commonsense", "--model", model, "--data", str(files / "commonsense_170k.json"),
                 "--output-dir", str(out), "--mixed-precision", "no", "--epochs", str(epochs), "--grad-accum", "1",
                 "--max-length", "64", "--r", "4", "--num-A", "2", "--warmup-steps", "2"])  # fmt: skip
    assert code == 0


def test_recipe_trains_and_scores_each_set(tiny_llama_dir, commonsense_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _train(tiny_llama_dir, commonsense_files, out, epochs=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and metrics["data"] == {"train": 22, "validation": 1, "test": 1}
    results = commonsense.evaluate(out, commonsense_files / "dataset", num_beams=2, max_new_tokens=4, log=lambda _: 0)
    assert set(results["sets"]) == {"boolq", "piqa"} and results["sets"]["boolq"]["examples"] == 3
    assert json.loads((out / commonsense.RESULTS_FILE).read_text())["average"] == pytest.approx(results["average"])

    # hand-made replies: the score is what extraction and comparison make of them
    replies = iter([["the correct answer is true", "false", "i think false"], ["solution1", "solution1"]])
    monkeypatch.setattr(CausalLM, "generate", lambda self, model, prompts, *a, **k: next(replies))
    scored = commonsense.evaluate(out, commonsense_files / "dataset", base=True, log=lambda _: 0)
    assert scored["sets"]["boolq"]["accuracy"] == pytest.approx(2 / 3) and scored["sets"]["piqa"]["accuracy"] == 0.5
    assert scored["average"] == pytest.approx((2 / 3 + 0.5) / 2) and not scored["adapter"]
    assert (out / "commonsense-base.json").is_file()


def test_base_scoring_switches_the_adapter_off(tiny_llama_dir, commonsense_files, tmp_path):
    run = tmp_path / "run"
    _train(tiny_llama_dir, commonsense_files, run, epochs=1)
    task = load_run(run)
    ids = torch.tensor([task._prompt_ids("hello there")])
    randomize_adapter(task.model)
    with lily.disable_adapters(task.model):
        base = task.model(input_ids=ids).logits
    assert not torch.allclose(base, task.model(input_ids=ids).logits)
    with pytest.raises(LilyError, match="set 'nope' not found"):
        commonsense.evaluate(run, commonsense_files / "dataset", sets=["nope"])
    assert commonsense.main(["evaluate", str(run), "--data", str(commonsense_files / "dataset"), "--sets", "nope"]) == 2
    argv = ["evaluate", str(run), "--data", str(commonsense_files / "dataset"), "--sets", "piqa", "--limit", "1",
            "--num-beams", "1", "--max-new-tokens", "2", "--base"]  # fmt: skip
    assert commonsense.main(argv) == 0
    scored = json.loads((run / "commonsense-base.json").read_text())
    assert list(scored["sets"]) == ["piqa"] and scored["sets"]["piqa"]["examples"] == 1 and scored["num_beams"] == 1


def test_hand_written_mini_set_is_in_the_public_formats():
    cfg = TrainConfig(**{**defaults("commonsense"), "data": "commonsense-mini", "val_fraction": 0.1,
                         "test_fraction": 0.1})  # fmt: skip
    data = load_task_data(cfg)
    assert sum(data.sizes().values()) == 58
    for name in ("boolq", "piqa", "ARC-Easy", "winogrande"):
        rows = commonsense.read_set(assets.COMMONSENSE_MINI, name)
        declared = commonsense.answer_words("by its format line", rows[0]["instruction"])
        assert len(rows) == 12 and set(declared) <= set(commonsense.ANSWER_WORDS[name])
        assert {r["answer"] for r in rows} == set(declared)  # every option is right somewhere
