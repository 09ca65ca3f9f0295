"""The oracle: the best a one-at-a-time pruning order could do on these very images.

An upper bound for a lecture, not a usable rule: it looks at the test labels. Both kinds need the
cumulative-sum read-out (one linear read-out after the pruned layer), where each channel's removal
changes the logits by a fixed amount per image:
- `single`: every channel's own cost, exactly: the right answers left when it alone is pruned
  (and the loss, for ties); channels are ordered from the least to the most costly;
- `greedy`: prune, one at a time, the channel whose removal keeps the most images right (ties by
  the lower loss). Choices are made on float64 logits, only re-examining the images whose
  prediction the candidate could flip; the curve reported for the chosen order is the engine's
  exact count at every K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .engine import Engine, Progress


@dataclass(frozen=True)
class OracleOrder:
    kind: str
    order: list[int]        # channels in pruning order
    correct_after: list[int]  # single: right answers with that channel alone pruned; greedy: after the first i+1


def _readout(eng: Engine, mode: str):
    cache = eng.readout(mode)
    if cache is None or len(cache.readout.linears) != 1 or cache.readout.tail is not None:
        raise ValueError("the oracle needs the cumulative-sum read-out (one linear layer right after the pruned "
                         f"layer); here: {eng.fast_reason or 'not available'}. Use a coarse version: the "
                         "sensitivity map, or criteria compared on the Curve page.")
    return cache


def _loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Summed loss per row of logits (..., n, out) -> (...,)."""
    if task == "binary":
        target = y.double().expand(logits.shape[:-1])
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none").sum(-1)
    logp = torch.log_softmax(logits, -1)
    return -logp.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1).sum(-1)


def _predict(logits: torch.Tensor, task: str) -> torch.Tensor:
    return (logits[..., 0] > 0).long() if task == "binary" else logits.argmax(-1)


@torch.no_grad()
def single(eng: Engine, mode: str = "zero") -> OracleOrder:
    """Each channel pruned alone, exactly (the engine's count), ordered by cost, ties by lower loss."""
    cache = _readout(eng, mode)
    correct, loss = [], []
    for c in range(eng.channels):
        mask = torch.ones(eng.channels, device=eng.device)
        mask[c] = 0
        right, total_loss = 0, 0.0
        for on, off, y in zip(cache.on, cache.off, cache.labels):
            logits = cache.logits(cache.features(mask, on, off)).double()
            right += int((_predict(logits, eng.task) == y).sum())
            total_loss += float(_loss(logits, y, eng.task))
        correct.append(right)
        loss.append(total_loss)
    order = sorted(range(eng.channels), key=lambda c: (-correct[c], loss[c], c))
    return OracleOrder("single", order, [correct[c] for c in order])


@torch.no_grad()
def greedy(eng: Engine, mode: str = "zero", progress: Progress | None = None) -> OracleOrder:
    cache = _readout(eng, mode)
    p = eng.channels
    s = cache.on[0][0].shape[1] // p
    weight = cache.readout.linears[0].weight.double().view(-1, p, s)
    y = torch.cat(cache.labels)
    logits = torch.cat([cache.readout.linears[0](on).double() for (on,) in cache.on])     # (N, out), K = 0
    delta = torch.cat([torch.einsum("nps,ops->pno", ((off - on).double().view(len(on), p, s)), weight).float()
                       for (on,), (off,) in zip(cache.on, cache.off)], dim=1)                # (P, N, out)
    reach = 2 * delta.abs().amax(-1)                                                        # (P, N)
    left = list(range(p))
    order, after = [], []
    for step in range(p):
        pred = _predict(logits, eng.task)
        right = pred == y
        if eng.task == "binary":
            margin = logits[:, 0].abs()
        else:
            top2 = logits.topk(min(2, logits.shape[1]), -1).values
            margin = top2[:, 0] - top2[:, -1] if logits.shape[1] > 1 else torch.full_like(top2[:, 0], float("inf"))
        cand = torch.tensor(left)
        gain = torch.zeros(len(left), dtype=torch.long)
        risky = torch.nonzero(reach[cand] >= margin[None].float())                          # (pairs, 2): cand i, image n
        if len(risky):
            i, n = risky[:, 0], risky[:, 1]
            new = _predict(logits[n] + delta[cand[i], n].double(), eng.task) == y[n]
            gain.index_add_(0, i, new.long() - right[n].long())
        best = int(gain.max())
        tied = torch.nonzero(gain == best).flatten()
        if len(tied) > 1:  # ties by the lower loss, exactly over every image
            losses = torch.cat([_loss(logits[None] + delta[cand[tied[j:j + 32]]].double(), y, eng.task)
                                for j in range(0, len(tied), 32)])
            pick = int(tied[int(torch.argmin(losses))])
        else:
            pick = int(tied[0])
        channel = left.pop(pick)
        logits = logits + delta[channel].double()
        order.append(channel)
        if progress:
            progress(step + 1, p, "greedy oracle")
    curve = [c for _, c in eng.sweep_order(order, range(1, p + 1), mode)]
    return OracleOrder("greedy", order, curve)


@dataclass(frozen=True)
class Score:
    criterion: str
    area: float              # mean accuracy over K = 0..P (the area under the curve, K scaled to [0, 1])
    first_point_lost: int | None  # the first K at which accuracy is 1 point or more below K = 0
    spearman: float | None   # rank correlation of its order with the single-removal oracle's


def spearman(a: list[int], b: list[int]) -> float:
    """Spearman's rank correlation of two orders of the same channels (no ties: orders are permutations)."""
    n = len(a)
    ra, rb = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    ra[torch.as_tensor(a)] = torch.arange(n, dtype=torch.float64)
    rb[torch.as_tensor(b)] = torch.arange(n, dtype=torch.float64)
    return float(1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1)))


def score(name: str, counts: list[int], total: int, order: list[int] | None,
          reference: list[int] | None) -> Score:
    """One row of the Curve page's scoreboard (Molchanov et al. 2017 compare criteria this way)."""
    acc = [c / total for c in counts]
    lost = next((k for k, a in enumerate(acc) if a <= acc[0] - 0.01), None)
    rho = spearman(order, reference) if order is not None and reference is not None else None
    return Score(name, sum(acc) / len(acc), lost, rho)
