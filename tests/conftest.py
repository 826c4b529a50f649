"""Session fixtures for the training tests: tiny random models saved to disk, tiny data in real file formats."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["good", "great", "love", "bad", "awful", "hate", "okay", "fine", "meh", "the", "a", "is", "car", "day",
         "food", "what", "your", "name", "hello", "there", "how", "are", "you", "i", "am", "well"]  # fmt: skip
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
LABEL_WORDS = {
    "positive": ["good", "great", "love"],
    "negative": ["bad", "awful", "hate"],
    "neutral": ["okay", "fine", "meh"],
}


def save_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[SEP]",
    )  # fmt: skip
    tok.save_pretrained(directory)
    return tok


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert")
    save_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-roberta")
    tok = save_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                                     pad_token_id=tok.pad_token_id, type_vocab_size=1)  # fmt: skip
    transformers.RobertaModel(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = save_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.cls_token_id)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    patch_size=4, image_size=16, mlp_ratio=2)  # fmt: skip
    transformers.Dinov2Model(cfg).save_pretrained(d)
    return str(d)


def sentence(rng: random.Random, label: str) -> str:
    return " ".join(rng.choice(WORDS[9:]) for _ in range(3)) + " " + rng.choice(LABEL_WORDS[label])


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "reviews.csv"
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(90):
            label = list(LABEL_WORDS)[i % 3]
            writer.writerow([sentence(rng, label), label])
    return str(path)


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rng = random.Random(0)
    pairs = [("hello there", "hello how are you"), ("what is your name", "i am well"), ("how are you", "i am fine")]
    with open(path, "w") as f:
        for i in range(40):
            prompt, response = pairs[i % 3]
            f.write(json.dumps({"prompt": prompt + " " + rng.choice(WORDS[9:15]), "response": response}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square", "stripe"]):
        (root / name).mkdir()
        for i in range(12):
            img = (rng.random((16, 16, 3)) * 60 + 60 * c).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return str(root)
