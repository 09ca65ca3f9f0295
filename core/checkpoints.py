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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data, models, program


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why in one sentence."""


class UnknownArchitecture(CheckpointError):
    """A plain state dict that matches no registered architecture: the user may say which it is."""


@dataclass
class Checkpoint:
    arch: str
    arch_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    digest: str = ""  # sha256 of the file's bytes: the cache key, so a replaced file is never stale
    name: str = ""
    program: program.Program | None = None  # a .pt2 file: the graph is the architecture
    program_spec: models.ArchSpec | None = None

    @property
    def spec(self) -> models.ArchSpec:
        return self.program_spec if self.program_spec is not None else models.REGISTRY[self.arch]

    @property
    def dataset(self) -> str:
        return self.meta.get("dataset", self.spec.dataset)

    def build_model(self) -> nn.Module:
        """A fresh model in eval mode with the weights loaded; each call returns a new object."""
        if self.program is not None:
            return self.program.build()
        try:
            model = models.build(self.arch, **self.arch_kwargs)
        except TypeError as exc:
            raise CheckpointError(f"Architecture '{self.arch}' does not take these arguments: {exc}") from None
        _check_fits(self.arch, model.state_dict(), self.state_dict)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def _check_fits(arch: str, expected: dict, given: dict) -> None:
    """Name the first tensor that is missing, unexpected or of another shape, with both shapes."""
    for key, tensor in expected.items():
        if key not in given:
            raise CheckpointError(f"The weights do not fit '{arch}': tensor '{key}' {list(tensor.shape)} is missing.")
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"The weights do not fit '{arch}': '{key}' has shape {list(given[key].shape)} "
                                  f"in the file, but '{arch}' expects {list(tensor.shape)}.")
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
    candidates = [(name, kwargs, _shapes(spec.builder(**kwargs).state_dict()))
                  for name, spec in models.REGISTRY.items() for kwargs in spec.variants]
    for name, kwargs, ours in candidates:
        if dict(ours) == dict(theirs):
            return name, kwargs, {}
    for name, kwargs, ours in candidates:  # the right names, a wrong shape: say which
        if set(dict(ours)) == set(dict(theirs)):
            _check_fits(name, {k: torch.empty(s) for k, s in ours}, {k: torch.empty(s) for k, s in theirs})
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
    raise UnknownArchitecture(
        f"This state dict ({len(theirs)} tensors, first '{theirs[0][0]}' {list(theirs[0][1])}) matches no "
        f"registered architecture. Registered: {', '.join(models.REGISTRY)}. Nearest: '{best}' "
        f"({matching} of its {len(ours)} tensors match by name and shape)."
    )


def _with_bn_counters(state: dict, arch: str, kwargs: dict) -> dict:
    """State dicts from PyTorch before 0.4.1 have no BatchNorm counters: add zeros."""
    missing = {k: torch.tensor(0) for k in models.build(arch, **kwargs).state_dict()
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
    except ValueError:
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
    state = {k: v for k, v in prog.module.state_dict().items()}
    return Checkpoint(prog.root_type, {}, state, meta, hashlib.sha256(blob).hexdigest(), name, prog, spec)


def from_bytes(data: bytes, name: str = "", arch: str | None = None, dataset: str | None = None) -> Checkpoint:
    """Read a checkpoint. `arch` forces the architecture of a plain state dict (the user's pick);
    `dataset` is the data set a `.pt2` program is evaluated on (checked to fit)."""
    if program.is_program(data):
        return _from_program(data, name, dataset)
    obj = _torch_load(data)
    digest = hashlib.sha256(data).hexdigest()
    if isinstance(obj, dict) and "state_dict" in obj and "arch" in obj:
        arch = obj["arch"]
        if arch not in models.REGISTRY:
            raise CheckpointError(f"Unknown architecture '{arch}'. Registered: {', '.join(sorted(models.REGISTRY))}.")
        ckpt = Checkpoint(arch, dict(obj.get("arch_kwargs", {})), obj["state_dict"], dict(obj.get("meta", {})),
                          digest, name)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is not None:
            if arch not in models.REGISTRY:
                raise CheckpointError(f"Unknown architecture '{arch}'.")
            kwargs, renamed = {}, {}
        else:
            arch, kwargs, renamed = detect_arch(obj)
        state = _with_bn_counters({renamed.get(k, k): v for k, v in obj.items()}, arch, kwargs)
        meta = {"renamed_tensors": renamed} if renamed else {}
        ckpt = Checkpoint(arch, kwargs, state, meta, digest, name)
    else:
        raise CheckpointError("This file holds no state dict: expected a dict of tensors or the bundled format.")
    for key, tensor in ckpt.state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"'{key}' in the state dict is a {type(tensor).__name__}, not a tensor.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"Tensor '{key}' holds NaN or infinite values: the model is broken "
                                  "(a diverged training run?), so its accuracies would mean nothing.")
    ckpt.build_model()  # fail now, with the shapes named, rather than later
    return ckpt


def load(path: str | Path, dataset: str | None = None) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No such checkpoint file: {path}")
    return from_bytes(path.read_bytes(), name=path.stem, dataset=dataset)


def save(path: str | Path, arch: str, arch_kwargs: dict, model: nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": state, "meta": meta}, path)
