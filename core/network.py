"""The whole network as a pruner sees it: which conv channels can be pruned, in which groups, at what cost.

A *unit* is a set of conv layers whose output channels must be pruned together. Torch-Pruning's
dependency graph (DepGraph, Fang et al. CVPR 2023) decides it, not hand-written rules: the two convs
whose outputs meet in a residual add form one unit of the same width, a plain conv is a unit of its
own. A unit is *left out*, with the reason in words, where the product could not count its cost or
where its channels are the model's outputs.

The cost of a plan (MACs, parameters) is exact arithmetic, not an estimate: every conv and linear
layer's count is bilinear in the share of its output and input channels kept, so the counts of the
unpruned model (PyTorch's `FlopCounterMode`, per module) scaled by those shares are the slim model's
counts; `tests/test_compress.py` checks them against the slim model counted again.

The criteria rank each member layer from the same statistics the single-layer engine takes
(`core/capture.py`'s sums of the activation after the conv), here for every layer in one pass over
the test set; a unit of several layers ranks by the mean of its members' scores.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import criteria
from .capture import ChannelStats, _Sums
from .hooks import hooks
from .split import activation_after, following_batchnorm
from .tasks import task_loss

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Unit:
    """Conv layers whose output channels are pruned together (one layer, or several tied by an add)."""

    layers: tuple[str, ...]
    channels: int
    bns: tuple[str | None, ...]      # each member's own batch norm
    exact_removal: bool              # removing the channels for real computes what zeroing them computes
    why_not_exact: str = ""

    @property
    def name(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else " + ".join(self.layers)

    @property
    def tied(self) -> bool:
        return len(self.layers) > 1


@dataclass(frozen=True)
class LeftOut:
    layer: str
    reason: str


@dataclass(frozen=True)
class _Term:
    """One counted quantity (a module's MACs, or one parameter tensor) and the units whose kept share scales it."""

    count: int
    out_unit: int | None  # the unit whose output channels are this tensor's output dimension
    in_unit: int | None   # the unit whose output channels are its input dimension


_COUNTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def _handler(dep) -> str:
    return getattr(dep.handler, "__name__", type(dep.handler).__name__)


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]):
    import torch_pruning as tp

    for p in model.parameters():  # the dependency graph is traced through autograd
        p.requires_grad_(True)
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape))


