"""Whole-model programs written by `torch.export.save` (`.pt2`): read safely, check, make prunable.

A `.pt2` file carries the graph and the weights together, so a model of any architecture loads
without importing anyone's Python code. But `torch.export.load` is not safe on an untrusted file:
it unpickles some members with full Python when the weights-only unpickler refuses them, it
evaluates the graph's symbolic shape expressions with `sympy.sympify` (an `eval`), and
`ExportedProgram.module()` executes the file's guard code. So this module never calls either:
- it reads the archive member by member: tensors stored raw are read as raw bytes; every pickled
  member (a weight saved with pickle, the sample inputs, a legacy weights file) goes through
  `torch.load(weights_only=True)` with no fallback; members that can only be read by running code
  (TorchScript and opaque objects) are refused;
- before torch's deserializer sees the graph, every symbolic expression in it is parsed with
  Python's `ast` and checked to be plain arithmetic over shape symbols;
- the deserialized graph may only use the ATen operators in `core.graph.ALLOWED_ATEN`;
- the module the engine runs is rebuilt here from that graph (no guard code): every conv, batch
  norm and linear call becomes an `nn.Conv2d` / `nn.BatchNorm2d` / `nn.Linear` named by the module
  path the user wrote (`layer4.1.conv2`), so the engine prunes it like a registered model's layer.
"""
from __future__ import annotations

import ast
import copy
import io
import json
import re
import zipfile
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from . import untrusted
from .graph import ALIASING_ATEN, ALLOWED_ATEN, INPLACE_TO_FUNCTIONAL, aten, described_op, module_path, op_name

MAX_UNCOMPRESSED_BYTES = 2 * 2**30  # the whole archive, unpacked
MAX_GRAPH_BYTES = 64 * 2**20        # the graph's JSON
MAX_EXPR_CHARS = 2000                # one symbolic shape expression
MAX_CONV_ARG = 64                    # a convolution's stride, padding or dilation
MAX_INPUT_CHANNELS = 16              # of one input image
MAX_INPUT_SIDE = 1024                # height or width of one input image, in pixels
MAX_OUTPUTS = 1000                   # logits per image (ImageNet's classes)
MAX_SAMPLE_BYTES = 16 * 2**20        # the sample inputs saved beside the program

DYNAMIC_BATCH_HINT = ("export it with a dynamic batch dimension: torch.export.export(model.eval(), (example,), "
                      "dynamic_shapes=({0: torch.export.Dim('batch')},))")


# How a user exports their own model (the README shows the same lines; tests/test_zoo.py runs them).
EXPORT_LINES = """import json, torch
model.eval()  # batch norm in inference mode
example = torch.zeros(2, 1, 28, 28)  # two images of the size your model takes
meta = {"input": {"scale": "0-1", "mean": [0.2860], "std": [0.3530]}}  # how its images were prepared
# trained on pixels in [0, 1] without normalising: meta = {"input": {"scale": "0-1", "normalize": None}}
program = torch.export.export(model, (example,),
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
torch.export.save(program, "model.pt2", extra_files={"meta.json": json.dumps(meta)})"""


class ProgramError(ValueError):
    """A `.pt2` file that is refused; the message says why in one sentence."""


def is_program(data: bytes) -> bool:
    """A zip whose members include `archive_format` (torch.save's zips do not)."""
    if data[:4] != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return any(n == "archive_format" or n.endswith("/archive_format") for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


# ---------------------------------------------------------------------------------------------
# Reading the archive

def _weights_only(data: bytes, what: str):
    """The weights-only unpickler, and nothing else: no fallback to full unpickling; the bytes first
    pass the bounded scan (what the unpickler may build, how much it may allocate)."""
    try:
        untrusted.check_checkpoint(data)
    except untrusted.Unlisted as exc:
        raise ProgramError(f"Refused: {what} in this program is a pickle that builds a '{exc.name}', which plain "
                           "tensors never need and which could run code or allocate without bound when "
                           "loaded.") from None
    except untrusted.Refused as exc:
        raise ProgramError(f"Refused ({what} in this program): {str(exc).removeprefix('Refused: ')}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's refusal, a corrupt member: either way, refused
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), None)
        if reason is None:
            raise ProgramError(f"Not a readable .pt2 archive: {what} is corrupt.") from None
        raise ProgramError(f"Refused: {what} in this program is a pickle that holds more than plain tensors, so "
                           f"loading it could run code ({reason.rstrip('.')}).") from None


