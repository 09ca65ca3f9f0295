"""The naive procedure: copy the model, zero the weights, evaluate everything.

This is the reference every fast path must equal to the last test image, and what the tests and
benchmarks compare against; fine-tuning and the slim model start from the same pruned copy.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .tasks import count_correct

if TYPE_CHECKING:
    from .engine import Engine


@torch.no_grad()
def prune_copy(model: nn.Module, layer: str, channels: Sequence[int], mode: str,
               bn_name: str | None) -> nn.Module:
    """A copy of the model with the channels' weights really zeroed (in `remove` mode its batch norm's too)."""
    return prune_plan_copy(model, {layer: list(channels)}, mode, {layer: bn_name})


@torch.no_grad()
def prune_plan_copy(model: nn.Module, plan: dict[str, Sequence[int]], mode: str,
                    bn_names: dict[str, str | None]) -> nn.Module:
    """A copy of the model with every layer's planned channels zeroed: the conv's weights and bias, and
    in `remove` mode its batch norm (scale and shift 0, running mean 0, variance 1)."""
    pruned = copy.deepcopy(model).eval()
    for layer, channels in plan.items():
        idx = torch.as_tensor(list(channels), dtype=torch.long)
        conv = pruned.get_submodule(layer)
        conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0
        bn_name = bn_names.get(layer)
        if mode == "remove" and bn_name is not None:
            bn = pruned.get_submodule(bn_name)
            bn.weight[idx], bn.bias[idx] = 0, 0
            bn.running_mean[idx], bn.running_var[idx] = 0, 1
    return pruned


def naive_correct(engine: Engine, k: int, mode: str = "zero", criterion: str = "mean") -> int:
    """Right answers of the engine's model with its K lowest-ranked channels really zeroed, over every image."""
    channels = engine.ranking(criterion)[:k].tolist()
    pruned = prune_copy(engine.model, engine.layer, channels, mode, engine.bn_name)
    return count_correct(pruned, engine.x, engine.y, engine.task, engine.device, engine.batch_size)