class Network:
    """A model's units, their costs and their channel rankings; shared read-only once built."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "multiclass",
                 device: torch.device | str = "cpu", batch_size: int | None = None, progress: Progress | None = None,
                 saved_stats: dict | None = None):
        self.model = copy.deepcopy(model).cpu().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.x, self.y, self.task = x, y, task
        self.device = torch.device(device)
        # Small batches stay in a CPU's caches: 250 images ran a plain evaluation 1.6x faster than 1,000 on
        # two cores (scripts/bench_compress.py times both); a GPU wants large ones.
        self.batch_size = batch_size or (1000 if self.device.type == "cuda" else 250)
        self.input_shape = tuple(x.shape[1:])
        self.units, self.left_out, self._deps = self._find_units()
        self.base_macs, self.base_params, self._macs, self._params = self._costs()
        self.stats = ({n: ChannelStats(*v) for n, v in saved_stats["stats"].items()} if saved_stats
                      else self._capture(progress))
        self._taylor: dict[str, torch.Tensor] | None = saved_stats.get("taylor") if saved_stats else None
        self._rankings: dict[tuple[int, str], torch.Tensor] = {}
        self.stored_as: tuple | None = None  # (store, key) where its statistics are kept (core/tradeoff.py)

    # -- units ---------------------------------------------------------------------------------
    def _find_units(self):
        model = copy.deepcopy(self.model)
        graph = dependency_graph(model, self.input_shape)
        import torch_pruning as tp

        names = {m: n for n, m in model.named_modules()}
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        units, left, deps, seen = [], [], [], set()
        for layer in convs:
            if layer in seen:
                continue
            group = graph.get_pruning_group(model.get_submodule(layer), tp.prune_conv_out_channels, idxs=[0])
            members, touched, reason = [], [], ""
            for dep, _ in group:
                module, name = dep.target.module, names.get(dep.target.module, "")
                if not name:   # Torch-Pruning's bookkeeping nodes (ReLU, add, reshape): no parameters
                    continue
                kind = "out" if "out_channels" in _handler(dep) else "in"
                if isinstance(module, nn.Conv2d) and kind == "out":
                    members.append(name)
                if not isinstance(module, _COUNTED):
                    reason = f"its channels reach a {type(module).__name__} ({name}), whose cost this product does not count"
                elif isinstance(module, nn.Conv2d) and module.groups > 1:
                    reason = f"its channels reach a grouped convolution ({name})"
                touched.append((name, kind))
            members = list(dict.fromkeys(members))
            seen.update(members)
            if not reason and not any(kind == "in" for _, kind in touched):
                reason = "its channels are the model's outputs"
            if reason:
                left.extend(LeftOut(m, reason) for m in members)
                continue
            bns = tuple(following_batchnorm(model, m) for m in members)
            group_bns = {n for n, _ in touched if isinstance(model.get_submodule(n), nn.BatchNorm2d)}
            why = self._why_not_exact(model, members, bns, group_bns)
            units.append(Unit(tuple(members), model.get_submodule(members[0]).out_channels, bns, not why, why))
            deps.append(list(dict.fromkeys(touched)))
        return units, left, deps

    @staticmethod
    @torch.no_grad()
    def _why_not_exact(model, members, bns, group_bns) -> str:
        """In `remove` mode a pruned channel outputs exactly zero (its conv and batch norm zeroed) if the
        activation after it is zero at zero, and no other batch norm (after an add, say) would emit a
        constant for it; then removing it for real changes nothing."""
        extra = group_bns - set(bns)
        if extra:
            return f"the batch norm {sorted(extra)[0]} after the tied layers would still emit a constant"
        for layer, bn in zip(members, bns):
            act = activation_after(model, layer, bn)
            if not isinstance(act, (nn.Conv2d, nn.BatchNorm2d)) and bool((act(torch.zeros(1, 1, 1, 1)) != 0).any()):
                return f"the activation after {layer} ({type(act).__name__}) is not zero at zero"
        return ""

    # -- costs ---------------------------------------------------------------------------------
    def _costs(self):
        """Per-module MACs and per-tensor parameter counts of the unpruned model, each with the units
        that scale it."""
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            self.model(torch.zeros(1, *self.input_shape))
        flops = counter.get_flop_counts()
        out_of, in_of = {}, {}
        for u, touched in enumerate(self._deps):
            for name, kind in touched:
                (out_of if kind == "out" else in_of)[name] = u
        root = type(self.model).__name__  # FlopCounterMode names modules from the root's class name
        macs, params = [], []
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name:
                own = sum(int(v) for v in flops.get(f"{root}.{name}", {}).values()) // 2
                macs.append(_Term(own, out_of.get(name), in_of.get(name)))
            for pname, p in module.named_parameters(recurse=False):
                o = out_of.get(name)
                i = in_of.get(name) if pname == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)) else None
                params.append(_Term(p.numel(), o, i))
        total_macs = sum(int(v) for v in flops.get("Global", {}).values()) // 2
        # Anything counted outside the conv and linear layers (a matmul in a forward) is kept as it is.
        macs.append(_Term(total_macs - sum(t.count for t in macs), None, None))
        return total_macs, sum(p.numel() for p in self.model.parameters()), macs, params

    def _scaled(self, terms: list[_Term], kept: list[int]) -> int:
        total = 0
        for t in terms:
            n = t.count
            for u in (t.out_unit, t.in_unit):
                if u is not None:
                    n = n * kept[u] // self.units[u].channels
            total += n
        return total

    def macs(self, pruned: list[int]) -> int:
        """MACs of one image through the model with `pruned[u]` channels of each unit pruned."""
        return self._scaled(self._macs, [u.channels - k for u, k in zip(self.units, pruned)])

    def params(self, pruned: list[int]) -> int:
        return self._scaled(self._params, [u.channels - k for u, k in zip(self.units, pruned)])

    def kept_share(self, pruned: list[int], of: str) -> float:
        return self.macs(pruned) / self.base_macs if of == "macs" else self.params(pruned) / self.base_params

    # -- statistics and rankings ---------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, progress: Progress | None) -> dict[str, ChannelStats]:
        """The channel statistics of every member layer, in one pass (the single-layer engine's sums)."""
        model = copy.deepcopy(self.model).to(self.device)
        layers = [(layer, bn) for u in self.units for layer, bn in zip(u.layers, u.bns)]
        sums = {layer: _Sums() for layer, _ in layers}
        batches = range(0, len(self.x), self.batch_size)
        for step, i in enumerate(batches):
            acts: dict[str, list[torch.Tensor]] = {layer: [] for layer, _ in layers}
            pairs = [(activation_after(model, layer, bn), lambda m, a, o, layer=layer: acts[layer].append(o.detach()))
                     for layer, bn in layers]
            with hooks(pairs):
                model(self.x[i:i + self.batch_size].to(self.device))
            for layer, _ in layers:
                sums[layer].add(acts[layer])
            if progress:
                progress(step + 1, len(batches), "channel statistics of every layer")
        return {layer: sums[layer].stats(len(self.x)) for layer, _ in layers}

    def taylor(self) -> dict[str, torch.Tensor]:
        """Molchanov et al.'s first-order Taylor scores of every member layer, from one forward and backward
        pass (mean over images of |sum over positions of activation x gradient|)."""
        if self._taylor is None:
            model = copy.deepcopy(self.model).to(self.device)
            layers = [(layer, bn) for u in self.units for layer, bn in zip(u.layers, u.bns)]
            total = {layer: torch.zeros(self.stats[layer].channels, dtype=torch.float64) for layer, _ in layers}
            for i in range(0, len(self.y), self.batch_size):
                acts: dict[str, torch.Tensor] = {}
                pairs = [(activation_after(model, layer, bn), lambda m, a, o, layer=layer: acts.__setitem__(layer, o))
                         for layer, bn in layers]
                with torch.enable_grad(), hooks(pairs):
                    logits = model(self.x[i:i + self.batch_size].to(self.device))
                    loss = task_loss(logits, self.y[i:i + self.batch_size].to(self.device), self.task) * len(logits)
                    names = list(acts)
                    grads = torch.autograd.grad(loss, [acts[n] for n in names])
                for n, g in zip(names, grads):
                    total[n] += (acts[n].detach().double() * g.double()).sum((2, 3)).abs().sum(0).cpu()
            self._taylor = {n: (t / len(self.y)).float() for n, t in total.items()}
        return self._taylor

    def facts(self, layer: str, bn: str | None) -> criteria.LayerFacts:
        s = self.stats[layer]
        bn_mod = self.model.get_submodule(bn) if bn else None
        return criteria.LayerFacts(s.mean_map, s.mean_abs_map, s.zero_fraction,
                                   self.model.get_submodule(layer).weight.detach().cpu(),
                                   bn_mod.weight.detach().cpu() if bn_mod is not None else None,
                                   lambda: self.taylor()[layer])

    def scores(self, u: int, criterion: str) -> torch.Tensor:
        """(channels,) the unit's scores: its one layer's, or the mean of its members'."""
        unit, rule = self.units[u], criteria.get(criterion)
        return torch.stack([rule.scores(self.facts(layer, bn)).float()
                            for layer, bn in zip(unit.layers, unit.bns)]).mean(0)

    def ranking(self, u: int, criterion: str) -> torch.Tensor:
        """The unit's channels in pruning order (ties by channel index), as the single-layer engine ranks."""
        key = (u, criterion)
        if key not in self._rankings:
            self._rankings[key] = torch.sort(self.scores(u, criterion), stable=True).indices
        return self._rankings[key]

    def saved_stats(self) -> dict:
        """The pass's statistics as plain tensors (for the engine store)."""
        return {"stats": {n: [s.mean_map, s.mean_abs_map, s.zero_fraction] for n, s in self.stats.items()},
                "taylor": self._taylor}

    def unit_of(self, layer: str) -> int:
        for u, unit in enumerate(self.units):
            if layer in unit.layers:
                return u
        for left in self.left_out:
            if left.layer == layer:
                raise ValueError(f"{layer} is left out of whole-network pruning: {left.reason}.")
        raise ValueError(f"'{layer}' is not a conv layer of this model.")
