"""Channel ranking criteria, pluggable in the way of Torch-Pruning's `importance.py`.

Each criterion is a small object with `scores(facts) -> (P,)`: it receives the layer's statistics
and weights (`LayerFacts`), never the engine. Channels are pruned in ascending order of score (ties
broken by channel index, so the order is reproducible). A new criterion is one new class
registered below; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# What each criterion looked at, in the words the UI shows.
ACTIVATIONS = "the test images (the layer's activations)"
WEIGHTS = "the conv's weights only (no data)"
BATCHNORM = "the batch norm's scale only (no data)"
GRADIENTS = "the test images and their labels (activations and the loss's gradients)"
NOTHING = "nothing (a seeded random order)"


@dataclass(frozen=True)
class LayerFacts:
    """What a criterion may look at: one pruned layer's statistics and weights."""

    mean_map: torch.Tensor        # (P, H, W) activation averaged over the test set
    mean_abs_map: torch.Tensor    # (P, H, W) |activation| averaged
    zero_fraction: torch.Tensor   # (P,) share of the activation's values that are exactly 0
    weight: torch.Tensor          # (P, C_in / groups, kh, kw) the conv's filters
    bn_weight: torch.Tensor | None  # (P,) gamma of the batch norm after the conv, if any
    taylor: Callable[[], torch.Tensor]  # (P,) first-order Taylor scores, computed once on demand


class Criterion:
    name = ""
    label = ""
    explain = ""  # one line for students
    source = ""   # where it comes from
    looks_at = ACTIVATIONS

    def scores(self, facts: LayerFacts) -> torch.Tensor:
        raise NotImplementedError

    def rank(self, facts: LayerFacts) -> torch.Tensor:
        return torch.sort(self.scores(facts), stable=True).indices


class MeanActivation(Criterion):
    name, label = "mean", "mean activation"
    explain = "Channels whose activation is smallest on average over the test images go first."
    source = "The classic 'least active channels' rule; cf. Hu et al. 2016, Network Trimming."

    def scores(self, facts):
        return facts.mean_map.flatten(1).mean(1)


class MeanAbsActivation(Criterion):
    name, label = "mean_abs", "mean |activation|"
    explain = "As mean activation, but on absolute values: for activations that can be negative (LeakyReLU)."
    source = "Mean absolute activation, as used with LeakyReLU networks."

    def scores(self, facts):
        return facts.mean_abs_map.flatten(1).mean(1)


class APoZ(Criterion):
    name, label = "apoz", "APoZ (share of zeros)"
    explain = "Average percentage of zeros: channels whose activation is most often exactly zero go first."
    source = "Hu et al. 2016, Network Trimming: A Data-Driven Neuron Pruning Approach."

    def scores(self, facts):
        return 1 - facts.zero_fraction  # most zeros = smallest score = pruned first


class FilterL1Norm(Criterion):
    name, label = "l1_norm", "filter L1 norm"
    explain = "Filters with the smallest sum of |weights| go first."
    source = "Li et al. 2017, Pruning Filters for Efficient ConvNets."
    looks_at = WEIGHTS

    def scores(self, facts):
        return facts.weight.abs().flatten(1).sum(1).float().cpu()


class FilterL2Norm(Criterion):
    name, label = "l2_norm", "filter L2 norm"
    explain = "Filters with the smallest Euclidean norm of their weights go first."
    source = "The L2 variant of Li et al. 2017 (as in He et al. 2018, soft filter pruning)."
    looks_at = WEIGHTS

    def scores(self, facts):
        return facts.weight.double().flatten(1).norm(dim=1).float().cpu()


class BatchNormGamma(Criterion):
    name, label = "bn_gamma", "batch-norm |gamma|"
    explain = "Channels whose batch-norm scale |gamma| is smallest go first (they are scaled down anyway)."
    source = "Liu et al. 2017, Learning Efficient Convolutional Networks through Network Slimming."
    looks_at = BATCHNORM

    def scores(self, facts):
        if facts.bn_weight is None:
            raise ValueError("bn_gamma needs a batch norm right after the conv; this layer has none.")
        return facts.bn_weight.abs().float().cpu()


class Taylor(Criterion):
    name, label = "taylor", "first-order Taylor"
    explain = ("How much the loss would change if the channel were removed, to first order: mean over images "
               "of |sum over positions of activation x gradient|.")
    source = "Molchanov et al. 2017, Pruning Convolutional Neural Networks for Resource Efficient Inference."
    looks_at = GRADIENTS

    def scores(self, facts):
        return facts.taylor()


class FPGM(Criterion):
    name, label = "fpgm", "geometric median (FPGM)"
    explain = ("Filters closest to the geometric median of the layer's filters go first: the others can "
               "stand in for them.")
    source = "He et al. 2019, Filter Pruning via Geometric Median (the sum of distances to all other filters)."
    looks_at = WEIGHTS

    def scores(self, facts):
        flat = facts.weight.double().flatten(1)
        return torch.cdist(flat, flat).sum(1).float().cpu()


class RandomOrder(Criterion):
    label = "random order"
    explain = "A seeded random order: the baseline every rule must beat."
    source = "A control, not a rule."
    looks_at = NOTHING

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.name = "random" if seed == 0 else f"random:{seed}"

    def scores(self, facts):
        return torch.rand(facts.weight.shape[0], generator=torch.Generator().manual_seed(self.seed))


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    MeanActivation(), MeanAbsActivation(), APoZ(), FilterL1Norm(), FilterL2Norm(), BatchNormGamma(), Taylor(),
    FPGM(), RandomOrder())}


BAND_SEEDS = 20  # the random band: this many seeded random orders


def random_orders(n: int = BAND_SEEDS) -> list[str]:
    """The names of the seeded random orders of the baseline band (seeds 0 to n-1)."""
    return [RandomOrder(seed).name for seed in range(n)]


def get(name: str) -> Criterion:
    """A criterion by name; `random:SEED` is the random order with another seed."""
    seed = name[len("random:"):] if name.startswith("random:") else ""
    if seed.isascii() and seed.isdigit() and len(seed) <= 6:
        return RandomOrder(int(seed))
    if name not in CRITERIA:
        raise ValueError(f"Unknown criterion '{name}'. Criteria: {', '.join(CRITERIA)}.")
    return CRITERIA[name]
