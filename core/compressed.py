"""What a whole-network plan gives: its exact count, the slim model, fine-tuning, and its measurements.

Exact: the count of a plan is the naive procedure's (`naive.prune_plan_copy`: copy the model, zero
every planned channel's conv weights and bias, in `remove` mode its batch norm, evaluate every test
image). Fast where that is exact: in `remove` mode a pruned channel outputs exactly zero, so the slim
model (the channels cut out by Torch-Pruning) computes the same logits with fewer MACs, up to the
order of float additions. So the slim model is evaluated instead, and every image whose two best
logits are so close that such rounding could swap them is counted again on the masked model: the
count is the masked model's to the last image, at the slim model's cost. In `zero` mode a pruned
channel still emits its batch norm's constant, which a removed channel cannot: there the masked
model is evaluated (one full pass) and the slim model is a different model, counted on its own.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .compress import Plan
from .naive import prune_plan_copy
from .network import Network, dependency_graph
from .tasks import count_correct, margin, predictions
from .train import ZeroHold, fit, flipped, random_batches

SAMPLE = 1000           # images of the labelled sample estimate
CLOSE = 1e-4            # a top-two gap below this share of the logits' size is counted again on the masked model


def bn_names(net: Network) -> dict[str, str | None]:
    return {layer: bn for u in net.units for layer, bn in zip(u.layers, u.bns)}


def masked(net: Network, plan: Plan) -> nn.Module:
    """The naive procedure's model: a copy with every planned channel zeroed."""
    return prune_plan_copy(net.model, plan.layers, plan.mode, bn_names(net))


def removal_exact(net: Network, plan: Plan) -> str:
    """'' where the slim model computes what the masked model computes, else why not (in words)."""
    if plan.mode == "zero" and plan.layers:
        return ("in zero mode a pruned channel still emits its batch norm's constant, which a removed channel "
                "cannot: the slim model is counted on its own")
    for unit, k in zip(net.units, plan.pruned):
        if k and not unit.exact_removal:
            return f"{unit.name}: {unit.why_not_exact}"
    return ""


def slim_model(net: Network, plan: Plan) -> nn.Module:
    """A new model with every planned channel cut out (Torch-Pruning); raises where a unit would keep none."""
    import torch_pruning as tp

    wiped = plan.wiped(net)
    if wiped:
        raise ValueError(f"{wiped[0]} would keep no channel: a conv with no channels is no layer, so this plan "
                         f"cannot be removed for real (its accuracy is the masked model's)")
    model = copy.deepcopy(net.model).cpu().eval()
    graph = dependency_graph(model, net.input_shape)
    for unit in net.units:
        idx = plan.layers.get(unit.layers[0])
        if idx:
            graph.get_pruning_group(model.get_submodule(unit.layers[0]), tp.prune_conv_out_channels,
                                    idxs=list(idx)).prune()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass(frozen=True)
class Count:
    correct: int
    total: int
    how: str            # in words: which model was evaluated
    recounted: int = 0  # images counted again on the masked model (close calls)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@torch.no_grad()
def count(net: Network, plan: Plan, slim: nn.Module | None = None, n: int | None = None) -> Count:
    """Right answers with the plan applied, over every test image (or the first n: a labelled sample)."""
    x, y = (net.x, net.y) if n is None else (net.x[:n], net.y[:n])
    dev = net.device
    if removal_exact(net, plan):
        model = masked(net, plan).to(dev)
        return Count(count_correct(model, x, y, net.task, dev, net.batch_size), len(y), "the masked model")
    how = "the slim model (close calls counted again on the masked model)"
    if plan.wiped(net):  # no layer of no channels: the slim model keeps one, silenced
        slim, how = silenced_slim(net, plan), ("the slim model with one silenced channel in each wiped-out layer "
                                               "(close calls counted again on the masked model)")
    slim = (slim if slim is not None else slim_model(net, plan)).to(dev)
    reference: nn.Module | None = None
    correct = recounted = 0
    for i in range(0, len(y), net.batch_size):
        xb, yb = x[i:i + net.batch_size].to(dev), y[i:i + net.batch_size]
        logits = slim(xb)
        pred = predictions(logits, net.task).cpu()
        scale = logits.detach().abs().amax(dim=-1) + 1.0
        close = (margin(logits, net.task) <= CLOSE * scale).cpu()
        if close.any():
            reference = reference if reference is not None else masked(net, plan).to(dev)
            pred[close] = predictions(reference(xb[close.to(dev)]), net.task).cpu()
            recounted += int(close.sum())
        correct += int((pred == yb).sum())
    return Count(correct, len(y), how, recounted)


