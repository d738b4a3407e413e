"""What each optimizer updates and how fast: parameter groups with and without weight decay, and
learning-rate schedules as functions of the optimizer step (the loop steps them once a step)."""

from __future__ import annotations

import functools
import itertools
import math
from inspect import signature
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

# The layers whose weights multiply their input: weight decay shrinks these and nothing else.
# Biases, norm scales, embeddings, position tables and class tokens keep their size, as in GPT-2
# and nanoGPT. A tied embedding is also the output layer's weight, so it decays (nanoGPT's too).
DECAYED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)


def decay_groups(entry: list[Any], model: nn.Module) -> list[dict[str, Any]]:
    """One optimizer's parameters (a list of tensors or of group dicts, from Task.param_groups)
    as groups that decay and groups with weight_decay 0, each keeping its own settings."""
    decayed = {id(p) for module in model.modules() if isinstance(module, DECAYED_LAYERS)
               for name, p in module.named_parameters() if "bias" not in name}
    groups = []
    for group in entry if isinstance(entry[0], dict) else [{"params": entry}]:
        params = list(group["params"])
        groups += [{**group, "params": [p for p in params if id(p) in decayed]},
                   {**group, "params": [p for p in params if id(p) not in decayed],
                    "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def device_options(optimizer: functools.partial, device: torch.device) -> dict[str, Any]:
    """fused=True on CUDA for an optimizer with a fused kernel (Adam, AdamW, SGD) unless its
    config says otherwise: one kernel for the whole step in place of several per tensor."""
    wanted = device.type == "cuda" and "fused" not in optimizer.keywords
    return {"fused": True} if wanted and "fused" in signature(optimizer.func).parameters else {}


def flat(entry: list[Any]) -> list[nn.Parameter]:
    """The parameters of one Task.param_groups entry, in its order."""
    return [p for group in entry for p in group["params"]] if isinstance(entry[0], dict) else entry


def regrouped(saved: dict, scheduler: dict, optimizer: Optimizer,
              params: list[nn.Parameter]) -> tuple[dict, dict]:
    """An optimizer and scheduler state saved before `decay_groups` split the groups (one group
    per optimizer, `params` in order), laid out for `optimizer`'s groups; states that already
    match are returned as they are. Parameters are numbered in a plain state dict and named in a
    sharded one's (torch.distributed.checkpoint), and keep their number's or name's state."""
    old_groups = saved["param_groups"]
    if len(old_groups) == len(optimizer.param_groups):
        return saved, scheduler
    old_keys = [(key, index) for index, group in enumerate(old_groups) for key in group["params"]]
    origin = {id(p): old for p, old in zip(params, old_keys, strict=True)}
    numbered = isinstance(old_keys[0][0], int)
    state, groups, sources, numbers = {}, [], [], itertools.count()
    for group in optimizer.param_groups:
        keys = []
        for p in group["params"]:
            old_key, _ = origin[id(p)]
            key = next(numbers) if numbered else old_key
            if old_key in saved["state"]:
                state[key] = saved["state"][old_key]
            keys.append(key)
        sources.append(origin[id(group["params"][0])][1])
        groups.append({**old_groups[sources[-1]], "params": keys,
                       "weight_decay": group["weight_decay"]})
    # LambdaLR and StepLR keep one base and last lr per group.
    scheduler = {**scheduler, **{name: [scheduler[name][i] for i in sources]
                                 for name in ("base_lrs", "_last_lr") if name in scheduler}}
    return {"state": state, "param_groups": groups}, scheduler


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100,
           min_lr_ratio: float = 0.1) -> LRScheduler:
    """Linear warmup, then a half cosine from lr down to min_lr_ratio * lr at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step(optimizer: Optimizer, total_steps: int, step_size: int = 1000,
         gamma: float = 0.5) -> LRScheduler:
    return StepLR(optimizer, step_size=step_size, gamma=gamma)
