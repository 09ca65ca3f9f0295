"""Realise: remove the pruned channels for real, and measure the original and the slim model.

Torch-Pruning's dependency graph (DepGraph, Fang et al. CVPR 2023) finds every layer that must
shrink with the pruned conv: its batch norm, the input channels of whatever reads it, and, through
a residual add or a concatenation, the layers tied to it. Removing a channel is exact only when
nothing else shares it: a shortcut that carries the block's input around the pruned conv keeps that
channel alive in the masked model, so removing it for real would change the model (the result says
so and gives the slim model's own accuracy).

In `zero` mode a pruned channel is not silent: its batch norm still emits a constant. Where the
pruned layer reads out through a linear layer (the engine's fast path) that constant's contribution
is folded into the linear layer's bias, so the slim model computes the same logits.
"""
from __future__ import annotations

import copy
import inspect
import io
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .engine import Engine
from .naive import prune_copy


@dataclass
class SlimResult:
    model: nn.Module
    shrunk: list[str]            # every layer Torch-Pruning shrank, "name: what"
    tied: list[str] = field(default_factory=list)  # layers beyond the conv, its batch norm and its readers
    folded: bool = False         # zero mode: the constant was folded into the linear layer's bias

    @property
    def exact(self) -> bool:
        """The slim model computes what the masked model computes."""
        return not self.tied


def _fold_constant(model: nn.Module, eng: Engine, channels: list[int], mode: str) -> bool:
    """Add the pruned channels' constant read-out features (x the linear weights) to the linear bias."""
    cache = eng.readout(mode)
    if cache is None or not cache.linear:
        return False
    block = cache.pruned_constant(channels)                  # (K, S): what the pruned channels still send
    if block is None:
        return False
    p, s = eng.channels, block.shape[1]
    linear_name = next(n for n, m in eng.model.named_modules() if m is cache.linear_layer)
    linear = model.get_submodule(linear_name)
    weight = linear.weight.detach().view(linear.out_features, p, s)[:, channels]   # (out, K, S)
    extra = torch.einsum("oks,ks->o", weight.double(), block.double().to(weight.device))
    with torch.no_grad():
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features))
        linear.bias += extra.to(linear.bias.dtype)
    return True


def slim(eng: Engine, k: int, mode: str = "remove", criterion: str = "mean") -> SlimResult:
    """A new model with the K lowest-ranked channels of the engine's layer cut out (0 <= K < channels)."""
    _check_k(eng, k)
    channels = eng.ranking(criterion)[:k].tolist()
    model = prune_copy(eng.model, eng.layer, channels, mode, eng.bn_name).cpu().eval()
    folded = False
    if mode == "zero":
        folded = _fold_constant(model, eng, channels, mode)
        if not folded:
            raise ValueError("In zero mode a pruned channel still emits its batch norm's constant, which can only be "
                             "folded into a linear read-out right after the layer; use remove mode here.")
    elif not eng.removed_channels_are_silent():
        raise ValueError("The activation after this layer is not zero at zero, so a removed channel would still "
                         "emit a constant; this layer cannot be removed exactly.")
    if not channels:
        return SlimResult(copy.deepcopy(model), [], [], folded)
    group = _pruning_group(model, eng, channels)
    names = {m: n for n, m in model.named_modules()}
    shrunk, tied = [], []
    own = {eng.layer, eng.bn_name}
    for dep, _ in group:
        module = dep.target.module
        name = names.get(module, str(dep.target.name))
        what = dep.handler.__name__ if hasattr(dep.handler, "__name__") else type(dep.handler).__name__
        if not name.startswith("_"):  # Torch-Pruning's own bookkeeping nodes (reshape, ReLU) are not layers
            shrunk.append(f"{name}: {what.replace('prune_', '').replace('_', ' ')}")
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) and name not in own and "out_channels" in what:
            tied.append(name)
        if isinstance(module, nn.BatchNorm2d) and name not in own:
            tied.append(name)
    group.prune()
    for p in model.parameters():
        p.requires_grad_(False)
    return SlimResult(model, list(dict.fromkeys(shrunk)), list(dict.fromkeys(tied)), folded)


def _check_k(eng: Engine, k: int) -> None:
    # A conv with no output channels is no layer (PyTorch refuses a weight of size [0, ...]); the masked
    # model at K = P is still shown on the curve, where its read-out is a constant.
    if not 0 <= k < eng.channels:
        raise ValueError(f"K = {k}: removing for real keeps at least one of the layer's {eng.channels} channels, "
                         f"so K goes from 0 to {eng.channels - 1} here; a conv with no channels is no layer.")


def removed_per_channel(eng: Engine) -> int:
    """Parameters that removing one channel of the engine's layer takes away, counted by Torch-Pruning on a
    copy: the filter, its bias and batch norm, and every reader's weights for that channel (the linear
    read-out's columns, the next conv's input slice). Every channel of a layer costs the same, so K
    channels remove K times this: the number the slider shows is the slim model's count."""
    model = copy.deepcopy(eng.model).cpu().eval()
    before = sum(p.numel() for p in model.parameters())
    _pruning_group(model, eng, [0]).prune()
    return before - sum(p.numel() for p in model.parameters())


