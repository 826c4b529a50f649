"""`LilyBank`: the shared parameters of one target type -- its A groups and its B experts.

The bank is their only owner: adapted layers hold a plain (unregistered) reference to it, so the model's
`state_dict`, the optimizer and the adapter file each see one copy of every shared tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("lora", "experts")
"""How a bank starts. "lora": A kaiming-uniform (like `nn.Linear`), B zero, so the experts start identical and
differ only through their routers' weights. "experts": A zero, each B expert drawn independently (kaiming-uniform,
like `nn.Linear(r, d_out)`), so the experts start distinct and every layer's mix of them differs."""


class LilyBank(nn.Module):
    """A groups A_g (r x d_in, like `nn.Linear(d_in, r).weight`) and B experts B_e (stacked E x d_out x r).

    For a conv type, A_g is a conv kernel r x d_in x *kernel_size (like `nn.Conv2d(d_in, r, kernel_size).weight`)
    and B_e a 1x1 conv r -> d_out, stored as d_out x r like any B. Either factor starts at zero, so the adapted
    model starts equal to the base model (see `INITS`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        num_A: int,
        num_B: int,
        kernel_size: tuple[int, ...] = (),
        init: str = "lora",
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.kernel_size = tuple(kernel_size)
        self.A = nn.ParameterList(
            nn.Parameter(torch.empty(r, in_features, *kernel_size, device=device, dtype=dtype)) for _ in range(num_A)
        )
        self.B = nn.Parameter(torch.zeros(num_B, out_features, r, device=device, dtype=dtype))
        if init == "lora":
            for a in self.A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:  # "experts": A zero, each expert like `nn.Linear(r, d_out).weight`
            for a in self.A:
                nn.init.zeros_(a)
            for expert in self.B.data:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))

    @property
    def num_A(self) -> int:
        return len(self.A)

    @property
    def num_B(self) -> int:
        return self.B.shape[0]

    def extra_repr(self) -> str:
        shape = f"in={self.in_features}, out={self.out_features}"
        kernel = f", kernel_size={self.kernel_size}" if self.kernel_size else ""
        return f"{shape}{kernel}, r={self.r}, num_A={self.num_A}, num_B={self.num_B}"
