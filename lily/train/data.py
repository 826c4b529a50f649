"""Examples for each task from bundled assets, local files, or Hugging Face `datasets`, split reproducibly.

Every loader returns a `TaskData`: train/validation/test lists of examples (never overlapping) and, for
classification, the label names. Sources with their own splits keep them; what a source lacks is carved
out of its training data with `split_seed`, test first, so the test set does not change with
`max_train_samples`.

Example formats:  text-cls ((text, pair text or None), label_id) | text-reg ((text, pair or None), score) |
causal-lm (prompt, response) or (None, text), a prompt being an instruction or (instruction, input) |
image-cls (image, label_id), where an image is a uint8 array or a file path.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lily import assets
from lily.errors import DataError
from lily.train.config import TrainConfig
from lily.train.files import (
    SPLIT_ALIASES,
    SPLITS,
    VTAB_LISTS,
    image_folder,
    read_records,
    require_columns,
    split_files,
    vtab_lists,
)
from lily.train.online import offline_flag, offline_reason


@dataclass
class TaskData:
    splits: dict[str, list[Any]]
    labels: list[str] = field(default_factory=list)
    source: str = ""

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def _carve(rows: list[Any], have: dict[str, list[Any]], cfg: TrainConfig) -> dict[str, list[Any]]:
    """Fill the missing splits from `rows` (shuffled with split_seed): test first, then validation (none when
    selecting on the test split)."""
    rows = list(rows)
    random.Random(cfg.split_seed).shuffle(rows)
    splits = dict(have)
    if "test" not in splits:
        n = max(1, round(len(rows) * cfg.test_fraction))
        splits["test"], rows = rows[:n], rows[n:]
    if "validation" not in splits:  # selecting on the test split needs none
        n = max(1, round(len(rows) * cfg.val_fraction)) if cfg.val_fraction > 0 and not cfg.select_on_test else 0
        splits["validation"], rows = rows[:n], rows[n:]
    splits["train"] = rows
    return splits


def _cap(splits: dict[str, list[Any]], cfg: TrainConfig) -> dict[str, list[Any]]:
    limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_test_samples}
    capped = {k: v[: limits[k]] if limits[k] is not None else v for k, v in splits.items()}
    for name in SPLITS:
        if not capped.get(name) and not (name == "validation" and cfg.select_on_test):
            raise DataError(f"the {name} split of '{cfg.data}' is empty; provide more data or adjust the fractions.")
    return capped


# ---- choosing splits -------------------------------------------------------------------------------------


def _choose_test(splits: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """With --test-split validation, the source's validation split becomes the test split and its own test split
    (unlabelled in GLUE) is dropped."""
    if cfg.test_split == "test":
        return splits
    if "validation" not in splits:
        raise DataError(f"--test-split validation, but '{cfg.data}' has no validation split ({sorted(splits)}).")
    rest = {k: v for k, v in splits.items() if k not in ("test", "validation")}
    return {**rest, "test": splits["validation"]}


def _record_splits(cfg: TrainConfig) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None]:
    """Records per split from a local file or folder of split files, or from `datasets`, and the class names in
    the source's order when it declares them (a `datasets` ClassLabel)."""
    path = Path(cfg.data)
    if path.is_file():
        return _choose_test({"all": read_records(path, cfg.columns)}, cfg), None
    if path.is_dir():
        files = split_files(path)
        if not files:
            raise DataError(f"folder {path} holds no train/validation/test .csv/.tsv/.jsonl/.json files.")
        return {name: read_records(file, cfg.columns) for name, file in _choose_test(files, cfg).items()}, None
    return _hub_records(cfg)


