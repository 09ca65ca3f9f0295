"""The one pass over the test set, and the other passes a criterion may ask for.

`capture` runs the split's prefix over every image once and keeps what each evaluator needs later:
the boundary tensors (within a memory budget), the read-out's `on`/`off` features, the count at
K = 0, and the per-channel statistics of the layer's activation (what the activation criteria rank
by). `capture_hooked` takes the same statistics with a hook, for a model that cannot be split.
`taylor_scores` and `reranked_order` are the two passes a criterion may need beyond it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .hooks import hooks
from .readout import ReadoutCache
from .split import MODES, Split, activation_after
from .tasks import predictions, task_loss

if TYPE_CHECKING:
    from .engine import Progress


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of the layer's activation over the whole test set."""

    mean_map: torch.Tensor      # (P, H, W) averaged feature maps
    mean_abs_map: torch.Tensor  # (P, H, W) averaged absolute feature maps
    zero_fraction: torch.Tensor  # (P,) share of activation values that are exactly 0 (APoZ)

    @property
    def channels(self) -> int:
        return self.mean_map.shape[0]


class _Sums:
    """Running float64 sums of the activations, their absolute values and their zeros, over every call of the conv."""

    def __init__(self):
        self.sums = self.abs_sums = self.zeros = None
        self.calls = 0

    def add(self, acts: list[torch.Tensor]) -> None:
        for act in acts:
            s, a, z = act.double().sum(0), act.double().abs().sum(0), (act == 0).sum((0, 2, 3)).double()
            self.sums = s if self.sums is None else self.sums + s
            self.abs_sums = a if self.abs_sums is None else self.abs_sums + a
            self.zeros = z if self.zeros is None else self.zeros + z
        self.calls = len(acts)

    def stats(self, images: int) -> ChannelStats:
        n = images * self.calls
        return ChannelStats((self.sums / n).float().cpu(), (self.abs_sums / n).float().cpu(),
                            (self.zeros / (n * self.sums[0].numel())).float().cpu())


@dataclass
class Capture:
    """What the one pass leaves behind."""

    stats: ChannelStats
    boundaries: list = field(default_factory=list)  # per batch: the boundary tensors, or None past the budget
    base_correct: int | None = None                  # K = 0, counted during the pass (split models only)
    boundary_bytes: int = 0                          # everything that crossed the split, kept or not
    readouts: dict[str, ReadoutCache] = field(default_factory=dict)  # the modes whose read-out held
    fast_reason: str = ""                            # why a mode's read-out did not hold, in words


def capture_state(found: Capture) -> dict:
    """A Capture as plain tensors, lists and numbers (core/store.py keeps it on disk)."""
    st = found.stats
    return {"stats": {"mean_map": st.mean_map, "mean_abs_map": st.mean_abs_map, "zero_fraction": st.zero_fraction},
            "boundaries": [list(b) if b is not None else None for b in found.boundaries],
            "base_correct": found.base_correct, "boundary_bytes": found.boundary_bytes,
            "readouts": {mode: cache.state() for mode, cache in found.readouts.items()},
            "fast_reason": found.fast_reason}


def restore(state: dict, readouts: dict[str, ReadoutCache]) -> Capture:
    """The Capture `capture_state` gave; `readouts`: the engine's empty read-out caches, filled here
    for the modes the saved pass kept (a mode the pass dropped stays dropped, with its reason)."""
    stats = ChannelStats(**state["stats"])
    kept = {mode: readouts[mode] for mode in state["readouts"]}
    for mode, cache in kept.items():
        cache.load_state(state["readouts"][mode])
    return Capture(stats, [tuple(b) if b is not None else None for b in state["boundaries"]],
                   state["base_correct"], int(state["boundary_bytes"]), kept, str(state["fast_reason"]))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def capture(split: Split, x: torch.Tensor, y: torch.Tensor, task: str, device: torch.device, batch_size: int,
            budget: int, readouts: dict[str, ReadoutCache], fast_reason: str = "",
            progress: Progress | None = None) -> Capture:
    """The one pass through a split model. `readouts`: the modes whose suffix has a linear read-out;
    each is filled with its features, or dropped (with the reason) when the features do not fit."""
    channels = split.channels
    ones = torch.ones(channels, device=device)
    sums, out = _Sums(), Capture(None, readouts=dict(readouts), fast_reason=fast_reason)
    base, kept = 0, 0
    batches = range(0, len(y), batch_size)
    for step, i in enumerate(batches):
        labels = y[i:i + batch_size]
        boundary = split.prefix(x[i:i + batch_size].to(device))
        size = _nbytes(boundary)
        out.boundary_bytes += size
        logits, acts = split.suffixes["zero"](*boundary, ones)
        base += int((predictions(logits, task).cpu() == labels).sum())
        _add_readout_batch(split, out, boundary, logits, labels, first=step == 0)
        if len(out.readouts) < len(MODES):  # a mode without a read-out evaluates through the suffix
            keep = kept + size <= budget
            out.boundaries.append(boundary if keep else None)
            kept += size if keep else 0
        sums.add(acts)
        if progress:
            progress(step + 1, len(batches), "capturing activations")
    out.stats, out.base_correct = sums.stats(len(y)), base
    return out


