"""A bounded, thread-safe cache of engines, shared by every session of one server.

Keyed by (checkpoint content digest, data set, layer, device): a replaced file gets a new digest and
is never served stale. Bounded in entries and bytes; an evicted engine is simply rebuilt on demand.
Engines are read-only once built, so sharing them across sessions is safe. The byte bound is never
exceeded: an engine that alone needs more than the whole budget is refused (`OverBudget`, one
sentence) and not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable

from .engine import Engine


class OverBudget(RuntimeError):
    """An engine that alone needs more memory than the cache may hold; the message says so."""


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


class EngineCache:
    def __init__(self, max_entries: int = 4, max_bytes: int = 2 * 2**30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._engines: OrderedDict[Hashable, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}
        self._holders: dict[Hashable, int] = {}  # sessions holding an entry of their own models (see `hold`)

    def get(self, key: Hashable, build: Callable[[], Engine], estimate: int | None = None) -> Engine:
        """The engine for `key`, built once even when several sessions ask at the same time. `estimate`:
        the caller's lower bound of its bytes, known before building: over the budget, the engine is
        refused at once rather than built and then refused."""
        if estimate is not None and estimate > self.max_bytes and self.lookup(key) is None:
            raise OverBudget(self._too_large(estimate))
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._engines:
                    return self._engines[key]
            try:
                engine = build()
                size = engine.cache_bytes()
            except BaseException:
                with self._lock:
                    self._building.pop(key, None)
                raise
            if size > self.max_bytes:
                with self._lock:
                    self._building.pop(key, None)
                raise OverBudget(self._too_large(size))
            with self._lock:
                self._engines[key] = engine
                self._building.pop(key, None)
                self._evict()
            return engine

    def _too_large(self, size: int) -> str:
        return (f"This model's layer needs {_mb(size)} of memory for its test-set pass, more than the "
                f"{_mb(self.max_bytes)} the server keeps for all models (PRUNE_EXPLORER_MAX_CACHE_GB); choose an "
                "earlier layer or a smaller model.")

    def lookup(self, key: Hashable) -> Engine | None:
        """The engine if it is cached now, without building it."""
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
            return self._engines.get(key)

    def hold(self, key: Hashable) -> None:
        """A session holds the entry `key` (built for a model only it has: an upload, a fine-tuned copy)."""
        with self._lock:
            self._holders[key] = self._holders.get(key, 0) + 1

    def release(self, key: Hashable) -> None:
        """A holder of `key` has ended: when it was the last, the entry is dropped at once, so that the
        memory of a session's own models returns when the session ends, not when eviction reaches it."""
        with self._lock:
            left = self._holders.get(key, 0) - 1
            if left > 0:
                self._holders[key] = left
                return
            self._holders.pop(key, None)
            self._engines.pop(key, None)

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.cache_bytes() for e in self._engines.values())

    def _evict(self) -> None:
        # Least recently used first; the newest entry is within the budget on its own (checked in `get`).
        while len(self._engines) > 1 and (len(self._engines) > self.max_entries
                                          or sum(e.cache_bytes() for e in self._engines.values()) > self.max_bytes):
            self._engines.popitem(last=False)