def _hub_records(cfg: TrainConfig) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"'{cfg.data}' is neither a bundled dataset ({', '.join(BUNDLED)}) nor a local path; to load it from "
            "the Hugging Face Hub, pip install datasets."
        ) from exc
    reason = offline_reason()
    unreachable = (
        f"dataset '{cfg.data}' is not bundled and the Hugging Face Hub is unreachable ({reason}); bundled datasets "
        f"are: {', '.join(BUNDLED)} (or give a local file or folder)"
    )
    if reason is not None and not offline_flag():
        raise DataError(f"{unreachable}. With HF_HUB_OFFLINE=1 a copy in the local Hub cache is used.")
    try:
        loaded = datasets.load_dataset(cfg.data, cfg.dataset_config)
    except Exception as exc:  # datasets raises many types for unknown ids and offline use
        if reason is not None:
            raise DataError(f"{unreachable}, nor is it in the local Hub cache.") from exc
        config = f" (configuration {cfg.dataset_config})" if cfg.dataset_config else ""
        raise DataError(
            f"cannot load dataset '{cfg.data}'{config}: not a local path and not loadable from the Hub ({exc})."
        ) from exc
    tables = _choose_test({SPLIT_ALIASES.get(split, split): table for split, table in loaded.items()}, cfg)
    out, class_names = {}, None
    for split, table in tables.items():
        rows = [dict(r) for r in table]
        label = next((c for c in cfg.label_column.split("|") if c in table.features), None)
        feature = table.features.get(label)
        if getattr(feature, "names", None):  # ClassLabel: store names, not indices
            class_names = list(feature.names)
            if any(r[label] < 0 for r in rows):
                raise DataError(
                    f"the {split} split of '{cfg.data}' has unlabelled rows (label -1), as GLUE's test splits do; "
                    "score on the validation split with --test-split validation."
                )
            for r in rows:
                r[label] = feature.names[r[label]]
        out[split] = rows
    return out, class_names


def _assemble(per_split: dict[str, list[Any]], cfg: TrainConfig) -> dict[str, list[Any]]:
    have = {k: v for k, v in per_split.items() if k in SPLITS}
    rest = per_split.get("all", have.pop("train", []))
    return _cap(_carve(rest, have, cfg), cfg)


# ---- text classification and regression -----------------------------------------------------------------


def _label_ids(splits: dict[str, list[tuple[Any, str]]], labels: list[str] | None, where: str) -> TaskData:
    if labels is None:
        seen = sorted({str(y) for _, y in splits["train"]})
        labels = sorted(seen, key=int) if all(s.lstrip("-").isdigit() for s in seen) else seen
    index = {name: i for i, name in enumerate(labels)}
    out = {}
    for split, rows in splits.items():
        for row_number, (_, y) in enumerate(rows, 1):
            if str(y) not in index:
                raise DataError(
                    f"{where}: label '{y}' (row {row_number} of the {split} split) does not occur in the training "
                    f"labels {labels}."
                )
        out[split] = [(x, index[str(y)]) for x, y in rows]
    return TaskData(out, labels, where)


def _text_records(cfg: TrainConfig) -> tuple[dict[str, list[tuple[tuple[str, str | None], Any]]], list[str] | None]:
    """((text, pair text or None), label) per split from a file, folder or Hub dataset."""
    per_split, class_names = _record_splits(cfg)
    wanted = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    out = {}
    for name, rows in per_split.items():
        text, label, *pair = require_columns(rows, wanted, f"{cfg.data} ({name})")
        out[name] = [((str(r[text]), str(r[pair[0]]) if pair else None), r[label]) for r in rows]
    return out, class_names


def text_classification(cfg: TrainConfig) -> TaskData:
    if cfg.data in ("tweets", "bbc"):
        rows, labels = assets.tweets() if cfg.data == "tweets" else assets.bbc()
        pairs = [((text, None), label) for text, label in rows]
        return _label_ids(_cap(_carve(pairs, {}, cfg), cfg), labels, cfg.data)
    examples, class_names = _text_records(cfg)
    return _label_ids(_assemble(examples, cfg), class_names, cfg.data)


def text_regression(cfg: TrainConfig) -> TaskData:
    examples, _ = _text_records(cfg)
    out = {}
    for split, rows in examples.items():
        scores = []
        for number, (_, y) in enumerate(rows, 1):
            try:
                scores.append(float(y))
            except (TypeError, ValueError):
                raise DataError(f"{cfg.data}: the {split} split's row {number} has the score {y!r} in column "
                                f"'{cfg.label_column}', which is not a number.") from None  # fmt: skip
        out[split] = [(x, s) for (x, _), s in zip(rows, scores, strict=True)]
    return TaskData(_assemble(out, cfg), source=cfg.data)


# ---- causal language modelling ---------------------------------------------------------------------------


