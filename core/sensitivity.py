"""Sensitivity map: each conv layer pruned alone by each fraction of its channels (Li et al. 2017, Fig. 2).

One engine per layer, built and dropped in turn (one pass over the test set each, then one pass of
the rest of the network per fraction; the last layer's read-out makes its row nearly free). Rows
are yielded as they are computed, so a caller can draw them progressively and stop at any time.
A finished map is a fact about (checkpoint, test data, rule, mode, fractions, device): `kept_map`
reads it back from the engine store (core/store.py) or counts it and keeps it there.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from .engine import Engine, Progress, pick_device
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


def store_key(ckpt, criterion: str, mode: str, fractions, device: str, data_root: str | None = None) -> tuple:
    """The engine store's key of a whole map (the test data by content: a replaced file is a new map)."""
    from .store import data_digest

    split = ckpt.split(train=False, data_root=data_root)
    return ("sensitivity", ckpt.digest, data_digest(split.x, split.y), criterion, mode,
            tuple(float(f) for f in fractions), pick_device(device).type)


def read_back(store, key: tuple) -> list[Row] | None:
    """A whole map kept before, or None (none kept, or a file that does not hold rows: then dropped)."""
    state = store.load(key) if store is not None else None
    if state is None:
        return None
    try:
        return [Row(**row) for row in state["rows"]]
    except (KeyError, TypeError):
        store.drop(key)
        return None


def keep(store, key: tuple, rows: list[Row]) -> None:
    if store is not None:
        store.save(key, {"rows": [asdict(r) for r in rows]})


def kept_map(ckpt, criterion: str = "mean", mode: str = "zero", fractions=DEFAULT_FRACTIONS, device: str = "auto",
             store=None, data_root: str | None = None, progress: Progress | None = None) -> tuple[list[Row], bool]:
    """(the whole map, whether it was read back) for a checkpoint on its data set's test split."""
    key = store_key(ckpt, criterion, mode, fractions, device, data_root) if store is not None else None
    rows = read_back(store, key) if key else None
    if rows is not None:
        return rows, True
    split = ckpt.split(train=False, data_root=data_root)
    rows = list(sensitivity(ckpt.build_model(), split.x, split.y, ckpt.spec.task, criterion, mode, fractions, device,
                            progress=progress))
    if key:
        keep(store, key, rows)
    return rows, False
