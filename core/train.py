"""The one training loop, the one way to hold pruned weights at zero, and the bundled models' recipe.

`fit` is every optimisation in the product: the bundled checkpoints' recipe (`train`), fine-tuning
a channel-pruned model (`core/finetune.py`), Han et al.'s retraining after magnitude pruning
(`core/magnitude.py`) and the MobileNet-style program's script. What differs between them is
passed in: the optimiser, the batches, the inputs (flipped or not), a penalty, a `ZeroHold`.
Seeded: the same arguments give the same model on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from . import data, models
from .tasks import count_correct, task_loss


class ZeroHold:
    """Pruned weights held at exactly zero while training. Each parameter's gradient is multiplied by
    its keep-mask before the optimiser steps (no gradient: no momentum and no Adam moment, so no step),
    and the weight after it (so weight decay or rounding can never revive it)."""

    def __init__(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = [(p, keep.to(p.device, p.dtype)) for p, keep in pairs]

    @classmethod
    def channels(cls, model: nn.Module, layer: str, pruned: torch.Tensor, mode: str,
                 bn_name: str | None) -> "ZeroHold":
        """The pruned output channels of one conv: its filters and bias, in `remove` mode its batch norm's scale and shift."""
        conv = model.get_submodule(layer)
        keep = torch.ones(conv.out_channels)
        keep[pruned] = 0
        params = [conv.weight, conv.bias]
        if mode == "remove" and bn_name is not None:
            bn = model.get_submodule(bn_name)
            params += [bn.weight, bn.bias]
        return cls((p, keep.view(-1, *([1] * (p.dim() - 1)))) for p in params if p is not None)

    def gradients(self) -> None:
        for p, keep in self.pairs:
            if p.grad is not None:
                p.grad.mul_(keep)

    @torch.no_grad()
    def weights(self) -> None:
        for p, keep in self.pairs:
            p.mul_(keep)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch: a seeded permutation of the n images in batches (drawn at once, before anything else)."""
    order = torch.randperm(n, generator=gen)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def random_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches drawn with replacement (fine-tuning: a few hundred steps, not whole epochs)."""
    for _ in range(steps):
        yield torch.randint(n, (batch_size,), generator=gen)


def fit(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[torch.Tensor],
        inputs: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, task: str,
        device: str | torch.device = "cpu", sched=None, hold: ZeroHold | None = None,
        penalty: Callable[[nn.Module], torch.Tensor] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> list[float]:
    """One pass of optimisation over `batches` (index tensors; `inputs(idx)` gives the images):
    the losses of the steps taken. The model is left in training mode."""
    model.train()
    losses: list[float] = []
    for step, idx in enumerate(batches):
        if should_stop is not None and should_stop():
            break
        loss = task_loss(model(inputs(idx).to(device)), labels[idx].to(device), task)
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hold is not None:
            hold.gradients()
        opt.step()
        if hold is not None:
            hold.weights()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def flipped(x: torch.Tensor, flips: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inputs with the images where `flips` is True mirrored left-right: clothes are left-right
    symmetric, a free augmentation."""
    return lambda idx: torch.where(flips[idx].view(-1, 1, 1, 1), x[idx].flip(-1), x[idx])


# ---------------------------------------------------------------------------------------------
# The bundled checkpoints' recipe: AdamW with a one-cycle schedule, flips, seeded.

@dataclass
class TrainConfig:
    arch: str
    dataset: str = ""  # default: the architecture's own data set
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    l1: float = 0.0  # L1 penalty on the weights (Han et al.'s regulariser for pruning without retraining)


def train(cfg: TrainConfig, data_root: str | None = None):
    torch.manual_seed(cfg.seed)
    spec = models.REGISTRY[cfg.arch]
    cfg.dataset = cfg.dataset or spec.dataset
    train_split = data.load(cfg.dataset, train=True, data_root=data_root)
    test_split = data.load(cfg.dataset, train=False, data_root=data_root)
    model = models.build(cfg.arch).to(cfg.device)
    penalty = (lambda m: cfg.l1 * sum(w.abs().sum() for w in models.prunable_weights(m).values())) if cfg.l1 else None
    model, correct, seconds = recipe(model, train_split, test_split, spec.task, cfg.epochs, cfg.batch_size, cfg.lr,
                                     cfg.weight_decay, cfg.seed, cfg.device, penalty)
    return model.cpu().eval(), correct, seconds


def recipe(model: nn.Module, train_split, test_split, task: str, epochs: int, batch_size: int, lr: float,
           weight_decay: float, seed: int, device: str = "cpu", penalty=None, bar: bool = True):
    """AdamW, one-cycle learning rate, horizontal flips; the test accuracy after each epoch.
    Returns (model, right answers after the last epoch, seconds)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(train_split) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    start, correct = time.time(), 0
    for epoch in range(epochs):
        batches = epoch_batches(len(train_split), batch_size, gen)
        flips = torch.rand(len(train_split), generator=gen) < 0.5
        progress = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not bar)

        def on_step(step: int, loss: float) -> None:
            progress.update()
            if step % 50 == 0:
                progress.set_postfix(loss=f"{loss:.3f}")
        losses = fit(model, opt, batches, flipped(train_split.x, flips), train_split.y, task, device, sched=sched,
                     penalty=penalty, on_step=on_step)
        progress.close()
        model.eval()
        correct = count_correct(model, test_split.x, test_split.y, task, device=device)
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.3f}, test accuracy {correct / len(test_split):.4f}, "
              f"{time.time() - start:.0f} s", flush=True)
    return model, correct, time.time() - start
