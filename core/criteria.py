"""Channel ranking criteria, pluggable in the way of Torch-Pruning's `importance.py`.

Each criterion is a small object with `scores(engine) -> (P,)`; channels are pruned in ascending
order of score (ties broken by channel index, so the order is reproducible). A new criterion is
one new class registered below; nothing else changes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Engine


class Criterion:
    name = ""
    label = ""

    def scores(self, engine: "Engine") -> torch.Tensor:
        raise NotImplementedError

    def rank(self, engine: "Engine") -> torch.Tensor:
        return torch.sort(self.scores(engine), stable=True).indices


class MeanActivation(Criterion):
    name = "mean"
    label = "mean activation"

    def scores(self, engine):
        return engine.stats.mean_map.flatten(1).mean(1)


class MeanAbsActivation(Criterion):
    name = "mean_abs"
    label = "mean |activation|"

    def scores(self, engine):
        return engine.stats.mean_abs_map.flatten(1).mean(1)


class FilterL1Norm(Criterion):
    name = "l1_norm"
    label = "filter L1 norm"

    def scores(self, engine):
        return engine.conv.weight.detach().abs().flatten(1).sum(1).float().cpu()


CRITERIA: dict[str, Criterion] = {c.name: c for c in (MeanActivation(), MeanAbsActivation(), FilterL1Norm())}


def get(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"Unknown criterion '{name}'. Criteria: {', '.join(CRITERIA)}.")
    return CRITERIA[name]
