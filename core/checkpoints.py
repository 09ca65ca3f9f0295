"""Checkpoints: load and save in safe formats only, with clear errors.

Format (nanoGPT's `model_args` idea): a dict {"arch", "arch_kwargs", "state_dict", "meta"} saved by
`torch.save` and read back with `torch.load(..., weights_only=True)`, so no file can run code.
A plain state dict of a registered architecture is accepted too; its architecture is detected from
the tensors' names and shapes. A `torch.export` program (`.pt2`) of any architecture is read by
`core.program`, which never runs anything the file holds.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import data, inputs, models, program, untrusted


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why in one sentence."""


class UnknownArchitecture(CheckpointError):
    """A plain state dict that matches no registered architecture: the user may say which it is, or
    export the model as a program (`how_to`: the lines that do it)."""

    how_to = program.EXPORT_LINES


@dataclass
class Checkpoint:
    arch: str
    arch_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    digest: str = ""  # sha256 of the file's bytes (and a chosen input preparation): the key of every cache
    name: str = ""
    program: program.Program | None = None  # a .pt2 file: the graph is the architecture
    program_spec: models.ArchSpec | None = None
    input_prep: inputs.Preparation | None = None  # as the file states it or the user chose; None: not said

    @property
    def spec(self) -> models.ArchSpec:
        return self.program_spec if self.program_spec is not None else models.REGISTRY[self.arch]

    @property
    def dataset(self) -> str:
        return self.meta.get("dataset", self.spec.dataset)

    @property
    def prep(self) -> inputs.Preparation:
        """How this model's inputs are prepared; where nothing says, the data set's usual statistics
        (`prep.source` then says it was assumed)."""
        if self.input_prep is not None:
            return self.input_prep
        return inputs.usual(data.DATASETS.get(self.dataset), self.spec.input_shape[0])

    def with_prep(self, prep: inputs.Preparation) -> "Checkpoint":
        """The same model with inputs prepared as the user chose: a new object (a shared checkpoint is never
        changed) whose digest, the key of every cache, includes the choice."""
        prep = prep.with_source(inputs.CHOSEN)
        if not prep.fits(self.spec.input_shape[0]):
            raise CheckpointError(f"The input preparation gives {len(prep.mean)} means, but the model takes "
                                  f"{self.spec.input_shape[0]} channels.")
        digest = self.file_digest + ":" + prep.token()
        return replace(self, input_prep=prep, digest=digest)

    @property
    def file_digest(self) -> str:
        """The file's own sha256 (the digest without a chosen preparation)."""
        return self.digest.split(":", 1)[0]

    def split(self, train: bool = False, data_root: str | None = None) -> data.DataSplit:
        """Its data set's test (or training) split, prepared as this model's inputs are."""
        return data.load(self.dataset, train, data_root, self.prep)

    def saved_meta(self, **updates) -> dict:
        """The meta to write beside this model (or a model made from it): the data set and the input
        preparation stated, this product's own notes left out."""
        meta = {k: v for k, v in self.meta.items() if k not in ("fitting_datasets", "renamed_tensors",
                                                                "normalization")}
        meta.update(dataset=self.dataset, input=self.prep.to_meta())
        meta.update(updates)
        return meta

    def build_model(self) -> nn.Module:
        """A fresh model in eval mode with the weights loaded; each call returns a new object."""
        if self.program is not None:
            return self.program.build()
        _check_fits(self.arch, models.shapes(self.arch, self.arch_kwargs), self.state_dict)
        try:
            model = models.build(self.arch, **self.arch_kwargs)
        except TypeError as exc:
            raise CheckpointError(f"Architecture '{self.arch}' does not take these arguments: {exc}") from None
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def _check_fits(arch: str, expected: dict, given: dict) -> None:
    """Name the first tensor that is missing, unexpected or of another shape, with both shapes.
    `expected` and `given` map names to shapes or tensors (only shapes are read)."""
    for key, want in expected.items():
        if key not in given:
            raise CheckpointError(f"The weights do not fit '{arch}': tensor '{key}' {list(want.shape if isinstance(want, torch.Tensor) else want)} is missing.")
        have = tuple(given[key].shape if isinstance(given[key], torch.Tensor) else given[key])
        want = tuple(want.shape if isinstance(want, torch.Tensor) else want)
        if have != want:
            raise CheckpointError(f"The weights do not fit '{arch}': '{key}' has shape {list(have)} "
                                  f"in the file, but '{arch}' expects {list(want)}.")
    extra = [k for k in given if k not in expected]
    if extra:
        raise CheckpointError(f"The weights do not fit '{arch}': unexpected tensor '{extra[0]}'"
                              + (f" and {len(extra) - 1} more." if len(extra) > 1 else "."))


