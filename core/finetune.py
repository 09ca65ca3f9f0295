"""Recover: fine-tune a channel-pruned model with the pruned channels held at exactly zero.

The pruned copy is the naive procedure's (`naive.prune_copy`: the conv's weights and bias zeroed,
in `remove` mode its batch norm too); the training loop's `ZeroHold` keeps those entries at exactly
zero, so the channels stay pruned. Seeded: the same arguments give the same model on the CPU.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .engine import Engine
from .naive import prune_copy
from .train import ZeroHold, fit, random_batches


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
    hold = ZeroHold.channels(model, eng.layer, channels, cfg.mode, eng.bn_name)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    report = (lambda step, loss: progress(step + 1, cfg.steps, loss)) if progress is not None else None
    losses = fit(model, opt, random_batches(len(train_y), cfg.batch_size, cfg.steps, gen), lambda idx: train_x[idx],
                 train_y, eng.task, eng.device, hold=hold, on_step=report, should_stop=should_stop)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.cpu(), losses