def silenced_slim(net: Network, plan: Plan) -> nn.Module:
    """For a plan that wipes out a unit (remove mode): the slim model keeping that unit's last-ranked channel,
    whose conv and batch norm are then zeroed, so it outputs exactly 0 as every removed channel does: the
    masked model's function at nearly the slim model's cost."""
    keep = {}
    layers = dict(plan.layers)
    for unit, k in zip(net.units, plan.pruned):
        if k == unit.channels:
            last = int(net.ranking(net.units.index(unit), plan.criterion)[-1])
            for layer in unit.layers:
                layers[layer] = [c for c in plan.layers[layer] if c != last]
                keep[layer] = [0]  # the one channel left is index 0 of the slim layer
    pruned = tuple(k - 1 if k == u.channels else k for u, k in zip(net.units, plan.pruned))
    model = slim_model(net, dataclasses.replace(plan, layers=layers, pruned=pruned))
    return prune_plan_copy(model, keep, "remove", bn_names(net))


def count_model(model: nn.Module, net: Network) -> int:
    """A plain evaluation of any model over every test image."""
    return count_correct(model.to(net.device).eval(), net.x, net.y, net.task, net.device, net.batch_size)


# -- fine-tuning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneRecipe:
    """Adam with a cosine-decayed learning rate, random batches, left-right flips; seeded."""

    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0


def finetune(net: Network, plan: Plan, train_x: torch.Tensor, train_y: torch.Tensor, recipe: FinetuneRecipe,
             start: nn.Module | None = None, progress: Callable[[int, int, float], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> tuple[nn.Module, list[float]]:
    """The plan's model fine-tuned: the slim model where removal is exact (fewer MACs, faster steps, the same
    function), else the masked model with every planned channel held at exactly zero. (model, losses)."""
    torch.manual_seed(recipe.seed)
    hold = None
    if start is not None:
        model = copy.deepcopy(start)
    elif not removal_exact(net, plan) and not plan.wiped(net):
        model = slim_model(net, plan)
    else:
        model = masked(net, plan)
        hold = _hold(model, net, plan)
    model = model.to(net.device)
    for p in model.parameters():
        p.requires_grad_(True)
    if hold is not None:
        hold = ZeroHold([(p.to(net.device), keep) for p, keep in hold.pairs])
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed)
    flips = torch.rand(len(train_y), generator=gen) < 0.5
    report = (lambda step, loss: progress(step + 1, recipe.steps, loss)) if progress is not None else None
    losses = fit(model, opt, random_batches(len(train_y), recipe.batch_size, recipe.steps, gen),
                 flipped(train_x, flips), train_y, net.task, net.device, sched=sched, hold=hold, on_step=report,
                 should_stop=should_stop)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.cpu(), losses


def _hold(model: nn.Module, net: Network, plan: Plan) -> ZeroHold:
    pairs = []
    names = bn_names(net)
    for layer, idx in plan.layers.items():
        one = ZeroHold.channels(model, layer, torch.as_tensor(idx, dtype=torch.long), plan.mode, names.get(layer))
        pairs += one.pairs
    return ZeroHold(pairs)