def _add_readout_batch(split: Split, out: Capture, boundary, logits, labels, first: bool) -> None:
    device = logits.device
    ones = torch.ones(split.channels, device=device)
    zeros = torch.zeros(split.channels, device=device)
    on = None  # with every channel kept the features are the same in every mode: keep one copy
    for mode, cache in list(out.readouts.items()):
        zone = cache.readout.zone
        on = zone(*boundary, ones) if on is None else on
        try:
            cache.add_batch(on, zone(*boundary, zeros), labels)
        except ValueError:
            del out.readouts[mode]
            out.fast_reason = ("the features the linear layer reads do not split evenly into this layer's "
                               f"{split.channels} channels")
            continue
        if first and not _readout_agrees(split, cache, mode, boundary, logits):
            del out.readouts[mode]
            out.fast_reason = (f"the fast read-out did not give the model's own answers on the first batch "
                               f"({mode} mode), so each K is counted by running the rest of the network")


def _readout_agrees(split: Split, cache: ReadoutCache, mode: str, boundary, logits) -> bool:
    """Belt and braces: on the first batch the fast path must give the suffix's own logits."""
    mask = (torch.arange(split.channels, device=logits.device) % 3 != 0).float()
    expected, _ = split.suffixes[mode](*boundary, mask)
    return torch.allclose(cache.logits(mask, 0), expected, rtol=1e-4, atol=1e-5) and \
        torch.allclose(cache.base_logits(0), logits, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def capture_hooked(model: nn.Module, layer: str, bn_name: str | None, x: torch.Tensor, device: torch.device,
                   batch_size: int, progress: Progress | None = None) -> Capture:
    """The statistics of a model that cannot be split, from a hook after the layer's activation. Only
    called while an engine is being built, on its private model, before anyone else can see it."""
    sums = _Sums()
    target = activation_after(model, layer, bn_name)
    batches = range(0, len(x), batch_size)
    for step, i in enumerate(batches):
        acts: list[torch.Tensor] = []
        with hooks([(target, lambda m, i, o: acts.append(o.detach()))]):
            model(x[i:i + batch_size].to(device))
        sums.add(acts)
        if progress:
            progress(step + 1, len(batches), "capturing activations")
    return Capture(sums.stats(len(x)))


def taylor_scores(split: Split, x: torch.Tensor, y: torch.Tensor, task: str, device: torch.device,
                  batch_size: int) -> torch.Tensor:
    """Molchanov et al.'s first-order Taylor criterion: mean over images of |sum over positions of
    activation x d(loss)/d(activation)|; one forward and backward pass."""
    total = torch.zeros(split.channels, dtype=torch.float64)
    ones = torch.ones(split.channels, device=device)
    for i in range(0, len(y), batch_size):
        with torch.no_grad():
            boundary = list(split.prefix(x[i:i + batch_size].to(device)))
        for j in range(len(split.sites)):  # the conv outputs come first in the boundary
            boundary[j] = boundary[j].detach().requires_grad_()
        with torch.enable_grad():
            logits, acts = split.suffixes["zero"](*boundary, ones)
            # Summed, so that each image's gradient is that of its own loss.
            loss = task_loss(logits, y[i:i + batch_size].to(device), task) * len(logits)
            grads = torch.autograd.grad(loss, acts)
        effect = sum((a.detach().double() * g.double()).sum((2, 3)) for a, g in zip(acts, grads))
        total += effect.abs().sum(0).cpu()
    return (total / len(y)).float()


@torch.no_grad()
def reranked_order(split: Split, x: torch.Tensor, device: torch.device, batch_size: int, steps: int,
                   mode: str, criterion: str) -> list[int]:
    """After each prune, run the images again through the pruned model, re-rank the channels still
    there, prune the lowest (a full pass per step)."""
    if criterion not in ("mean", "mean_abs"):
        raise ValueError("re-ranking is defined for the activation criteria (mean, mean_abs)")
    pruned: list[int] = []
    mask = torch.ones(split.channels, device=device)
    for _ in range(steps):
        sums, calls = None, 0
        for i in range(0, len(x), batch_size):
            _, acts = split.suffixes[mode](*split.prefix(x[i:i + batch_size].to(device)), mask)
            for act in acts:  # the same arithmetic as the capture, so equal values stay equal
                a = (act.double().abs() if criterion == "mean_abs" else act.double()).sum(0)
                sums = a if sums is None else sums + a
            calls = len(acts)
        scores = (sums / (len(x) * calls)).float().cpu().flatten(1).mean(1)
        scores[pruned] = float("inf")  # already pruned: not candidates again
        nxt = int(torch.argmin(scores))  # first minimum: ties by channel index, as the ranking
        pruned.append(nxt)
        mask[nxt] = 0
    return pruned
