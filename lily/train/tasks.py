"""The tasks: how each builds its model, batches its examples, scores a model, and predicts.

text-cls   AutoModelForSequenceClassification, one text or a pair; metric accuracy, mcc or f1
text-reg   AutoModelForSequenceClassification with one output (MSE loss), one text or a pair; metric pearson
causal-lm  AutoModelForCausalLM, loss on the response tokens, metric perplexity (lower is better)
image-cls  AutoModelForImageClassification, metric accuracy, mcc or f1
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lily import assets
from lily.errors import LilyError
from lily.train.config import TrainConfig
from lily.train.console import progress_bar
from lily.train.data import TaskData
from lily.train.metrics import Metric, make_metric
from lily.train.online import offline_reason

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
HEAD_NAMES = ("classifier", "score")
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
"""The Alpaca prompt templates, as LLM-Adapters (and so the paper's commonsense code) trains with them."""


class ModelError(LilyError, ValueError):
    """A model cannot be loaded or does not fit the data."""


def locate_model(name: str) -> str:
    """Where to load model `name` from: a bundled model's directory (built on first use), a local directory, or
    a Hub id. A Hub id must be reachable or in the local Hub cache, else a ModelError at once (no retries)."""
    if name in assets.MODELS:
        return str(assets.MODELS[name]())
    if Path(name).exists():
        return name
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(
            f"cannot load model '{name}': it is not a bundled model ({', '.join(assets.MODELS)}), not an existing "
            "local directory, and not a Hugging Face model id (owner/name)."
        ) from None
    reason = offline_reason()
    if reason is not None and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelError(
            f"cannot load model '{name}': it is not bundled and the Hugging Face Hub is unreachable ({reason}), nor "
            f"is it in the local Hub cache; bundled models are: {', '.join(assets.MODELS)} (or give a local model "
            "directory)."
        )
    return name


def _from_pretrained(auto_class: Any, name: str, **kwargs: Any) -> Any:
    path = locate_model(name)
    offline = path == name and not Path(name).exists() and offline_reason() is not None  # a Hub id, from the cache
    try:
        return auto_class.from_pretrained(path, local_files_only=offline, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"cannot load model '{name}': it is not a bundled model ({', '.join(assets.MODELS)}), not a local model "
            f"directory, and not a model id reachable on the Hugging Face Hub. ({exc})"
        ) from exc
    except (RuntimeError, ValueError) as exc:
        if "size mismatch" in str(exc) or "mismatched" in str(exc):
            raise ModelError(
                f"model '{name}' has a classification head whose size does not match the "
                f"{kwargs.get('num_labels')} labels of the data; start from a model without a head (the base "
                f"encoder) or use data with the head's labels. ({exc})"
            ) from exc
        raise


def head_modules(model: torch.nn.Module) -> list[str]:
    """Names of the task head (trained fully with every method), if the model has one."""
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]


def float32_heads(model: torch.nn.Module) -> None:
    """Keep the task head in float32 under low-precision pretrained weights: its parameters train, so they need
    float32 for AdamW, and its inputs are cast up to match."""

    def upcast(_module: torch.nn.Module, args: tuple) -> tuple:
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for name in head_modules(model):
        head = model.get_submodule(name).float()
        head.register_forward_pre_hook(upcast)


def _check_head(model: torch.nn.Module, labels: list[str], name: str) -> None:
    if model.config.num_labels != max(1, len(labels)):
        wanted = f"{len(labels)} ({labels})" if labels else "1 (a score)"
        raise ModelError(f"model '{name}' predicts {model.config.num_labels} labels but the data has {wanted}.")