def _check_archive(data: bytes) -> str:
    """Sizes and names, before anything is unpacked; returns the folder prefix of the members."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ProgramError(f"Not a readable .pt2 archive: {exc}.") from None
    infos = zf.infolist()
    if sum(i.file_size for i in infos) > MAX_UNCOMPRESSED_BYTES:
        raise ProgramError(f"Refused: the archive unpacks to more than {MAX_UNCOMPRESSED_BYTES // 2**30} GB.")
    fmt = [i.filename for i in infos if i.filename.rsplit("/", 1)[-1] == "archive_format"]
    if len(fmt) != 1:
        raise ProgramError("Not a torch.export program: the archive has no single `archive_format` member.")
    prefix = fmt[0][: -len("archive_format")]
    for i in infos:
        name = i.filename[len(prefix):]
        if not i.filename.startswith(prefix) or name.startswith("data/aotinductor") or name.endswith((".so", ".dll")):
            raise ProgramError(f"Refused: the archive holds '{i.filename}', which is not part of a torch.export "
                               "program (compiled code is not accepted).")
        if name.startswith("models/") and name != "models/model.json":
            raise ProgramError("Refused: the archive holds more than one program; save one model per file.")
    graph = prefix + "models/model.json"
    if graph not in zf.namelist() or zf.getinfo(graph).file_size > MAX_GRAPH_BYTES:
        raise ProgramError("Not a torch.export program: `models/model.json` is missing or too large.")
    return prefix


def _payloads(reader, config_name: str, base_dir: str, what: str) -> dict[str, torch.Tensor]:
    """Weights or constants: raw tensors as torch stores them, pickled ones through the safe unpickler.
    Every raw record's declared shape is checked against the bytes it holds, and the values of all
    of them, counted as the model will hold them (a view repeating one value counts every repeat),
    against the parameter budget, before anything is allocated."""
    from torch.export.pt2_archive import _package as pkg

    if config_name not in reader.get_file_names():
        legacy = base_dir + "model.pt"
        if legacy in reader.get_file_names():  # torch 2.7's layout: one pickled dict
            obj = _weights_only(reader.read_bytes(legacy), f"the {what} file")
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise ProgramError(f"Refused: the program's {what} are not a dict of tensors.")
            return obj
        return {}
    try:
        config = pkg._load_payload_config(reader, config_name)
    except Exception:  # noqa: BLE001 - malformed JSON or fields of the wrong kind
        raise ProgramError(f"Not a readable .pt2 archive: the list of its {what} is malformed.") from None
    views, total = {}, 0
    for fqn, meta in config.config.items():
        if meta.path_name.startswith((pkg.CUSTOM_OBJ_FILENAME_PREFIX, pkg.OPAQUE_OBJ_FILENAME_PREFIX)):
            raise ProgramError(f"Refused: the program's {what} include a Python or TorchScript object "
                               f"('{untrusted.printable(meta.path_name)}'), which can only be loaded by running code.")
        if meta.tensor_meta is not None:
            views[fqn] = _view(meta.tensor_meta, f"the {what[:-1]} '{untrusted.printable(fqn)}'")
            total += views[fqn][3]
    if total > untrusted.max_params():
        raise ProgramError(f"Refused: the program declares {total:,} {what} values (each repeat of a shared or "
                           f"repeated value counted), more than the {untrusted.max_params():,} parameters this "
                           "server accepts (PRUNE_EXPLORER_MAX_PARAMS).")
    out: dict[str, torch.Tensor] = {}
    records: dict[str, torch.Tensor] = {}  # a record two names share (tied weights) is read once
    for fqn, meta in config.config.items():
        if meta.use_pickle:
            value = _weights_only(reader.read_bytes(base_dir + meta.path_name),
                                  f"the {what[:-1]} '{untrusted.printable(fqn)}'")
            if not isinstance(value, torch.Tensor):
                raise ProgramError(f"Refused: the program's {what} '{untrusted.printable(fqn)}' is a "
                                   f"{type(value).__name__}, not a tensor.")
        else:
            value = _read_view(reader, base_dir + meta.path_name, views[fqn],
                               f"the {what[:-1]} '{untrusted.printable(fqn)}'", records)
        out[fqn] = nn.Parameter(value, requires_grad=False) if meta.is_param else value
    return out


def _view(tm, what: str) -> tuple[torch.dtype, tuple, tuple, int, int]:
    """A record's (dtype, sizes, strides, values, offset), refused in words unless it is a plain CPU tensor
    of a known type, at most 8 dimensions, whose sizes and strides are whole numbers."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
    from torch.export.pt2_archive import _package as pkg

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(tm.dtype)
    if dtype is None or dtype.is_complex:
        raise ProgramError(f"Refused: {what} has the type code {untrusted.printable(tm.dtype, 20)}, which is not a "
                           "real tensor type.")
    try:
        sizes, strides = pkg.deserialize_size(tm.sizes), pkg.deserialize_stride(tm.strides)
        offset = pkg.deserialize_storage_offset(tm.storage_offset)
    except (AssertionError, AttributeError, TypeError):
        raise ProgramError(f"Refused: {what} has a symbolic or malformed size; stored weights have fixed sizes.") from None
    numbers = [*sizes, *strides, offset]
    if len(sizes) > 8 or len(sizes) != len(strides) or \
            not all(type(v) is int and 0 <= v < 2**48 for v in numbers):
        raise ProgramError(f"Refused: {what} declares the shape {untrusted.printable(list(sizes), 60)} with strides "
                           f"{untrusted.printable(list(strides), 60)}; a stored tensor has at most 8 dimensions and "
                           "sizes and strides that fit its file.")
    values = 1
    for d in sizes:
        values *= d
    return dtype, tuple(sizes), tuple(strides), values, offset


