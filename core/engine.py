"""Activation capture, ranking, masks, exact fast evaluation, sweeps.

The central idea: pruning channels of one conv changes nothing upstream of it, and
zeroing a channel's weights and bias is the same as multiplying that output channel by 0. So the
model is split at the conv (torch.fx), the part before it runs over the test set ONCE, and the
accuracy for any set of pruned channels is `suffix(cached, mask)`. The loaded model is never
mutated: the engine holds its own copy and only ever reads it.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import criteria
from .graph import ACTIVATION_MODULES, BATCHNORMS, compact, is_activation, is_batchnorm, sole_user
from .readout import ReadoutCache, find_readout

MODES = {
    "zero": "Set the pruned filters' weights and bias to zero. A BatchNorm after the conv still adds its "
            "constant shift, so the channel is not silent.",
    "remove": "Silence the pruned channels: the conv filter and its BatchNorm scale and shift are zeroed, so "
              "the channel outputs exactly 0, as if the filter were removed.",
}

PATH_SPLIT = "fx split (prefix cached once)"
PATH_FAST = "fx split + on/off features at the linear read-out (whole curve from one pass)"
PATH_HOOK = "forward hook fallback (full pass per evaluation)"

Progress = Callable[[int, int, str], None]

def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when there is one; `cuda` without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available here.")
    return torch.device(name)


def predictions(logits: torch.Tensor, task: str) -> torch.Tensor:
    """The predicted class of each image: logits (..., n, out), or (n,) for a pair task's one logit."""
    if task == "binary":
        return ((logits[..., 0] if logits.dim() > 1 else logits) > 0).long()
    return logits.argmax(dim=-1)


@torch.no_grad()
def count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "multiclass",
                  device: torch.device | str = "cpu", batch_size: int = 1000) -> int:
    """The plain evaluation: the whole split through the whole model."""
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((predictions(logits, task).cpu() == y[i:i + batch_size]).sum())
    return correct


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def default_layer(model: nn.Module) -> str:
    names = conv_layer_names(model)
    if not names:
        raise ValueError("This model has no Conv2d layer, so there are no channels to prune.")
    return names[-1]


# ---------------------------------------------------------------------------------------------
# Graph analysis: where the conv is, what follows it, where the mask goes.

@dataclass
class ConvSite:
    """One call of the pruned conv in the traced graph and what follows it."""

    conv: fx.Node
    batchnorm: fx.Node | None  # the BatchNorm right after it, zeroed too in `remove` mode
    activation: fx.Node        # where the statistics are taken (the conv/BN output if no activation)


def _conv_sites(gm: fx.GraphModule, layer: str) -> list[ConvSite]:
    """Each call of the conv, with the BatchNorm that belongs to it: right after the conv, or right
    after its activation (Keras' Conv2D(activation='relu') followed by BatchNormalization)."""
    def follows(node, test):
        nxt = sole_user(node) if node is not None else None
        return nxt if nxt is not None and test(nxt) else None

    def is_bn(n):
        return is_batchnorm(gm, n)

    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == layer:
            bn = follows(node, is_bn)
            act = follows(bn or node, lambda n: is_activation(gm, n))
            if bn is None and act is not None:
                bn = follows(act, is_bn)
            sites.append(ConvSite(node, bn, act or bn or node))
    return sites


