"""Where a conv layer sits in a model: the conv layers and their output shapes, and the fx split.

The split cuts the traced model at the conv: `prefix(x)` returns every tensor the rest of the
network reads from before the cut (the conv's output first, a residual input too), and each mode's
`suffix(*boundary, mask)` computes the logits with the conv's output channels multiplied by `mask`
(after the batch norm in `remove` mode), plus the activations the statistics are taken on.
Pruning never changes what comes before the conv, so the prefix runs once per image.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .graph import ACTIVATION_MODULES, BATCHNORMS, compact, is_activation, is_batchnorm, sole_user
from .hooks import hooks

MODES = {
    "zero": "Set the pruned filters' weights and bias to zero. A BatchNorm after the conv still adds its "
            "constant shift, so the channel is not silent.",
    "remove": "Silence the pruned channels: the conv filter and its BatchNorm scale and shift are zeroed, so "
              "the channel outputs exactly 0, as if the filter were removed.",
}


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def default_layer(model: nn.Module) -> str:
    names = conv_layer_names(model)
    if not names:
        raise ValueError("This model has no Conv2d layer, so there are no channels to prune.")
    return names[-1]


@dataclass
class ConvSite:
    """One call of the pruned conv in the traced graph and what follows it."""

    conv: fx.Node
    batchnorm: fx.Node | None  # the BatchNorm right after it, zeroed too in `remove` mode
    activation: fx.Node        # where the statistics are taken (the conv/BN output if no activation)


def conv_sites(gm: fx.GraphModule, layer: str) -> list[ConvSite]:
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


class Split:
    """The traced model cut at the conv: `prefix(x) -> boundary`, `suffix(*boundary, mask) -> (logits, acts)`."""

    def __init__(self, model: nn.Module, layer: str):
        # A program's module is a graph already: tracing it again would lose what each node records
        # (the user's module path, the shapes), which the reasons shown to the user are made of.
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        self.sites = conv_sites(gm, layer)
        self.channels: int = gm.get_submodule(layer).out_channels
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
        self.batch_sizes = [b for b in boundary if is_batch_size(b)]
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


def is_batch_size(node: fx.Node) -> bool:
    """`x.size(0)` or `aten.sym_size.int(x, 0)`: an int that is the batch size (the one dimension a
    program leaves free), not a tensor."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim != 0 or not ((node.op == "call_function" and node.target == torch.ops.aten.sym_size.int)
                        or (node.op == "call_method" and node.target == "size")):
        return False
    return not isinstance(node.meta.get("val"), int)  # a fixed size would be a plain int here


def following_batchnorm(model: nn.Module, layer: str) -> str | None:
    """Without a graph: the BatchNorm registered right after the conv, if its width matches."""
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    i = names.index(layer)
    nxt = names[i + 1] if i + 1 < len(names) else None
    if nxt and isinstance(mods[nxt], BATCHNORMS) and mods[nxt].num_features == mods[layer].out_channels:
        return nxt
    return None


def activation_after(model: nn.Module, layer: str, bn_name: str | None) -> nn.Module:
    """Without a graph: the activation module registered right after the conv (or its batch norm), else that layer."""
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    anchor = bn_name or layer
    i = names.index(anchor)
    if i + 1 < len(names) and isinstance(mods[names[i + 1]], ACTIVATION_MODULES):
        return mods[names[i + 1]]
    return mods[anchor]


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

    with hooks((m, record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)):
        model(torch.zeros(1, *input_shape))
    return [ConvInfo(n, m.in_channels, m.out_channels, tuple(m.kernel_size), shapes.get(n, ()))
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
