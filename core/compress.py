"""Compress the whole network: a plan prunes channels of every unit at once (core/network.py).

Four strategies turn a target (keep this share of the MACs, or of the parameters) into a plan:
- `uniform`: the same fraction of every unit;
- `global`: one ranking of all channels of all units by the criterion's score, after a normaliser
  (`none`; `mean` or `max`: each unit's scores divided by their mean or largest |score|; `lamp`:
  Lee et al. 2021's LAMP score, a channel's squared score over the sum of the squares of the channels
  ranked after it in its unit), pruned from the bottom until the target is met, no unit pruned past
  its cap (default 90%; with the cap off a unit can lose every channel, and the plan says so);
- `sensitivity`: Li et al. 2017: from the sensitivity map (each layer pruned alone), every unit is
  pruned as far as it loses at most a tolerance of accuracy, and the tolerance is found by bisection
  so that the target is met (a unit of tied layers is as sensitive as its most sensitive member);
- `manual`: a fraction per layer, as given.
Within a unit, channels always go in the criterion's own order, so a plan's first K channels of a
layer are the ones the single-layer slider prunes at K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .network import Network

STRATEGIES = ("uniform", "global", "sensitivity", "manual")
NORMALISERS = ("none", "mean", "max", "lamp")
DEFAULT_CAP = 0.9
TARGETS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2)  # shares of the MACs kept: the chart's x


@dataclass(frozen=True)
class Plan:
    """Which output channels of every unit are pruned, and how the plan was made."""

    strategy: str
    criterion: str
    mode: str
    pruned: tuple[int, ...]                   # per unit: how many channels
    layers: dict[str, list[int]]              # every pruned layer: its pruned channel indices, ascending
    target: float | None = None               # the share asked for (None: manual)
    of: str = "macs"                          # what the target is a share of: "macs" or "params"
    normaliser: str = ""
    cap: float | None = DEFAULT_CAP           # None: off
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        """plan.json: the mode, the criterion and each layer's pruned channels (layer names as `info` lists them)."""
        return {"mode": self.mode, "criterion": self.criterion, "layers": self.layers}

    def wiped(self, net: Network) -> list[str]:
        """The units left with no channel at all."""
        return [u.name for u, k in zip(net.units, self.pruned) if k == u.channels]


def cap_k(channels: int, cap: float | None) -> int:
    """The most channels a unit may lose: all of them with the cap off."""
    return channels if cap is None else min(channels, math.floor(cap * channels + 1e-9))


def make_plan(net: Network, pruned: list[int], strategy: str, criterion: str, mode: str, **how) -> Plan:
    layers: dict[str, list[int]] = {}
    for u, (unit, k) in enumerate(zip(net.units, pruned)):
        if k:
            chosen = sorted(net.ranking(u, criterion)[:k].tolist())
            for layer in unit.layers:
                layers[layer] = chosen
    notes = list(how.pop("notes", ()))
    wiped = [unit.name for unit, k in zip(net.units, pruned) if k == unit.channels]
    if wiped:
        notes.append(f"wiped out (every channel pruned, nothing it computed reaches the rest of the network): "
                     f"{', '.join(wiped)}")
    return Plan(strategy, criterion, mode, tuple(int(k) for k in pruned), layers, notes=tuple(notes), **how)


def _smallest(meets, lo: float, hi: float, steps: int = 50) -> float:
    """The smallest x in [lo, hi] with meets(x), for a monotone test (meets(hi) is True)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi


def _unreachable(net: Network, ks: list[int], target: float, of: str) -> tuple[str, ...]:
    share = net.kept_share(ks, of)
    if share <= target + 1e-12:
        return ()
    return (f"the target {target:.0%} of the {_of_words(of)} cannot be met with every unit capped: "
            f"the plan keeps {share:.1%}",)


def _of_words(of: str) -> str:
    return "MACs" if of == "macs" else "parameters"


def uniform(net: Network, target: float, of: str = "macs", criterion: str = "mean", mode: str = "remove",
            cap: float | None = DEFAULT_CAP) -> Plan:
    """The same fraction f of every unit: the smallest f that keeps at most `target` of the MACs/params."""
    def ks(f: float) -> list[int]:
        return [min(cap_k(u.channels, cap), round(f * u.channels)) for u in net.units]

    f = _smallest(lambda f: net.kept_share(ks(f), of) <= target, 0.0, 1.0)
    chosen = ks(f)
    return make_plan(net, chosen, "uniform", criterion, mode, target=target, of=of, cap=cap,
                     notes=_unreachable(net, chosen, target, of))


def normalised(scores: torch.Tensor, ranking: torch.Tensor, normaliser: str) -> torch.Tensor:
    """The unit's scores in its pruning order, normalised, made non-decreasing (so that the global order
    never takes a unit's channels out of its own order)."""
    s = scores[ranking].double()
    if normaliser == "mean":
        s = s / max(float(s.abs().mean()), 1e-12)
    elif normaliser == "max":
        s = s / max(float(s.abs().max()), 1e-12)
    elif normaliser == "lamp":
        sq = s ** 2
        after = sq.flip(0).cumsum(0).flip(0)  # the sum over this channel and every channel ranked after it
        s = sq / after.clamp_min(1e-300)
    elif normaliser != "none":
        raise ValueError(f"Unknown normaliser '{normaliser}'. Normalisers: {', '.join(NORMALISERS)}.")
    return torch.cummax(s, 0).values


