"""Low-rank adapters (LoRA, Hu et al., 2021): fine-tuning that trains two small matrices beside
each frozen weight instead of the weight itself, as torchtune and peft do.

A `LoRALinear` is an `nn.Linear` whose output gains `scale * x A^T B^T`, A (rank x in) and B
(out x rank), scale = alpha / rank. B starts at zero, so a model given adapters computes exactly
what it did before them; the checkpoint keeps the layer's own `weight` and `bias` names beside
`lora_a` and `lora_b`, so weights from a run without adapters load into it (init_from=).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER = re.compile(r"(.*)\.lora_([ab])$")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 8,
                 alpha: float = 16.0) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's own weight

    def forward(self, x: Tensor) -> Tensor:
        # Scaled and summed in place: no more full-size outputs than the two products.
        return super().forward(x).add_(F.linear(F.linear(x, self.lora_a), self.lora_b),
                                       alpha=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def train_adapters_only(model: nn.Module, also: tuple[nn.Module, ...] = ()) -> None:
    """Freeze every weight of `model` but the adapters' and those of the modules `also`."""
    model.requires_grad_(False)
    for name, weight in model.named_parameters():
        if ADAPTER.match(name):
            weight.requires_grad_(True)
    for module in also:
        module.requires_grad_(True)


def merged(state: dict[str, Any], scale: float) -> dict[str, Tensor]:
    """A state dict with adapters as one without them: each `X.weight` + scale * B @ A, the
    `X.lora_a` and `X.lora_b` entries dropped. The same outputs, from plain linear layers."""
    adapted = {m.group(1) for m in map(ADAPTER.match, state) if m}
    out = {name: tensor for name, tensor in state.items() if not ADAPTER.match(name)}
    for layer in adapted:
        a, b = state[f"{layer}.lora_a"], state[f"{layer}.lora_b"]
        weight = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    return out
