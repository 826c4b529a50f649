"""Property-based tests (hypothesis): configs x small models x damaged and hostile files.

Every outcome is a success or a `lily.LilyError` whose message names the field, module, file or tensor at
fault; after every failure the model is unchanged (`model_state`); a success is checked against what the
input actually says (the model holds exactly the file's tensors and config). Examples are derandomized, so CI
runs the same cases every time; the number of examples each property ran is printed at the end of the module
("hypothesis examples run: ...").

The bugs these properties found are pinned by minimal regression tests at the end of the file.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import lily
import lily.plan
from lily import CheckpointError, ConfigError, LilyConfig, LilyError, MergeError
from lily.adapter import saved_parameters
from lily.config import MAX_EXPERTS, MAX_GROUPS, MAX_RANK
from lily.io import CONFIG_NAME, SCHEMA, TEMP_PREFIX, V1_CONFIG_NAME, V1_WEIGHTS_NAME, WEIGHTS_NAME
from lily.routing import ROUTING_MODES
from tests.helpers import (
    assert_same_state,
    mlp_stack,
    model_inputs,
    model_state,
    randomize_adapter,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)
from tests.test_io import write_v1

RUNS: collections.Counter[str] = collections.Counter()
"""Examples run per property (printed at the end of the module)."""


def examples(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def report_examples(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than several fighting for shared cores
    yield
    torch.set_num_threads(threads)
    total = sum(RUNS.values())
    line = f"hypothesis examples run: {dict(sorted(RUNS.items()))}; total {total}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    else:  # pragma: no cover
        print(line)


FIELDS = [f.name for f in dataclasses.fields(LilyConfig)]
EVIL_REGEX = r"(.|\w)*[xyz]"
r"""Backtracks catastrophically (for the `regex` module too, which sees through `(\w+\.?)*zz`) against every long
module name that does not end in x, y or z ('bert.encoder.layer.0.attention.output.dense')."""
PROPERTY_REGEX_BUDGET_S = 0.2
"""The properties cut a hostile regex off after this long (lily's default, 2 s, is timed in its own test)."""
CALL_LIMIT_S = 5.0
"""No single lily call on a tiny model may take longer than this, whatever its input."""


def mentions(message: str, names) -> bool:
    return any(n and n in message for n in names)


def field_named(message: str, field: str) -> bool:
    """Whether `message` names LilyConfig field `field` as a word (so 'r' is not found inside 'router')."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", message) is not None


# ---------------------------------------------------------------------------------------------------------------
# tiny models, built once, deep-copied per example

FAMILIES = ("mlp", "bert", "gpt2", "llama", "vit")
_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}
_PROTOS: dict[str, torch.nn.Module] = {}


def fresh(family: str) -> torch.nn.Module:
    if family not in _PROTOS:
        torch.manual_seed(0)
        _PROTOS[family] = mlp_stack(width=8, depth=4) if family == "mlp" else _BUILDERS[family](2)
    return copy.deepcopy(_PROTOS[family])


def forward(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        if family == "mlp":
            return model(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
        return model(**model_inputs(family)).logits


def module_names(family: str) -> list[str]:
    return [n for n, _ in _proto(family).named_modules() if n]


def _proto(family: str) -> torch.nn.Module:
    fresh(family)
    return _PROTOS[family]


def linear_suffixes(family: str) -> list[str]:
    """The last part of the name of every layer lily can adapt (nn.Linear, Conv1D) in the model."""
    return sorted({n.rsplit(".", 1)[-1] if family != "mlp" else n for n, m in _proto(family).named_modules()
                   if n and lily.plan.layer_kind(m) is not None})  # fmt: skip


def real_suffixes(family: str) -> list[str]:
    """The last one and two parts of every module name of the model: real `target_modules` entries."""
    out = set()
    for name in module_names(family):
        parts = name.split(".")
        out.update({parts[-1], ".".join(parts[-2:])})
    return sorted(out)


JUNK_NAMES = ["nope", "q_proj.x", "layer.99", "9.9", "lily_adapters"]
REGEXES = [r".*", r".*\.query", r".*_proj", r".*(c_attn|c_fc)", r"\d+\.0", r"q_proj", r".*\.(query|key|value)",
           r".*dense", r".*\.(fc1|fc2)", EVIL_REGEX]  # fmt: skip
PARALLEL = {
    # Sinks that return a tuple (LlamaAttention, BertAttention, GPT2Attention, ViT attention) or drop the token
    # axis (BERT's pooler) cannot take an update: their first forward raises a TargetError naming the adapter.
    "mlp": ["0", "0.0", "2.0", "1.0>1.1", "0.0>0.1"],
    "bert": ["intermediate", "intermediate>output.dense", "output.dense", "output", "query", "attention", "pooler"],
    "gpt2": ["mlp", "c_fc", "attn"],
    "llama": ["mlp", "q_proj", "self_attn"],
    "vit": ["mlp", "fc1", "attention"],
}
PARALLEL_JUNK = ["nope", "mlp>nope", "a>b"]
TRAINABLE = {
    "mlp": ["3.0", "0.0", "3"],
    "bert": ["classifier", "pooler", "query"],
    "gpt2": ["lm_head", "ln_f", "c_fc"],
    "llama": ["lm_head", "norm", "q_proj"],
    "vit": ["classifier", "layernorm", "fc1"],
}


# ---------------------------------------------------------------------------------------------------------------
# 1. LilyConfig construction

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([10**400, -(10**400)]),
    st.sampled_from([0, -1, 3_000_000, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["", "batch", "relu", "q_proj", EVIL_REGEX, "[", "a>b>c", ">", "mlp>", " "]),
    st.lists(st.one_of(st.none(), st.text(max_size=4), st.integers(), st.just("")), max_size=3),
    st.tuples(st.text(max_size=3)),
    st.frozensets(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.binary(max_size=3),
    st.recursive(
        st.none() | st.integers(-5, 5) | st.text(max_size=2),
        lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
        max_leaves=4,
    ),
)

_NAMES = st.sampled_from(["q_proj", "v_proj", "query", "dense", "c_attn", "0.0", "mlp"])
VALID = {
    "target_modules": st.one_of(
        st.lists(_NAMES, min_size=1, max_size=3),
        st.tuples(_NAMES, _NAMES),
        st.sampled_from([".*q_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", EVIL_REGEX]),
    ),
    "r": st.integers(1, MAX_RANK),
    "num_A": st.integers(1, MAX_GROUPS),
    "layers_per_A": st.integers(1, MAX_GROUPS),
    "num_B": st.integers(1, MAX_EXPERTS),
    "scaling": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6),
    "routing": st.sampled_from([None, *ROUTING_MODES]),
    "dropout": st.floats(0.0, 1.0, exclude_max=True),
    "init": st.sampled_from(["lora", "experts"]),
    "router_init_scale": st.floats(0.0, 1e3, exclude_min=True) | st.integers(1, 1000),
    "parallel_modules": st.lists(st.sampled_from(["mlp", "intermediate>output.dense", "attn"]), max_size=2),
    "parallel_r": st.none() | st.integers(1, MAX_RANK),
    "parallel_activation": st.sampled_from([None, "relu", "gelu"]),
    "trainable_modules": st.lists(st.sampled_from(["classifier", "lm_head", "score"]), max_size=2)
    | st.frozensets(st.sampled_from(["classifier", "score"])),
}


def check_valid_config(cfg: LilyConfig) -> None:
    """Invariants of every LilyConfig that constructs, and an exact JSON round trip."""
    for name, bound in (("r", MAX_RANK), ("num_B", MAX_EXPERTS)):
        value = getattr(cfg, name)
        assert type(value) is int and 1 <= value <= bound, (name, value)
    assert (cfg.num_A is None) != (cfg.layers_per_A is None)
    for name in ("num_A", "layers_per_A"):
        value = getattr(cfg, name)
        assert value is None or (type(value) is int and 1 <= value <= MAX_GROUPS)
    assert type(cfg.scaling) is float and math.isfinite(cfg.scaling)
    assert type(cfg.dropout) is float and 0.0 <= cfg.dropout < 1.0
    assert cfg.init in ("lora", "experts") and type(cfg.router_init_scale) is float
    assert 0.0 < cfg.router_init_scale <= 1e3
    assert cfg.routing is None or cfg.routing in ROUTING_MODES
    targets = cfg.target_modules
    assert (isinstance(targets, str) and targets) or (
        type(targets) is list and all(isinstance(t, str) and t for t in targets)
    )
    for name in ("parallel_modules", "trainable_modules"):
        assert type(getattr(cfg, name)) is list and all(isinstance(t, str) and t for t in getattr(cfg, name))
    if cfg.parallel_modules:
        assert type(cfg.parallel_r) is int and cfg.parallel_r >= 1
        assert cfg.parallel_r <= MAX_RANK
    assert cfg.target_modules or cfg.parallel_modules
    assert LilyConfig.from_dict(json.loads(json.dumps(cfg.to_dict(), allow_nan=False))) == cfg


@st.composite
def one_bad_field(draw):
    bad = draw(st.sampled_from(FIELDS))
    kwargs = {name: draw(VALID[name]) for name in FIELDS if name not in ("num_A", "layers_per_A")}
    grouping = draw(st.sampled_from(["none", "num_A", "layers_per_A"]))
    if bad in ("num_A", "layers_per_A"):
        grouping = bad
    elif grouping != "none":
        kwargs[grouping] = draw(VALID[grouping])
    if bad not in ("init", "parallel_modules", "parallel_activation") and kwargs["parallel_activation"] == "relu":
        kwargs["init"] = "lora"  # init="experts" behind a relu parallel adapter is itself an error naming those
    kwargs[bad] = draw(JUNK)
    return bad, kwargs


@examples(300)
@given(one_bad_field())
def test_config_with_one_bad_field_is_valid_or_a_config_error_naming_that_field(case):
    RUNS["config_one_bad_field"] += 1
    bad, kwargs = case
    try:
        cfg = LilyConfig(**kwargs)
    except ConfigError as exc:
        assert field_named(str(exc), bad), (bad, str(exc))
        return
    check_valid_config(cfg)


ANY_VALUE = st.one_of(*VALID.values(), JUNK)


@examples(300)
@given(
    st.one_of(
        st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=len(FIELDS)),
        st.fixed_dictionaries({"target_modules": ANY_VALUE}, optional={f: ANY_VALUE for f in FIELDS[1:]}),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6) | st.integers(), ANY_VALUE, max_size=4),
        JUNK,
    )
)
def test_config_from_any_mapping_is_valid_or_a_config_error_naming_a_field(data):
    RUNS["config_from_dict"] += 1
    try:
        cfg = LilyConfig.from_dict(data)
    except ConfigError as exc:
        message = str(exc)
        if not isinstance(data, dict):
            assert "mapping" in message, message
        else:
            assert any(field_named(message, f) for f in FIELDS) or mentions(message, map(repr, data)), message
        return
    check_valid_config(cfg)


# ---------------------------------------------------------------------------------------------------------------
# 2. inject on tiny models


@st.composite
def inject_configs(draw, family: str):
    suffixes = real_suffixes(family)
    layers = st.lists(st.sampled_from(linear_suffixes(family)), min_size=1, max_size=2, unique=True)
    targets = draw(st.one_of(layers, layers, st.lists(st.sampled_from(suffixes + JUNK_NAMES), max_size=3),
                             st.sampled_from(REGEXES)))  # fmt: skip
    none = st.just([])
    kwargs = {
        "target_modules": targets,
        "r": draw(st.integers(1, 8)),
        "num_B": draw(st.integers(1, 4)),
        "routing": draw(st.sampled_from([None, *ROUTING_MODES])),
        "scaling": draw(st.floats(-2.0, 2.0)),
        "dropout": draw(st.sampled_from([0.0, 0.1])),
        "parallel_modules": draw(none | st.lists(st.sampled_from(PARALLEL[family] + PARALLEL_JUNK), max_size=1)),
        "trainable_modules": draw(none | st.lists(st.sampled_from(TRAINABLE[family] + ["nope"]), max_size=1)),
    }
    grouping = draw(st.sampled_from(["default", "num_A", "layers_per_A"]))
    if grouping != "default":
        kwargs[grouping] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        kwargs["parallel_r"] = draw(st.integers(1, 8))
    return kwargs


def inject_names(model_family: str, kwargs: dict) -> list[str]:
    """What an inject error may name: a config field, an entry of the config, a module, an adapter."""
    entries = [kwargs["target_modules"]] if isinstance(kwargs["target_modules"], str) else kwargs["target_modules"]
    entries = [*entries, *kwargs["parallel_modules"], *kwargs["trainable_modules"]]
    return (
        [f"LilyConfig.{f}" for f in FIELDS]
        + [f for f in FIELDS if len(f) > 2]
        + [f"'{e}'" for e in entries]
        + [f"'{n}'" for n in module_names(model_family)]
        + ["adapter"]
    )


def timed(call):
    start = time.monotonic()
    try:
        return call()
    finally:
        elapsed = time.monotonic() - start
        assert elapsed < CALL_LIMIT_S, f"a lily call took {elapsed:.1f} s"


def try_inject(model, family, kwargs, name):
    """inject; None on success, else the LilyError (after checking its message and that the model is unchanged)."""
    before = model_state(model)
    try:
        cfg = LilyConfig(**kwargs)
    except ConfigError as exc:
        assert mentions(str(exc), inject_names(family, kwargs)), str(exc)
        return exc
    try:
        timed(lambda: lily.inject(model, cfg, name=name))
    except LilyError as exc:
        note(f"{name}: {type(exc).__name__}: {exc}")
        event(f"{name}: {type(exc).__name__}")
        assert mentions(str(exc), inject_names(family, kwargs)), str(exc)
        assert_same_state(before, model_state(model))
        return exc
    return None


def assert_base_or_refused_sink(model, family, base_out) -> None:
    """The adapted model computes the base model, or its first forward refuses a parallel sink that cannot take
    an update (a block returning a tuple, or dropping the token axis) with a TargetError naming the adapter."""
    try:
        out = forward(model, family)
    except lily.TargetError as exc:
        assert "parallel adapter reading" in str(exc), exc
        event("forward: parallel sink refused")
        return
    assert torch.equal(out, base_out)


@examples(100)
@given(st.data())
def test_inject_succeeds_or_raises_a_lily_error_leaving_the_model_unchanged_and_remove_restores_it(data):
    RUNS["inject"] += 1
    family = data.draw(st.sampled_from(FAMILIES), label="family")
    first = data.draw(inject_configs(family), label="config")
    model = fresh(family)
    original = model_state(model)
    base_out = forward(model, family)
    with mock.patch.object(lily.plan, "REGEX_BUDGET_S", PROPERTY_REGEX_BUDGET_S):
        if try_inject(model, family, first, "default") is not None:
            return
        event("default: injected")
        # B experts start at zero: the adapted model computes exactly the base model
        assert_base_or_refused_sink(model, family, base_out)
        trained = {id(p) for p in lily.adapter_parameters(model).values()}
        for module in lily.get_adapter(model).trainable_modules:
            trained |= {id(p) for p in model.get_submodule(module).parameters()}
        assert all(p.requires_grad == (id(p) in trained) for p in model.parameters())

        second = data.draw(inject_configs(family), label="second config")
        if try_inject(model, family, second, "second") is None:
            event("second: injected")
            assert lily.adapter_names(model) == ["default", "second"]
            assert_base_or_refused_sink(model, family, base_out)
            lily.set_adapter(model, "default")
            assert_base_or_refused_sink(model, family, base_out)
    lily.remove(model)
    assert_same_state(original, model_state(model))
    assert torch.equal(forward(model, family), base_out)


# ---------------------------------------------------------------------------------------------------------------
# 3. damaged and hostile adapter folders

ADAPTER_CONFIG = {"target_modules": ["query", "value"], "r": 2, "num_B": 2, "layers_per_A": 1, "routing": "batch",
                  "trainable_modules": ["classifier"]}  # fmt: skip
"""The saved adapter: tiny BERT (long module names, so a hostile regex backtracks), a trained head, exportable
to PEFT ("batch" routing, layers_per_A)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    model = fresh("bert")
    lily.inject(model, LilyConfig(**ADAPTER_CONFIG))
    randomize_adapter(model, seed=1)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    lily.save_adapter(model, root / "v2")
    shutil.copytree(root / "v2", root / "v1")
    write_v1(root / "v1")
    lily.to_peft(model, root / "peft")
    return root


FILES = {"v2": (CONFIG_NAME, WEIGHTS_NAME), "v1": (V1_CONFIG_NAME, V1_WEIGHTS_NAME),
         "peft": ("adapter_config.json", "adapter_model.safetensors")}  # fmt: skip
HOSTILE = st.sampled_from([
    None, True, False, 0, -1, 1, 2, 3, 400, 3_000_000, 10**30, 1.5, math.nan, math.inf, -math.inf, "", "x",
    "batch", "lily-adapter", "LILY", [], [None], ["query"], ["nope"], {}, {"a": 1}, EVIL_REGEX, "0" * 64,
])  # fmt: skip
LILY_PATHS = (
    [(k,) for k in SCHEMA[2]]
    + [("config", f) for f in FIELDS]
    + [("target_types", 0, k) for k in ("key", "target", "in_features", "out_features", "module_names", "groups")]
    + [("target_types", 5), ("weights", "sha256"), ("weights", "size")]
)
PEFT_FIELDS = ["peft_type", "task_type", "inference_mode", "auto_mapping", "base_model_name_or_path", "revision",
               "r", "stride_A", "num_B", "scaling", "target_modules", "exclude_modules", "modules_to_save",
               "layers_to_transform", "layers_pattern", "init_weights"]  # fmt: skip
PEFT_PATHS = [(k,) for k in PEFT_FIELDS]
RAW = ["empty", "list", "string", "number", "null", "truncate", "badutf8", "deep", "huge", "other_kind", "minimal"]
TENSOR_OPS = ["rename", "drop", "add", "grow", "transpose", "scale", "int32", "int64", "bool", "uint8", "float16",
              "bfloat16", "float64", "float8_e4m3fn"]  # fmt: skip
NON_FLOAT = ("int32", "int64", "bool", "uint8")
FS_OPS = ["missing", "symlink_copy", "symlink_dangling", "symlink_loop", "dir", "devnull", "fifo", "pending_garbage"]

frac = st.floats(0.0, 1.0, exclude_max=True)


def sometimes(strategy):
    """None half the time, else a value of `strategy` (`st.none() | one_of(...)` would flatten to 1 in n)."""
    return st.booleans().flatmap(lambda present: strategy if present else st.none())


config_mutations = sometimes(
    st.one_of(  # each kind of damage is absent half the time
        st.tuples(st.just("delete"), st.integers(0, 10**6)),  # index into the path list of the layout
        st.tuples(st.just("set"), st.integers(0, 10**6), HOSTILE),
        st.tuples(st.just("raw"), st.sampled_from(RAW), frac),
        st.tuples(st.just("evil_regex")),
    )
)
weights_mutations = sometimes(
    st.one_of(
        st.tuples(st.just("truncate"), frac),
        st.tuples(
            st.just("flip"), st.lists(st.tuples(frac, st.integers(1, 255)), min_size=1, max_size=3), st.booleans()
        ),
        st.tuples(st.just("empty")),
        st.tuples(st.just("huge_shape"), st.booleans()),
        st.tuples(st.just("huge_header_length")),
        st.tuples(st.just("tensors"), st.sampled_from(TENSOR_OPS), st.integers(0, 10**6), st.booleans()),
    )
)
fs_mutations = sometimes(st.tuples(st.sampled_from(FS_OPS), st.sampled_from(["config", "weights"])))


class Folder:
    """A copy of a saved adapter folder, damaged step by step; `must_fail` is set by each damage a correct
    loader has to detect."""

    def __init__(self, template: Path, root: Path, layout: str) -> None:
        self.dir = root / "adapter"
        shutil.copytree(template, self.dir)
        self.layout = layout
        self.outside = root / "outside"
        self.outside.mkdir()
        self.must_fail: list[str] = []

    def file(self, which: str) -> Path:
        return self.dir / FILES[self.layout][0 if which == "config" else 1]

    def fail(self, why: str) -> None:
        self.must_fail.append(why)

    # config -----------------------------------------------------------------------------------------------
    def _meta(self):
        return json.loads(self.file("config").read_bytes())

    def _write_meta(self, meta) -> None:
        self.file("config").write_text(json.dumps(meta, indent=2))

    def paths(self):
        return PEFT_PATHS if self.layout == "peft" else LILY_PATHS

    def mutate_config(self, mutation) -> None:
        if mutation is None:
            return
        kind = mutation[0]
        if kind == "raw":
            self._raw_config(mutation[1], mutation[2])
            return
        meta = self._meta()
        if kind == "evil_regex":
            if self.layout == "peft":
                meta["target_modules"] = EVIL_REGEX
            else:
                meta["config"]["target_modules"] = EVIL_REGEX
            self.fail("hostile regex")
            self._write_meta(meta)
            return
        path = self.paths()[mutation[1] % len(self.paths())]
        parent = meta
        try:
            for part in path[:-1]:
                parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return  # a field this layout does not have (version 1 has no "weights")
        key = path[-1]
        exists = key in parent if isinstance(parent, dict) else key < len(parent)
        if kind == "delete":
            if exists:
                del parent[key]
                self._deleted(path)
        else:
            old = parent[key] if exists else KeyError
            if isinstance(parent, list) and not exists:
                parent.append(mutation[2])
            else:
                parent[key] = mutation[2]
            if not exists or not same_json(old, mutation[2]):
                self._changed(path, mutation[2], exists)
        self._write_meta(meta)

    def _deleted(self, path) -> None:
        if self.layout == "peft":
            if path[0] in ("peft_type", "target_modules", "r", "stride_A", "num_B", "scaling"):
                self.fail(f"deleted {path}")
        elif len(path) == 1 or path[0] in ("target_types", "weights") or path == ("config", "target_modules"):
            self.fail(f"deleted {path}")

    def _changed(self, path, value, existed) -> None:
        if self.layout == "peft":
            if path[0] == "peft_type" or (
                path[0] in ("exclude_modules", "layers_to_transform", "layers_pattern") and value not in (None, [], "")
            ):
                self.fail(f"set {path}={value!r}")
            return
        version = 2 if self.layout == "v2" else 1
        if len(path) == 1 and path[0] not in SCHEMA[version]:  # a field version 1 does not have
            self.fail(f"unknown field {path}")
        elif len(path) == 1:
            kinds = SCHEMA[version][path[0]]
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                self.fail(f"retyped {path}")
            elif path[0] == "format" or path[0] == "format_version":
                self.fail(f"set {path}={value!r}")
        elif path[0] in ("target_types", "weights"):
            self.fail(f"set {path}={value!r}")

    def _raw_config(self, kind: str, where: float) -> None:
        file = self.file("config")
        good = file.read_bytes()
        content = {
            "empty": b"",
            "list": b"[]",
            "string": b'"lily-adapter"',
            "number": b"2",
            "null": b"null",
            "truncate": good[: int(where * (len(good) - 1))],  # any proper prefix of one JSON object is invalid
            "badutf8": b'{"format": "\xff\xfe"}',
            "deep": b"[" * 200_000,
            "other_kind": b'{"peft_type": "LORA"}' if self.layout == "peft" else b'{"peft_type": "LILY", "r": 2}',
            "minimal": b'{"peft_type": "LILY"}' if self.layout == "peft" else b'{"format": "lily-adapter"}',
        }.get(kind)
        if kind == "huge":  # a sparse file just over lily's 64 MiB cap on config files
            file.write_bytes(b"{")
            with file.open("r+b") as handle:
                handle.truncate((64 << 20) + 1)
        else:
            file.write_bytes(content)
        self.fail(f"config file {kind}")

    # weights ----------------------------------------------------------------------------------------------
    def _fix_checksum(self) -> None:
        """Record the current weights' sha256 and size in the config: a well-formed, hostile folder."""
        data = self.file("weights").read_bytes()
        meta = self._meta()
        meta["weights"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        self._write_meta(meta)

    def _weights_changed(self, fix: bool, why: str | None) -> None:
        if self.layout == "v2":
            if fix:
                self._fix_checksum()
            else:
                self.fail("weights do not match the checksum")
        if why:
            self.fail(why)

    def mutate_weights(self, mutation) -> None:
        if mutation is None:
            return
        file, kind = self.file("weights"), mutation[0]
        data = file.read_bytes()
        if kind == "truncate":
            file.write_bytes(data[: int(mutation[1] * len(data))])
            self._weights_changed(False, "truncated weights")
        elif kind == "flip":
            flipped = bytearray(data)
            for where, xor in mutation[1]:
                flipped[int(where * len(data))] ^= xor
            if flipped != data:  # two flips of one byte can cancel out
                file.write_bytes(bytes(flipped))
                self._weights_changed(mutation[2], None)
        elif kind == "empty":
            file.write_bytes(b"")
            self._weights_changed(False, "empty weights")
        elif kind == "huge_shape":
            key = sorted(safetensors.torch.load(data))[0]
            header = json.dumps({key: {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}}).encode()
            file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
            self._weights_changed(mutation[1], "header claims a huge tensor")
        elif kind == "huge_header_length":
            file.write_bytes((2**62).to_bytes(8, "little") + data[8:])
            self._weights_changed(False, "header length field is huge")
        elif kind == "tensors":
            self._mutate_tensors(safetensors.torch.load(data), mutation[1], mutation[2], mutation[3])

    def _mutate_tensors(self, tensors: dict[str, torch.Tensor], op: str, index: int, fix: bool) -> None:
        keys = sorted(tensors)
        key = keys[index % len(keys)]
        t = tensors[key]
        why = None
        if op == "rename":
            tensors[key + "_x"] = tensors.pop(key)
            why = "renamed tensor"
        elif op == "drop":
            del tensors[key]
            why = "missing tensor"
        elif op == "add":
            tensors["base_model.model.extra" if self.layout == "peft" else "extra.router"] = torch.zeros(2, 2)
            why = "unexpected tensor"
        elif op == "grow":
            tensors[key] = torch.cat([t, torch.zeros((1, *t.shape[1:]), dtype=t.dtype)])
            why = "tensor has the wrong shape"
        elif op == "transpose":
            tensors[key] = t.transpose(-1, -2).contiguous()
            if t.shape[-1] != t.shape[-2]:
                why = "tensor has the wrong shape"
        elif op == "scale":
            tensors[key] = t * 2 + 1
        else:
            tensors[key] = (t * 10 if op in NON_FLOAT else t).to(getattr(torch, op))
            if op in NON_FLOAT:
                why = "non-float tensor"
        self.file("weights").write_bytes(safetensors.torch.save(tensors))
        self._weights_changed(fix, why)

    # file system ------------------------------------------------------------------------------------------
    def mutate_fs(self, mutation) -> None:
        if mutation is None:
            return
        op, which = mutation
        file = self.file(which)
        if op == "pending_garbage":
            if self.layout == "v2":
                (self.dir / f"{TEMP_PREFIX}{CONFIG_NAME}.0123456789abcdef.tmp").write_bytes(b'{"format": "lily-ad')
            return
        if op == "symlink_copy":
            target = self.outside / file.name
            shutil.move(file, target)
            file.symlink_to(target)
            return
        file.unlink()
        if op == "symlink_dangling":
            file.symlink_to(self.outside / "nothing")
        elif op == "symlink_loop":
            file.symlink_to(file)
        elif op == "dir":
            file.mkdir()
        elif op == "devnull":
            file.symlink_to(os.devnull)
        elif op == "fifo":
            os.mkfifo(file)
        self.fail(f"{which} file: {op}")


def same_json(a, b) -> bool:
    return type(a) is type(b) and json.dumps(a) == json.dumps(b)


@st.composite
def damage(draw, layouts):
    return (
        draw(st.sampled_from(layouts)),
        draw(weights_mutations),
        draw(config_mutations),
        draw(fs_mutations),
    )


def at(path: tuple, layout: str = "v2") -> int:
    """The index of a config field path, for the mutation tuples of explicit examples."""
    return (PEFT_PATHS if layout == "peft" else LILY_PATHS).index(path)


def with_examples(cases):
    """Run each case as an explicit example too: every kind of damage alone, so that each check of the loader is
    exercised whatever the random draws."""

    def decorate(test):
        for case in reversed(cases):
            test = example(case=case)(test)
        return test

    return decorate


LILY_EXAMPLES = [
    ("v2", None, None, None),  # intact
    ("v1", None, None, None),
    ("v2", ("tensors", "int32", 0, True), None, None),  # hostile but consistent: the checksum matches
    ("v1", ("tensors", "int64", 3, False), None, None),
    ("v2", ("tensors", "bool", 5, True), None, None),
    ("v2", ("tensors", "float16", 1, True), None, None),  # well-formed, another float dtype: loads, cast
    ("v1", ("tensors", "float8_e4m3fn", 2, False), None, None),
    ("v2", ("tensors", "scale", 4, True), None, None),
    ("v2", ("tensors", "grow", 0, True), None, None),
    ("v2", ("tensors", "rename", 1, True), None, None),
    ("v1", ("tensors", "drop", 2, False), None, None),
    ("v2", ("tensors", "add", 0, True), None, None),
    ("v2", ("flip", [(0.95, 1)], False), None, None),  # one bit of tensor data: only the checksum can tell
    ("v2", ("flip", [(0.95, 1)], True), None, None),
    ("v1", ("flip", [(0.95, 1)], False), None, None),
    ("v1", ("flip", [(0.01, 0x40)], False), None, None),  # in the header
    ("v2", ("truncate", 0.5), None, None),
    ("v1", ("truncate", 0.99), None, None),
    ("v1", ("empty",), None, None),
    ("v2", ("huge_shape", True), None, None),
    ("v1", ("huge_shape", False), None, None),
    ("v1", ("huge_header_length",), None, None),
    ("v2", None, ("set", at(("config", "r")), 3_000_000), None),
    ("v2", None, ("set", at(("config", "num_B")), 400), None),
    ("v1", None, ("set", at(("config", "r")), 400), None),
    ("v2", None, ("set", at(("config", "scaling")), 1.5), None),  # a valid other config: loads as written
    ("v2", None, ("set", at(("config", "scaling")), math.nan), None),
    ("v2", None, ("set", at(("config", "routing")), "batch"), None),
    ("v2", None, ("set", at(("config", "target_modules")), ["nope"]), None),
    ("v2", None, ("set", at(("format_version",)), 3), None),
    ("v1", None, ("set", at(("format_version",)), 2), None),
    ("v2", None, ("set", at(("format_version",)), True), None),
    ("v2", None, ("set", at(("weights", "sha256")), "0" * 64), None),
    ("v2", None, ("set", at(("weights", "size")), 1), None),
    ("v2", None, ("set", at(("target_types", 0, "module_names")), ["nope"]), None),
    ("v2", None, ("set", at(("target_types", 5)), {}), None),
    ("v1", None, ("set", at(("lily_version",)), "x"), None),
    ("v2", None, ("delete", at(("target_types",))), None),
    ("v2", None, ("delete", at(("config", "dropout"))), None),
    ("v2", None, ("raw", "truncate", 0.5), None),
    ("v2", None, ("raw", "deep", 0.0), None),
    ("v2", None, ("raw", "huge", 0.0), None),
    ("v1", None, ("raw", "badutf8", 0.0), None),
    ("v2", None, ("raw", "other_kind", 0.0), None),
    ("v2", None, ("evil_regex",), None),
    ("v2", None, None, ("symlink_copy", "weights")),  # a symlink to intact files: loads
    ("v1", None, None, ("symlink_copy", "config")),
    ("v2", None, None, ("symlink_dangling", "weights")),
    ("v2", None, None, ("symlink_loop", "config")),
    ("v1", None, None, ("dir", "weights")),
    ("v1", None, None, ("devnull", "weights")),
    ("v2", None, None, ("fifo", "weights")),
    ("v1", None, None, ("fifo", "config")),
    ("v2", None, None, ("missing", "config")),
    ("v1", None, None, ("missing", "weights")),
    ("v2", ("flip", [(0.95, 1)], False), None, ("pending_garbage", "config")),
]
PEFT_EXAMPLES = [
    ("peft", None, None, None),
    ("peft", ("tensors", "float16", 0, False), None, None),
    ("peft", ("tensors", "scale", 0, False), None, None),  # one layer's copy of a shared B differs
    ("peft", ("tensors", "transpose", 3, False), None, None),
    ("peft", ("tensors", "grow", 1, False), None, None),
    ("peft", ("tensors", "rename", 2, False), None, None),
    ("peft", ("tensors", "drop", 4, False), None, None),
    ("peft", ("tensors", "add", 0, False), None, None),
    ("peft", ("flip", [(0.95, 1)], False), None, None),
    ("peft", ("truncate", 0.7), None, None),
    ("peft", ("huge_shape", False), None, None),
    ("peft", ("huge_header_length",), None, None),
    ("peft", None, ("set", at(("r",), "peft"), 3_000_000), None),
    ("peft", None, ("set", at(("stride_A",), "peft"), 0), None),
    ("peft", None, ("set", at(("stride_A",), "peft"), 1.5), None),
    ("peft", None, ("set", at(("num_B",), "peft"), 400), None),
    ("peft", None, ("set", at(("scaling",), "peft"), 1.5), None),
    ("peft", None, ("set", at(("peft_type",), "peft"), "LORA"), None),
    ("peft", None, ("set", at(("exclude_modules",), "peft"), ["nope"]), None),
    ("peft", None, ("set", at(("modules_to_save",), "peft"), [None]), None),
    ("peft", None, ("set", at(("modules_to_save",), "peft"), ["nope"]), None),
    ("peft", None, ("delete", at(("target_modules",), "peft")), None),
    ("peft", None, ("evil_regex",), None),
    ("peft", None, ("raw", "deep", 0.0), None),
    ("peft", None, ("raw", "truncate", 0.3), None),
    ("peft", None, ("raw", "list", 0.0), None),
    ("peft", None, None, ("symlink_copy", "weights")),
    ("peft", None, None, ("symlink_loop", "config")),
    ("peft", None, None, ("dir", "weights")),
    ("peft", None, None, ("devnull", "config")),
    ("peft", None, None, ("missing", "weights")),
]
WEIGHTS_EXAMPLES = [
    ("v2", None, None, None),
    ("v1", None, None, None),
    ("v2", ("tensors", "int32", 0, True), None, None),
    ("v2", ("tensors", "float16", 1, True), None, None),
    ("v2", ("tensors", "grow", 0, True), None, None),
    ("v2", ("flip", [(0.95, 1)], False), None, None),
    ("v1", ("flip", [(0.95, 1)], False), None, None),
    ("v2", ("truncate", 0.5), None, None),
    ("v2", ("huge_shape", True), None, None),
    ("v2", None, ("set", at(("config", "scaling")), 1.5), None),  # another config: refused, not copied
    ("v2", None, ("set", at(("config", "r")), 400), None),
    ("v2", None, ("set", at(("target_types", 0, "groups")), [0, 0]), None),
    ("v2", None, ("evil_regex",), None),
    ("v2", None, None, ("symlink_copy", "weights")),
    ("v2", None, None, ("missing", "weights")),
]


def make_folder(saved: Path, root: Path, case) -> Folder:
    layout, weights, config, fs = case
    folder = Folder(saved / layout, root, layout)
    folder.mutate_weights(weights)
    folder.mutate_config(config)
    folder.mutate_fs(fs)
    note(f"layout={layout} weights={weights} config={config} fs={fs} must_fail={folder.must_fail}")
    return folder


@functools.cache
def file_names(saved: Path) -> list[str]:
    """What a checkpoint error may name: a file, a config field, a tensor, a module."""
    tensors = [*safetensors.torch.load_file(saved / "v2" / WEIGHTS_NAME),
               *safetensors.torch.load_file(saved / "peft" / "adapter_model.safetensors")]  # fmt: skip
    fields = [*SCHEMA[2], *FIELDS[1:], "LilyConfig.r", "r=", "'r'", *PEFT_FIELDS, "target type", "sha256"]
    return [*{n for pair in FILES.values() for n in pair}, *fields, *tensors, *module_names("bert"), "format"]


def check_failure(exc: LilyError, folder: Folder, model, before, saved: Path) -> None:
    message = str(exc)
    note(f"{type(exc).__name__}: {message[:300]}")
    event(f"refused: {type(exc).__name__}")
    assert isinstance(exc, (CheckpointError, ConfigError)), type(exc)
    assert mentions(message, [str(folder.dir), *file_names(saved)]), message  # names the file, field or tensor
    assert_same_state(before, model_state(model))


def config_candidates(folder: Folder) -> list[LilyConfig]:
    """The configs a successful load may have read: the config file(s) in the folder as written."""
    found = []
    for name in (CONFIG_NAME, V1_CONFIG_NAME):
        try:
            meta = json.loads((folder.dir / name).read_bytes())
            found.append(LilyConfig.from_dict(meta["config"]))
        except Exception:
            continue
    return found


def same_config(loaded: LilyConfig, candidate: LilyConfig) -> bool:
    if candidate.routing is None:
        candidate = dataclasses.replace(candidate, routing=loaded.routing)
    return loaded == candidate


def assert_holds_file(model, folder: Folder, name: str = "default") -> None:
    """The model's adapter holds exactly the tensors in the weights file (cast to the parameters' dtype)."""
    params = saved_parameters(model, name)
    tensors = safetensors.torch.load_file(folder.file("weights"))
    assert params.keys() == tensors.keys()
    for key, param in params.items():
        assert torch.equal(param.detach(), tensors[key].to(param.dtype)), key


@examples(100)
@with_examples(LILY_EXAMPLES)
@given(damage(["v2", "v2", "v1"]))
def test_load_adapter_of_a_damaged_folder_loads_what_it_says_or_raises_leaving_the_model_unchanged(saved, case):
    RUNS["load_adapter"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(saved, Path(tmp), case)
        model = fresh("bert")
        before = model_state(model)
        try:
            with mock.patch.object(lily.plan, "REGEX_BUDGET_S", PROPERTY_REGEX_BUDGET_S):
                timed(lambda: lily.load_adapter(model, folder.dir))
        except LilyError as exc:
            check_failure(exc, folder, model, before, saved)
            return
        event("loaded")
        assert not folder.must_fail, f"loaded a folder that should have been refused: {folder.must_fail}"
        adapter = lily.get_adapter(model)
        assert any(same_config(adapter.config, c) for c in config_candidates(folder))
        assert_holds_file(model, folder)
        forward(model, "bert")
        lily.remove(model)
        after = model_state(model)
        assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]


@examples(50)
@with_examples(WEIGHTS_EXAMPLES)
@given(damage(["v2", "v1"]))
def test_load_adapter_weights_from_a_damaged_folder_copies_what_it_says_or_changes_nothing(saved, case):
    RUNS["load_adapter_weights"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(saved, Path(tmp), case)
        model = lily.load_adapter(fresh("bert"), saved / "v2", is_trainable=True)
        with torch.no_grad():
            for param in lily.adapter_parameters(model).values():
                param.zero_()  # so that a copy that did not happen shows
        before = model_state(model)
        try:
            with mock.patch.object(lily.plan, "REGEX_BUDGET_S", PROPERTY_REGEX_BUDGET_S):
                timed(lambda: lily.load_adapter_weights(model, folder.dir))
        except LilyError as exc:
            check_failure(exc, folder, model, before, saved)
            return
        event("loaded")
        assert not folder.must_fail, f"loaded a folder that should have been refused: {folder.must_fail}"
        assert any(lily.get_adapter(model).config == c for c in config_candidates(folder))
        assert_holds_file(model, folder)
        forward(model, "bert")


@examples(60)
@with_examples(PEFT_EXAMPLES)
@given(damage(["peft"]))
def test_from_peft_of_a_damaged_checkpoint_imports_what_it_says_or_raises_leaving_the_model_unchanged(saved, case):
    RUNS["from_peft"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(saved, Path(tmp), case)
        model = fresh("bert")
        before = model_state(model)
        try:
            with mock.patch.object(lily.plan, "REGEX_BUDGET_S", PROPERTY_REGEX_BUDGET_S):
                timed(lambda: lily.from_peft(folder.dir, model))
        except LilyError as exc:
            check_failure(exc, folder, model, before, saved)
            return
        event("loaded")
        assert not folder.must_fail, f"imported a checkpoint that should have been refused: {folder.must_fail}"
        # exporting again gives back exactly the checkpoint's tensors and sharing fields
        lily.to_peft(model, Path(tmp) / "again")
        theirs = safetensors.torch.load_file(folder.file("weights"))
        ours = safetensors.torch.load_file(Path(tmp) / "again" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for key, tensor in ours.items():
            assert torch.equal(tensor, theirs[key].to(tensor.dtype)), key
        meta = json.loads(folder.file("config").read_bytes())
        exported = json.loads((Path(tmp) / "again" / "adapter_config.json").read_bytes())
        for key in ("r", "num_B", "target_modules"):
            assert exported[key] == meta[key], key
        assert exported["scaling"] == float(meta["scaling"])
        forward(model, "bert")


@pytest.mark.parametrize("layout", ["v2", "peft"])
def test_a_hostile_target_regex_in_a_saved_adapter_is_cut_off_within_seconds(saved, tmp_path, layout):
    folder = Folder(saved / layout, tmp_path, layout)
    folder.mutate_config(("evil_regex",))
    model = fresh("bert")
    before = model_state(model)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="target_modules") as caught:
        if layout == "peft":
            lily.from_peft(folder.dir, model)
        else:
            lily.load_adapter(model, folder.dir)
    elapsed = time.monotonic() - start
    assert elapsed < lily.plan.REGEX_BUDGET_S + 2.0, elapsed
    assert "took too long" in str(caught.value)
    assert_same_state(before, model_state(model))


# ---------------------------------------------------------------------------------------------------------------
# 4. merge / unmerge / remove round trips

MERGE_TARGETS = {"mlp": r"\d\.0", "bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"],
                 "llama": ["q_proj", "v_proj"]}  # fmt: skip
MERGE_PARALLEL = {"mlp": "1.0", "bert": "intermediate", "gpt2": "mlp", "llama": "mlp"}


@examples(100)
@given(
    family=st.sampled_from(sorted(MERGE_TARGETS)),
    routing=st.sampled_from(ROUTING_MODES),
    r=st.integers(1, 8),
    num_B=st.integers(1, 4),
    layers_per_A=st.integers(1, 2),
    scaling=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
    parallel=st.booleans(),
    tied=st.booleans(),
)
def test_merge_unmerge_and_remove_round_trip_or_raise_merge_error_leaving_the_model_unchanged(
    family, routing, r, num_B, layers_per_A, scaling, seed, parallel, tied
):
    RUNS["merge"] += 1
    tied = tied and family == "gpt2"  # GPT-2's lm_head shares its weight with the input embeddings
    targets = MERGE_TARGETS[family] if family == "mlp" else MERGE_TARGETS[family] + (["lm_head"] if tied else [])
    cfg = LilyConfig(target_modules=targets, r=r, num_B=num_B, layers_per_A=layers_per_A, scaling=scaling,
                     routing=routing, parallel_modules=[MERGE_PARALLEL[family]] if parallel else [])  # fmt: skip
    model = lily.inject(fresh(family), cfg)
    randomize_adapter(model, seed=seed)
    adapted = forward(model, family)
    before = model_state(model)
    if routing not in ("static", "uniform") or parallel or tied:
        for call in (lily.merge, lambda m: lily.remove(m, merge=True)):
            with pytest.raises(MergeError) as caught:
                call(model)
            assert mentions(str(caught.value), [routing, "parallel", "shared", "lm_head"]), str(caught.value)
            assert_same_state(before, model_state(model))
        return
    lily.merge(model)
    merged = forward(model, family)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    lily.merge(model)  # merging twice folds once
    assert torch.equal(forward(model, family), merged)
    lily.unmerge(model)
    after = model_state(model)
    assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]
    for key, (tensor, grad) in before[1].items():
        assert (after[1][key][0] - tensor).abs().max().item() <= 1e-6 and after[1][key][1] == grad, key
    lily.unmerge(model)  # unmerging twice takes out once
    assert_same_state(after, model_state(model))
    lily.remove(model, merge=True)
    assert lily.adapter.find_adapters(model) is None
    torch.testing.assert_close(forward(model, family), merged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Regressions: the bugs the properties found, each as its minimal reproduction


def test_config_with_an_int_scaling_beyond_float_range_is_a_config_error():
    with pytest.raises(ConfigError, match="scaling"):
        LilyConfig(target_modules=["q"], scaling=10**400)


@pytest.mark.parametrize("layout", ["v2", "peft"])
def test_a_saved_int_scaling_beyond_float_range_is_a_checkpoint_error(saved, tmp_path, layout):
    folder = Folder(saved / layout, tmp_path, layout)
    meta = json.loads(folder.file("config").read_bytes())
    (meta if layout == "peft" else meta["config"])["scaling"] = 10**400
    folder.file("config").write_text(json.dumps(meta))
    model = fresh("bert")
    before = model_state(model)
    with pytest.raises(CheckpointError, match="scaling"):
        lily.from_peft(folder.dir, model) if layout == "peft" else lily.load_adapter(model, folder.dir)
    assert_same_state(before, model_state(model))


def test_default_parallel_r_of_a_config_respects_the_rank_bound():
    try:
        cfg = LilyConfig(target_modules=["q"], r=MAX_RANK // 2 + 1, parallel_modules=["mlp"])
    except ConfigError:
        return  # refusing it is fine too
    assert LilyConfig.from_dict(cfg.to_dict()) == cfg  # raises ConfigError: parallel_r=65538 is above 65536


def test_config_from_a_mapping_with_non_string_keys_is_a_config_error():
    with pytest.raises(ConfigError):
        LilyConfig.from_dict({1: 2, "a": 3})


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_from_peft_refuses_non_float_tensors(saved, tmp_path, dtype):
    folder = Folder(saved / "peft", tmp_path, "peft")
    tensors = safetensors.torch.load_file(folder.file("weights"))
    safetensors.torch.save_file({k: (v * 10).to(dtype) for k, v in tensors.items()}, folder.file("weights"))
    model = fresh("bert")
    before = model_state(model)
    with pytest.raises(CheckpointError, match="dtype"):
        lily.from_peft(folder.dir, model)
    assert_same_state(before, model_state(model))


def test_parallel_adapter_on_a_block_returning_a_tuple_is_refused_by_name():
    model = fresh("llama")
    lily.inject(model, LilyConfig(target_modules=[], parallel_modules=["self_attn"], r=2))
    with pytest.raises(lily.TargetError, match=r"parallel adapter reading 'model\.layers\.0\.self_attn'.*tuple"):
        forward(model, "llama")


FIFO_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch, lily
    from torch import nn

    def stack():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])

    root, cases = Path(sys.argv[1]), sys.argv[2:]
    config = lily.LilyConfig(target_modules=["0.0", "1.0"], r=2, num_B=2, layers_per_A=1, routing="batch")
    model = lily.inject(stack(), config)
    for case in cases:
        folder = root / case
        if case == "v1-weights":
            lily.save_adapter(model, folder)
            meta = json.loads((folder / "lily_config.json").read_text())
            v1 = {k: meta[k] for k in ("format", "config", "routing_reason", "target_types")}
            (folder / "adapter_config.json").write_text(json.dumps({**v1, "format_version": 1}))
            (folder / "lily_config.json").unlink()
            (folder / "lily_adapter.safetensors").unlink()
        else:
            lily.to_peft(model, folder)
        fifo = folder / ("adapter_config.json" if case == "peft-config" else "adapter_model.safetensors")
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    print("READY", flush=True)
    for case in cases:
        print("START", case, flush=True)
        try:
            lily.from_peft(root / case, stack()) if case.startswith("peft") else lily.load_adapter(stack(), root / case)
            result = "ok"
        except lily.LilyError as exc:
            result = "LilyError " + type(exc).__name__
        except BaseException as exc:
            result = "other " + type(exc).__name__
        print("DONE", case, result, flush=True)
    """
)
FIFO_CASES = {"v1-weights": "adapter_model.safetensors", "peft-config": "adapter_config.json",
              "peft-weights": "adapter_model.safetensors"}  # fmt: skip
"""case -> the file that is a FIFO (a named pipe no process writes to)."""
FIFO_WAIT_S = 1.5


@pytest.fixture(scope="module")
def fifo_results(tmp_path_factory) -> dict[str, str]:
    """Each FIFO case's outcome, "hang" for a call still blocked FIFO_WAIT_S after it started.

    The cases run one after another in one child process: a blocked read cannot be interrupted in-process
    (safetensors' Rust open holds the GIL). A hung case is released by opening its FIFO for writing and closing
    it (the read then sees end-of-file), so the next case can run; the child is killed if that fails.
    """
    root = tmp_path_factory.mktemp("fifo")
    script = root / "child.py"
    script.write_text(FIFO_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(root), *FIFO_CASES], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    results: dict[str, str] = {}
    output: list[str] = []
    running, hung = None, set()
    try:
        while True:
            try:
                line = lines.get(timeout=FIFO_WAIT_S if running else 120)
            except queue.Empty:
                if running is None or running in hung:
                    break  # no progress at all: give up on the rest
                hung.add(running)
                try:
                    os.close(os.open(root / running / FIFO_CASES[running], os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    break
                continue
            if line is None:
                break
            output.append(line)
            words = line.split()
            if words[:1] == ["START"]:
                running = words[1]
            elif words[:1] == ["DONE"]:
                results[words[1]] = "hang" if words[1] in hung else " ".join(words[2:])
                running = None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for case in FIFO_CASES:
        results.setdefault(case, "hang" if case in hung else "no result: " + "".join(output)[-500:])
    return results


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_reading_a_fifo_instead_of_an_adapter_file_does_not_hang(fifo_results, case):
    assert fifo_results[case] == "LilyError CheckpointError", fifo_results[case]