def causal_lm(cfg: TrainConfig) -> TaskData:
    if cfg.data == "commonsense-mini":  # hand-written, in the commonsense_170k format
        return causal_lm(dataclasses.replace(cfg, data=str(assets.COMMONSENSE_MINI / "train.json")))
    if cfg.data == "chat":
        return TaskData(_cap(_carve(assets.chat(), {}, cfg), cfg), source="chat")
    if cfg.data == "shakespeare":  # split by play, so no play is in two splits
        return TaskData(_cap(_carve([(None, text) for _, text in assets.shakespeare()], {}, cfg), cfg),
                        source="shakespeare")  # fmt: skip
    path = Path(cfg.data)
    if path.is_file() and path.suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        splits = _choose_test({"all": [(None, p) for p in paragraphs]}, cfg)
        return TaskData(_cap(_carve(splits["all"], {}, cfg), cfg), source=cfg.data)
    per_split, _ = _record_splits(cfg)
    first = next(iter(per_split.values()))
    chat_style = bool(first) and any(c in first[0] for c in cfg.prompt_column.split("|"))
    examples = {}
    for name, rows in per_split.items():
        where = f"{cfg.data} ({name})"
        if not chat_style:
            (text,) = require_columns(rows, [cfg.text_column], where)
            examples[name] = [(None, str(r[text])) for r in rows]
            continue
        prompt, response = require_columns(rows, [cfg.prompt_column, cfg.response_column], where)
        examples[name] = [(record_prompt(r[prompt], r.get(cfg.input_column)), str(r[response])) for r in rows]
    return TaskData(_assemble(examples, cfg), source=cfg.data)


def record_prompt(instruction: Any, extra: Any) -> str | tuple[str, str]:
    """The prompt of a chat-style record: the instruction, paired with its input when it has a non-empty one."""
    return (str(instruction), str(extra)) if extra not in (None, "") else str(instruction)


# ---- image classification --------------------------------------------------------------------------------


def image_classification(cfg: TrainConfig) -> TaskData:
    if cfg.data == "fashion":
        arrays = assets.fashion_mnist()
        train = [(img, assets.FASHION_LABELS[y]) for img, y in zip(*arrays["train"], strict=True)]
        test = [(img, assets.FASHION_LABELS[y]) for img, y in zip(*arrays["test"], strict=True)]
        random.Random(cfg.split_seed).shuffle(test)
        return _label_ids(_cap(_carve(train, {"test": test}, cfg), cfg), assets.FASHION_LABELS, "fashion")
    path = Path(cfg.data)
    if path.is_dir() and (path / VTAB_LISTS[0]).is_file():
        splits = _choose_test(vtab_lists(path, cfg.select_on_test), cfg)
        return _label_ids(_cap({"validation": [], **splits}, cfg), None, cfg.data)
    if path.is_dir():
        return _label_ids(_assemble(_choose_test(image_folder(path), cfg), cfg), None, cfg.data)
    per_split, class_names = _hub_records(cfg)
    pairs = {}
    for name, rows in per_split.items():
        image, label = require_columns(rows, [cfg.image_column, cfg.label_column], f"{cfg.data} ({name})")
        pairs[name] = [(r[image], r[label]) for r in rows]
    return _label_ids(_assemble(pairs, cfg), class_names, cfg.data)


BUNDLED = ("tweets", "bbc", "chat", "shakespeare", "commonsense-mini", "fashion")
LOADERS = {"text-cls": text_classification, "text-reg": text_regression, "causal-lm": causal_lm,
           "image-cls": image_classification}  # fmt: skip


def load_task_data(cfg: TrainConfig) -> TaskData:
    """The train/validation/test examples of `cfg.data` for `cfg.task`."""
    bundled_for = {"text-cls": ("tweets", "bbc"), "text-reg": (), "image-cls": ("fashion",),
                   "causal-lm": ("chat", "shakespeare", "commonsense-mini")}  # fmt: skip
    if cfg.data in BUNDLED and cfg.data not in bundled_for[cfg.task]:
        raise DataError(f"bundled dataset '{cfg.data}' is not for task {cfg.task}; use {bundled_for[cfg.task]}.")
    if cfg.data in BUNDLED and cfg.test_split != "test":
        raise DataError(f"bundled dataset '{cfg.data}' has no validation split of its own to score as the test split; "
                        "use --test-split test.")  # fmt: skip
    if cfg.data not in BUNDLED and not Path(cfg.data).exists() and "/" not in cfg.data:
        raise DataError(
            f"dataset '{cfg.data}' is not a bundled dataset ({', '.join(BUNDLED)}), not an existing path, and not a "
            "Hugging Face dataset id (owner/name)."
        )
    return LOADERS[cfg.task](cfg)
