"""Bounded checks of untrusted bytes, done before anything in them is unpickled or allocated.

`torch.load(weights_only=True)` never runs code, but it trusts sizes and shapes: a 2 KB pickle can
describe an object whose hash takes 2^30 steps in C (a "billion laughs" of nested tuples shared
through the memo), storages of gigabytes, or a zip member that inflates to gigabytes. So every
archive is checked here first, in time and memory proportional to its size:
- the zip's central directory: member count, declared sizes, no compressed members (`torch.save`
  never compresses), every member inside the file;
- every pickle stream, opcode by opcode without building anything: only the opcodes the
  weights-only unpickler knows, and for every object it would build, the size it has when fully
  expanded (shared references counted each time they are used) and its nesting depth, so that no
  later hash, comparison or message can take more than a bounded number of steps; dict keys must be
  plain strings or numbers; and the storages it declares, summed, within the budget;
- every global it names is on a short list of what a state dict is made of (tensors, their storages
  and dtypes, ordered dicts, sets, devices, sizes): the weights-only unpickler itself also allows
  `bytearray(n)` and `collections.Counter`, which allocate gigabytes or hold the GIL for minutes from
  a few bytes of pickle;
- every tensor it rebuilds lies inside its storage, and the tensors' elements, summed as the model
  will hold them (a view that repeats one value a billion times counts a billion), within the budget.
The limits are read from the environment (see README, Limits and safety).
"""
from __future__ import annotations

import io
import os
import pickletools
import struct
import zipfile


class Refused(ValueError):
    """Bytes that are refused before they are unpickled; the message says why in one sentence."""


class _Malformed(Refused):
    """Not a pickle the unpickler could read at all (as opposed to one it would read at a great cost)."""


class Unlisted(Refused):
    """A pickle that names a global off the list of what a checkpoint is made of (`name`)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def env_int(name: str, default: int) -> int:
    """A positive whole number from the environment, or the default (a bad value is ignored)."""
    try:
        value = int(float(os.environ.get(name, default)))
    except ValueError:
        return default
    return value if value > 0 else default


def max_params() -> int:
    """The parameter budget of one model (its arch_kwargs are sized against it before it is built)."""
    return env_int("PRUNE_EXPLORER_MAX_PARAMS", 50_000_000)


def max_tensor_bytes() -> int:
    """All storages a checkpoint declares, together: 8 bytes per budgeted parameter."""
    return 8 * max_params()


MAX_MEMBERS = 100_000          # zip members of one archive
MAX_PICKLE_BYTES = 4 * 2**20    # one pickle stream (a state dict of 10,000 tensors is about 1.5 MB)
MAX_OPS = 400_000               # instructions in one file's pickles (about 37 per tensor; scanned at ~4 us each)
MAX_NODES = 2_000_000           # one object, fully expanded
MAX_DEPTH = 64                  # nesting of containers
MAX_KEY_NODES = 1               # a dict key: one atom (a string or a number)
MAX_LONG_BYTES = 64             # an integer in a pickle (LONG1)
LEGACY_PICKLES = 5              # torch.save before 1.6: magic, protocol, sys info, object, storage keys

# The opcodes torch's weights-only unpickler implements (torch._weights_only_unpickler).
_ATOMS = {"NONE", "NEWFALSE", "NEWTRUE", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE",
          "SHORT_BINSTRING", "LONG1"}
_KNOWN = _ATOMS | {"PROTO", "STOP", "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM",
                   "SETITEMS", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "EMPTY_LIST",
                   "EMPTY_DICT", "EMPTY_SET", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT"}
_STORAGES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
             "ComplexFloat", "ComplexDouble")
# What a checkpoint of weights is made of; everything else the weights-only unpickler would build is refused.
REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
ALLOWED_GLOBALS = frozenset({
    REBUILD_TENSOR, "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.complex", "_codecs.encode",
    "torch.device", "torch.Size",
    *(f"torch.{s}Storage" for s in _STORAGES), *(f"torch.cuda.{s}Storage" for s in _STORAGES),
    *(f"torch.{name}" for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                                   "uint8", "bool", "complex64", "complex128")),
})
MAX_TENSOR_DIMS = 8

_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                  "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


class _Obj:
    """What the scan knows of one object the unpickler would build."""

    __slots__ = ("kind", "nodes", "depth", "used", "value", "items")

    def __init__(self, kind: str, nodes: int = 1, depth: int = 0, value=None, items=None):
        self.kind, self.nodes, self.depth, self.used, self.value, self.items = kind, nodes, depth, False, value, items


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def printable(text: object, limit: int = 80) -> str:
    """A string from a file as one safe line: control characters (newlines, ANSI escapes, bidi marks)
    written as escapes, cut to `limit` characters. Every name a message quotes from a file goes
    through this, so a crafted name can neither forge a line of output nor clear a terminal."""
    text = str(text)
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _qualname(arg: object) -> str:
    """GLOBAL's 'module name' as one dotted name (protocol 2 writes builtins as __builtin__)."""
    name = str(arg).replace(" ", ".")
    return "builtins." + name[len("__builtin__."):] if name.startswith("__builtin__.") else name


