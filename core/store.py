"""What an engine learned from the test set, kept on disk: a restart or an eviction reads it back.

An engine's one pass (the capture: channel statistics, read-out features, boundary tensors) and its
memos (curves, exact counts, Taylor scores) are a fact about (checkpoint content, test data content,
layer, device, batch size, this format's version, PyTorch's version). `Store` keeps them as files
under `PRUNE_EXPLORER_CACHE`/engines, bounded by `PRUNE_EXPLORER_DISK_CACHE_GB` (default 4; 0 turns
it off), least recently used removed first. A file is written to a temporary name and renamed, so a
reader never sees half of one, and read with the weights-only unpickler (tensors, lists, dicts,
numbers and strings only); a file that does not load, or does not fit the engine, is deleted and the
engine computed again. Several server processes may share one directory: the worst race is two
processes writing the same entry, and the last rename wins with an equal file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Hashable

import torch

from .data import cache_dir

FORMAT = 1  # raise when what an engine keeps changes: older files are then never read


def default() -> Store | None:
    """The store the app and the CLI use, or None where PRUNE_EXPLORER_DISK_CACHE_GB is 0."""
    gb = float(os.environ.get("PRUNE_EXPLORER_DISK_CACHE_GB", 4))
    return Store(cache_dir() / "engines", int(gb * 2**30)) if gb > 0 else None


def remembered(store: Store | None, key: Hashable, make: Callable[[], dict],
               fits: Callable[[dict], bool] = lambda state: True) -> dict:
    """`make()`'s result (plain tensors, lists, numbers, strings) for `key`: read back where it was kept
    before and still `fits`, otherwise made and kept. Without a store it is simply made."""
    if store is not None:
        found = store.load(key)
        if found is not None:
            found.pop("key", None)
            if fits(found):
                return found
            store.drop(key)
    made = make()
    if store is not None:
        store.save(key, made)
    return made


def data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """The content of a test set (images and labels), for a store key: a replaced file is a new key."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.contiguous().cpu()
        h.update(repr((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Store:
    def __init__(self, root: Path, budget_bytes: int):
        self.root, self.budget = Path(root), budget_bytes

    def path(self, key: Hashable) -> Path:
        name = hashlib.sha256(repr((FORMAT, torch.__version__, key)).encode()).hexdigest()
        return self.root / f"{name}.pt"

    def load(self, key: Hashable, device: torch.device | str = "cpu") -> dict | None:
        """The entry for `key`, or None (absent, or unreadable: then it is deleted)."""
        path = self.path(key)
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # corrupt, truncated, foreign or hostile: never trusted, computed again
            self.drop(key)
            return None
        if not isinstance(state, dict) or state.get("key") != repr(key):
            self.drop(key)
            return None
        try:
            os.utime(path)  # recently used: eviction takes the oldest first
        except OSError:
            pass
        return state

    def save(self, key: Hashable, state: dict) -> bool:
        """Keep `state` (tensors, lists, dicts, numbers, strings) for `key`; False where it would take
        more than a quarter of the budget or the disk refuses (the engine works without it)."""
        path = self.path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as f:
                torch.save({**state, "key": repr(key)}, f)
                size = f.tell()
            if size > self.budget // 4:
                os.unlink(f.name)
                return False
            os.replace(f.name, path)
        except OSError:
            return False
        self._evict(keep=path)
        return True

    def drop(self, key: Hashable) -> None:
        try:
            self.path(key).unlink()
        except OSError:
            pass

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.suffix == ".pt" and p.is_file()]
        except OSError:
            return []

    def _evict(self, keep: Path) -> None:
        files = []
        for p in self._files():
            try:
                info = p.stat()
            except OSError:  # removed by another process meanwhile
                continue
            files.append((info.st_mtime, info.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.budget:
                break
            if p != keep:
                try:
                    p.unlink()
                except OSError:
                    pass
                total -= size
