"""What the engine needs to know about the nodes of a traced graph: one place for the fx helpers.

A graph comes either from `torch.fx.symbolic_trace` of a registered model (modules, torch
functions, tensor methods) or from a `torch.export` program (ATen operators, see `core/program.py`).
Both kinds of node are classified here: which are activations (the statistics are taken after
them), which work channel by channel (the cumulative-sum read-out may pass through them), and
which ATen operators an uploaded program may use at all (`ALLOWED_ATEN`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

# -- modules and torch functions (symbolic_trace of a registered model) -------------------------
ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
                      nn.Hardswish, nn.Hardsigmoid, nn.PReLU, nn.Sigmoid, nn.Tanh)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATION_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, F.relu6, F.elu, F.gelu, F.silu, F.hardswish,
                         torch.sigmoid, torch.tanh}
_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}
_PER_CHANNEL_MODULES = BATCHNORMS + ACTIVATION_MODULES + (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                                          nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
                                                          nn.Identity)
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                          torch.mul, torch.div, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.max_pool2d_with_indices,
                          F.adaptive_max_pool2d_with_indices} | _ACTIVATION_FUNCTIONS
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "size", "contiguous", "add", "sub", "mul", "div"}

# -- ATen operators (torch.export programs) ---------------------------------------------------
# Layers: turned into nn.Conv2d / nn.BatchNorm2d / nn.Linear modules when a program is loaded.
ATEN_LAYERS = {aten.conv2d.default, aten.batch_norm.default, aten.linear.default}
ATEN_ACTIVATIONS = {aten.relu.default, aten.leaky_relu.default, aten.hardtanh.default, aten.relu6.default,
                    aten.elu.default, aten.selu.default, aten.gelu.default, aten.silu.default,
                    aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default, aten.sigmoid.default,
                    aten.tanh.default, aten.prelu.default}
# Channel by channel: each output channel reads only the same channel of each input.
_ATEN_PER_CHANNEL = ATEN_ACTIVATIONS | {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.abs.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
    aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_max_pool2d.default, aten.max_pool2d_with_indices.default, aten.sym_size.int,
}
# Per channel, but they give (values, indices): the read-out passes through the `getitem` of either.
_POOLS_WITH_INDICES = {aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default,
                       F.max_pool2d_with_indices, F.adaptive_max_pool2d_with_indices}
_ATEN_REDUCTIONS = {aten.mean.dim, aten.amax.default, aten.sum.dim_IntList}  # per channel over H, W only
_ATEN_RESHAPES = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Allowed, but they mix or move channels (the split path handles them, the read-out stops there).
_ATEN_OTHER = {
    aten.cat.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.pad.default,
    aten.constant_pad_nd.default, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten.softmax.int, aten.log_softmax.int, aten._softmax.default, aten._log_softmax.default,
    aten.layer_norm.default, aten.group_norm.default, aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec, aten.pixel_shuffle.default, aten.channel_shuffle.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.pow.Tensor_Scalar, aten.sqrt.default, aten.rsqrt.default, aten.exp.default, aten.log.default,
    aten.max.dim, aten.min.dim, aten.sum.default, aten.mean.default,
    aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
}
_PYTHON_OPS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
               operator.mod, operator.neg}
ALLOWED_ATEN = ATEN_LAYERS | _ATEN_PER_CHANNEL | _ATEN_REDUCTIONS | _ATEN_RESHAPES | _ATEN_OTHER | _PYTHON_OPS


def _inplace_variants() -> dict:
    """`aten.relu_.default` -> `aten.relu.default`, for every allowed operator that has an in-place twin.

    torch.export keeps the in-place variants torchvision's modules call (`ReLU(inplace=True)`,
    `out += identity`); a program is made functional with this table before it is checked
    (`core.program.functionalize`), so the list of operators lives here only."""
    table = {}
    for op in ALLOWED_ATEN:
        if not isinstance(op, torch._ops.OpOverload) or op.name().startswith("aten::_"):
            continue
        if op in ALIASING_ATEN:  # t_, squeeze_...: they change a tensor's shape, not its values
            continue
        packet = getattr(aten, op.overloadpacket.__name__ + "_", None)
        twin = getattr(packet, op._overloadname, None) if packet is not None else None
        if isinstance(twin, torch._ops.OpOverload):
            table[twin] = op
    return table


# Operators whose output may share memory with their first input: an in-place write through one of
# them would change another tensor too, which a functional rewrite cannot express.
ALIASING_ATEN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                 aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
                 aten.chunk.default, aten.permute.default, aten.transpose.int, aten.t.default,
                 aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                 aten.expand.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
                 operator.getitem}
INPLACE_TO_FUNCTIONAL = _inplace_variants()


def op_name(target) -> str:
    """A target as a user would recognise it: `aten.conv2d.default`, `operator.getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', repr(target))}".lstrip(".")


# -- node tests ---------------------------------------------------------------------------------

def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(gm, node), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS or node.target in ATEN_ACTIVATIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), BATCHNORMS)


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), nn.Linear)


def sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _spatial_dims(dims) -> bool:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return all(isinstance(d, int) and (d >= 2 or d in (-1, -2)) for d in dims)


def _flattens_channels_last(node: fx.Node) -> bool:
    """flatten(x, 1) or x.view(x.size(0), -1): channel-major blocks of features, one block per channel."""
    start = (node.args[1:2] or [node.kwargs.get("start_dim", 0)])[0]
    if node.op == "call_function" and node.target in (torch.flatten, aten.flatten.using_ints):
        return start == 1 and (node.args[2:3] or [-1])[0] == -1
    if node.op == "call_method" and node.target == "flatten":
        return start == 1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        return len(node.args) == 3 and node.args[2] == -1
    if node.op == "call_function" and node.target in _ATEN_RESHAPES:  # view(x, [batch, features])
        shape = node.args[1] if len(node.args) > 1 else None
        return isinstance(shape, (list, tuple)) and len(shape) == 2
    return False


def is_per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Each output channel (or, after flattening, each block of features) reads one input channel."""
    if node.op == "call_module":
        module = module_of(gm, node)
        if isinstance(module, nn.Flatten):
            return module.start_dim == 1
        return isinstance(module, _PER_CHANNEL_MODULES)
    if node.op == "call_function":
        if node.target is operator.getitem:  # the values or the indices of a max-pool: one per channel
            source = node.args[0]
            return isinstance(source, fx.Node) and source.op == "call_function" \
                and source.target in _POOLS_WITH_INDICES and node.args[1] in (0, 1)
        if node.target in _ATEN_REDUCTIONS:
            return _spatial_dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        return (node.target in _ELEMENTWISE_FUNCTIONS or node.target in _ATEN_PER_CHANNEL
                or _flattens_channels_last(node))
    if node.op == "call_method":
        if node.target in ("mean", "amax", "sum"):
            return _spatial_dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        return node.target in _ELEMENTWISE_METHODS or _flattens_channels_last(node)
    return False


def compact(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule of `graph` over `root`'s submodules, without the nodes nothing reads."""
    module = fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


# -- nodes in words: what a user sees names their own module paths, never fx node names ----------

_OP_WORDS = {
    aten.cat.default: "a concatenation of channels", aten.max_pool2d_with_indices.default: "a max-pool",
    aten.layer_norm.default: "a layer norm (it mixes the channels of each position)",
    aten.group_norm.default: "a group norm (it mixes the channels of each group)",
    aten.permute.default: "a permutation of the dimensions", aten.transpose.int: "a transpose",
    aten.channel_shuffle.default: "a channel shuffle", aten.pixel_shuffle.default: "a pixel shuffle",
    aten.matmul.default: "a matrix product", aten.mm.default: "a matrix product",
    aten.addmm.default: "a matrix product", aten.bmm.default: "a matrix product",
    aten.softmax.int: "a softmax", aten._softmax.default: "a softmax", aten.log_softmax.int: "a log-softmax",
    aten._log_softmax.default: "a log-softmax", aten.conv2d.default: "a convolution with computed weights",
    aten.mean.default: "an average over every value", aten.sum.default: "a sum over every value",
    aten.view.default: "a reshape", aten.reshape.default: "a reshape", aten._unsafe_view.default: "a reshape",
    aten.flatten.using_ints: "a flatten", aten.slice.Tensor: "a slice", aten.select.int: "a selection",
    aten.split.Tensor: "a split", aten.split_with_sizes.default: "a split", aten.chunk.default: "a split",
    aten.linear.default: "a linear layer with computed weights", aten.mul.Tensor: "a product of two tensors",
    torch.cat: "a concatenation of channels", torch.flatten: "a flatten", torch.matmul: "a matrix product",
    operator.getitem: "a selection of part of a tensor",
}
_METHOD_WORDS = {"view": "a reshape", "reshape": "a reshape", "flatten": "a flatten", "permute":
                 "a permutation of the dimensions", "transpose": "a transpose", "chunk": "a split",
                 "split": "a split", "mean": "an average", "sum": "a sum", "matmul": "a matrix product"}


def op_words(target) -> str:
    """An operator as a lecturer would say it: "a concatenation of channels", "the in-place ReLU"."""
    if target in _OP_WORDS:
        return _OP_WORDS[target]
    if isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
        return f"the in-place {name[:-1]}" if name.endswith("_") and not name.startswith("_") else f"the {name}"
    return f"the {getattr(target, '__name__', 'operation')}"


def described_op(target) -> str:
    """The words and, in brackets, the operator's own name, for a refusal a user may look up."""
    return f"{op_words(target)} (`{op_name(target)}`)"


def module_path(node: fx.Node) -> str:
    """` in `layer4.1.conv2``: where the user's code made this node (empty where nothing says)."""
    if node.op == "call_module":
        return f" in `{node.target}`"
    stack = node.meta.get("nn_module_stack") or {}
    paths = [entry[0] for entry in stack.values() if isinstance(entry, tuple) and entry and entry[0]]
    return f" in `{paths[-1]}`" if paths else ""


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """One node in words with its module path: "a concatenation of channels in `blocks.2`"."""
    if node.op == "call_module":
        return f"the {type(module_of(gm, node)).__name__} `{node.target}`"
    if node.op == "call_method":
        return _METHOD_WORDS.get(node.target, f"the tensor method `{node.target}`") + module_path(node)
    if node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return describe_node(gm, node.args[0])  # a part of a tuple: say what made the tuple
        return op_words(node.target) + module_path(node)
    return f"the graph's {node.op}"
