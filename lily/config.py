"""`LilyConfig`: every knob of a Lily adapter, validated at construction."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lily.errors import ConfigError
from lily.layer import ACTIVATIONS
from lily.routing import ROUTING_MODES


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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LilyConfig.r must be a positive integer, got {self.r!r}.")
        if isinstance(self.num_B, bool) or not isinstance(self.num_B, int) or self.num_B < 1:
            raise ConfigError(f"LilyConfig.num_B must be an integer >= 1, got {self.num_B!r}.")
        if self.num_A is not None and self.layers_per_A is not None:
            raise ConfigError(
                f"LilyConfig: give num_A (number of A groups) or layers_per_A (layers per A group), "
                f"not both (got num_A={self.num_A}, layers_per_A={self.layers_per_A})."
            )
        for name in ("num_A", "layers_per_A"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"LilyConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.num_A is None and self.layers_per_A is None:
            self.num_A = 2
        if (
            isinstance(self.scaling, bool)
            or not isinstance(self.scaling, (int, float))
            or not math.isfinite(self.scaling)
        ):
            raise ConfigError(f"LilyConfig.scaling must be a finite number, got {self.scaling!r}.")
        self.scaling = float(self.scaling)
        if self.routing is not None and self.routing not in ROUTING_MODES:
            raise ConfigError(
                f"LilyConfig.routing={self.routing!r} is not a routing mode; choose one of "
                f"{', '.join(map(repr, ROUTING_MODES))} or None for the default."
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LilyConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        self.dropout = float(self.dropout)
        if isinstance(self.trainable_modules, str) or not all(isinstance(t, str) and t for t in self.trainable_modules):
            raise ConfigError(
                f"LilyConfig.trainable_modules must be a list of module-name suffixes, got {self.trainable_modules!r}."
            )
        self.trainable_modules = list(self.trainable_modules)
        self._check_parallel()

    def _check_parallel(self) -> None:
        entries = self.parallel_modules
        if isinstance(entries, str) or not all(isinstance(e, str) and e for e in entries):
            raise ConfigError(f"LilyConfig.parallel_modules must be a list of module names, got {entries!r}.")
        self.parallel_modules = list(entries)
        for entry in self.parallel_modules:
            if entry.count(">") > 1 or not all(entry.split(">")):
                raise ConfigError(f"LilyConfig.parallel_modules entry {entry!r} must be 'block' or 'source>sink'.")
        if self.parallel_r is not None and (
            isinstance(self.parallel_r, bool) or not isinstance(self.parallel_r, int) or self.parallel_r < 1
        ):
            raise ConfigError(f"LilyConfig.parallel_r must be a positive integer or None, got {self.parallel_r!r}.")
        if self.parallel_activation not in (None, *ACTIVATIONS):
            raise ConfigError(
                f"LilyConfig.parallel_activation={self.parallel_activation!r}: choose one of "
                f"{', '.join(map(repr, ACTIVATIONS))} or None."
            )
        if self.parallel_r is None and self.parallel_modules:
            self.parallel_r = 2 * self.r

    def _check_targets(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ConfigError(f"LilyConfig.target_modules={targets!r} is not a valid regex: {exc}.") from exc
            return
        if isinstance(targets, tuple | set | frozenset):
            targets = sorted(targets) if isinstance(targets, set | frozenset) else list(targets)
            self.target_modules = targets
        if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                "LilyConfig.target_modules must be a list of module-name suffixes or one regex string, got "
                f"{self.target_modules!r}."
            )
        if not targets and not self.parallel_modules:
            raise ConfigError("LilyConfig.target_modules is empty and there are no parallel_modules: nothing to adapt.")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LilyConfig:
        """Rebuild a config from `to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"LilyConfig has no field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)
