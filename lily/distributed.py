"""FSDP2 support: Lily's wrap policy, and whole tensors from shards and back (for saving and loading).

The tensor functions are collectives for sharded tensors: every rank of the process group must call them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def group_running() -> bool:
    """True inside a running torch.distributed process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(tensor: torch.Tensor) -> bool:
    """True when `tensor` is an FSDP2 shard (a DTensor) of a running process group."""
    if not group_running():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: shards are all-gathered."""
    tensor = tensor.detach()
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor `value` into `param`, which may be a shard (each rank keeps its own part)."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    param.copy_(value)


def reshard(model: nn.Module) -> nn.Module:
    """Put every FSDP2 unit of `model` back in its sharded state; returns `model`.

    After a forward without backward (evaluation) the root unit stays gathered, and its modules then hold
    plain whole parameters rather than the shards the optimizer updates; reading or loading weights must
    see the shards.
    """
    if group_running():
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    return model


def is_main_process() -> bool:
    return not group_running() or torch.distributed.get_rank() == 0


def fully_shard_blocks(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) with the wrap policy Lily needs; returns `model`.

    Each repeated block (every child of an outermost `nn.ModuleList`: transformer layers) becomes one unit,
    and the root another. The root unit holds `model.lily_adapters`, so each shared A group and B expert
    lives in exactly one unit, which is gathered for the whole forward and backward. `param_dtype` (e.g.
    torch.bfloat16) computes in that precision and reduces gradients in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    taken: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            for block in module:
                fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)
