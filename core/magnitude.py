"""Magnitude pruning with retraining (Han et al. 2015, "Learning both Weights and Connections").

Unstructured: the weights with the smallest |w| are set to zero, either below one global
threshold over every prunable layer (the paper's way) or the same fraction in each layer. Masks
are tensors kept beside the model; the model keeps its class. Retraining holds pruned weights at
exactly zero. Biases are not pruned, as in the paper.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine import Progress
from .hooks import hooks
from .models import prunable_weights
from .tasks import count_correct
from .train import ZeroHold, epoch_batches, fit



class MagnitudeOrder:
    """Each weight's place in the order of |w|, computed once, so that a mask for any sparsity is
    one scatter (what makes the app's sparsity slider instant)."""

    def __init__(self, model: nn.Module):
        weights = prunable_weights(model)
        self.names = list(weights)
        self.shapes = {n: w.shape for n, w in weights.items()}
        self.sizes = [w.numel() for w in weights.values()]
        flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        # Stable sorts: ties (zeros above all) resolve by position, so masks are reproducible.
        self.global_order = torch.sort(flat, stable=True).indices
        self.layer_orders = [torch.sort(w.detach().abs().flatten(), stable=True).indices for w in weights.values()]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def masks(self, sparsity: float, per_layer: bool = False) -> dict[str, torch.Tensor]:
        """Keep-masks (True = kept) pruning round(sparsity * n) weights globally, or in each layer."""
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be between 0 and 1, got {sparsity}")
        if per_layer:
            masks = []
            for size, order in zip(self.sizes, self.layer_orders):
                keep = torch.ones(size, dtype=torch.bool)
                keep[order[:round(sparsity * size)]] = False
                masks.append(keep)
        else:
            keep = torch.ones(self.total, dtype=torch.bool)
            keep[self.global_order[:round(sparsity * self.total)]] = False
            masks = list(torch.split(keep, self.sizes))
        return {n: m.view(self.shapes[n]) for n, m in zip(self.names, masks)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A pruned copy: the same class, masked weights set to exactly zero. The input is not touched."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in prunable_weights(pruned).items():
            weight.mul_(masks[name].to(weight.device, weight.dtype))
    return pruned


# The Magnitude page's slider steps: every 5% to 80%, every 2% to 90%, every 1% to 99%, then the tail where
# accuracy falls fastest. Each step's accuracy is counted once (`grid_counts`), so the slider is a lookup.
GRID = tuple(sorted({i / 100 for i in range(0, 80, 5)} | {i / 100 for i in range(80, 90, 2)}
                    | {i / 100 for i in range(90, 100)} | {0.993, 0.995, 0.997, 0.999}))


def grid_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "multiclass", per_layer: bool = False,
                grid=GRID, progress: Progress | None = None) -> dict:
    """{"correct": right test answers, "nonzero": weights left} at each sparsity of `grid`: the literal
    procedure (a pruned copy, every test image) at each step."""
    order, correct, nonzero = MagnitudeOrder(model), [], []
    for i, s in enumerate(grid):
        pruned = apply_masks(model, order.masks(s, per_layer))
        correct.append(count_correct(pruned, x, y, task=task, device="cpu"))
        nonzero.append(sparsity_of(pruned).overall_nonzero)
        if progress:
            progress(i + 1, len(grid), f"{s:.1%} of the weights pruned")
    return {"grid": [float(s) for s in grid], "correct": correct, "nonzero": nonzero, "total": order.total}


def kept_grid(ckpt, per_layer: bool = False, store=None, data_root: str | None = None,
              progress: Progress | None = None) -> dict:
    """`grid_counts` for a checkpoint on its test split, kept in the engine store (core/store.py) where
    one is given: a restart or another server process reads it back."""
    split = ckpt.split(train=False, data_root=data_root)

    def make() -> dict:
        return grid_counts(ckpt.build_model(), split.x, split.y, ckpt.spec.task, per_layer, progress=progress)
    if store is None:
        return make()
    from .store import data_digest, remembered

    key = ("magnitude grid", ckpt.digest, data_digest(split.x, split.y), per_layer, GRID)
    return remembered(store, key, make, lambda state: state.get("grid") == list(GRID)
                      and len(state.get("correct", [])) == len(GRID))


@dataclass
class Sparsity:
    nonzero: dict[str, int]
    total: dict[str, int]

    @property
    def overall_nonzero(self) -> int:
        return sum(self.nonzero.values())

    @property
    def compression(self) -> float:
        """Original weights / non-zero weights (the paper's 'x fewer')."""
        return sum(self.total.values()) / max(1, self.overall_nonzero)


def sparsity_of(model: nn.Module) -> Sparsity:
    weights = prunable_weights(model)
    return Sparsity({n: int((w != 0).sum()) for n, w in weights.items()}, {n: w.numel() for n, w in weights.items()})


def retrain(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, epochs: int,
            lr: float = 1e-3, momentum: float = 0.9, batch_size: int = 128, seed: int = 0,
            device: str | torch.device = "cpu", progress: Progress | None = None,
            task: str = "multiclass") -> nn.Module:
    """SGD on a copy of `model` with the pruned weights held at exactly zero. Returns the copy."""
    model = apply_masks(model, masks).to(device)
    weights = prunable_weights(model)
    hold = ZeroHold((weights[n], m) for n, m in masks.items())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    steps = (len(y) + batch_size - 1) // batch_size
    for epoch in range(epochs):
        def report(step: int, loss: float, epoch=epoch) -> None:
            if progress and (step % 20 == 0 or step == steps - 1):
                progress(epoch * steps + step + 1, epochs * steps, f"retraining {epochs} epoch(s)")
        fit(model, opt, epoch_batches(len(y), batch_size, gen), lambda idx: x[idx], y, task, device, hold=hold,
            on_step=report)
    return model.eval().cpu()


@dataclass
class StepResult:
    step: int
    sparsity: float
    accuracy_before: float  # right after pruning to this step's sparsity
    accuracy_after: float   # after this step's retraining
    sparsity_after: Sparsity = field(repr=False)


def iterative_prune(model: nn.Module, schedule: list[float], retrain_epochs: int, train: tuple, test: tuple,
                    per_layer: bool = False, lr: float = 1e-3, device: str = "cpu", task: str = "multiclass",
                    progress: Progress | None = None) -> tuple[nn.Module, dict, list[StepResult]]:
    """Prune -> retrain -> prune harder, as in the paper. Each step ranks the current weights; the
    weights pruned before are zero, so they stay pruned."""
    if any(b < a for a, b in zip(schedule, schedule[1:])):
        raise ValueError("the schedule must not decrease")
    results, current, masks = [], model, None
    for step, target in enumerate(schedule, start=1):
        masks = MagnitudeOrder(current).masks(target, per_layer)
        pruned = apply_masks(current, masks)
        before = count_correct(pruned, *test, task=task, device="cpu") / len(test[1])
        if retrain_epochs:
            def report(done, total, label, step=step):
                if progress:
                    progress(done, total, f"step {step}/{len(schedule)} ({target:.1%}): {label}")
            pruned = retrain(pruned, masks, *train, epochs=retrain_epochs, lr=lr, device=device, seed=step,
                             progress=report, task=task)
        after = count_correct(pruned, *test, task=task, device="cpu") / len(test[1])
        results.append(StepResult(step, target, before, after, sparsity_of(pruned)))
        current = pruned
    return current, masks, results


def firing_neurons(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How many hidden units are active (> 0 after their ReLU) for one input, per hidden Linear."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    counts: dict[str, int] = {}
    def count(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            counts[name] = int((output > 0).sum())
        return hook

    with hooks((m, count(n)) for n, m in linears), torch.no_grad():
        model(x.unsqueeze(0))
    return counts