def _unpickler_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines()]
    return next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln), lines[0] if lines else "")


def _torch_load(data: bytes):
    # torch.save writes a zip archive (or, before torch 1.6, a pickle stream starting with 0x80).
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise CheckpointError("Not a PyTorch checkpoint: the file does not start like anything torch.save "
                              "writes (is it an image, an archive or a text file?).")
    try:
        untrusted.check_checkpoint(data)  # bounded: sizes, pickle bombs, storages, before torch reads anything
    except untrusted.Unlisted as exc:
        raise CheckpointError(
            f"Refused: this file builds a '{exc.name}' (for example a whole model saved with torch.save(model)), "
            "which a checkpoint of weights never needs and which could run code or allocate without bound when "
            "loaded; save the weights instead: torch.save(model.state_dict(), 'model.pt').") from None
    except untrusted.Refused as exc:
        raise CheckpointError(str(exc)) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                "Refused: this file holds pickled Python objects (e.g. a whole model saved with"
                " torch.save(model)), which could run code when loaded. Save the weights instead:"
                f" torch.save(model.state_dict(), 'model.pt'). ({_unpickler_reason(exc)})"
            ) from None
        raise CheckpointError(f"Not a readable PyTorch checkpoint (corrupt?): {_unpickler_reason(exc)}") from None
    except Exception as exc:  # zip errors, truncated files
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"Not a readable PyTorch checkpoint (is it truncated?): {type(exc).__name__}: {first}".rstrip(": ")
        ) from None


_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: absent before PyTorch 0.4.1, never a weight


def _shapes(state_dict: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in state_dict.items() if not k.endswith(_COUNTER)]


def detect_arch(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict, dict[str, str]]:
    """Which registered architecture (and constructor arguments) these tensors belong to.

    First by names and shapes; then, for a student who named the modules differently, by the
    tensors' shapes in order. Returns (arch, arch_kwargs, {their name: our name}) - the mapping is
    empty when the names already match.
    """
    theirs = _shapes(state_dict)
    candidates = [(name, kwargs, [(k, v) for k, v in models.shapes(name, kwargs).items() if not k.endswith(_COUNTER)])
                  for name, spec in models.REGISTRY.items() for kwargs in spec.variants]
    for name, kwargs, ours in candidates:
        if dict(ours) == dict(theirs):
            return name, kwargs, {}
    for name, kwargs, ours in candidates:  # the right names, a wrong shape: say which
        if set(dict(ours)) == set(dict(theirs)):
            _check_fits(name, dict(ours), dict(theirs))
    for name, kwargs, ours in candidates:
        if [shape for _, shape in ours] == [shape for _, shape in theirs]:
            renamed = {t: o for (t, _), (o, _) in zip(theirs, ours) if t != o}
            for key in state_dict:  # counters follow their BatchNorm's running mean
                mean = key.removesuffix(_COUNTER) + "running_mean"
                if key.endswith(_COUNTER) and mean in renamed:
                    renamed[key] = renamed[mean].removesuffix("running_mean") + _COUNTER
            return name, kwargs, renamed
    best, kwargs, ours = max(candidates, key=lambda c: len(set(c[2]) & set(theirs)))
    matching = len(set(ours) & set(theirs))
    nearest = f"; nearest '{best}', {matching} of its {len(ours)} tensors match" if matching else ""
    raise UnknownArchitecture(
        f"This state dict ({len(theirs)} tensors, first '{theirs[0][0]}' {list(theirs[0][1])}) is of none of the "
        f"registered architectures ({', '.join(models.REGISTRY)}{nearest}), so export the model as a .pt2 "
        "program with the lines below and upload model.pt2."
    )