def _read_view(reader, record: str, view: tuple, what: str, records: dict) -> torch.Tensor:
    """The record's bytes as the declared view; refused unless the record holds every value the view reads
    (torch's own reader would allocate an empty record's declared size with torch.zeros)."""
    dtype, sizes, strides, values, offset = view
    element = torch.empty(0, dtype=dtype).element_size()
    try:
        nbytes = reader.archive_file.get_record_size(record)
    except Exception:  # noqa: BLE001 - a record the archive lacks
        raise ProgramError(f"Not a readable .pt2 archive: {what} has no data in the file.") from None
    need = 0 if values == 0 else offset + sum((d - 1) * st for d, st in zip(sizes, strides)) + 1
    if need * element > nbytes:
        raise ProgramError(f"Refused: {what} declares {need:,} values of {str(dtype).removeprefix('torch.')} "
                           f"({need * element:,} bytes), but the file holds {nbytes:,} bytes for it.")
    if nbytes == 0:
        return torch.empty(sizes, dtype=dtype)
    key = f"{record}:{dtype}"
    if key not in records:
        raw = reader.archive_file.get_storage_from_record(record, nbytes // element, dtype)
        records[key] = torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), 0, (nbytes // element,), (1,))
    return torch.as_strided(records[key], sizes, strides, offset)


_SYMBOL = re.compile(r"[a-z]+\d+")
_SYMPY_CALLS = {"Symbol", "Integer", "Add", "Mul", "Float", "Rational", "Max", "Min", "Abs", "Mod", "FloorDiv", "CeilDiv",
                "CleanDiv", "ModularIndexing", "PythonMod", "Where", "IntTrueDiv", "FloatTrueDiv",
                "TruncToInt", "TruncToFloat", "CeilToInt", "FloorToInt", "RoundToInt", "RoundDecimal",
                "ToFloat", "PowByNatural", "FloatPow", "Identity", "Eq", "Ne", "Lt", "Le",
                "Gt", "Ge", "And", "Or", "Not", "sympy_sqrt", "OpaqueUnaryFn_sqrt"}
_POW_CALLS = {"PowByNatural", "FloatPow"}
_AST_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.Load,
              ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
              ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.BoolOp, ast.And, ast.Or)
# Bounds that keep sympy's work on one expression small: a batch dimension's expressions are a few
# symbols and small numbers (`s0`, `784*s0`, `Max(1, s0)`); a tower like 9**9**8 would take minutes.
MAX_EXPR_NODES = 200         # parts of one expression
MAX_EXPR_SYMBOLS = 8         # distinct shape symbols in one expression
MAX_EXPRESSIONS = 20_000     # expressions in one graph
MAX_SYMBOLS = 64             # shape symbols the graph declares
MAX_CONSTANT = 2**31         # any number in an expression
MAX_EXPONENT = 4             # a power: a symbol or a number to a small whole number
MAX_GRAPH_NODES = 10_000     # operators in one graph (torchvision's largest classifiers have a few thousand)
MAX_JSON_INT = 2**63         # any integer anywhere in the graph's JSON (sizes, strides, ranges): an int64