@dataclass
class Task:
    """A task bound to its data and model: batching, scoring and prediction."""

    cfg: TrainConfig
    data: TaskData
    model: torch.nn.Module
    processor: Any = None

    higher_is_better = True

    @cached_property
    def metric(self) -> Metric:
        return make_metric(self.cfg.metric, len(self.data.labels))

    @property
    def metric_name(self) -> str:
        return self.metric.name

    def examples(self, split: str) -> list[Any]:
        return self.data.splits[split]

    def collate(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def example_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example statistics (examples x k), summed over the split and turned into the metric by `finish`."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return self.metric.stats(self.predictions(logits), batch["labels"])

    def finish(self, totals: torch.Tensor) -> float:
        return self.metric.value(totals)

    def predict(self, model: torch.nn.Module, inputs: list[str]) -> list[str]:
        raise NotImplementedError

    def label_strings(self, logits: torch.Tensor) -> list[str]:
        """'label (probability)' of the most likely class of each row."""
        probs = logits.float().softmax(-1)
        return [f"{self.data.labels[i]} ({p[i]:.2f})" for p, i in zip(probs, probs.argmax(-1).tolist(), strict=True)]


class TextClassification(Task):
    def encode(self, texts: list[tuple[str, str | None]]) -> dict[str, torch.Tensor]:
        """Tokenised, padded and truncated the same way for training, evaluation and prediction; a pair is
        joined by the tokenizer's separator."""
        first = [t for t, _ in texts]
        second = [p for _, p in texts]
        pairs = None if any(p is None for p in second) else second
        return dict(self.processor(first, pairs, padding=True, truncation=True, max_length=self.cfg.max_length,
                                   return_tensors="pt"))  # fmt: skip

    label_dtype = torch.long

    def collate(self, batch):
        texts, labels = zip(*batch, strict=True)
        return {**self.encode(list(texts)), "labels": torch.tensor(labels, dtype=self.label_dtype)}

    def _inputs(self, lines: list[str]) -> list[tuple[str, str | None]]:
        """Prediction inputs: a text, or for pair tasks two texts separated by a tab."""
        if not self.cfg.text_pair_column:
            return [(line, None) for line in lines]
        split = [line.split("\t", 1) for line in lines]
        for line, parts in zip(lines, split, strict=True):
            if len(parts) != 2:
                raise ModelError(f"this run classifies text pairs: give each input as 'text<TAB>pair', got {line!r}.")
        return [(a, b) for a, b in split]

    @torch.no_grad()
    def predict(self, model, inputs):
        enc = {k: v.to(next(model.parameters()).device) for k, v in self.encode(self._inputs(inputs)).items()}
        return self.label_strings(model(**enc).logits)


class TextRegression(TextClassification):
    label_dtype = torch.float32

    def predictions(self, logits):
        return logits[:, 0]

    def label_strings(self, logits):
        return [f"{score:.4f}" for score in logits[:, 0].float().tolist()]


def to_pixels(image: Any, size: int) -> torch.Tensor:
    """A (3, size, size) ImageNet-normalised tensor from a uint8 array, a PIL image or an image file path."""
    if isinstance(image, str | os.PathLike):
        from PIL import Image

        with Image.open(image) as img:
            image = np.asarray(img.convert("RGB"))
    elif not isinstance(image, np.ndarray):  # a PIL image (e.g. from `datasets`)
        image = np.asarray(image.convert("RGB"))
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)) / 255.0
    pixels = pixels.unsqueeze(0).expand(3, -1, -1) if pixels.dim() == 2 else pixels.permute(2, 0, 1)[:3]
    pixels = torch.nn.functional.interpolate(pixels.unsqueeze(0), size=(size, size), mode="bilinear",
                                             align_corners=False)[0]  # fmt: skip
    return (pixels - IMAGENET_MEAN) / IMAGENET_STD


class ImageClassification(Task):
    def collate(self, batch):
        images, labels = zip(*batch, strict=True)
        pixels = torch.stack([to_pixels(img, self.cfg.image_size) for img in images])
        return {"pixel_values": pixels, "labels": torch.tensor(labels)}

    @torch.no_grad()
    def predict(self, model, inputs):
        device = next(model.parameters()).device
        pixels = torch.stack([to_pixels(path, self.cfg.image_size) for path in inputs]).to(device)
        return self.label_strings(model(pixel_values=pixels).logits)