class _Split:
    """The traced model cut at the conv: `prefix(x) -> boundary`, `suffix(*boundary, mask) -> (logits, acts)`."""

    def __init__(self, model: nn.Module, layer: str):
        # A program's module is a graph already: tracing it again would lose what each node records
        # (the user's module path, the shapes), which the reasons shown to the user are made of.
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        self.sites = _conv_sites(gm, layer)
        if not self.sites:
            raise ValueError(f"layer '{layer}' is not called in the traced forward pass")
        nodes = list(gm.graph.nodes)
        convs = {s.conv for s in self.sites}
        affected: set[fx.Node] = set(convs)
        for n in nodes:
            if n.op != "output" and any(i in affected for i in n.all_input_nodes):
                affected.add(n)
        suffix_nodes = [n for n in nodes if n in affected and n not in convs]
        # Everything the suffix reads from before the cut, computed once; the conv outputs first.
        boundary = list(dict.fromkeys(
            [s.conv for s in self.sites]
            + [i for n in suffix_nodes + [nodes[-1]] for i in n.all_input_nodes
               if i not in affected and i.op != "get_attr"]))
        # A batch size read before the cut (a channel shuffle's `view(x, [batch, groups, ...])`) is
        # not a tensor to cache: the suffix reads it again from the conv output.
        self.batch_sizes = [b for b in boundary if _is_batch_size(b)]
        boundary = [b for b in boundary if b not in self.batch_sizes]
        self.bn_name = self.sites[0].batchnorm.target if self.sites[0].batchnorm is not None else None
        self.prefix = self._build_prefix(gm, nodes, boundary)
        self.suffixes = {mode: self._build_suffix(gm, nodes, boundary, suffix_nodes, mode) for mode in MODES}

    @staticmethod
    def _build_prefix(gm, nodes, boundary) -> fx.GraphModule:
        graph, env = fx.Graph(), {}
        for n in nodes:
            if n.op != "output":
                env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(tuple(env[b] for b in boundary))
        return compact(gm, graph)

    def _build_suffix(self, gm, nodes, boundary, suffix_nodes, mode) -> fx.GraphModule:
        graph, env = fx.Graph(), {}
        for i, b in enumerate(boundary):
            env[b] = graph.placeholder(f"boundary_{i}")
        mask = graph.placeholder("mask")
        for b in self.batch_sizes:
            env[b] = graph.call_method("size", (env[boundary[0]], 0))
        mask_points = {(s.batchnorm if mode == "remove" and s.batchnorm is not None else s.conv) for s in self.sites}

        def masked(node: fx.Node, value: fx.Node) -> fx.Node:
            if node not in mask_points:
                return value
            view = graph.call_method("view", (mask, 1, -1, 1, 1))
            return graph.call_function(torch.mul, (value, view))

        for s in self.sites:
            env[s.conv] = masked(s.conv, env[s.conv])
        for n in nodes:
            if n in env or n.op == "output":
                continue
            if n in suffix_nodes or n.op == "get_attr":
                env[n] = masked(n, graph.node_copy(n, lambda a: env[a]))
        logits = fx.map_arg(nodes[-1].args[0], lambda a: env[a])
        graph.output((logits, tuple(env[s.activation] for s in self.sites)))
        return compact(gm, graph)


def _is_batch_size(node: fx.Node) -> bool:
    """`x.size(0)` or `aten.sym_size.int(x, 0)`: an int that is the batch size (the one dimension a
    program leaves free), not a tensor."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim != 0 or not ((node.op == "call_function" and node.target == torch.ops.aten.sym_size.int)
                        or (node.op == "call_method" and node.target == "size")):
        return False
    return not isinstance(node.meta.get("val"), int)  # a fixed size would be a plain int here


# ---------------------------------------------------------------------------------------------
# The engine

@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of the layer's activation over the whole test set."""

    mean_map: torch.Tensor      # (P, H, W) averaged feature maps
    mean_abs_map: torch.Tensor  # (P, H, W) averaged absolute feature maps
    zero_fraction: torch.Tensor  # (P,) share of activation values that are exactly 0 (APoZ)

    @property
    def channels(self) -> int:
        return self.mean_map.shape[0]


