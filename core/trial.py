"""A model's first run, before it joins a session: memory estimated on the meta device, then one real batch.

A file can pass every check of its bytes and still describe a model that fails or takes a terabyte
on its first forward pass (an input of 6000x6000, a stride that makes no sense, float64 weights
that cannot multiply float32 images). Such a model must be refused with the reason, not admitted
and then break every page of the session. So an upload is run here first:
1. on the meta device (shapes only, no memory), one batch of the size the engine evaluates, while
   the live bytes of every intermediate tensor are tracked: their peak is the activation memory of
   that batch, an estimate checked against the budget before any real allocation;
2. for real, on a few test images: it must give finite logits of the shape its task expects.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from .untrusted import env_int, printable

ENGINE_BATCH = 1000   # images per batch in the engine's passes (core.engine.Engine's batch_size)
TRIAL_IMAGES = 8      # real test images of the first real pass
MAX_CLASSES = 1000    # classes of a test set (ImageNet's count; the pages list classes by name)


def max_batch_bytes() -> int:
    """The activation memory one batch may take (PRUNE_EXPLORER_MAX_BATCH_MB, default 4 GB)."""
    return env_int("PRUNE_EXPLORER_MAX_BATCH_MB", 4096) * 2**20


class TrialError(ValueError):
    """A model refused at its first run; the message says why in one sentence."""


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors each operator creates while they are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes() if t.device.type == "meta" else 0
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...], batch: int = ENGINE_BATCH) -> int:
    """Peak bytes of the intermediate tensors of one batch, computed on the meta device (no real memory)."""
    state = {k: v.to("meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}
    mode = _LiveBytes()
    with torch.no_grad(), mode:
        functional_call(model, state, (torch.empty(batch, *input_shape, device="meta"),))
    return mode.peak


def _first_line(exc: BaseException) -> str:
    return printable((str(exc).splitlines() or [""])[0] or type(exc).__name__, 160)


def check_memory(model: nn.Module, input_shape: tuple[int, ...], batch: int = ENGINE_BATCH) -> None:
    """Refuse a model whose batch of `batch` images would take more activation memory than the budget,
    or that fails on such a batch already on the meta device (a shape that does not fit)."""
    budget = max_batch_bytes()
    try:
        need = activation_bytes(model, input_shape, batch)
    except Exception as exc:  # noqa: BLE001 - a shape error shows on the meta device already
        raise TrialError(f"Refused: the model fails on a batch of {'x'.join(map(str, input_shape))} images "
                         f"({type(exc).__name__}: {_first_line(exc)}).") from None
    if need > budget:
        raise TrialError(f"Refused: one batch of {batch:,} images would take about {need / 2**30:,.1f} GB "
                         f"of activations (estimated on the meta device), more than the {budget / 2**30:,.1f} GB "
                         "this server allows (PRUNE_EXPLORER_MAX_BATCH_MB).")


def check(model: nn.Module, input_shape: tuple[int, ...], x: torch.Tensor, task: str, classes: int,
          at_least: bool = False) -> None:
    """Refuse, in one sentence, a model whose one batch would exceed the memory budget, that fails on
    real images, or whose logits are not finite and shaped for its task: (N, classes) for a multiclass
    model, (N,) or (N, 1) for a binary one. `x`: a few real test images, prepared as the model's inputs."""
    check_memory(model, input_shape)
    x = x[:TRIAL_IMAGES]
    try:
        with torch.no_grad():
            logits = model(x)
    except Exception as exc:  # noqa: BLE001 - whatever the model does wrong, it is this model's fault
        raise TrialError(f"Refused: the model fails on the first test images ({type(exc).__name__}: "
                         f"{_first_line(exc)}).") from None
    n = len(x)
    wanted = [(n,), (n, 1)] if task == "binary" else [(n, classes)]
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
    if at_least and shape is not None and len(shape) == 2 and shape[0] == n and task != "binary":
        if shape[1] < classes:  # class folders named by index, some absent: the labels must fit the outputs
            raise TrialError(f"Refused: the model gives {shape[1]:,} outputs, but the test images' class folders "
                             f"go up to index {classes - 1:,}.")
    elif shape not in wanted:
        raise TrialError(f"Refused: on {n} test images the model gives "
                         f"{list(shape) if shape is not None else type(logits).__name__}, not logits of shape "
                         f"{list(wanted[0])}.")
    if not logits.is_floating_point() or not bool(torch.isfinite(logits).all()):
        raise TrialError("Refused: on the first test images the model gives NaN, infinite or non-float logits.")


def check_on(ckpt, split) -> None:
    """`check` for a checkpoint on the test split it will be evaluated on: one output per class of that
    split (a yes/no task: one logit), or for images in folders named by class index ("3_dress") with some
    index absent, at least one output per index; and a class count within the bound."""
    classes = len(split.spec.class_names)
    if classes > MAX_CLASSES:
        raise TrialError(f"Refused: the test data has {classes:,} classes, more than the {MAX_CLASSES:,} this "
                         "product shows.")
    labels = int(split.y.max()) + 1 if len(split.y) else 0
    if ckpt.spec.task == "binary" and labels > 2:
        raise TrialError(f"Refused: the model answers yes or no, but the test images have {labels:,} class indices.")
    check(ckpt.build_model(), ckpt.spec.input_shape, split.x, ckpt.spec.task, max(classes, labels),
          at_least=labels > classes)  # more indices than folders: folders named by index, some absent