def _with_bn_counters(state: dict, arch: str, kwargs: dict) -> dict:
    """State dicts from PyTorch before 0.4.1 have no BatchNorm counters: add zeros."""
    missing = {k: torch.tensor(0) for k in models.shapes(arch, kwargs)
               if k.endswith(_COUNTER) and k not in state}
    return {**state, **missing} if missing else state


def fitting_datasets(input_shape: tuple[int, ...], outputs: int) -> list[str]:
    """Registered data sets a model taking `input_shape` and giving `outputs` values can be tested on."""
    return [name for name, spec in data.DATASETS.items() if _fit_problem(spec, input_shape, outputs) is None]


def _fit_problem(spec: data.DataSpec, input_shape: tuple[int, ...], outputs: int) -> str | None:
    shape = "x".join(map(str, input_shape))
    if tuple(spec.input_shape) != tuple(input_shape):
        return (f"the model takes {shape} inputs, but '{spec.name}' has {'x'.join(map(str, spec.input_shape))} "
                "images")
    classes = len(spec.class_names)
    if outputs != classes and not (outputs == 1 and classes == 2):
        return f"the model gives {outputs} outputs, but '{spec.name}' has {classes} classes"
    return None


def _from_program(blob: bytes, name: str, dataset: str | None) -> Checkpoint:
    """A `.pt2` program; its data set is `dataset`, else the one recorded beside it, else the first that fits."""
    try:
        prog = program.load(blob)
    except program.ProgramError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        meta = json.loads(prog.extra.get("meta.json", "{}"))
    except (ValueError, RecursionError):  # a deeply nested meta.json is ignored, not followed
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    sig = prog.signature
    fits = fitting_datasets(sig.input_shape, sig.outputs)
    chosen = dataset or (meta.get("dataset") if isinstance(meta.get("dataset"), str) else None)
    if chosen is not None:
        if chosen not in data.DATASETS:
            raise CheckpointError(f"Unknown data set '{chosen}'. Known: {', '.join(data.DATASETS)}.")
        problem = _fit_problem(data.DATASETS[chosen], sig.input_shape, sig.outputs)
        if problem:
            raise CheckpointError(f"This program does not fit '{chosen}': {problem}.")
    elif fits:
        chosen = fits[0]
    else:
        chosen = ""  # no registered data set fits: the user's own images are the only test data
    meta["dataset"] = chosen
    meta["fitting_datasets"] = fits
    task = "binary" if sig.outputs == 1 else "multiclass"
    convs = sum(isinstance(m, nn.Conv2d) for m in prog.module.modules())
    spec = models.ArchSpec(prog.root_type, prog.build, sig.input_shape, task, chosen,
                           f"a torch.export program ({convs} conv layers, {sig.outputs} outputs)")
    state = dict(prog.module.state_dict())
    return Checkpoint(prog.root_type, {}, state, meta, hashlib.sha256(blob).hexdigest(), name, prog, spec)


# ---------------------------------------------------------------------------------------------
# Every value a file brings is checked here, type first, before it is hashed, formatted or used.

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TENSORS = 20_000      # tensors in one state dict
MAX_NAME_CHARS = 300      # a tensor's name
MAX_TEXT_CHARS = 2_000    # a text in meta (e.g. the training command)
MAX_META_PARTS = 2_000    # values in meta, nested ones included
MAX_KWARG = 10**6         # an integer constructor argument (the parameter budget is checked after)
_FINITE_CHUNK = 2**24     # values checked for NaN at a time: bounded temporaries


