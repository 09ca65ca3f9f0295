"""The cumulative-sum fast path: the whole accuracy curve from one pass at a linear read-out.

When everything between the pruned conv and the first cross-channel layer works channel by
channel (BatchNorm, activations, a residual add of the same channel, pooling, flatten) and that
layer is linear, each feature reaching the linear layer depends on ONE channel's mask bit. It then
takes one of two values: `on` (channel kept) or `off` (channel pruned), both computed once. The
logits for any pruned set are `linear(where(kept, on, off))`, and for a ranked order they are a
cumulative sum of per-channel contributions: the whole curve costs milliseconds.

This module only decides whether a traced suffix has that shape and cuts it into
`zone` (boundary, mask -> linear input), the linear layer, and `tail` (linear output -> logits).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .graph import compact, describe_node, is_linear, is_per_channel
from .tasks import margin, predictions

@dataclass
class Readout:
    zone: fx.GraphModule           # (*boundary, mask) -> a tuple: the features (N, F) entering each linear layer
    linears: list[nn.Linear]       # the first cross-channel layers: one, or one per call of a shared conv
    tail: fx.GraphModule | None    # linear outputs -> logits; None when there is one linear and it gives them


def find_readout(suffix: fx.GraphModule) -> tuple[Readout | None, str]:
    """The suffix cut at its first linear layers, or None and the reason the fast path does not apply.

    Nodes reading only the mask's zone are per-channel zone nodes or entry linears; nodes reading
    an entry's output form the tail, which may mix anything but must not read the zone directly
    (the Siamese network: one projection per branch, then |a-b| and a*b)."""
    nodes = list(suffix.graph.nodes)
    mask = next(n for n in nodes if n.op == "placeholder" and n.target == "mask")
    output = nodes[-1]
    affected = {mask}
    for n in nodes:
        if n.op != "output" and any(i in affected for i in n.all_input_nodes):
            affected.add(n)
    zone, entries, tail = {mask}, [], []
    for n in nodes:
        if n not in affected or n is mask or n.op == "output":
            continue
        inputs = [i for i in n.all_input_nodes if i in affected]
        if all(i in zone for i in inputs):
            if is_linear(suffix, n):
                entries.append(n)
            elif is_per_channel(suffix, n) or n.args[:1] == (mask,):  # the mask's own view
                zone.add(n)
            else:
                return None, (f"after this layer, {describe_node(suffix, n)} mixes its channels before the "
                              "classifier's linear layer reads them")
        elif any(i in zone for i in inputs) or any(i.op == "placeholder" for i in n.all_input_nodes):
            return None, (f"after the classifier's linear layer, {describe_node(suffix, n)} reads this layer's "
                          "channels again")
        else:
            tail.append(n)
    if not entries:
        return None, "no linear layer reads this layer's channels out (the classifier is a convolution or a pooling)"
    logits = output.args[0][0]
    if logits not in entries and logits not in tail:
        return None, "the model's output is not computed from the linear layers that read this layer"
    return Readout(_zone(suffix, nodes, [e.args[0] for e in entries]),
                   [suffix.get_submodule(e.target) for e in entries], _tail(suffix, entries, tail, logits)), ""


def _zone(suffix: fx.GraphModule, nodes: list[fx.Node], features: list[fx.Node]) -> fx.GraphModule:
    graph, env = fx.Graph(), {}
    for n in nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[f] for f in features))
    return compact(suffix, graph)


def _tail(suffix: fx.GraphModule, entries: list[fx.Node], tail: list[fx.Node],
          logits: fx.Node) -> fx.GraphModule | None:
    if entries == [logits]:
        return None
    graph = fx.Graph()
    env = {e: graph.placeholder(f"linear_out_{i}") for i, e in enumerate(entries)}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # parameters and constants the tail reads
            env[a] = graph.node_copy(a, arg)
        return env[a]

    for n in tail:
        env[n] = graph.node_copy(n, arg)
    graph.output(env[logits])
    return compact(suffix, graph)


class ReadoutCache:
    """The `on`/`off` features of every test image for one pruning mode, and exact answers from them.

    `correct(mask)` computes `linear(where(kept, on, off))` batch by batch: the very numbers the
    naive procedure computes. `sweep(order, ks)` adds per-channel contributions in float64 in ranked
    order; any image whose top-two margin is within rounding distance is recomputed exactly, so the
    counts equal the naive procedure's to the last image. The features are private: the oracle and
    the slim model ask for what they need (`base_and_delta`, `image_logits`, `pruned_constant`).
    """

    TIE_TOLERANCE = 1e-4  # relative to the logits' size; float32 rounding is ~1e-6

    def __init__(self, readout: Readout, channels: int, task: str):
        self.readout, self.channels, self.task = readout, channels, task
        self._on: list[tuple[torch.Tensor, ...]] = []   # per batch, one tensor per linear layer
        self._off: list[tuple[torch.Tensor, ...]] = []
        self._labels: list[torch.Tensor] = []
        self._starts: list[int] = [0]  # image index where each batch starts (and, last, the total)

    def add_batch(self, on: tuple, off: tuple, labels: torch.Tensor) -> None:
        for f in on:
            if f.dim() != 2 or f.shape[1] % self.channels:
                raise ValueError(f"features of shape {tuple(f.shape)} do not split into {self.channels} channels")
        self._on.append(tuple(on))
        self._off.append(tuple(off))
        self._labels.append(labels.to(on[0].device))
        self._starts.append(self._starts[-1] + len(labels))

    @property
    def linear(self) -> bool:
        """The logits are one linear layer of the features: each channel's removal adds a fixed change
        (what the oracle and zero mode's folding rely on)."""
        return len(self.readout.linears) == 1 and self.readout.tail is None

    @property
    def linear_layer(self) -> nn.Linear:
        """The one linear layer that reads this layer out (where `linear` holds)."""
        return self.readout.linears[0]

    @property
    def _width(self) -> int:
        """Features per channel entering the linear layer (S: the positions left after pooling)."""
        return self._on[0][0].shape[1] // self.channels

    def tensors(self) -> list[torch.Tensor]:
        return [t for batch in self._on + self._off for t in batch] + self._labels

    def state(self) -> dict:
        """The filled cache as plain tensors and lists (core/store.py keeps it on disk)."""
        return {"on": [list(b) for b in self._on], "off": [list(b) for b in self._off],
                "labels": list(self._labels), "starts": list(self._starts)}

    def load_state(self, state: dict) -> None:
        """Fill an empty cache from `state()`, checked against this read-out's channels."""
        for on, off, labels in zip(state["on"], state["off"], state["labels"]):
            self.add_batch(tuple(on), tuple(off), labels)
        if self._starts != list(state["starts"]):
            raise ValueError("the saved read-out's batches do not add up")

    def labels(self) -> torch.Tensor:
        """Every image's label, in order (N,)."""
        return torch.cat(self._labels)

    def _logits(self, features: tuple) -> torch.Tensor:
        outs = [linear(f) for linear, f in zip(self.readout.linears, features)]
        return self.readout.tail(*outs) if self.readout.tail is not None else outs[0]

    def _features(self, keep: torch.Tensor, on: tuple, off: tuple) -> tuple:
        """The linear layers' inputs with the channels where `keep` is False pruned."""
        keep = keep.to(on[0].device).bool()
        return tuple(torch.where(keep.repeat_interleave(a.shape[-1] // self.channels, dim=-1), a, b)
                     for a, b in zip(on, off))

    def logits(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """The logits of cached batch `batch` with the channels where `mask` is 0 pruned."""
        return self._logits(self._features(mask, self._on[batch], self._off[batch]))

    def base_logits(self, batch: int) -> torch.Tensor:
        """The logits of cached batch `batch` with nothing pruned."""
        return self._logits(self._on[batch])

    @torch.no_grad()
    def correct(self, mask: torch.Tensor, batches: int | None = None) -> int:
        """Right answers with the channels where `mask` is 0 pruned (in the first `batches` batches only, if given)."""
        return sum(int((predictions(self.logits(mask, j), self.task) == y).sum())
                   for j, y in enumerate(self._labels[:batches]))

    @torch.no_grad()
    def predictions(self, mask: torch.Tensor) -> torch.Tensor:
        """Every image's predicted class with the channels where `mask` is 0 pruned (N,)."""
        return torch.cat([predictions(self.logits(mask, j), self.task).cpu() for j in range(len(self._labels))])

    @torch.no_grad()
    def image_logits(self, keep: torch.Tensor, n: int) -> torch.Tensor:
        """Image n's logits (1, out), computed exactly, with the channels where `keep` is False pruned."""
        b = bisect.bisect_right(self._starts, n) - 1  # the batch holding image n
        i = n - self._starts[b]
        return self._logits(self._features(keep, tuple(t[i:i + 1] for t in self._on[b]),
                                           tuple(t[i:i + 1] for t in self._off[b])))

    @torch.no_grad()
    def base_and_delta(self, dtype: torch.dtype, channels: slice = slice(None)):
        """(N, out) float64 logits at K = 0, and the (C, N, out) change in them when each of `channels`
        alone is pruned (where `linear` holds: removals then add)."""
        p, s = self.channels, self._width
        linear = self.linear_layer
        weight = linear.weight.double().view(-1, p, s)[:, channels]
        base = torch.cat([linear(on).double() for (on,) in self._on])
        delta = torch.cat([torch.einsum("nps,ops->pno", (off - on).double().view(len(on), p, s)[:, channels],
                                        weight).to(dtype) for (on,), (off,) in zip(self._on, self._off)], dim=1)
        return base, delta

    def pruned_constant(self, channels: list[int]) -> torch.Tensor | None:
        """(K, S): the features the pruned `channels` send to the linear layer, where they are the same for
        every image (a batch norm's constant shift in zero mode); None where they are not."""
        off = self._off[0][0]                                  # (n, P*S): features with every channel pruned
        block = off.view(len(off), self.channels, self._width)[:, channels]
        return block[0] if torch.equal(block, block[:1].expand_as(block)) else None

    @torch.no_grad()
    def sweep(self, order: torch.Tensor, ks: list[int]) -> list[int]:
        """Correct counts for pruning the first K channels of `order`, for each K in `ks`."""
        if not ks:
            return []
        rank = torch.empty_like(order)
        rank[order] = torch.arange(self.channels, device=order.device)  # channel -> its place in the order
        if len(self.readout.linears) > 1:  # no cumulative sum through the tail: each K exactly, still cheap
            return [self.correct(rank >= k) for k in ks]
        p, s = self.channels, self._width
        linear = self.linear_layer
        ks_t = torch.as_tensor(ks, device=order.device)
        counts = torch.zeros(len(ks), dtype=torch.long)
        weight = linear.weight.double().view(-1, p, s)[:, order]                        # (out, P, S)
        for (on,), (off,), y in zip(self._on, self._off, self._labels):
            base = linear(on).double()                                                   # K = 0, exactly
            delta = (off - on).double().view(len(y), p, s)[:, order]                    # (n, P, S)
            cum = torch.einsum("nps,ops->pno", delta, weight).cumsum(0)                 # (P, n, out)
            out = base + torch.cat([torch.zeros_like(base)[None], cum])[ks_t]           # (len(ks), n, out)
            if self.readout.tail is not None:
                out = self.readout.tail(out.float().flatten(0, 1)).double().view(len(ks), len(y), -1)
            right = predictions(out.flatten(0, 1), self.task).view(len(ks), len(y)) == y
            ties = self.near_ties(out)
            if len(ties):
                j, i = ties[:, 0], ties[:, 1]
                keep = rank[None, :] >= ks_t[j, None]                                   # (ties, P)
                right[j, i] = predictions(self._logits(self._features(keep, (on[i],), (off[i],))), self.task) == y[i]
            counts += right.sum(1).cpu()
        return counts.tolist()

    def near_ties(self, logits: torch.Tensor) -> torch.Tensor:
        """(k index, image) pairs whose prediction float rounding could flip."""
        scale = 1 + logits.abs().amax(-1)
        return torch.nonzero(margin(logits, self.task) < self.TIE_TOLERANCE * scale)
