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

from dataclasses import asdict, dataclass

import torch

from .engine import Engine, Progress, kept
from .tasks import image_losses, margin, predictions


@dataclass(frozen=True)
class OracleOrder:
    kind: str
    order: list[int]        # channels in pruning order
    correct_after: list[int]  # single: right answers with that channel alone pruned; greedy: after the first i+1


def _readout(eng: Engine, mode: str):
    why = why_not_exact(eng, mode)
    if why is not None:
        raise ValueError("the oracle needs the cumulative-sum read-out (one linear layer right after the pruned "
                         f"layer); here {why}. Use the coarse version (`--kind sampled`, or the Curve page), or "
                         "the sensitivity map.")
    return eng.readout(mode)


def _reach(delta: torch.Tensor, task: str) -> torch.Tensor:
    """(C, N): a prediction can only change where its margin is at most this (the spread of the change)."""
    if task == "binary":
        return delta[..., 0].abs()
    return delta.amax(-1) - delta.amin(-1)


def _margin(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(N,) float32: how far each prediction is from changing, shrunk by 1e-5 so that float32
    rounding never hides a change."""
    return (margin(logits, task) * (1 - 1e-5)).float()


@torch.no_grad()
def single(eng: Engine, mode: str = "zero") -> OracleOrder:
    """Each channel pruned alone, exactly (the engine's count), ordered by cost, ties by lower loss.

    The logits after each removal are computed in float64 from the linear read-out, a few channels
    at a time; any image within rounding distance of a tie is recomputed the naive way."""
    cache = _readout(eng, mode)
    p, y = eng.channels, cache.labels()
    correct, loss = [], []
    for first in range(0, p, 32):
        chunk = slice(first, min(first + 32, p))
        base, delta = cache.base_and_delta(torch.float64, chunk)
        logits = base[None] + delta                                                      # (C, N, out)
        right = predictions(logits, eng.task) == y
        for j, n in cache.near_ties(logits).tolist():  # within rounding of a tie: the image again, exactly
            keep = torch.ones(p, dtype=torch.bool, device=eng.device)
            keep[first + j] = False
            right[j, n] = bool(predictions(cache.image_logits(keep, n), eng.task)[0] == y[n])
        correct += right.sum(1).tolist()
        loss += image_losses(logits, y, eng.task).sum(-1).tolist()
    order = sorted(range(p), key=lambda c: (-correct[c], loss[c], c))
    return OracleOrder("single", order, [correct[c] for c in order])


@torch.no_grad()
def greedy(eng: Engine, mode: str = "zero", progress: Progress | None = None) -> OracleOrder:
    cache = _readout(eng, mode)
    p, y = eng.channels, cache.labels()
    logits, delta = cache.base_and_delta(torch.float32)    # float32 changes: P x N x out is large
    reach = _reach(delta, eng.task)                             # (P, N): how far each removal moves each image
    bound = reach.amax(0)                                       # (N,): how far any removal moves it
    taken = torch.zeros(p, dtype=torch.bool, device=reach.device)
    order = []
    for step in range(p):
        right = predictions(logits, eng.task) == y
        margin = _margin(logits, eng.task)
        gain = torch.zeros(p, dtype=torch.long, device=reach.device)
        contested = torch.nonzero(bound >= margin).flatten()    # only these images can change at all
        if len(contested):
            c, j = torch.nonzero(reach[:, contested] >= margin[contested]).unbind(1)
            n = contested[j]
            new = predictions(logits[n] + delta[c, n].double(), eng.task) == y[n]
            gain.index_add_(0, c, new.long() - right[n].long())
        gain[taken] = -len(y) - 1
        tied = torch.nonzero(gain == gain.max()).flatten()
        if len(tied) > 1:  # ties by the lower loss: only the images a candidate moves change its loss
            c, n = torch.nonzero(reach[tied] > 0).unbind(1)
            change = torch.zeros(len(tied), dtype=torch.float64, device=reach.device)
            change.index_add_(0, c, image_losses(logits[n] + delta[tied[c], n].double(), y[n], eng.task)
                              - image_losses(logits[n], y[n], eng.task))
            channel = int(tied[int(torch.argmin(change))])
        else:
            channel = int(tied[0])
        taken[channel] = True
        reach[channel] = -1
        logits = logits + delta[channel].double()
        order.append(channel)
        if progress:
            progress(step + 1, p, "greedy oracle")
    curve = [c for _, c in eng.sweep_order(order, range(1, p + 1), mode)]
    return OracleOrder("greedy", order, curve)


def why_not_exact(eng: Engine, mode: str) -> str | None:
    """Why the exact oracles do not apply here (they need one linear read-out right after the layer), or None."""
    cache = eng.readout(mode)
    if cache is None:
        return eng.fast_reason or "the rest of the network mixes channels before its read-out"
    if not cache.linear:
        return "the read-out goes on after its first linear layers (several branches, or a tail mixing them)"
    return None


@torch.no_grad()
def sampled_single(eng: Engine, mode: str = "zero", progress: Progress | None = None) -> OracleOrder:
    """The coarse oracle, where the read-out is not linear: each channel pruned alone and counted
    exactly on the first `eng.sample_size` test images only (a sample: P passes of the rest of the
    network over them), ordered from the least to the most costly (ties by channel). Its
    `correct_after` are counts on that sample."""
    correct = []
    for c in range(eng.channels):
        mask = torch.ones(eng.channels)
        mask[c] = 0
        correct.append(eng.sample_correct(mask, mode))
        if progress:
            progress(c + 1, eng.channels, "each channel alone, on a sample")
    order = sorted(range(eng.channels), key=lambda c: (-correct[c], c))
    return OracleOrder("sampled single", order, [correct[c] for c in order])


HELDOUT_IMAGES = 10_000


def training_size(ckpt, data_root: str | None = None) -> int:
    """How many of the last training images the oracle may choose on: a sixth of them, at most 10,000."""
    return min(HELDOUT_IMAGES, len(ckpt.split(train=True, data_root=data_root)) // 6)


def training_engine(ckpt, eng: Engine, data_root: str | None = None, progress: Progress | None = None) -> Engine:
    """An engine over the last `training_size` training images at the same layer: the oracle can choose
    its order there without looking at the test labels, and the order is then scored on the test set.
    (The bundled models were trained on these images too: they are apart from the test set, not unseen.)"""
    train = ckpt.split(train=True, data_root=data_root)
    n = training_size(ckpt, data_root)
    return Engine(ckpt.build_model(), train.x[-n:], train.y[-n:], layer=eng.layer, task=eng.task,
                  device=eng.device, progress=progress)


def scored_on(eng: Engine, found: OracleOrder, mode: str) -> OracleOrder:
    """The same order with its counts on `eng`'s images (the test set), whatever it was chosen on."""
    if found.kind in ("single", "sampled single"):
        alone = single(eng, mode) if found.kind == "single" else sampled_single(eng, mode)
        count = dict(zip(alone.order, alone.correct_after))
        return OracleOrder(found.kind, found.order, [count[c] for c in found.order])
    return OracleOrder("greedy", found.order, [c for _, c in eng.sweep_order(found.order, range(1, eng.channels + 1),
                                                                            mode)])


def chosen(eng: Engine, kind: str, mode: str = "zero", pick_on: str = "test", ckpt=None,
           data_root: str | None = None, progress: Progress | None = None, picker=None) -> OracleOrder:
    """The `kind` oracle's order picked on the test images (`pick_on="test"`: an upper bound) or on the
    last training images of `ckpt`'s data set, with its counts on `eng`'s images. Kept in the engine's
    store (core/store.py) where it has one: the greedy order costs seconds to minutes, a lookup after.
    `picker`: a callable giving the training images' engine, where several orders share one pass."""
    def make() -> dict:
        if pick_on == "test":
            return asdict(_run(kind, eng, mode, progress))
        train = picker() if picker is not None else training_engine(ckpt, eng, data_root, progress)
        return asdict(scored_on(eng, _run(kind, train, mode, progress), mode))

    def fits(state: dict) -> bool:
        return sorted(state.get("order", [])) == list(range(eng.channels)) and \
            len(state.get("correct_after", [])) == eng.channels
    where = "test" if pick_on == "test" else ("train",) + _training_digest(ckpt, data_root)
    return OracleOrder(**kept(eng, ("oracle", kind, mode, where), make, fits))


def _training_digest(ckpt, data_root: str | None) -> tuple[int, str]:
    """The training images an order is chosen on, by count and content (another --data-root: another key)."""
    from .store import data_digest

    train, n = ckpt.split(train=True, data_root=data_root), training_size(ckpt, data_root)
    return n, data_digest(train.x[-n:], train.y[-n:])


def _run(kind: str, eng: Engine, mode: str, progress: Progress | None) -> OracleOrder:
    if kind == "single":
        return single(eng, mode)
    if kind == "greedy":
        return greedy(eng, mode, progress)
    if kind == "sampled":
        return sampled_single(eng, mode, progress)
    raise ValueError(f"Unknown oracle '{kind}'. Oracles: single, greedy, sampled.")


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