def global_order(net: Network, criterion: str, normaliser: str, cap: float | None) -> list[int]:
    """Units in the order their channels are pruned by one threshold over every channel (at most the cap of each)."""
    entries = []
    for u, unit in enumerate(net.units):
        values = normalised(net.scores(u, criterion), net.ranking(u, criterion), normaliser)
        entries += [(float(v), u, pos) for pos, v in enumerate(values[:cap_k(unit.channels, cap)])]
    return [u for _, u, _ in sorted(entries)]


def global_(net: Network, target: float, of: str = "macs", criterion: str = "mean", mode: str = "remove",
            normaliser: str = "mean", cap: float | None = DEFAULT_CAP) -> Plan:
    order = global_order(net, criterion, normaliser, cap)
    prefix = [[0] * len(net.units)]
    for u in order:
        ks = list(prefix[-1])
        ks[u] += 1
        prefix.append(ks)
    lo, hi = 0, len(order)
    if net.kept_share(prefix[hi], of) > target:
        lo = hi
    while lo < hi:  # the fewest channels that meet the target
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if net.kept_share(prefix[mid], of) <= target else (mid + 1, hi)
    chosen = prefix[lo]
    return make_plan(net, chosen, "global", criterion, mode, target=target, of=of, normaliser=normaliser,
                     cap=cap, notes=_unreachable(net, chosen, target, of))


def drops(net: Network, rows) -> list[tuple[list[float], list[float]]]:
    """Per unit, (fractions, accuracy lost) from the sensitivity map's rows; a tied unit takes the
    largest loss of its members; the loss is made non-decreasing in the fraction."""
    by_layer: dict[str, dict[float, float]] = {}
    for r in rows:
        by_layer.setdefault(r.layer, {})[float(r.fraction)] = r.correct / r.total
    out = []
    for unit in net.units:
        missing = [layer for layer in unit.layers if layer not in by_layer]
        if missing:
            raise ValueError(f"the sensitivity map has no row for {missing[0]}")
        fractions = sorted(set.intersection(*(set(by_layer[layer]) for layer in unit.layers)))
        if not fractions or fractions[0] != 0:
            raise ValueError("the sensitivity map must include the fraction 0 (the unpruned accuracy)")
        acc = [min(by_layer[layer][f] for layer in unit.layers) for f in fractions]
        lost = torch.cummax(torch.tensor([acc[0] - a for a in acc]), 0).values.tolist()
        out.append((fractions, lost))
    return out


def _fraction_within(fractions: list[float], lost: list[float], tolerance: float) -> float:
    """The largest fraction whose (linearly interpolated) loss is at most the tolerance."""
    best = 0.0
    for i, (f, d) in enumerate(zip(fractions, lost)):
        if d <= tolerance:
            best = f
            if i + 1 < len(fractions) and lost[i + 1] > tolerance:
                span = lost[i + 1] - d
                best = f + (tolerance - d) / span * (fractions[i + 1] - f)
        else:
            break
    return best


def sensitivity(net: Network, rows, target: float, of: str = "macs", criterion: str = "mean",
                mode: str = "remove", cap: float | None = DEFAULT_CAP) -> Plan:
    """Every unit pruned as far as its own sensitivity row loses at most t; t found by bisection."""
    curves = drops(net, rows)

    def ks(t: float) -> list[int]:
        return [min(cap_k(u.channels, cap), math.floor(_fraction_within(f, d, t) * u.channels + 1e-9))
                for u, (f, d) in zip(net.units, curves)]

    top = max(max(d) for _, d in curves) + 1e-9
    t = _smallest(lambda t: net.kept_share(ks(t), of) <= target, 0.0, top)
    chosen = ks(t)
    note = (f"each unit pruned as far as it alone loses at most {t:.2%} of the test images",)
    return make_plan(net, chosen, "sensitivity", criterion, mode, target=target, of=of, cap=cap,
                     notes=note + _unreachable(net, chosen, target, of))


def manual(net: Network, ratios: dict[str, float], criterion: str = "mean", mode: str = "remove") -> Plan:
    """A fraction per layer as given (a tied layer's fraction applies to its whole unit)."""
    ks = [0] * len(net.units)
    for layer, ratio in ratios.items():
        if not 0 <= ratio <= 1:
            raise ValueError(f"the fraction for {layer} must lie between 0 and 1, got {ratio:g}")
        u = net.unit_of(layer)
        ks[u] = max(ks[u], round(ratio * net.units[u].channels))
    return make_plan(net, ks, "manual", criterion, mode, cap=None)


def plan_for(net: Network, strategy: str, target: float | None = None, of: str = "macs", criterion: str = "mean",
             mode: str = "remove", normaliser: str = "mean", cap: float | None = DEFAULT_CAP,
             ratios: dict[str, float] | None = None, rows=None) -> Plan:
    """The one entry point of the four strategies."""
    if strategy == "manual":
        return manual(net, ratios or {}, criterion, mode)
    if target is None or not 0 < target <= 1:
        raise ValueError("a target is the share of the MACs or parameters to keep, between 0 and 1 (0.5 keeps half)")
    if strategy == "uniform":
        return uniform(net, target, of, criterion, mode, cap)
    if strategy == "global":
        return global_(net, target, of, criterion, mode, normaliser, cap)
    if strategy == "sensitivity":
        if rows is None:
            raise ValueError("the sensitivity strategy needs the sensitivity map")
        return sensitivity(net, rows, target, of, criterion, mode, cap)
    raise ValueError(f"Unknown strategy '{strategy}'. Strategies: {', '.join(STRATEGIES)}.")
