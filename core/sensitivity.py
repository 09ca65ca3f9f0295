"""Sensitivity map: each conv layer pruned alone by each fraction of its channels (Li et al. 2017, Fig. 2).

One engine per layer, built and dropped in turn (one pass over the test set each, then one pass of
the rest of the network per fraction; the last layer's read-out makes its row nearly free). Rows
are yielded as they are computed, so a caller can draw them progressively and stop at any time.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from .engine import Engine, Progress
from .split import conv_layer_names
from .graph import aten, is_linear

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
_ADDS = {operator.add, torch.add, aten.add.Tensor}
_CATS = {torch.cat, aten.cat.default}


@dataclass(frozen=True)
class Row:
    layer: str
    channels: int
    fraction: float
    k: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def ties(model: nn.Module) -> dict[str, str]:
    """Layers whose output channels are tied to another tensor's channels: 'residual add' or
    'concatenation' (found by following each conv's output to the next conv or linear layer).
    Removing such channels for real would have to shrink the other side too."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # untraceable: nothing to mark
        return {}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        seen, todo, found = set(), list(node.users), set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_module" and (isinstance(gm.get_submodule(n.target), nn.Conv2d) or is_linear(gm, n)):
                continue
            if n.op == "call_function" and n.target in _ADDS and \
                    sum(isinstance(a, fx.Node) for a in n.args) == 2:
                found.add("residual add")
            if n.op == "call_function" and n.target in _CATS:
                found.add("concatenation")
            todo.extend(n.users)
        if found:
            out[node.target] = " and ".join(sorted(found))
    return out


def fraction_k(fraction: float, channels: int) -> int:
    return min(channels, max(0, round(fraction * channels)))


def sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "multiclass",
                criterion: str = "mean", mode: str = "zero", fractions=DEFAULT_FRACTIONS,
                device: str = "auto", layers: list[str] | None = None,
                progress: Progress | None = None) -> Iterator[Row]:
    """Rows (layer, channels, fraction, K, correct, total), layer by layer, fraction by fraction."""
    fractions = sorted(set(float(f) for f in fractions))
    if not fractions or any(not 0 <= f <= 1 for f in fractions):
        raise ValueError("fractions must lie between 0 and 1, e.g. 0,0.1,0.2,...,1")
    layers = layers or conv_layer_names(model)
    steps, done = len(layers) * (len(fractions) + 1), 0
    for layer in layers:
        def building(d: int, t: int, what: str, layer=layer, done=done) -> None:  # a caller may stop here too
            if progress:
                progress(done, steps, f"{layer}: {what} ({d} of {t} batches)")

        eng = Engine(model, x, y, layer=layer, task=task, device=device, progress=building)
        done += 1
        for f in fractions:
            k = fraction_k(f, eng.channels)
            row = Row(layer, eng.channels, f, k, eng.correct(k, mode, criterion), eng.total)
            done += 1
            if progress:
                progress(done, steps, f"{layer}: {f:.0%} pruned")
            yield row
        del eng