def _pruning_group(model: nn.Module, eng: Engine, channels: list[int]):
    """Torch-Pruning's group of every layer that shrinks with these output channels of the engine's layer."""
    import torch_pruning as tp

    for p in model.parameters():  # the dependency graph is traced through autograd
        p.requires_grad_(True)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *eng.x.shape[1:]))
    return graph.get_pruning_group(model.get_submodule(eng.layer), tp.prune_conv_out_channels, idxs=channels)


def widths(arch: str, arch_kwargs: dict, model: nn.Module) -> dict | None:
    """The constructor arguments of a registered architecture that build exactly the slim model's
    shapes (the VGG-style model's `width` for its last conv, the ResNet-style model's `width` or
    `bottleneck`), or None where no single integer argument says this layer's width."""
    from . import models

    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = models.shapes(arch, arch_kwargs)
    if before == want:  # nothing was removed
        return dict(arch_kwargs)
    narrowed = {t for key, shape in want.items() if before.get(key) != shape for t in shape}  # shrunk tensors' sizes
    params = inspect.signature(models.REGISTRY[arch].builder).parameters
    for name, param in params.items():
        value = arch_kwargs.get(name, param.default)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        for width in sorted(narrowed):
            kwargs = {**arch_kwargs, name: width}
            try:
                if width != value and models.shapes(arch, kwargs) == want:
                    return kwargs
            except (TypeError, ValueError, RuntimeError):  # a value this builder refuses
                continue
    return None


@dataclass(frozen=True)
class Measured:
    parameters: int
    macs: int
    file_bytes: int
    latency_ms: dict  # {(device, batch): median ms}
    spread_ms: dict = field(default_factory=dict)  # {(device, batch): (25th, 75th percentile) ms}
    runs: int = 0     # timed runs per (device, batch)

    def latency_text(self, dev_batch: tuple) -> str:
        """"12.34 (11.9-12.8)": the median and the middle half of the runs."""
        low, high = self.spread_ms.get(dev_batch, (self.latency_ms[dev_batch],) * 2)
        return f"{self.latency_ms[dev_batch]:.2f} ({low:.2f}-{high:.2f})"


def measure(model: nn.Module, input_shape: tuple[int, ...], batches=(1, 256), repeats: int = 20,
            devices=("cpu",)) -> Measured:
    """`measure_together` of one model."""
    return measure_together([model], input_shape, batches, repeats, devices)[0]


def measure_together(models: list[nn.Module], input_shape: tuple[int, ...], batches=(1, 256), repeats: int = 20,
                     devices=("cpu",), max_repeats: int | None = None, max_seconds: float = 20.0) -> list[Measured]:
    """Parameters, MACs (PyTorch's FlopCounterMode: 2 FLOPs per multiply-add), state-dict file size, and
    latency per device and batch size. The models are timed in turns (one run of each, then again), so
    a burst of other work on a shared server slows all of them alike instead of making one look fast;
    at least `repeats` turns, more (up to `max_repeats`, default 3 x repeats, and `max_seconds`) while
    any model's middle half of runs is wider than a fifth of its median."""
    models = [copy.deepcopy(m).eval() for m in models]
    latency: list[dict] = [{} for _ in models]
    spread: list[dict] = [{} for _ in models]
    runs = 0
    for device in devices:
        on = [m.to(device) for m in models]
        for batch in batches:
            x = torch.randn(batch, *input_shape, device=device)
            times = _timed_in_turns(on, x, device, repeats, max_repeats or 3 * repeats, max_seconds)
            for i, t in enumerate(times):
                q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
                latency[i][(device, batch)] = 1000 * statistics.median(t)
                spread[i][(device, batch)] = (1000 * q[0], 1000 * q[2])
                runs = len(t)
    return [Measured(*_size(m.cpu(), input_shape), latency[i], spread[i], runs) for i, m in enumerate(models)]


def _size(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return params, counter.get_total_flops() // 2, len(buf.getvalue())


def _timed_in_turns(models: list[nn.Module], x: torch.Tensor, device: str, repeats: int, max_repeats: int,
                    max_seconds: float) -> list[list[float]]:
    def once(m: nn.Module) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        m(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: list[list[float]] = [[] for _ in models]
    began = time.perf_counter()
    with torch.no_grad():
        for m in models:  # warm-up
            for _ in range(3):
                m(x)
        while True:
            for m, t in zip(models, times):
                t.append(once(m))
            n = len(times[0])
            if n >= max_repeats or (n >= repeats and (not _noisy(times) or time.perf_counter() - began > max_seconds)):
                return times


def _noisy(times: list[list[float]]) -> bool:
    for t in times:
        if len(t) < 2:
            return True
        q = statistics.quantiles(t, n=4)
        if q[2] - q[0] > 0.2 * statistics.median(t):
            return True
    return False