def _kind(value) -> str:
    """'a list', 'an int': the unpickler builds only allowlisted types, so the name is short and safe."""
    name = type(value).__name__
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _text(value, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise CheckpointError(f"{what} is {_kind(value)}, not a text.")
    if len(value) > limit:
        raise CheckpointError(f"{what} is {len(value):,} characters long, more than {limit:,}.")
    return value


def _number(value, what: str, low: float, high: float, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise CheckpointError(f"{what} is {_kind(value)}, not {'an integer' if integer else 'a number'}.")
    if not (low <= value <= high):  # NaN fails both comparisons
        raise CheckpointError(f"{what} is {value!r:.30}, outside {low:g} to {high:g}.")
    return value


def _plain(value, path: str, budget: list[int], depth: int = 0):
    """Plain data (text, numbers, booleans, None, and lists and dicts of them), bounded in size."""
    what = f"The checkpoint's '{path[:80]}'"
    budget[0] -= 1
    if budget[0] < 0 or depth > 8:
        raise CheckpointError(f"{what} is too large or too deeply nested.")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _number(value, what, -2**63, 2**63, integer=True)
    if isinstance(value, float):
        return _number(value, what, -1e300, 1e300)
    if isinstance(value, str):
        return _text(value, what)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]", budget, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_text(k, f"A key in {what}", 200): _plain(v, f"{path}.{k}", budget, depth + 1)
                for k, v in value.items()}
    raise CheckpointError(f"{what} is {_kind(value)}, not plain data.")


def _meta(raw) -> dict:
    """The bundled format's `meta`: known fields of the right type first, then all of it plain data."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"The checkpoint's 'meta' is {_kind(raw)}, not a dict.")
    if "dataset" in raw:
        dataset = _text(raw["dataset"], "The checkpoint's 'meta.dataset'", 100)
        if dataset not in data.DATASETS:
            raise CheckpointError(f"The checkpoint's data set '{dataset[:60]}' is not a registered data set. "
                                  f"Known: {', '.join(data.DATASETS)}.")
    if "test_accuracy" in raw:
        _number(raw["test_accuracy"], "The checkpoint's 'meta.test_accuracy'", 0.0, 1.0)
    for key in ("test_correct", "test_total"):
        if key in raw:
            _number(raw[key], f"The checkpoint's 'meta.{key}'", 0, 10**9, integer=True)
    for key in ("train_command", "torch_version"):
        if key in raw:
            _text(raw[key], f"The checkpoint's 'meta.{key}'")
    if "class_names" in raw and not (isinstance(raw["class_names"], list)
                                     and all(isinstance(c, str) for c in raw["class_names"])):
        raise CheckpointError("The checkpoint's 'meta.class_names' is not a list of texts.")
    meta = _plain(raw, "meta", [MAX_META_PARTS])
    for key in ("renamed_tensors", "fitting_datasets"):  # this product's own notes, never the file's
        meta.pop(key, None)
    return meta


def _arch(value) -> str:
    arch = _text(value, "The checkpoint's 'arch'", 100)
    if arch not in models.REGISTRY:
        raise CheckpointError(f"Unknown architecture '{arch[:60]}'. Registered: {', '.join(sorted(models.REGISTRY))}.")
    return arch


def _arch_kwargs(arch: str, raw) -> dict:
    """Constructor arguments the builder takes, each of its default's type and in range."""
    import inspect

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"The checkpoint's 'arch_kwargs' is {_kind(raw)}, not a dict.")
    params = inspect.signature(models.REGISTRY[arch].builder).parameters
    kwargs = {}
    for key, value in raw.items():
        name = _text(key, "A name in 'arch_kwargs'", 100)
        if name not in params or params[name].default is inspect.Parameter.empty:
            raise CheckpointError(f"Architecture '{arch}' takes no argument '{name[:60]}' (it takes: "
                                  f"{', '.join(p for p in params if p != 'self') or 'none'}).")
        default, what = params[name].default, f"'arch_kwargs.{name}'"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise CheckpointError(f"{what} is {_kind(value)}, not True or False.")
        elif isinstance(default, int):
            _number(value, what, 1, MAX_KWARG, integer=True)
        elif isinstance(default, float):
            _number(value, what, 0.0, float(MAX_KWARG))
        else:
            _text(value, what, 40)
        kwargs[name] = value
    return kwargs


