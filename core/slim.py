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
    """A new model with the K lowest-ranked channels of the engine's layer cut out."""
    import torch_pruning as tp

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
    example = torch.zeros(1, *eng.x.shape[1:])
    for p in model.parameters():  # the dependency graph is traced through autograd
        p.requires_grad_(True)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    conv = model.get_submodule(eng.layer)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=channels)
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


def measure(model: nn.Module, input_shape: tuple[int, ...], batches=(1, 256), repeats: int = 20,
            devices=("cpu",)) -> Measured:
    """Parameters, MACs (PyTorch's FlopCounterMode: 2 FLOPs per multiply-add), file size of the state
    dict, and median latency over `repeats` runs after warm-up, per device and batch size."""
    model = copy.deepcopy(model).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    latency = {}
    for device in devices:
        m = model.to(device)
        for batch in batches:
            x = torch.randn(batch, *input_shape, device=device)
            with torch.no_grad():
                for _ in range(3):
                    m(x)
                times = []
                for _ in range(repeats):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    m(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            latency[(device, batch)] = 1000 * statistics.median(times)
    return Measured(params, counter.get_total_flops() // 2, len(buf.getvalue()), latency)