class Engine:
    """Accuracies for any pruned set of one conv layer's channels, from one cached pass.

    Shared read-only between sessions and threads: nothing here is mutated after `__init__`.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str | None = None,
                 task: str = "multiclass", device: str | torch.device = "auto", batch_size: int = 1000,
                 progress: Progress | None = None, fast: bool = True, boundary_budget: int | None = None):
        self.device = pick_device(device) if isinstance(device, str) else device
        # The boundary tensors of a middle layer are kept up to this many bytes; batches beyond it
        # are recomputed through the prefix when evaluated (exact either way, slower).
        self.boundary_budget = boundary_budget if boundary_budget is not None else default_boundary_budget()
        self.model = copy.deepcopy(model).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layer = layer or default_layer(self.model)
        if self.layer not in conv_layer_names(self.model):
            raise ValueError(f"'{self.layer}' is not a Conv2d layer of this model. "
                             f"Conv layers: {', '.join(conv_layer_names(self.model))}.")
        self.conv: nn.Conv2d = self.model.get_submodule(self.layer)
        self.task, self.batch_size = task, batch_size
        self.x, self.y = x, y
        self._memo_locks: dict[tuple, threading.Lock] = {}  # one per memo entry, see `_memo`
        self._memo_locks_lock = threading.Lock()
        self.fast_reason = ""
        self._readouts = {}
        try:
            self._split: _Split | None = _Split(self.model, self.layer)
            self.bn_name = self._split.bn_name
        except Exception as exc:  # data-dependent control flow etc.: fall back, and say so
            self._split = None
            self.fast_reason = ("its forward pass cannot be followed operation by operation (it decides what to "
                                "do from its data, or calls code that cannot be traced), so it cannot be cut at "
                                "this layer")
            self.bn_name = _following_batchnorm(self.model, self.layer)
        if self._split is not None and fast:
            for mode, suffix in self._split.suffixes.items():
                readout, why = find_readout(suffix)
                if readout is not None:
                    self._readouts[mode] = ReadoutCache(readout, self.channels, task)
                else:
                    self.fast_reason = why
        self.boundary_bytes = 0  # the size of everything crossing the split, whether kept or not
        self.base_correct: int | None = None  # K = 0, counted during the one pass
        self.stats, self._cache = self._capture(progress)
        self._bounds = [(i, min(i + batch_size, self.total)) for i in range(0, self.total, batch_size)]
        if self.device.type == "cuda" and self._cache and None not in self._cache and \
                8 * self.boundary_bytes < torch.cuda.mem_get_info(self.device)[0]:
            # One chunk per evaluation on a GPU: ten launches of each kernel become one; and channels-last
            # convolutions (measured on an H200 at a middle layer of a CIFAR ResNet9: 38 -> 27 ms per K).
            self._cache = [tuple(_channels_last(torch.cat(parts)) for parts in zip(*self._cache))]
            self._bounds = [(0, self.total)]
            for suffix in self._split.suffixes.values():
                suffix.to(memory_format=torch.channels_last)
        self._rankings: dict[str, torch.Tensor] = {}
        self._curves: dict[tuple[str, str], list[int]] = {}
        self._answers: dict[tuple[str, str, int], int] = {}  # (mode, criterion, K) -> correct, once computed
        self._taylor: dict[str, torch.Tensor] = {}  # {"scores": ...} once computed

    @property
    def path(self) -> str:
        """Which evaluation path is in use, in words the UI shows."""
        if self._split is None:
            return PATH_HOOK
        return PATH_FAST if len(self._readouts) == len(MODES) else PATH_SPLIT

    @property
    def recomputed_batches(self) -> int:
        """Batches whose boundary did not fit the budget: their prefix runs again at each evaluation."""
        return sum(batch is None for batch in self._cache)

    def cache_bytes(self) -> int:
        """Memory held by the cached pass (boundary tensors and read-out features)."""
        held = [t for batch in self._cache if batch is not None for t in batch] + [t for r in self._readouts.values() for t in r.tensors()]
        unique = {t.data_ptr(): t for t in held}  # the `on` features are shared between modes
        return sum(t.numel() * t.element_size() for t in unique.values())

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    @property
    def total(self) -> int:
        return len(self.y)

    # -- the one pass -------------------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, progress: Progress | None):
        ones = torch.ones(self.channels, device=self.device)
        sums = abs_sums = zeros = None
        calls = 0
        cache = []
        base = 0
        batches = range(0, self.total, self.batch_size)
        for step, i in enumerate(batches):
            xb = self.x[i:i + self.batch_size].to(self.device)
            if self._split is not None:
                boundary = self._split.prefix(xb)
                self.boundary_bytes += sum(t.numel() * t.element_size() for t in boundary)
                logits, acts = self._split.suffixes["zero"](*boundary, ones)
                base += int((predictions(logits, self.task).cpu() == self.y[i:i + self.batch_size]).sum())
                self._add_readout_batch(boundary, logits, self.y[i:i + self.batch_size], first=step == 0)
                if len(self._readouts) < len(MODES):
                    kept = sum(t.numel() * t.element_size() for b in cache if b is not None for t in b)
                    size = sum(t.numel() * t.element_size() for t in boundary)
                    cache.append(boundary if kept + size <= self.boundary_budget else None)
            else:
                acts = self._hooked_activations(xb)
            for act in acts:
                s, a, z = act.double().sum(0), act.double().abs().sum(0), (act == 0).sum((0, 2, 3)).double()
                sums = s if sums is None else sums + s
                abs_sums = a if abs_sums is None else abs_sums + a
                zeros = z if zeros is None else zeros + z
            calls = len(acts)
            if progress:
                progress(step + 1, len(batches), "capturing activations")
        if self._split is not None:
            self.base_correct = base
        n = self.total * calls
        stats = ChannelStats((sums / n).float().cpu(), (abs_sums / n).float().cpu(),
                             (zeros / (n * sums[0].numel())).float().cpu())
        return stats, cache

    def _add_readout_batch(self, boundary, logits, labels, first: bool) -> None:
        ones = torch.ones(self.channels, device=self.device)
        zeros = torch.zeros(self.channels, device=self.device)
        on = None  # with every channel kept the features are the same in every mode: keep one copy
        for mode, cache in list(self._readouts.items()):
            zone = cache.readout.zone
            on = zone(*boundary, ones) if on is None else on
            try:
                cache.add_batch(on, zone(*boundary, zeros), labels)
            except ValueError as exc:
                del self._readouts[mode]
                self.fast_reason = f"the features the linear layer reads do not split evenly into this layer's {self.channels} channels"
                continue
            if first and not self._readout_agrees(mode, boundary, logits):
                del self._readouts[mode]
                self.fast_reason = (f"the fast read-out did not give the model's own answers on the first batch "
                                    f"({mode} mode), so each K is counted by running the rest of the network")

    def _readout_agrees(self, mode: str, boundary, logits) -> bool:
        """Belt and braces: on the first batch the fast path must give the suffix's own logits."""
        cache = self._readouts[mode]
        mask = (torch.arange(self.channels, device=self.device) % 3 != 0).float()
        expected, _ = self._split.suffixes[mode](*boundary, mask)
        got = cache.logits(cache.features(mask, cache.on[0], cache.off[0]))
        base = cache.logits(cache.on[0])
        return torch.allclose(got, expected, rtol=1e-4, atol=1e-5) and torch.allclose(base, logits, rtol=1e-4,
                                                                                       atol=1e-5)

    # -- ranking ------------------------------------------------------------------------------
    def ranking(self, criterion: str = "mean") -> torch.Tensor:
        """Channel indices in pruning order (rank 0 = pruned first). Computed once per criterion."""
        return self._memo(self._rankings, criterion, lambda: criteria.get(criterion).rank(self.facts()))

    def scores(self, criterion: str = "mean") -> torch.Tensor:
        return criteria.get(criterion).scores(self.facts())

    def facts(self) -> criteria.LayerFacts:
        """What the criteria may look at (they never see the engine itself)."""
        bn = self.model.get_submodule(self.bn_name) if self.bn_name else None
        return criteria.LayerFacts(self.stats.mean_map, self.stats.mean_abs_map, self.stats.zero_fraction,
                                   self.conv.weight.detach().cpu(),
                                   bn.weight.detach().cpu() if bn is not None and bn.weight is not None else None,
                                   self.taylor_scores)

    def taylor_scores(self) -> torch.Tensor:
        """Molchanov et al.'s first-order Taylor criterion: mean over images of |sum over positions of
        activation x d(loss)/d(activation)|; one forward and backward pass, computed once."""
        return self._memo(self._taylor, "scores", self._taylor_pass)

    def _taylor_pass(self) -> torch.Tensor:
        if self._split is None:
            raise ValueError("the Taylor criterion needs the model split at the layer, which torch.fx cannot "
                             "do for this model")
        from .train import task_loss

        total = torch.zeros(self.channels, dtype=torch.float64)
        ones = torch.ones(self.channels, device=self.device)
        n_sites = len(self._split.sites)
        for i in range(0, self.total, self.batch_size):
            with torch.no_grad():
                boundary = list(self._split.prefix(self.x[i:i + self.batch_size].to(self.device)))
            for j in range(n_sites):  # the conv outputs come first in the boundary
                boundary[j] = boundary[j].detach().requires_grad_()
            with torch.enable_grad():
                logits, acts = self._split.suffixes["zero"](*boundary, ones)
                # Summed, so that each image's gradient is that of its own loss.
                loss = task_loss(logits, self.y[i:i + self.batch_size].to(self.device), self.task) * len(logits)
                grads = torch.autograd.grad(loss, acts)
            effect = sum((a.detach().double() * g.double()).sum((2, 3)) for a, g in zip(acts, grads))
            total += effect.abs().sum(0).cpu()
        return (total / self.total).float()

    def mask_for(self, k: int, criterion: str = "mean") -> torch.Tensor:
        if not 0 <= k <= self.channels:
            raise ValueError(f"K must be between 0 and {self.channels}, got {k}.")
        mask = torch.ones(self.channels)
        mask[self.ranking(criterion)[:k]] = 0
        return mask

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def correct_for_mask(self, mask: torch.Tensor, mode: str = "zero") -> int:
        """Test images classified right with the channels where `mask == 0` pruned."""
        if mode not in MODES:
            raise ValueError(f"Unknown mode '{mode}'. Modes: {', '.join(MODES)}.")
        mask = mask.to(self.device, torch.float32)
        if mode in self._readouts:
            return self._readouts[mode].correct(mask)
        if self._split is None:
            return self._hooked_correct(mask, mode)
        return sum(self._batch_correct(j, mask, mode) for j in range(len(self._cache)))

    def _batch_correct(self, j: int, mask: torch.Tensor, mode: str, limit: int | None = None) -> int:
        """Right answers in cached chunk j (its first `limit` images only, if given)."""
        start, end = self._bounds[j]
        end = min(end, start + limit) if limit else end
        boundary = self._cache[j]
        if boundary is None:  # over the memory budget: run the prefix again for this batch
            boundary = self._split.prefix(self.x[start:end].to(self.device))
        elif limit:
            boundary = tuple(t[: end - start] for t in boundary)
        logits, _ = self._split.suffixes[mode](*boundary, mask)
        return int((predictions(logits, self.task).cpu() == self.y[start:end]).sum())

    @torch.no_grad()
    def predictions(self, k: int, mode: str = "zero", criterion: str = "mean") -> torch.Tensor:
        """The predicted class of every test image with the K lowest-ranked channels pruned (N,)."""
        mask = self.mask_for(k, criterion).to(self.device)
        if mode in self._readouts:
            cache = self._readouts[mode]
            return torch.cat([cache.predict(cache.logits(cache.features(mask, on, off))).cpu()
                              for on, off in zip(cache.on, cache.off)])
        if self._split is None:
            model = _masked_copy(self, mask, mode)
            return torch.cat([predictions(model(self.x[i:i + self.batch_size].to(self.device)), self.task).cpu()
                              for i in range(0, self.total, self.batch_size)])
        out = []
        for j, (start, end) in enumerate(self._bounds):
            boundary = self._cache[j] if self._cache[j] is not None else \
                self._split.prefix(self.x[start:end].to(self.device))
            out.append(predictions(self._split.suffixes[mode](*boundary, mask)[0], self.task).cpu())
        return torch.cat(out)

    def correct(self, k: int, mode: str = "zero", criterion: str = "mean") -> int:
        """Exact count with the K lowest-ranked channels pruned; remembered, so asking again is a lookup."""
        key = (mode, criterion, k)
        if k == 0 and self.base_correct is not None:  # nothing pruned: counted during the one pass
            return self.base_correct
        if key not in self._answers:
            curve = self._curves.get((mode, criterion))
            self._answers[key] = curve[k] if curve is not None else \
                self.correct_for_mask(self.mask_for(k, criterion), mode)
        return self._answers[key]

    def known(self, k: int, mode: str = "zero", criterion: str = "mean") -> int | None:
        """The exact count if it is already known (a lookup, never a computation)."""
        curve = self._curves.get((mode, criterion))
        if curve is not None:
            return curve[k]
        return self.base_correct if k == 0 and self.base_correct is not None else self._answers.get((mode, criterion, k))

    def answers(self, mode: str = "zero", criterion: str = "mean") -> dict[int, int]:
        """Every K whose exact count is known so far (the whole curve where it is computed)."""
        curve = self._curves.get((mode, criterion))
        if curve is not None:
            return dict(enumerate(curve))
        known = {k: c for (m, c_name, k), c in list(self._answers.items()) if m == mode and c_name == criterion}
        return {0: self.base_correct, **known} if self.base_correct is not None else known

    def readout(self, mode: str) -> ReadoutCache | None:
        """The cumulative-sum read-out of one mode, where it applies (the oracle and slim need its features)."""
        return self._readouts.get(mode)

    @torch.no_grad()
    def removed_channels_are_silent(self) -> bool:
        """In `remove` mode the batch norm's output is zeroed; the channels are then silent if what the
        statistics are taken on (the activation after it) is exactly zero: run on a few test images."""
        if self._split is None:
            return False
        boundary = self._split.prefix(self.x[:4].to(self.device))
        _, acts = self._split.suffixes["remove"](*boundary, torch.zeros(self.channels, device=self.device))
        return all(bool((a == 0).all()) for a in acts)

    def sample_answer(self, k: int, mode: str = "zero", criterion: str = "mean") -> "SampleAnswer":
        """The count on the first batch of test images only: a quick, labelled estimate while the
        exact count over every image is computed (a middle layer costs a suffix pass per K)."""
        return SampleAnswer(self.sample_correct(self.mask_for(k, criterion), mode), self.sample_size, self.total)

    @property
    def sample_size(self) -> int:
        return min(self.batch_size, self.total)

    @torch.no_grad()
    def sample_correct(self, mask: torch.Tensor, mode: str = "zero") -> int:
        """Right answers among the first batch of test images (`sample_size`) with `mask`'s zeros pruned."""
        mask, n = mask.to(self.device), self.sample_size
        if mode in self._readouts:
            cache = self._readouts[mode]
            return int((cache.predict(cache.logits(cache.features(mask, cache.on[0], cache.off[0])))
                        == cache.labels[0]).sum())
        if self._split is None:
            return count_correct(_masked_copy(self, mask, mode), self.x[:n], self.y[:n], self.task, self.device)
        return self._batch_correct(0, mask, mode, limit=n)

    def coarse_ks(self, points: int = 17) -> list[int]:
        """K at every 1/(points-1) of the channels (17 points: every 1/16), always with 0 and P."""
        return sorted({round(i * self.channels / (points - 1)) for i in range(points)})

    def unknown(self, mode: str = "zero", criterion: str = "mean") -> int:
        """How many Ks from 0 to P have no exact count yet."""
        return self.channels + 1 - len(self.answers(mode, criterion))

    def next_refinement(self, mode: str = "zero", criterion: str = "mean") -> int | None:
        """The K where one more exact count teaches most about the curve: the middle of the gap between
        two known neighbours that is widest times the accuracy change across it (plus one image, so a flat
        gap, which may hide a dip, is filled in its turn). None when no gap is left."""
        known = sorted(self.answers(mode, criterion).items())
        gaps = [((b - a) * (abs(cb - ca) + 1), (a + b) // 2)
                for (a, ca), (b, cb) in zip(known, known[1:]) if b - a > 1]
        return max(gaps)[1] if gaps else None

    def sweep(self, ks: Iterable[int], mode: str = "zero", criterion: str = "mean",
              progress: Progress | None = None) -> list[tuple[int, int]]:
        """(K, correct) for each K, pruning the K lowest-ranked channels."""
        ks = list(ks)
        bad = [k for k in ks if not 0 <= k <= self.channels]
        if bad:
            raise ValueError(f"K must be between 0 and {self.channels}, got {bad[0]}.")
        if mode in self._readouts:
            counts = self._readouts[mode].sweep(self.ranking(criterion).to(self.device), ks)
            if progress:
                progress(len(ks), len(ks), f"{mode} sweep")
            return list(zip(ks, counts))
        out = []
        for j, k in enumerate(ks):
            out.append((k, self.correct(k, mode, criterion)))
            if progress:
                progress(j + 1, len(ks), f"{mode} sweep")
        return out

    def sweep_order(self, order: Sequence[int], ks: Iterable[int], mode: str = "zero") -> list[tuple[int, int]]:
        """(K, correct) pruning the first K channels of an explicit order (an oracle's, say)."""
        ks, order_t = list(ks), torch.as_tensor(list(order), dtype=torch.long)
        if mode in self._readouts:
            return list(zip(ks, self._readouts[mode].sweep(order_t.to(self.device), ks)))
        out = []
        for k in ks:
            mask = torch.ones(self.channels)
            mask[order_t[:k]] = 0
            out.append((k, self.correct_for_mask(mask, mode)))
        return out

    def curve(self, mode: str = "zero", criterion: str = "mean", progress: Progress | None = None) -> list[int]:
        """Correct counts for every K from 0 to P; computed once per (mode, criterion), then shared."""
        return self._memo(self._curves, (mode, criterion),
                          lambda: [c for _, c in self.sweep(range(self.channels + 1), mode, criterion, progress)])

    def _memo(self, table: dict, key, compute: Callable[[], Any]):
        """`table[key]`, computed once. A value already there is read without waiting; callers of the
        same missing key wait for one computation; other keys never wait: a student's lookup of a ready
        curve must not wait behind the warm-up computing another criterion's (seconds under load)."""
        if key in table:  # a dict read is atomic; entries are only ever added
            return table[key]
        with self._memo_locks_lock:
            lock = self._memo_locks.setdefault((id(table), key), threading.Lock())
        with lock:
            if key not in table:
                table[key] = compute()
            return table[key]

    @torch.no_grad()
    def reranked_order(self, steps: int, mode: str = "remove", criterion: str = "mean") -> list[int]:
        """The re-ranking procedure of the second pruning report, really done: after each prune, run the test set again through the
        pruned model, re-rank the channels still there, prune the lowest. (It costs a full pass per
        step; `ranking` gives the same order for activation criteria, which is what this shows.)"""
        if self._split is None:
            raise ValueError("re-ranking needs the fx split; this model uses the hook fallback")
        if criterion not in ("mean", "mean_abs"):
            raise ValueError("re-ranking is defined for the activation criteria (mean, mean_abs)")
        pruned: list[int] = []
        mask = torch.ones(self.channels, device=self.device)
        for _ in range(steps):
            sums, calls = None, 0
            for i in range(0, self.total, self.batch_size):
                _, acts = self._split.suffixes[mode](*self._split.prefix(self.x[i:i + self.batch_size].to(self.device)),
                                                     mask)
                for act in acts:  # the same arithmetic as the capture, so equal values stay equal
                    a = (act.double().abs() if criterion == "mean_abs" else act.double()).sum(0)
                    sums = a if sums is None else sums + a
                calls = len(acts)
            scores = (sums / (self.total * calls)).float().cpu().flatten(1).mean(1)
            scores[pruned] = float("inf")  # already pruned: not candidates again
            nxt = int(torch.argmin(scores))  # first minimum: ties by channel index, as `ranking`
            pruned.append(nxt)
            mask[nxt] = 0
        return pruned

    # -- fallback for models fx cannot trace: hooks on a private copy per call ----------------
    def _hooked_activations(self, xb: torch.Tensor) -> list[torch.Tensor]:
        acts: list[torch.Tensor] = []
        model = self.model
        target = _activation_after(model, self.layer, self.bn_name)
        # Only called while the engine is being built, before anyone else can see its model.
        handle = target.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
        try:
            model(xb)
        finally:
            handle.remove()
        return acts

    def _hooked_correct(self, mask: torch.Tensor, mode: str) -> int:
        return count_correct(_masked_copy(self, mask, mode), self.x, self.y, self.task, self.device, self.batch_size)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _masked_copy(eng: Engine, mask: torch.Tensor, mode: str) -> nn.Module:
    model = copy.deepcopy(eng.model)  # hooks go on a private copy, never on the shared one
    where = model.get_submodule(eng.bn_name) if (mode == "remove" and eng.bn_name) else model.get_submodule(eng.layer)
    where.register_forward_hook(lambda m, i, o: o * mask.view(1, -1, 1, 1))
    return model


@dataclass(frozen=True)
class SampleAnswer:
    """Accuracy on a fixed sample of the test set, with a 95% Wilson interval for the whole set."""

    correct: int
    n: int
    total: int  # images in the whole test set

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        p, n = self.accuracy, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def default_boundary_budget() -> int:
    """Bytes of boundary tensors one middle-layer engine keeps (PRUNE_EXPLORER_MAX_BOUNDARY_GB, default 1)."""
    import os

    return int(float(os.environ.get("PRUNE_EXPLORER_MAX_BOUNDARY_GB", 1)) * 2**30)


def _following_batchnorm(model: nn.Module, layer: str) -> str | None:
    """Without a graph: the BatchNorm registered right after the conv, if its width matches."""
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    i = names.index(layer)
    nxt = names[i + 1] if i + 1 < len(names) else None
    if nxt and isinstance(mods[nxt], BATCHNORMS) and mods[nxt].num_features == mods[layer].out_channels:
        return nxt
    return None


def _activation_after(model: nn.Module, layer: str, bn_name: str | None) -> nn.Module:
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    anchor = bn_name or layer
    i = names.index(anchor)
    if i + 1 < len(names) and isinstance(mods[names[i + 1]], ACTIVATION_MODULES):
        return mods[names[i + 1]]
    return mods[anchor]


# ---------------------------------------------------------------------------------------------
# The naive procedure (copy the model, zero the weights, evaluate everything): the reference every
# fast path must equal.

@torch.no_grad()
def prune_copy(model: nn.Module, layer: str, channels: Sequence[int], mode: str,
               bn_name: str | None) -> nn.Module:
    """A copy of the model with the channels' weights really zeroed, as the reports did."""
    pruned = copy.deepcopy(model).eval()
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    conv = pruned.get_submodule(layer)
    conv.weight[idx] = 0
    if conv.bias is not None:
        conv.bias[idx] = 0
    if mode == "remove" and bn_name is not None:
        bn = pruned.get_submodule(bn_name)
        bn.weight[idx], bn.bias[idx] = 0, 0
        bn.running_mean[idx], bn.running_var[idx] = 0, 1
    return pruned


def naive_correct(engine: Engine, k: int, mode: str = "zero", criterion: str = "mean") -> int:
    channels = engine.ranking(criterion)[:k].tolist()
    pruned = prune_copy(engine.model, engine.layer, channels, mode, engine.bn_name)
    return count_correct(pruned, engine.x, engine.y, engine.task, engine.device, engine.batch_size)


def from_checkpoint(ckpt, layer: str | None = None, device: str = "auto", data_root: str | None = None,
                    progress: Progress | None = None, split=None) -> Engine:
    """The engine for a checkpoint on its data set's test split (or on `split`, e.g. one's own images)."""
    from . import data

    split = split if split is not None else ckpt.split(train=False, data_root=data_root)
    return Engine(ckpt.build_model(), split.x, split.y, layer=layer, task=ckpt.spec.task,
                  device=device, progress=progress)


@dataclass(frozen=True)
class ConvInfo:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    out_shape: tuple[int, ...]  # (C, H, W) for one sample

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        return f"{self.name}: {self.in_channels}->{self.out_channels}, {k} kernel, output {'x'.join(map(str, self.out_shape))}"


@torch.no_grad()
def conv_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[ConvInfo]:
    """Every Conv2d with its output shape, from one zero sample through a private copy of the model."""
    model = copy.deepcopy(model).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    def record(name):
        def hook(module, inputs, output):  # returns None, so the output is left as it is
            shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return [ConvInfo(n, m.in_channels, m.out_channels, tuple(m.kernel_size), shapes.get(n, ()))
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
