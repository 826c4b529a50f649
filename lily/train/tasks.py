"""The three tasks: how each builds its model, batches its examples, scores a model, and predicts.

text-cls   AutoModelForSequenceClassification, metric accuracy (higher is better)
causal-lm  AutoModelForCausalLM, loss on the response tokens, metric perplexity (lower is better)
image-cls  AutoModelForImageClassification, metric accuracy (higher is better)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lily import assets
from lily.errors import LilyError
from lily.train.config import TrainConfig
from lily.train.data import TaskData

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
HEAD_NAMES = ("classifier", "score")


class ModelError(LilyError, ValueError):
    """A model cannot be loaded or does not fit the data."""


def resolve_model(name: str) -> str:
    """A bundled model's directory, or `name` itself (a local path or a Hub id)."""
    return str(assets.MODELS[name]()) if name in assets.MODELS else name


def _from_pretrained(auto_class: Any, name: str, **kwargs: Any) -> Any:
    path = resolve_model(name)
    try:
        return auto_class.from_pretrained(path, **kwargs)
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


def _check_head(model: torch.nn.Module, labels: list[str], name: str) -> None:
    if model.config.num_labels != len(labels):
        raise ModelError(
            f"model '{name}' predicts {model.config.num_labels} labels but the data has {len(labels)} ({labels})."
        )


@dataclass
class Task:
    """A task bound to its data and model: batching, scoring and prediction."""

    cfg: TrainConfig
    data: TaskData
    model: torch.nn.Module
    processor: Any = None

    metric_name = "accuracy"
    higher_is_better = True

    def examples(self, split: str) -> list[Any]:
        return self.data.splits[split]

    def collate(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def example_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example statistics (examples x 2), summed over the split and turned into the metric by `finish`."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct = (logits.argmax(-1) == batch["labels"]).float()
        return torch.stack([correct, torch.ones_like(correct)], dim=1)

    def finish(self, totals: torch.Tensor) -> float:
        return (totals[0] / totals[1]).item()

    def predict(self, model: torch.nn.Module, inputs: list[str]) -> list[str]:
        raise NotImplementedError

    def label_strings(self, logits: torch.Tensor) -> list[str]:
        """'label (probability)' of the most likely class of each row."""
        probs = logits.float().softmax(-1)
        return [f"{self.data.labels[i]} ({p[i]:.2f})" for p, i in zip(probs, probs.argmax(-1).tolist(), strict=True)]


class TextClassification(Task):
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenised, padded and truncated the same way for training, evaluation and prediction."""
        return dict(self.processor(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                                   return_tensors="pt"))  # fmt: skip

    def collate(self, batch):
        texts, labels = zip(*batch, strict=True)
        return {**self.encode(list(texts)), "labels": torch.tensor(labels)}

    @torch.no_grad()
    def predict(self, model, inputs):
        enc = {k: v.to(next(model.parameters()).device) for k, v in self.encode(inputs).items()}
        return self.label_strings(model(**enc).logits)


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

    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.processor
        if tok.chat_template:
            return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])  # fmt: skip
        return tok(f"User: {prompt}\nAssistant: ")["input_ids"]

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
    def predict(self, model, inputs, max_new_tokens: int = 48):
        device = next(model.parameters()).device
        replies = []
        for prompt in inputs:
            ids = torch.tensor([self._prompt_ids(prompt)], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=self.processor.pad_token_id)  # fmt: skip
            replies.append(self.processor.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
        return replies


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

    if cfg.task == "image-cls":
        model = _from_pretrained(AutoModelForImageClassification, cfg.model, **label_config)
        _check_head(model, data.labels, cfg.model)
        return ImageClassification(cfg, data, model)
    tokenizer = _from_pretrained(AutoTokenizer, cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.task == "text-cls":
        model = _from_pretrained(AutoModelForSequenceClassification, cfg.model, **label_config)
        _check_head(model, data.labels, cfg.model)
        model.config.pad_token_id = tokenizer.pad_token_id
        return TextClassification(cfg, data, model, tokenizer)
    model = _from_pretrained(AutoModelForCausalLM, cfg.model)
    return CausalLM(cfg, data, model, tokenizer)