@dataclass
class CausalLM(Task):
    metric_name = "perplexity"
    higher_is_better = False

    def __post_init__(self) -> None:
        self._tokenized = {split: self._tokenize(rows) for split, rows in self.data.splits.items()}

    def examples(self, split):
        return self._tokenized[split]

    def _prompt_ids(self, prompt: str | tuple[str, str]) -> list[int]:
        """Token ids of a prompt (an instruction, or an instruction with its input) framed by --prompt-style."""
        tok = self.processor
        instruction, extra = (prompt, None) if isinstance(prompt, str) else prompt
        if self.cfg.prompt_style == "alpaca":
            template = ALPACA_WITH_INPUT if extra else ALPACA
            return tok(template.format(instruction=instruction, input=extra))["input_ids"]
        text = instruction if extra is None else f"{instruction}\n\n{extra}"
        if tok.chat_template:
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])  # fmt: skip
        return tok(f"User: {text}\nAssistant: ")["input_ids"]

    def _tokenize(self, rows: list[tuple[str | None, str]]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per example; prompt tokens get label -100; long plain texts become several blocks."""
        tok, limit, out = self.processor, self.cfg.max_length, []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for prompt, text in rows:
            if prompt is None:
                ids = tok(text)["input_ids"] + eos
                out += [
                    (ids[i : i + limit], ids[i : i + limit])
                    for i in range(0, len(ids), limit)
                    if len(ids[i : i + limit]) > 1
                ]
                continue
            head = self._prompt_ids(prompt)
            body = tok(text, add_special_tokens=False)["input_ids"] + eos
            ids = (head + body)[:limit]
            labels = ([-100] * len(head) + body)[:limit]
            if any(t != -100 for t in labels[1:]):
                out.append((ids, labels))
        return out

    def collate(self, batch):
        width = max(len(ids) for ids, _ in batch)
        pad = self.processor.pad_token_id if self.processor.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def example_scores(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="none")  # fmt: skip
        return torch.stack([losses.sum(dim=1), (targets != -100).sum(dim=1).float()], dim=1)

    def finish(self, totals):
        return math.exp(min((totals[0] / totals[1]).item(), 50.0))

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: list[str | tuple[str, str]], max_new_tokens: int = 48,
                 num_beams: int = 1, batch_size: int = 8, progress: str | None = None) -> list[str]:  # fmt: skip
        """Deterministic replies (greedy, or beam search), prompts batched with left padding; `progress` names a
        progress bar over the batches (shown on a terminal)."""
        device = next(model.parameters()).device
        pad = self.processor.pad_token_id if self.processor.pad_token_id is not None else 0
        replies = []
        starts = range(0, len(prompts), batch_size)
        for start in progress_bar(starts, desc=progress, show=progress is not None):
            ids = [self._prompt_ids(p) for p in prompts[start : start + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, device=device)
            mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
            for i, x in enumerate(ids):
                input_ids[i, width - len(x) :], mask[i, width - len(x) :] = torch.tensor(x, device=device), 1
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, do_sample=False, pad_token_id=pad)  # fmt: skip
            replies += [self.processor.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        return replies

    def predict(self, model, inputs):
        return self.generate(model, inputs, progress="generating")


def build_task(cfg: TrainConfig, data: TaskData) -> Task:
    """Load the model and its processor for `cfg.task`, sized to the data's labels."""
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    transformers.logging.set_verbosity_error()  # a new head's "MISSING weights" load report is expected
    label_config = {"num_labels": len(data.labels), "id2label": dict(enumerate(data.labels)),
                    "label2id": {n: i for i, n in enumerate(data.labels)}}  # fmt: skip

    dtype = getattr(torch, cfg.model_dtype)
    if cfg.task == "image-cls":
        model = _from_pretrained(AutoModelForImageClassification, cfg.model, dtype=dtype, **label_config)
        _check_head(model, data.labels, cfg.model)
        float32_heads(model)
        return ImageClassification(cfg, data, model)
    tokenizer = _from_pretrained(AutoTokenizer, cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.task in ("text-cls", "text-reg"):
        if cfg.task == "text-reg":
            label_config = {"num_labels": 1, "problem_type": "regression"}
        model = _from_pretrained(AutoModelForSequenceClassification, cfg.model, dtype=dtype, **label_config)
        _check_head(model, data.labels, cfg.model)
        float32_heads(model)
        model.config.pad_token_id = tokenizer.pad_token_id
        task_class = TextRegression if cfg.task == "text-reg" else TextClassification
        return task_class(cfg, data, model, tokenizer)
    model = _from_pretrained(AutoModelForCausalLM, cfg.model, dtype=dtype)
    return CausalLM(cfg, data, model, tokenizer)
