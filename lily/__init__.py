"""lily: Low-Rank Interconnected Adaptation across Layers (Zhong, Zhao, Zhou; ACL Findings 2025).

Three lines put Lily on a model::

    import lily
    model = lily.inject(model, lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=32, num_A=2, num_B=4))
    print(lily.summary(model))
"""

from lily.adapter import adapter_names, adapter_parameters, disable_adapters, get_adapter, lily_layers, set_adapter
from lily.analysis import diagnostics, effective_rank, expert_diversity, expert_similarity, routing_statistics
from lily.budget import fit_budget, lily_parameters
from lily.config import LilyConfig
from lily.errors import CheckpointError, ConfigError, InjectionError, LilyError, MergeError, TargetError
from lily.hub import model_card, push_to_hub
from lily.inject import delete_adapter, inject, remove
from lily.interop import from_peft, to_peft
from lily.io import load_adapter, load_adapter_weights, save_adapter
from lily.merge import merge, unmerge
from lily.pretrained import export_merged, from_pretrained
from lily.report import count_parameters, summary
from lily.routing import ROUTING_MODES

__version__ = "0.1.0"

__all__ = [
    "ROUTING_MODES",
    "CheckpointError",
    "ConfigError",
    "InjectionError",
    "LilyConfig",
    "LilyError",
    "MergeError",
    "TargetError",
    "adapter_names",
    "adapter_parameters",
    "count_parameters",
    "delete_adapter",
    "diagnostics",
    "disable_adapters",
    "effective_rank",
    "expert_diversity",
    "expert_similarity",
    "export_merged",
    "fit_budget",
    "from_peft",
    "from_pretrained",
    "get_adapter",
    "inject",
    "lily_layers",
    "lily_parameters",
    "load_adapter",
    "load_adapter_weights",
    "merge",
    "model_card",
    "push_to_hub",
    "remove",
    "routing_statistics",
    "save_adapter",
    "set_adapter",
    "summary",
    "to_peft",
    "unmerge",
]