def _expr_refused(expr: str, why: str) -> ProgramError:
    return ProgramError(f"Refused: the program's graph holds a shape expression that {why}: "
                        f"{untrusted.printable(expr, 60)!r}.")


def _is_small_power(base: ast.AST, exponent: ast.AST) -> bool:
    """`x**n` with x a symbol or a number and n a whole number from 0 to MAX_EXPONENT."""
    return isinstance(base, (ast.Name, ast.Constant)) and isinstance(exponent, ast.Constant) \
        and type(exponent.value) is int and 0 <= exponent.value <= MAX_EXPONENT


def _check_expr(expr: str) -> None:
    """Symbolic shapes are evaluated by sympy (an `eval`): allow only small arithmetic over a few shape
    symbols: known calls, bounded numbers, powers of a symbol or number by a small whole number."""
    try:
        tree = ast.parse(expr, mode="eval") if len(expr) <= MAX_EXPR_CHARS else None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    if tree is None:
        raise _expr_refused(expr, "is not plain arithmetic over shape symbols")
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_EXPR_NODES:
        raise _expr_refused(expr, f"has {len(nodes):,} parts, more than the {MAX_EXPR_NODES} a shape needs")
    symbols = set()
    for node in nodes:
        ok = isinstance(node, _AST_NODES)
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
            if ok and node.func.id in _POW_CALLS and not (len(node.args) == 2 and _is_small_power(*node.args)):
                raise _expr_refused(expr, f"raises to a power other than a symbol or number to at most "
                                          f"{MAX_EXPONENT}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and not _is_small_power(node.left,
                                                                                                    node.right):
            raise _expr_refused(expr, f"raises to a power other than a symbol or number to at most {MAX_EXPONENT}")
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_CALLS or node.id in ("oo", "int_oo", "True", "False") \
                or bool(_SYMBOL.fullmatch(node.id))
            if _SYMBOL.fullmatch(node.id):
                symbols.add(node.id)
        elif isinstance(node, ast.Constant):
            value = node.value
            ok = isinstance(value, (int, float, bool)) or (isinstance(value, str) and bool(_SYMBOL.fullmatch(value)))
            if isinstance(value, str) and ok:
                symbols.add(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= MAX_CONSTANT:
                raise _expr_refused(expr, f"has a number beyond {MAX_CONSTANT:,}")
        if not ok:
            raise _expr_refused(expr, "is not plain arithmetic over shape symbols")
    if len(symbols) > MAX_EXPR_SYMBOLS:
        raise _expr_refused(expr, f"reads {len(symbols)} shape symbols, more than the {MAX_EXPR_SYMBOLS} a shape "
                                  "needs")


def _check_graph_json(doc) -> None:
    """Every symbolic expression, number and range-constraint name, wherever it sits in the graph's JSON,
    and the graph's size: all of it answers in well under a second (the JSON itself is at most 64 MB)."""
    graph = (doc.get("graph_module") or {}).get("graph") if isinstance(doc.get("graph_module"), dict) else None
    count = len(graph.get("nodes") or []) if isinstance(graph, dict) else 0
    if count > MAX_GRAPH_NODES:
        raise ProgramError(f"Refused: the program's graph has {count:,} operators, more than the "
                           f"{MAX_GRAPH_NODES:,} this server reads.")
    stack, expressions = [doc], 0
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    if not isinstance(value, str):
                        raise ProgramError("Refused: the program's graph is malformed (a shape expression is "
                                           "not a string).")
                    expressions += 1
                    if expressions > MAX_EXPRESSIONS:
                        raise ProgramError(f"Refused: the program's graph holds more than {MAX_EXPRESSIONS:,} "
                                           "shape expressions.")
                    _check_expr(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_JSON_INT:
            raise ProgramError(f"Refused: the program's graph holds a number of {len(str(abs(item))):,} digits; "
                               "sizes, strides and ranges must fit in 64 bits.")
    names = doc.get("range_constraints") or {}
    if len(names) > MAX_SYMBOLS:
        raise ProgramError(f"Refused: the program's graph declares {len(names):,} shape symbols, more than the "
                           f"{MAX_SYMBOLS} this server reads.")
    for name in names:
        if not _SYMBOL.fullmatch(str(name)):
            raise ProgramError(f"Refused: the program's graph names a shape symbol "
                               f"{untrusted.printable(name, 40)!r}, which is not a plain symbol name.")


def read_exported(data: bytes) -> torch.export.ExportedProgram:
    """The ExportedProgram in `data`, read without running anything the file holds."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import _package as pkg

    _check_archive(data)
    try:
        reader = pkg.PT2ArchiveReader(io.BytesIO(data))
    except Exception as exc:
        raise ProgramError(f"Not a readable .pt2 archive ({type(exc).__name__}).") from None
    try:
        doc = json.loads(reader.read_bytes("models/model.json"))
    except (ValueError, RecursionError, RuntimeError):
        raise ProgramError("Not a torch.export program: its graph is not valid JSON.") from None
    if not isinstance(doc, dict) or "graph_module" not in doc:
        raise ProgramError("Not a torch.export program: its graph has no `graph_module`.")
    _check_graph_json(doc)
    doc["guards_code"] = []  # Python source in the file: never executed here
    state_dict = _payloads(reader, "data/weights/model_weights_config.json", "data/weights/", "weights")
    constants = _payloads(reader, "data/constants/model_constants_config.json", "data/constants/", "constants")
    inputs_name = "data/sample_inputs/model.pt"
    sample = None
    if inputs_name in reader.get_file_names():  # only its shape is used, where the graph leaves it open
        size = reader.archive_file.get_record_size(inputs_name)
        if size > MAX_SAMPLE_BYTES:
            raise ProgramError(f"Refused: the program's sample inputs take {size / 2**20:,.0f} MB, more than the "
                               f"{MAX_SAMPLE_BYTES // 2**20} MB a few sample images need.")
        sample = _weights_only(reader.read_bytes(inputs_name), "the sample input")
    if sample is not None and not isinstance(sample, tuple):
        raise ProgramError("Refused: the program's sample inputs are not a tuple of tensors.")
    if sample is not None:  # a repeated value (an expanded view) is small in the file, not in what reads it
        size = sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(sample)
                   if isinstance(t, torch.Tensor))
        if size > MAX_SAMPLE_BYTES:
            raise ProgramError(f"Refused: the program's sample inputs take {size / 2**20:,.0f} MB, more than the "
                               f"{MAX_SAMPLE_BYTES // 2**20} MB a few sample images need.")
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, doc)
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, sample)
    except ProgramError:
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ProgramError(f"This .pt2 file could not be read by this version of PyTorch "
                           f"({torch.__version__}): {type(exc).__name__}: {first}".rstrip(": ") + ".") from None


def extra_files(data: bytes) -> dict[str, str]:
    """The `extra_files` saved beside the program (plain text; e.g. this product's `meta.json`)."""
    prefix = _check_archive(data)
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name = info.filename[len(prefix):]
            if name.startswith("extra/") and info.file_size <= 1 << 20:
                out[name[len("extra/"):]] = zf.read(info).decode("utf-8", errors="replace")
    return out


# ---------------------------------------------------------------------------------------------
# From the exported graph to a module the engine can prune

def _alias_root(node: fx.Node) -> fx.Node:
    """The tensor whose memory `node` shares: itself, or what it is a view of."""
    while node.op == "call_function" and node.target in ALIASING_ATEN and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _aliases(root: fx.Node) -> set[fx.Node]:
    """`root` and every view of it, views of views included."""
    found, stack = {root}, [root]
    while stack:
        for user in stack.pop().users:
            if user not in found and user.op == "call_function" and user.target in ALIASING_ATEN \
                    and user.args and user.args[0] in found:
                found.add(user)
                stack.append(user)
    return found


def functionalize(ep: torch.export.ExportedProgram) -> int:
    """Rewrite in-place operators as their functional twins; returns how many were rewritten.

    `torch.export` keeps the in-place calls of torchvision's modules (`ReLU(inplace=True)`,
    `out += identity`). `y = relu_(a)` becomes `y = relu(a)`, and every later reader of `a` reads `y`,
    which is what it saw before. Refused, in words: a write into a weight, a buffer or the input
    (the model would change itself or its caller's images), and a write through a view whose
    other views are read later (a functional graph cannot say that)."""
    graph = ep.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        functional = INPLACE_TO_FUNCTIONAL.get(node.target) if node.op == "call_function" else None
        if functional is None:
            continue
        target = node.args[0] if node.args else None
        where = module_path(node)
        if not isinstance(target, fx.Node):
            raise ProgramError(f"Refused: {described_op(node.target)}{where} writes in place into something that is "
                               "not a tensor of the graph.")
        root = _alias_root(target)
        if root.op == "placeholder":
            what = "its input images" if root.name in _user_inputs(ep) else "one of its weights or buffers"
            raise ProgramError(f"Refused: {described_op(node.target)}{where} writes in place into {what}; a model "
                               "that changes itself while it runs cannot be pruned reliably (use the operation "
                               "without `inplace=True` there).")
        later = [u for a in _aliases(root) if a is not target for u in a.users if order[u] > order[node]]
        if later:
            raise ProgramError(f"Refused: {described_op(node.target)}{where} writes in place through a view of a "
                               "tensor that is read again afterwards; use the operation without `inplace=True` "
                               "there.")
        with graph.inserting_after(node):
            new = graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        target.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and user is not node
                                     and order.get(user, -1) > order[node])
        graph.erase_node(node)
        order[new] = order.pop(node)
        rewritten += 1
    if rewritten:
        graph.lint()
    return rewritten


def _user_inputs(ep: torch.export.ExportedProgram) -> set[str]:
    from torch.export.graph_signature import InputKind

    return {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


def check_operators(ep: torch.export.ExportedProgram) -> None:
    """Only known tensor operators: anything else is refused, by name and place, with what to do."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target not in ALLOWED_ATEN:
            raise ProgramError(f"Refused: the program uses the operator '{op_name(node.target)}'{module_path(node)}, "
                               "which is not on this product's list of known tensor operators (core/graph.py): "
                               "replace it with a standard layer or function, or export the part of the model "
                               "before it.")
        if node.op in ("call_module", "call_method", "get_attr"):
            raise ProgramError(f"Refused: the program's graph has a '{node.op}' node ('{node.target}'); only "
                               "ATen tensor operators are accepted.")


def _shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


@dataclass(frozen=True)
class Signature:
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    outputs: int                  # width of the output: 1 means one logit (a binary task)


def signature(ep: torch.export.ExportedProgram) -> Signature:
    """What the program takes and gives; a fixed batch size is refused (its graph may hard-code it)."""
    from torch.export.graph_signature import InputKind, OutputKind

    users = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    outs = [s for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(users) != 1 or len(outs) != 1:
        raise ProgramError(f"Refused: the program takes {len(users)} inputs and gives {len(outs)} outputs; "
                           "one image batch in and one tensor of logits out is what can be evaluated.")
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == users[0].arg.name)
    shape = _shape(placeholder)
    if len(shape) != 4:
        raise ProgramError(f"Refused: the program's input has shape {list(shape)}; an image batch (N, C, H, W) "
                           "is expected.")
    if isinstance(shape[0], int):
        raise ProgramError(f"Refused: this program was exported with a fixed batch size of {shape[0]}; "
                           f"{DYNAMIC_BATCH_HINT}.")
    sample = shape[1:]
    if not all(isinstance(d, int) for d in sample):
        example = (ep.example_inputs or ((),))[0]
        if not example or not isinstance(example[0], torch.Tensor) or example[0].dim() != 4:
            raise ProgramError("Refused: the program's input channels, height and width are not fixed, and it "
                               "carries no sample input to take them from.")
        sample = tuple(example[0].shape[1:])
    output = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    out_node = output[0] if isinstance(output, (tuple, list)) else output
    out_shape = _shape(out_node)
    if len(out_shape) not in (1, 2) or (len(out_shape) == 2 and not isinstance(out_shape[1], int)):
        raise ProgramError(f"Refused: the program's output has shape {list(out_shape)}; logits of shape "
                           "(N, classes) or (N,) are expected.")
    channels, height, width = (int(d) for d in sample)
    if not (1 <= channels <= MAX_INPUT_CHANNELS and 1 <= height <= MAX_INPUT_SIDE and 1 <= width <= MAX_INPUT_SIDE):
        raise ProgramError(f"Refused: the program takes inputs of {channels}x{height}x{width}; this server accepts "
                           f"at most {MAX_INPUT_CHANNELS} channels and {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} pixels.")
    outputs = int(out_shape[1]) if len(out_shape) == 2 else 1
    if not 1 <= outputs <= MAX_OUTPUTS:
        raise ProgramError(f"Refused: the program gives {outputs:,} outputs; from 1 to {MAX_OUTPUTS:,} are accepted.")
    return Signature((channels, height, width), outputs)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(last, module)


def _layer_path(target: str, suffix: str) -> str:
    """`layer4.1.conv2.weight` -> `layer4.1.conv2`: the module path as the user wrote it."""
    return target[: -len(suffix)] if target.endswith(suffix) else target


def _free(name: str, taken: set[str]) -> str:
    """A module path not taken yet: the user's own (`trunk_output.block1.block1-0.proj.0`) where each
    part is plain letters, digits, `_` or `-`; other characters become `_`, a clash gets `_2`, `_3`."""
    parts = [re.sub(r"[^0-9A-Za-z_-]", "_", p)[:100] or "_" for p in name.replace("/", ".").split(".")[:32]]
    base = ".".join(parts) if parts and parts[0] else "layer"
    def clashes(path: str) -> bool:  # taken, a parent of a taken path, or inside a taken module
        parents = path.split(".")
        return path in taken or path + "." in taken or \
            any(".".join(parents[:j]) in taken for j in range(1, len(parents)))

    candidate, i = base, 1
    while clashes(candidate):
        i += 1
        candidate = f"{base}_{i}"
    parts = candidate.split(".")
    taken.update(".".join(parts[:j]) + "." for j in range(1, len(parts)))  # "a." marks a parent module
    taken.add(candidate)
    return candidate


def to_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a GraphModule whose convs, batch norms and linears are real modules."""
    from torch.export.graph_signature import InputKind

    sig = ep.graph_signature
    tensors: dict[str, tuple[str, torch.Tensor]] = {}  # placeholder name -> (fqn, tensor)
    for spec in sig.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            source = ep.state_dict if spec.target in ep.state_dict else ep.constants
            tensors[spec.arg.name] = (spec.target, source[spec.target])
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            tensors[spec.arg.name] = (spec.target, ep.constants[spec.target])
        elif spec.kind != InputKind.USER_INPUT:
            raise ProgramError(f"Refused: the program takes a {spec.kind.name.lower()} input, which cannot be "
                               "evaluated here.")
    root, graph, env = nn.Module(), fx.Graph(), {}
    taken: set[str] = set()
    modules: dict[tuple, str] = {}  # (kind, weight placeholder) -> module path: a shared layer stays one module

    def tensor(name: str) -> torch.Tensor | None:
        return tensors[name][1].detach().clone() if name in tensors else None

    def attr(node: fx.Node) -> fx.Node:  # a tensor read by an operator that stays an operator
        if node.name not in env:
            name = _free("tensor_" + re.sub(r"\W", "_", tensors[node.name][0]), taken)
            root.register_buffer(name, tensor(node.name))
            env[node.name] = graph.get_attr(name)
        return env[node.name]

    def arg(a):
        if isinstance(a, fx.Node):
            return attr(a) if a.name in tensors else env[a.name]
        return a

    def layer(kind: str, node: fx.Node, make) -> str | None:
        weight = node.args[1] if kind != "batch_norm" else (node.args[3] if len(node.args) > 3 else None)
        if not isinstance(weight, fx.Node) or weight.name not in tensors:
            return None  # computed weights: the call stays an operator (not a prunable layer)
        key = (kind, weight.name)
        if key not in modules:
            suffix = ".running_mean" if kind == "batch_norm" else ".weight"
            modules[key] = _free(_layer_path(tensors[weight.name][0], suffix), taken)
            _set_module(root, modules[key], make())
        return modules[key]

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name not in tensors:
                env[node.name] = graph.placeholder(node.name)
            continue
        if node.op == "output":
            out = node.args[0]
            graph.output(arg(out[0] if isinstance(out, (tuple, list)) else out))
            break
        path = None
        if node.target == aten.conv2d.default:
            path = layer("conv2d", node, lambda: _conv(node, tensor))
        elif node.target == aten.batch_norm.default:
            if node.args[5]:
                raise ProgramError("Refused: the program's batch norm runs in training mode; export the model "
                                   "after model.eval().")
            path = layer("batch_norm", node, lambda: _batchnorm(node, tensor))
        elif node.target == aten.linear.default:
            path = layer("linear", node, lambda: _linear(node, tensor))
        if path is not None:
            env[node.name] = graph.call_module(path, (env[node.args[0].name],))
        else:
            env[node.name] = graph.node_copy(node, arg)
    gm = fx.GraphModule(root, graph, class_name="ExportedModel")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()


def _opt(node: fx.Node, i: int, default):
    return node.args[i] if len(node.args) > i else default


def _conv(node: fx.Node, tensor) -> nn.Conv2d:
    weight, bias = tensor(node.args[1].name), _opt(node, 2, None)
    stride, padding, dilation, groups = (_opt(node, 3, [1, 1]), _opt(node, 4, [0, 0]), _opt(node, 5, [1, 1]),
                                         _opt(node, 6, 1))
    if isinstance(padding, str) or not all(type(v) is int for v in [*stride, *padding, *dilation, groups]):
        raise ProgramError(f"Refused: the convolution{module_path(node)} has a stride or padding this product cannot "
                           "rebuild (a padding mode given by name, or a computed value).")
    where = module_path(node)
    for what, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(values) != 2 or not all(low <= v <= MAX_CONV_ARG for v in values):
            raise ProgramError(f"Refused: the convolution{where} has the {what} {untrusted.printable(list(values))}; "
                               f"each must be from {low} to {MAX_CONV_ARG}.")
    if groups < 1 or weight.dim() != 4 or weight.shape[0] % groups:
        raise ProgramError(f"Refused: the convolution{where} has groups = {groups}; groups must be at least 1 and "
                           f"divide its {weight.shape[0] if weight.dim() else 0} output channels.")
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=tuple(stride),
                     padding=tuple(padding), dilation=tuple(dilation), groups=groups, bias=bias is not None)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(tensor(bias.name) if isinstance(bias, fx.Node) else torch.as_tensor(bias),
                                 requires_grad=False)
    return conv


def _batchnorm(node: fx.Node, tensor) -> nn.BatchNorm2d:
    weight, bias, mean, var = node.args[1:5]
    momentum, eps = _opt(node, 6, 0.1), _opt(node, 7, 1e-5)
    running_mean, running_var = tensor(mean.name), tensor(var.name)
    bn = nn.BatchNorm2d(running_mean.shape[0], eps=eps, momentum=momentum, affine=weight is not None)
    if weight is not None:
        bn.weight = nn.Parameter(tensor(weight.name), requires_grad=False)
        bn.bias = nn.Parameter(tensor(bias.name), requires_grad=False)
    bn.running_mean.copy_(running_mean)
    bn.running_var.copy_(running_var)
    return bn


def _linear(node: fx.Node, tensor) -> nn.Linear:
    weight, bias = tensor(node.args[1].name), _opt(node, 2, None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(tensor(bias.name), requires_grad=False)
    return linear


@dataclass
class Program:
    """A validated program: the module the engine runs, what it takes and gives, and extra files."""

    exported: torch.export.ExportedProgram
    module: fx.GraphModule
    signature: Signature
    extra: dict[str, str]

    def build(self) -> fx.GraphModule:
        return copy.deepcopy(self.module)

    @property
    def root_type(self) -> str:
        """The user's top-level class name, e.g. `MobileNetish` (from the graph's module stack)."""
        for node in self.exported.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            for path, type_name in stack.values():
                if path == "":
                    return re.sub(r"\W", "_", str(type_name).rsplit(".", 1)[-1])[:60] or "program"  # a class name
        return "program"


def load(data: bytes) -> Program:
    """Read, check and rebuild a `.pt2` program; raises ProgramError with one sentence."""
    ep = read_exported(data)
    functionalize(ep)
    check_operators(ep)
    sig = signature(ep)
    module = to_module(ep)
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()) and \
            not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise ProgramError("Refused: the program has no conv or linear layer with stored weights to prune.")
    return Program(ep, module, sig, extra_files(data))


def save(model: nn.Module, input_shape: tuple[int, ...], path, meta: dict | None = None) -> None:
    """`torch.export` a model with a dynamic batch dimension, the product's meta beside it as JSON."""
    example = torch.zeros(2, *input_shape)
    ep = torch.export.export(copy.deepcopy(model).eval(), (example,),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, path, extra_files={"meta.json": json.dumps(meta or {})})