def _check_model(arch: str, kwargs: dict, dataset: str) -> None:
    """Size the model the arguments describe before it is built, and check it takes the
    architecture's input and gives as many outputs as its data set has classes."""
    spec = models.REGISTRY[arch]
    try:
        count, out = models.size(arch, kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else _kind(exc)
        raise CheckpointError(f"'{arch}' with arch_kwargs {kwargs} does not make a model that takes "
                              f"{'x'.join(map(str, spec.input_shape))} inputs ({first}).") from None
    if count > untrusted.max_params():
        raise CheckpointError(f"Refused: '{arch}' with arch_kwargs {kwargs} has {count:,} parameters, more than the "
                              f"{untrusted.max_params():,} this server accepts (PRUNE_EXPLORER_MAX_PARAMS).")
    outputs = 1 if len(out) == 1 else int(torch.Size(out[1:]).numel())
    if len(out) > 2 or outputs < 1:
        raise CheckpointError(f"'{arch}' with arch_kwargs {kwargs} gives outputs of shape {list(out)}, not logits.")
    if dataset:
        problem = _fit_problem(data.DATASETS[dataset], spec.input_shape, outputs)
        if problem:
            raise CheckpointError(f"This checkpoint does not fit its data set '{dataset}': {problem}.")


def _state_dict(raw, what: str = "The state dict") -> dict[str, torch.Tensor]:
    """A dict of text names to tensors, names checked before they are used."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{what} is {_kind(raw)}, not a dict of tensors.")
    if len(raw) > MAX_TENSORS:
        raise CheckpointError(f"{what} has {len(raw):,} tensors, more than {MAX_TENSORS:,}.")
    for key, value in raw.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{what} has a key that is {_kind(key)}, not a tensor name.")
        _text(key, "A tensor name", MAX_NAME_CHARS)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"'{key}' in the state dict is {_kind(value)}, not a tensor.")
    return dict(raw)


def _check_tensors(state: dict[str, torch.Tensor], strict_dtypes: bool = True) -> None:
    """Floating-point weights (BatchNorm's counter an integer), dense, within the budget, and finite.
    Sizes come from the storages, never from views: `torch.zeros(1).expand(10**9)` costs nothing here."""
    seen: set[tuple[int, torch.dtype]] = set()
    budget = untrusted.max_params()
    for key, t in state.items():
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise CheckpointError(f"Tensor '{key}' is not a plain dense tensor ({t.layout}); save plain weights.")
        if t.dim() > 8 or any(d < 0 for d in t.shape):
            raise CheckpointError(f"Tensor '{key}' has an impossible shape.")
        if key.endswith(_COUNTER) and strict_dtypes:
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.numel() != 1:
                raise CheckpointError(f"Tensor '{key}' should be one integer (a BatchNorm's step counter).")
            continue
        if t.dtype not in FLOAT_DTYPES and (strict_dtypes or t.dtype.is_complex):
            raise CheckpointError(f"Tensor '{key}' holds {str(t.dtype).removeprefix('torch.')} values; a model's "
                                  "weights are floating-point numbers (float32, float64, float16 or bfloat16).")
        if t.dtype not in FLOAT_DTYPES:
            continue
        if torch.Size(t.shape).numel() > budget:
            raise CheckpointError(f"Refused: tensor '{key}' has {t.numel():,} values, more than the "
                                  f"{budget:,} parameters this server accepts (PRUNE_EXPLORER_MAX_PARAMS).")
        storage = t.untyped_storage()
        mark = (storage.data_ptr(), t.dtype)
        if mark in seen:
            continue
        seen.add(mark)
        flat = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),))
        for start in range(0, flat.numel(), _FINITE_CHUNK):
            if not bool(torch.isfinite(flat[start:start + _FINITE_CHUNK]).all()):
                raise CheckpointError(f"Tensor '{key}' holds NaN or infinite values: the model is broken "
                                      "(a diverged training run?), so its accuracies would mean nothing.")


def from_bytes(data: bytes, name: str = "", arch: str | None = None, dataset: str | None = None) -> Checkpoint:
    """Read a checkpoint. `arch` forces the architecture of a plain state dict (the user's pick);
    `dataset` is the data set a `.pt2` program is evaluated on (checked to fit)."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("A checkpoint must be given as bytes.")
    data = bytes(data)
    if program.is_program(data):
        try:  # bounded checks of the archive's pickles before the program's own reader sees them
            archive = untrusted.check_archive(data, stored_only=False, max_bytes=program.MAX_UNCOMPRESSED_BYTES)
            untrusted.check_program_members(archive)
        except untrusted.Refused as exc:
            raise CheckpointError(str(exc)) from None
        ckpt = _from_program(data, name, dataset)
        ckpt.meta = {**_meta({k: v for k, v in ckpt.meta.items() if k not in ("dataset", "fitting_datasets")}),
                     "dataset": ckpt.meta["dataset"], "fitting_datasets": ckpt.meta["fitting_datasets"]}
        _check_tensors(ckpt.state_dict, strict_dtypes=False)
        ckpt.input_prep = _stated_prep(ckpt)
        return ckpt
    obj = _torch_load(data)
    digest = hashlib.sha256(data).hexdigest()
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and "state_dict" in obj and "arch" in obj:
        arch = _arch(obj["arch"])
        kwargs = _arch_kwargs(arch, obj.get("arch_kwargs"))
        meta = _meta(obj.get("meta"))
        state = _state_dict(obj["state_dict"])
        _check_model(arch, kwargs, meta.get("dataset", models.REGISTRY[arch].dataset))
        _check_tensors(state)
        ckpt = Checkpoint(arch, kwargs, state, meta, digest, name)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = _state_dict(obj)
        _check_tensors(obj)  # before the shapes are compared: refuse complex or NaN weights first
        if arch is not None:
            if not isinstance(arch, str) or arch not in models.REGISTRY:
                raise CheckpointError(f"Unknown architecture '{str(arch)[:60]}'.")
            kwargs, renamed = {}, {}
        else:
            arch, kwargs, renamed = detect_arch(obj)
        state = _with_bn_counters({renamed.get(k, k): v for k, v in obj.items()}, arch, kwargs)
        meta = {"renamed_tensors": renamed} if renamed else {}
        ckpt = Checkpoint(arch, kwargs, state, meta, digest, name)
    else:
        raise CheckpointError("This file holds no state dict: expected a dict of tensors or the bundled format.")
    ckpt.build_model()  # fail now, with the shapes named, rather than later
    ckpt.input_prep = _stated_prep(ckpt)
    return ckpt


def _stated_prep(ckpt: Checkpoint) -> inputs.Preparation | None:
    """The input preparation the file states (`meta.input`), checked like every other field."""
    try:
        prep = inputs.from_meta(ckpt.meta)
    except inputs.PreparationError as exc:
        raise CheckpointError(str(exc)) from None
    if prep is not None and not prep.fits(ckpt.spec.input_shape[0]):
        raise CheckpointError(f"The checkpoint's 'meta.input' gives {len(prep.mean)} means, but the model takes "
                              f"{ckpt.spec.input_shape[0]} channels.")
    return prep


def load(path: str | Path, dataset: str | None = None) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No such checkpoint file: {path}")
    return from_bytes(path.read_bytes(), name=path.stem, dataset=dataset)


def save(path: str | Path, arch: str, arch_kwargs: dict, model: nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": state, "meta": meta}, path)
