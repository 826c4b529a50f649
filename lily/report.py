"""What an adapted model holds: `count_parameters` and `summary`."""

from __future__ import annotations

import torch
from torch import nn

from lily.adapter import adapter_names, adapter_parameters, get_adapter, module_parameters
from lily.plan import TargetType


def base_size(param: torch.Tensor) -> int:
    """The number of values a base tensor stands for: a bitsandbytes 4-bit weight packs two per byte of storage."""
    if getattr(param, "quant_state", None) is not None:
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_parameters(model: nn.Module, name: str | None = None) -> int:
    """Number of unique parameters of adapter `name` (default: the active one; each shared A and B counted once),
    what training it updates (trainable modules aside).

    Example:
        >>> lily.count_parameters(model)
        36864
    """
    return sum(p.numel() for p in adapter_parameters(model, name).values())


def router_size(routing: str, num_layers: int, r: int, num_B: int) -> int:
    """Router parameters of one target type: N*r*E (data-dependent), N*E ("static") or 0 ("uniform")."""
    if routing == "uniform":
        return 0
    return num_layers * num_B * (1 if routing == "static" else r)


def type_sizes(target_type: TargetType, num_B: int, routing: str) -> tuple[int, int, int]:
    """(A, B, router) parameter counts of one target type."""
    r = target_type.r
    a = target_type.num_A * target_type.fan_in * r
    b = num_B * r * target_type.out_features
    return a, b, router_size(routing, target_type.num_layers, r, num_B)


def summary(model: nn.Module, name: str | None = None) -> str:
    """A table of adapter `name` (default: the active one): per target type its layers, shape (with the kernel size
    of a conv), A groups, r, and A/B/router counts.

    Example:
        >>> print(lily.summary(model))
    """
    adapter = get_adapter(model, name)
    cfg = adapter.config
    header = (
        "target type",
        "layers",
        "in -> out",
        "A groups (layers each)",
        "r",
        "B experts",
        "A",
        "B",
        "router",
        "total",
    )
    rows = []
    total = 0
    for t in adapter.plan:
        a, b, router = type_sizes(t, cfg.num_B, adapter.routing)
        total += a + b + router
        sizes = t.group_sizes()
        kernel = f" ({'x'.join(map(str, t.kernel_size))} kernel)" if t.kernel_size else ""
        groups = f"{t.num_A} ({sizes[0]})" if len(set(sizes)) == 1 else f"{t.num_A} ({'+'.join(map(str, sizes))})"
        rows.append(
            (
                t.key,
                str(t.num_layers),
                f"{t.in_features} -> {t.out_features}{kernel}",
                groups,
                str(t.r),
                str(cfg.num_B),
                f"{a:,}",
                f"{b:,}",
                f"{router:,}",
                f"{a + b + router:,}",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"Lily adapter {adapter.name!r} on {type(model).__name__}: routing={adapter.routing!r} "
        f"({adapter.routing_reason}), scaling={cfg.scaling}, dropout={cfg.dropout}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    adapter_ids = {id(p) for other in adapter_names(model) for p in adapter_parameters(model, other).values()}
    base = sum(base_size(p) for p in model.parameters() if id(p) not in adapter_ids)
    trainable = count_parameters(model, adapter.name)
    lines.append(
        f"trainable adapter parameters: {trainable:,} ({100 * trainable / max(base, 1):.4f}% of the "
        f"{base:,} base parameters)"
    )
    if adapter.trainable_modules:
        fully = sum(p.numel() for p in module_parameters(model, adapter.name).values())
        lines.append(f"plus {fully:,} parameters in fully trained modules: {', '.join(adapter.trainable_modules)}")
    return "\n".join(lines)
