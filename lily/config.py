"""`LilyConfig`: every knob of a Lily adapter, validated at construction."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import regex

from lily.bank import INITS
from lily.errors import ConfigError
from lily.layer import ACTIVATIONS
from lily.routing import ROUTING_MODES

MAX_RANK = 65536
"""The largest `r` and `parallel_r` accepted: a bound that catches typos (and hostile configs) before allocation."""
MAX_EXPERTS = 4096
"""The largest `num_B` accepted."""
MAX_GROUPS = 65536
"""The largest `num_A` and `layers_per_A` accepted."""


def _finite(value: int | float) -> bool:
    """Whether `value` is a finite number that fits a float (a 400-digit integer does not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass
class LilyConfig:
    """Configuration of a Lily adapter.

    Example:
        >>> cfg = LilyConfig(target_modules=["q_proj", "v_proj"], r=32, num_A=2, num_B=4)
    """

    target_modules: list[str] | str = field(
        metadata={
            "help": "Modules to adapt: a list of module-name suffixes ('q_proj' matches "
            "'model.layers.0.self_attn.q_proj'), or one regular expression that must match the "
            "whole module name."
        }
    )
    r: int = field(default=32, metadata={"help": "Rank: output width of each A, input width of each B expert."})
    num_A: int | None = field(
        default=None,
        metadata={
            "help": "Number of A groups per target type (the paper's ne_1). The layers of a type are split "
            "into exactly num_A contiguous runs of as-equal-as-possible length. Default 2 when neither "
            "num_A nor layers_per_A is given."
        },
    )
    layers_per_A: int | None = field(
        default=None,
        metadata={
            "help": "Alternative to num_A (PEFT's stride_A): consecutive layers per A group; the last group "
            "may be shorter. Giving both is an error."
        },
    )
    num_B: int = field(default=4, metadata={"help": "Number of B experts per target type (the paper's ne_2)."})
    scaling: float = field(default=1.0, metadata={"help": "s in y = W x + s * (x A) * sum_e w_e B_e."})
    routing: str | None = field(
        default=None,
        metadata={
            "help": "How expert weights are computed: 'batch', 'sample', 'token', 'static' or 'uniform'. "
            "None picks 'token' for causal language models and 'sample' otherwise."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    init: str = field(
        default="lora",
        metadata={
            "help": "How A and the B experts start: 'lora' (A random, B zero: the experts start identical) or "
            "'experts' (A zero, each B expert random: the experts start distinct). Both start at the base model."
        },
    )
    router_init_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies the routers' initial weights (data-dependent and static routing): above 1, each "
            "layer starts with a sharper, more layer-specific mix of the experts."
        },
    )
    parallel_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Blocks that get a parallel adapter: its A reads the block's input and its update is added "
            "to the block's output (the paper's ViT MLP adapter). An entry is a module-name suffix ('mlp'), "
            "or 'source>sink' to read the input of `source` and add to the output of the module `sink` "
            "names relative to the source's parent ('intermediate>output.dense' in Hugging Face ViT)."
        },
    )
    parallel_r: int | None = field(
        default=None, metadata={"help": "Rank of the parallel adapters (default 2 * r, as in the paper's ViT code)."}
    )
    parallel_activation: str | None = field(
        default="relu",
        metadata={"help": "Nonlinearity on h of the parallel adapters: 'relu' (the paper's), 'gelu' or None."},
    )
    trainable_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Module-name suffixes of base modules to train fully and save with the adapter, e.g. a new "
            "classification head ['classifier'] (PEFT's modules_to_save). They are trained in place."
        },
    )

    def __post_init__(self) -> None:
        self._check_targets()
        if self.num_A is not None and self.layers_per_A is not None:
            raise ConfigError(
                f"LilyConfig: give num_A (number of A groups) or layers_per_A (layers per A group), "
                f"not both (got num_A={self.num_A}, layers_per_A={self.layers_per_A})."
            )
        for name, bound in (("r", MAX_RANK), ("num_B", MAX_EXPERTS), ("num_A", MAX_GROUPS),
                            ("layers_per_A", MAX_GROUPS), ("parallel_r", MAX_RANK)):  # fmt: skip
            self._check_count(name, bound)
        if self.num_A is None and self.layers_per_A is None:
            self.num_A = 2
        scaling = self.scaling
        if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not _finite(scaling):
            shown = f"{scaling!r}" if not isinstance(scaling, int) or abs(scaling) < 10**20 else "a huge integer"
            raise ConfigError(f"LilyConfig.scaling must be a finite number, got {shown}.")
        self.scaling = float(scaling)
        if self.routing is not None and self.routing not in ROUTING_MODES:
            raise ConfigError(
                f"LilyConfig.routing={self.routing!r} is not a routing mode; choose one of "
                f"{', '.join(map(repr, ROUTING_MODES))} or None for the default."
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"LilyConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        self.dropout = float(self.dropout)
        if self.init not in INITS:
            raise ConfigError(f"LilyConfig.init={self.init!r}: choose one of {', '.join(map(repr, INITS))}.")
        scale = self.router_init_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not _finite(scale) or not 0 < scale <= 1e3:
            raise ConfigError(f"LilyConfig.router_init_scale must be a number in (0, 1000], got {scale!r}.")
        self.router_init_scale = float(scale)
        self._check_names("trainable_modules", "module-name suffixes")
        self._check_parallel()
        if not self.target_modules and not self.parallel_modules:
            raise ConfigError("LilyConfig.target_modules is empty and there are no parallel_modules: nothing to adapt.")

    def _check_count(self, name: str, bound: int) -> None:
        """Field `name` must be an integer in [1, bound]; None is allowed where the field's default is None."""
        value = getattr(self, name)
        if value is None and next(f for f in fields(self) if f.name == name).default is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"LilyConfig.{name} must be an integer >= 1, got {value!r}.")
        if value > bound:
            raise ConfigError(
                f"LilyConfig.{name}={value} is above {bound}, the most lily accepts; this looks like a typo."
            )

    def _check_names(self, name: str, what: str) -> None:
        """Field `name` must be a list (or tuple, or set) of non-empty strings; it is stored as a list."""
        value = getattr(self, name)
        if not isinstance(value, list | tuple | set | frozenset) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"LilyConfig.{name} must be a list of {what}, got {value!r}.")
        setattr(self, name, sorted(value) if isinstance(value, set | frozenset) else list(value))

    def _check_parallel(self) -> None:
        self._check_names("parallel_modules", "module names")
        if self.parallel_modules and self.init == "experts" and self.parallel_activation == "relu":
            raise ConfigError(
                "LilyConfig: init='experts' starts A at zero, and the relu of parallel_modules' adapters has no "
                "gradient at zero, so they would never train; use parallel_activation='gelu' or None, or init='lora'."
            )
        for entry in self.parallel_modules:
            if entry.count(">") > 1 or not all(entry.split(">")):
                raise ConfigError(f"LilyConfig.parallel_modules entry {entry!r} must be 'block' or 'source>sink'.")
        if self.parallel_activation not in (None, *ACTIVATIONS):
            raise ConfigError(
                f"LilyConfig.parallel_activation={self.parallel_activation!r}: choose one of "
                f"{', '.join(map(repr, ACTIVATIONS))} or None."
            )
        if self.parallel_r is None and self.parallel_modules:
            self.parallel_r = 2 * self.r
            if self.parallel_r > MAX_RANK:
                raise ConfigError(
                    f"LilyConfig.parallel_r defaults to 2 * r = {self.parallel_r}, above {MAX_RANK}; set parallel_r."
                )

    def _check_targets(self) -> None:
        targets = self.target_modules
        if not isinstance(targets, str):
            self._check_names("target_modules", "module-name suffixes or one regex string")
        elif not targets:
            raise ConfigError(
                "LilyConfig.target_modules is an empty regex, which matches no module; give a pattern or a list of "
                "module-name suffixes."
            )
        else:
            try:
                regex.compile(targets)
            except regex.error as exc:
                raise ConfigError(f"LilyConfig.target_modules={targets!r} is not a valid regex: {exc}.") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LilyConfig:
        """Rebuild a config from `to_dict` output; unknown or missing fields are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"a LilyConfig must be given as a mapping of fields, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(repr, set(data) - known))
        if unknown:
            raise ConfigError(
                f"LilyConfig has no field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}."
            )
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in missing if name not in data]
        if missing:
            raise ConfigError(f"LilyConfig lacks the required field(s) {missing}.")
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LilyConfig:
        """The config of the adapter saved in directory `path` by `lily.save_adapter` (format 1 or 2).

        Example:
            >>> cfg = LilyConfig.from_pretrained("out/adapter")
        """
        from lily.io import read_adapter  # lily.io imports this module

        return read_adapter(path).config
