"""Forward hooks that live only inside a `with` block (fastai's `Hook`, in one function).

A hook left on a module changes every later call of it, in every session that shares the module:
so hooks go only on a private copy, and only for as long as the block that needs them runs.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

Hook = Callable[[nn.Module, tuple, object], object]  # (module, inputs, output) -> a new output, or None


@contextlib.contextmanager
def hooks(pairs: Iterable[tuple[nn.Module, Hook]]) -> Iterator[None]:
    """Register each (module, hook) as a forward hook for the duration of the block; removed however it ends."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