class _Scan:
    def __init__(self, what: str):
        self.what = what
        self.storage_bytes: dict[object, int] = {}
        self.view_bytes = 0  # the elements of every rebuilt tensor, as the model will hold them
        self.ops = 0

    def refuse(self, why: str):
        raise (_Malformed if "well-formed" in why or "instruction" in why and "never needs" in why
               or "integer of more" in why else Refused)(f"Refused: {self.what} {why}.")

    def contain(self, parent: _Obj, children: list[_Obj]) -> None:
        """`children` go into `parent`: it grows by their expanded size and nesting."""
        for child in children:
            child.used = True
            parent.nodes += child.nodes
            parent.depth = max(parent.depth, child.depth + 1)
        if parent.nodes > MAX_NODES:
            self.refuse(f"describes an object of more than {MAX_NODES:,} parts once its shared references are "
                        "expanded (a decompression bomb)")
        if parent.depth > MAX_DEPTH:
            self.refuse(f"nests containers more than {MAX_DEPTH} deep")

    def mutate(self, target: _Obj, children: list[_Obj]) -> None:
        self.contain(target, children)
        if target.used:  # torch.save fills a container before it puts it anywhere
            self.refuse("changes a container after using it (or puts a container inside itself)")

    def keys(self, keys: list[_Obj]) -> None:
        if any(k.kind != "atom" or k.nodes > MAX_KEY_NODES for k in keys):
            self.refuse("uses something other than a string or a number as a dictionary key")

    def persistent(self, pid: _Obj) -> _Obj:
        """The storage a persistent id declares: its size counted against the budget."""
        items = pid.items or []
        if pid.kind != "tuple" or len(items) < 5 or items[0].value != "storage":
            return _Obj("storage")  # the unpickler itself refuses anything but a storage
        kind, key, numel = items[1].value, items[2].value, items[4].value
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            self.refuse("declares a storage without a valid size")
        name = kind.rsplit(".", 1)[-1].removesuffix("Storage") if isinstance(kind, str) else ""
        element = _ELEMENT_BYTES.get(name, 16)
        self.storage_bytes[key if isinstance(key, (str, int)) else len(self.storage_bytes)] = numel * element
        total = sum(self.storage_bytes.values())
        if total > max_tensor_bytes():
            self.refuse(f"declares {_mb(total)} of tensors, more than the {_mb(max_tensor_bytes())} this server "
                        f"accepts ({max_params():,} parameters, PRUNE_EXPLORER_MAX_PARAMS)")
        return _Obj("storage", value=(numel, element))

    def rebuild(self, args: _Obj) -> None:
        """`_rebuild_tensor_v2(storage, offset, size, stride, ...)`: the view inside its storage, and its
        elements counted as what the model will hold (loading copies a view into a real parameter)."""
        items = args.items if args.kind == "tuple" else None
        if not items or len(items) < 4 or items[0].kind != "storage" or items[0].value is None:
            self.refuse("rebuilds a tensor from something that is not a storage")
        (numel, element), offset = items[0].value, items[1].value
        def numbers_of(obj: _Obj) -> list:  # a tuple of more than 8 items keeps none of them
            return [i.value for i in obj.items] if obj.kind == "tuple" and obj.items is not None \
                else [None] * (MAX_TENSOR_DIMS + 1)

        size, stride = numbers_of(items[2]), numbers_of(items[3])
        numbers = [offset, *size, *stride]
        if len(size) > MAX_TENSOR_DIMS or len(size) != len(stride) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
            self.refuse(f"rebuilds a tensor whose shape is not {MAX_TENSOR_DIMS} or fewer sizes with matching "
                        "non-negative strides")
        count = 1
        for d in size:
            count *= d
        if count and offset + sum((d - 1) * st for d, st in zip(size, stride)) >= numel:
            self.refuse(f"rebuilds a tensor of shape {size} that reads past the end of its storage of "
                        f"{numel:,} values")
        self.view_bytes += count * element
        if self.view_bytes > max_tensor_bytes():
            self.refuse(f"holds tensors of {_mb(self.view_bytes)} once their shared or repeated values are "
                        f"counted as the model will hold them, more than the {_mb(max_tensor_bytes())} this "
                        f"server accepts ({max_params():,} parameters, PRUNE_EXPLORER_MAX_PARAMS)")

    def run(self, stream: io.BytesIO) -> None:
        """Scan one pickle from the stream's position to its STOP."""
        stack: list = []
        marks: list[list] = []
        memo: dict[int, _Obj] = {}

        def pop(n: int = 1) -> list[_Obj]:
            if len(stack) < n or any(o is None for o in stack[-n:]):
                self.refuse("is not a well-formed pickle (stack underflow)")
            out = stack[-n:]
            del stack[-n:]
            return out

        def pop_mark() -> list[_Obj]:
            nonlocal stack
            if not marks:
                self.refuse("is not a well-formed pickle (no mark)")
            items, stack = stack, marks.pop()
            return items

        try:
            ops = pickletools.genops(stream)
            for op, arg, _ in ops:
                name = op.name
                self.ops += 1
                if self.ops > MAX_OPS:
                    self.refuse(f"holds more than {MAX_OPS:,} pickle instructions, more than a state dict needs")
                if name not in _KNOWN:
                    self.refuse(f"holds the pickle instruction {name}, which a checkpoint never needs")
                if name in _ATOMS:
                    if name == "LONG1" and isinstance(arg, int) and arg.bit_length() > 8 * MAX_LONG_BYTES:
                        self.refuse("holds an integer of more than 64 bytes")
                    value = arg if name not in ("NONE", "NEWFALSE", "NEWTRUE") else {
                        "NONE": None, "NEWFALSE": False, "NEWTRUE": True}[name]
                    stack.append(_Obj("atom", value=value if not isinstance(value, (str, bytes))
                                      or len(value) <= 256 else None))
                elif name == "PROTO":
                    pass
                elif name == "STOP":
                    pop()
                    return
                elif name == "MARK":
                    marks.append(stack)
                    stack = []
                elif name == "GLOBAL":
                    qual = _qualname(arg)
                    if qual not in ALLOWED_GLOBALS:
                        raise Unlisted(f"Refused: {self.what} builds a '{printable(qual, 60)}', which a "
                                       "checkpoint of weights never needs and which could run code or allocate "
                                       "without bound when loaded (only tensors, containers, numbers and texts are "
                                       "accepted).", printable(qual, 60))
                    stack.append(_Obj("global", value=qual))
                elif name in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                    stack.append(_Obj(name[6:].lower(), items=[]))
                elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                    items = pop_mark() if name == "TUPLE" else pop(int(name[-1]))
                    obj = _Obj("tuple", items=items if len(items) <= 8 else None)
                    self.contain(obj, items)
                    stack.append(obj)
                elif name in ("APPEND", "APPENDS"):
                    items = pop() if name == "APPEND" else pop_mark()
                    if not stack:
                        self.refuse("is not a well-formed pickle (nothing to append to)")
                    self.mutate(stack[-1], items)
                elif name in ("SETITEM", "SETITEMS"):
                    items = pop(2) if name == "SETITEM" else pop_mark()
                    if len(items) % 2:
                        self.refuse("is not a well-formed pickle (a key without a value)")
                    self.keys(items[0::2])
                    if not stack:
                        self.refuse("is not a well-formed pickle (no dictionary)")
                    self.mutate(stack[-1], items)
                elif name == "BUILD":
                    state = pop()
                    if not stack:
                        self.refuse("is not a well-formed pickle (nothing to build)")
                    self.mutate(stack[-1], state)
                elif name in ("REDUCE", "NEWOBJ"):
                    func, args = pop(2)
                    if func.kind == "global" and func.value == REBUILD_TENSOR:
                        self.rebuild(args)
                    obj = _Obj("object")
                    self.contain(obj, [func, args])
                    stack.append(obj)
                elif name == "BINPERSID":
                    pid = pop()[0]
                    stack.append(self.persistent(pid))
                elif name in ("BINPUT", "LONG_BINPUT"):
                    if not stack:
                        self.refuse("is not a well-formed pickle (nothing to memoize)")
                    memo[arg] = stack[-1]
                elif name in ("BINGET", "LONG_BINGET"):
                    if arg not in memo:
                        self.refuse("is not a well-formed pickle (a memo entry is missing)")
                    stack.append(memo[arg])
        except Refused:
            raise
        except Exception as exc:  # truncated or malformed opcodes
            self.refuse(f"is not a well-formed pickle ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        self.refuse("is not a well-formed pickle (it ends without STOP)")


def scan_pickle(data: bytes, what: str = "the file", pickles: int = 1, scan: _Scan | None = None) -> int:
    """Check `pickles` consecutive pickle streams at the start of `data`; returns the storage bytes declared."""
    if len(data) > MAX_PICKLE_BYTES and pickles == 1:
        raise Refused(f"Refused: {what} holds a pickle of {_mb(len(data))}, more than the "
                      f"{_mb(MAX_PICKLE_BYTES)} a state dict needs.")
    scan = scan or _Scan(what)
    stream = io.BytesIO(data)
    for _ in range(pickles):
        start = stream.tell()
        scan.run(stream)
        if stream.tell() - start > MAX_PICKLE_BYTES:
            scan.refuse(f"holds a pickle of more than {_mb(MAX_PICKLE_BYTES)}")
    return sum(scan.storage_bytes.values())


def check_archive(data: bytes, stored_only: bool = True, max_bytes: int | None = None) -> zipfile.ZipFile:
    """The zip's central directory: member count, names, declared sizes, no compression; every pickle
    member (`*.pkl`) scanned. Returns the open archive."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, struct.error, EOFError, OSError) as exc:
        raise Refused(f"Not a readable PyTorch checkpoint (is it truncated?): {str(exc).splitlines()[0]}.") from None
    if len(infos) > MAX_MEMBERS:
        raise Refused(f"Refused: the archive has {len(infos):,} members, more than {MAX_MEMBERS:,}.")
    bound = max_bytes if max_bytes is not None else max_tensor_bytes() + 64 * 2**20
    total = sum(i.file_size for i in infos)
    if total > bound:
        raise Refused(f"Refused: the archive unpacks to {_mb(total)}, more than the {_mb(bound)} this server "
                      "accepts.")
    for info in infos:
        if stored_only and info.compress_type != zipfile.ZIP_STORED:
            raise Refused(f"Refused: the archive member '{printable(info.filename)}' is compressed, which torch.save never "
                          "does (save the file again with torch.save).")
        if info.header_offset + info.compress_size > len(data):
            raise Refused("Not a readable PyTorch checkpoint (is it truncated?): a member ends after the file.")
    scan = _Scan("the archive")  # one budget of instructions and storages for all its pickles
    for info in infos:
        if info.filename.endswith(".pkl"):
            if info.file_size > MAX_PICKLE_BYTES:
                raise Refused(f"Refused: the pickle '{printable(info.filename)}' is {_mb(info.file_size)}, more than the "
                              f"{_mb(MAX_PICKLE_BYTES)} a state dict needs.")
            scan.what = f"the pickle '{printable(info.filename)}'"
            scan_pickle(zf.read(info), scan.what, scan=scan)
    return zf


def check_program_members(zf: zipfile.ZipFile) -> None:
    """A `.pt2` archive's members that the program reader unpickles: nested torch.save zips are checked
    as checkpoints; members that start like a pickle are scanned, and refused only for what would be
    costly (a bomb, a container key, too many instructions), since raw tensor bytes may start alike."""
    scan = _Scan("the program")
    for info in zf.infolist():
        if info.is_dir() or info.filename.endswith(".pkl") or info.file_size == 0:
            continue  # .pkl members were scanned strictly by check_archive
        with zf.open(info) as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            if info.file_size > 4 * MAX_PICKLE_BYTES + max_tensor_bytes():
                raise Refused(f"Refused: the program member '{printable(info.filename)}' is too large.")
            try:
                check_checkpoint(zf.read(info))
            except _Malformed:
                pass  # not a readable archive: the program reader says so
        elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            scan.what = f"the program member '{printable(info.filename)}'"
            with zf.open(info) as f:
                body = f.read(MAX_PICKLE_BYTES)
            try:
                scan.run(io.BytesIO(body))
            except Unlisted:
                pass  # raw bytes may spell a GLOBAL; a member that is unpickled is checked strictly then
            except _Malformed as exc:  # raw bytes, not a pickle; unless it was only cut short here
                if info.file_size > len(body) and any(w in str(exc) for w in ("exhausted", "remain", "without STOP")):
                    raise Refused(f"Refused: {scan.what} holds a pickle of more than {_mb(MAX_PICKLE_BYTES)}.") from None


def check_checkpoint(data: bytes) -> None:
    """Everything `torch.load` would read, checked in bounded time and memory first (raises Refused)."""
    if data[:4] == b"PK\x03\x04":
        check_archive(data)
    elif data[:1] == b"\x80":
        scan_pickle(data, "the file", pickles=LEGACY_PICKLES)
