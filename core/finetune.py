"""Recover: fine-tune a channel-pruned model with the pruned channels held at exactly zero.

The pruned copy is the naive procedure's (`engine.prune_copy`: the conv's weights and bias zeroed,
in `remove` mode its batch norm too); gradient hooks zero those entries' gradients, so Adam never
moves them (a zero gradient gives a zero Adam step) and the channels stay pruned. Seeded: the
same arguments give the same model on the CPU.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .engine import Engine, prune_copy
from .train import task_loss


@dataclass(frozen=True)
class FinetuneConfig:
    k: int
    layer: str
    criterion: str = "mean"
    mode: str = "remove"
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0

    def describe(self) -> dict:
        return asdict(self)


def _hold_at_zero(model: nn.Module, layer: str, channels: torch.Tensor, mode: str, bn_name: str | None) -> list:
    """Gradient hooks that zero the pruned channels' entries; returns the handles."""
    keep = torch.ones(model.get_submodule(layer).out_channels)
    keep[channels] = 0
    params = [model.get_submodule(layer).weight, model.get_submodule(layer).bias]
    if mode == "remove" and bn_name is not None:
        bn = model.get_submodule(bn_name)
        params += [bn.weight, bn.bias]
    handles = []
    for p in params:
        if p is not None:
            view = keep.view(-1, *([1] * (p.dim() - 1))).to(p.device, p.dtype)
            handles.append(p.register_hook(lambda g, view=view: g * view))
    return handles


def finetune(eng: Engine, cfg: FinetuneConfig, train_x: torch.Tensor, train_y: torch.Tensor,
             progress: Callable[[int, int, float], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> tuple[nn.Module, list[float]]:
    """A fine-tuned copy of the engine's model with `cfg.k` channels pruned; (model in eval mode, losses)."""
    torch.manual_seed(cfg.seed)
    channels = eng.ranking(cfg.criterion)[:cfg.k]
    model = prune_copy(eng.model, eng.layer, channels.tolist(), cfg.mode, eng.bn_name).to(eng.device)
    model = copy.deepcopy(model)  # its own tensors: never the engine's
    for p in model.parameters():
        p.requires_grad_(True)
    handles = _hold_at_zero(model, eng.layer, channels, cfg.mode, eng.bn_name)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    try:
        for step in range(cfg.steps):
            if should_stop is not None and should_stop():
                break
            idx = torch.randint(len(train_y), (cfg.batch_size,), generator=gen)
            loss = task_loss(model(train_x[idx].to(eng.device)), train_y[idx].to(eng.device), eng.task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, cfg.steps, losses[-1])
    finally:
        for h in handles:
            h.remove()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.cpu(), losses
