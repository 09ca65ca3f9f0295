"""The engine: accuracies for any pruned set of one conv layer's channels, from one cached pass.

The central idea: pruning channels of one conv changes nothing upstream of it, and zeroing a
channel's weights and bias is the same as multiplying that output channel by 0. So the model is
split at the conv (`core/split.py`), the part before it runs over the test set ONCE
(`core/capture.py`), and the accuracy for any set of pruned channels comes from one of three
evaluators (`core/evaluate.py`): the linear read-out's cumulative sums, the split's suffix over the
cached boundary, or a hook on a private copy for a model that cannot be split. This facade ranks
channels (`core/criteria.py`), turns K into masks, and remembers every exact count it has made.
The loaded model is never mutated: the engine holds its own copy and only ever reads it.
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
from torch import nn

from . import capture, criteria
from .evaluate import (Evaluator, HookEvaluator, ReadoutEvaluator, SplitEvaluator, batch_bounds, one_chunk,
                       order_mask)
from .readout import ReadoutCache, find_readout
from .split import MODES, Split, conv_layer_names, default_layer, following_batchnorm

PATH_SPLIT = "fx split (prefix cached once)"
PATH_FAST = "fx split + on/off features at the linear read-out (whole curve from one pass)"
PATH_HOOK = "forward hook fallback (full pass per evaluation)"

Progress = Callable[[int, int, str], None]  # (done, total, what is being done)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when there is one; `cuda` without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available here.")
    return torch.device(name)


class Memo:
    """Values computed once per key, shared by every thread. A value already there is read without
    waiting; callers of the same missing key wait for one computation; other keys never wait: a
    student's lookup of a ready curve must not wait behind the warm-up computing another criterion's."""

    def __init__(self):
        self._values: dict[Hashable, Any] = {}  # entries are only ever added: a dict read is atomic
        self._locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]):
        if key in self._values:
            return self._values[key]
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = compute()
            return self._values[key]

    def peek(self, key: Hashable, default=None):
        """The value if it is there (a lookup, never a computation)."""
        return self._values.get(key, default)

    def put(self, key: Hashable, value) -> None:
        """Keep a value computed elsewhere (a sweep's counts); a value already there stays."""
        self._values.setdefault(key, value)

    def items(self) -> list[tuple[Hashable, Any]]:
        return list(self._values.items())


class Engine:
    """Accuracies for any pruned set of one conv layer's channels, from one cached pass.

    Shared read-only between sessions and threads: after `__init__` only the memos grow.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str | None = None,
                 task: str = "multiclass", device: str | torch.device = "auto", batch_size: int = 1000,
                 progress: Progress | None = None, fast: bool = True, boundary_budget: int | None = None,
                 saved: dict | None = None):
        self.device = pick_device(device) if isinstance(device, str) else device
        # The boundary tensors of a middle layer are kept up to this many bytes; batches beyond it
        # are recomputed through the prefix when evaluated (exact either way, slower).
        self.boundary_budget = boundary_budget if boundary_budget is not None else default_boundary_budget()
        self.model = copy.deepcopy(model).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layer = layer or default_layer(self.model)
        if self.layer not in conv_layer_names(self.model):
            raise ValueError(f"'{self.layer}' is not a Conv2d layer of this model. "
                             f"Conv layers: {', '.join(conv_layer_names(self.model))}.")
        self.conv: nn.Conv2d = self.model.get_submodule(self.layer)
        self.task, self.batch_size = task, batch_size
        self.x, self.y = x, y
        self._split, reason = self._make_split()
        self.bn_name = self._split.bn_name if self._split else following_batchnorm(self.model, self.layer)
        if saved is not None:  # `state()` of an engine of the same model, data, layer and device (core/store.py)
            found = capture.restore(saved["capture"], self._readouts(reason)[0] if self._split and fast else {})
        elif self._split is None:
            found = capture.capture_hooked(self.model, self.layer, self.bn_name, x, self.device, batch_size, progress)
        else:
            readouts, reason = self._readouts(reason) if fast else ({}, reason)
            found = capture.capture(self._split, x, y, task, self.device, batch_size, self.boundary_budget,
                                    readouts, reason, progress)
        self.stats, self.base_correct = found.stats, found.base_correct  # base_correct: K = 0, counted in the pass
        self.boundary_bytes, self.fast_reason = found.boundary_bytes, found.fast_reason
        self._readout_caches = found.readouts
        self._boundaries, bounds = found.boundaries, batch_bounds(self.total, batch_size)
        self._captured = found  # for `state()`; dropped where the boundaries are joined into one chunk
        if self._fits_one_chunk():  # on a GPU with room; one copy for both modes
            self._boundaries, bounds = one_chunk(self._split, self._boundaries), [(0, self.total)]
            self._captured = None
        self._evaluators: dict[str, Evaluator] = {mode: self._evaluator(mode, bounds) for mode in MODES}
        self._rankings, self._curves, self._answers, self._taylor = Memo(), Memo(), Memo(), Memo()
        if saved is not None:
            self._load_memos(saved.get("memos") or {})
        self.restored = saved is not None  # the pass was read back, not made
        self.stored_as: tuple | None = None  # (store, key) where `from_checkpoint` keeps it on disk
        self._memos_saved = 0

    # -- kept on disk (core/store.py) ---------------------------------------------------------
    def state(self) -> dict | None:
        """The pass and every memo as plain tensors, lists and numbers, for `Engine(..., saved=...)`;
        None where the pass is no longer held as it was made (boundaries joined on a GPU)."""
        if self._captured is None:
            return None
        return {"capture": capture.capture_state(self._captured)}

    def memo_state(self) -> dict:
        """The curves, exact counts and Taylor scores known so far (rankings are recomputed from them)."""
        return {"curves": [[list(k), v] for k, v in self._curves.items()],
                "answers": [[list(k), v] for k, v in self._answers.items()],
                "taylor": [v for _, v in self._taylor.items()]}

    def memo_count(self) -> int:
        return len(self._curves.items()) + len(self._answers.items()) + len(self._taylor.items())

    def _load_memos(self, memos: dict) -> None:
        for key, curve in memos.get("curves", []):
            if len(curve) != self.channels + 1:
                raise ValueError("a saved curve does not fit this layer")
            self._curves.put(tuple(key), [int(c) for c in curve])
        for key, count in memos.get("answers", []):
            self._answers.put(tuple(key), int(count))
        for scores in memos.get("taylor", []):
            if tuple(scores.shape) != (self.channels,):
                raise ValueError("saved Taylor scores do not fit this layer")
            self._taylor.put("scores", scores.cpu())

    def _make_split(self) -> tuple[Split | None, str]:
        try:
            return Split(self.model, self.layer), ""
        except Exception:  # data-dependent control flow etc.: fall back, and say so
            return None, ("its forward pass cannot be followed operation by operation (it decides what to do "
                          "from its data, or calls code that cannot be traced), so it cannot be cut at this layer")

    def _readouts(self, reason: str) -> tuple[dict[str, ReadoutCache], str]:
        """An empty read-out cache for each mode whose suffix reads the layer out linearly (the capture fills it)."""
        found = {}
        for mode, suffix in self._split.suffixes.items():
            readout, why = find_readout(suffix)
            if readout is not None:
                found[mode] = ReadoutCache(readout, self.channels, self.task)
            else:
                reason = why
        return found, reason

    def _fits_one_chunk(self) -> bool:
        """Every batch's boundary is kept (some mode evaluates through the suffix), on a GPU with eight
        times their size free."""
        return self.device.type == "cuda" and bool(self._boundaries) and None not in self._boundaries and \
            8 * self.boundary_bytes < torch.cuda.mem_get_info(self.device)[0]

    def _evaluator(self, mode: str, bounds: list[tuple[int, int]]) -> Evaluator:
        if mode in self._readout_caches:
            return ReadoutEvaluator(self._readout_caches[mode], self.device)
        if self._split is None:
            where = self.bn_name if mode == "remove" and self.bn_name else self.layer
            return HookEvaluator(self.model, where, self.channels, self.x, self.y, self.task, self.device,
                                 self.batch_size)
        return SplitEvaluator(self._split, mode, self._boundaries, bounds, self.x, self.y, self.task, self.device)

    @property
    def path(self) -> str:
        """Which evaluation path is in use, in words the UI shows."""
        if self._split is None:
            return PATH_HOOK
        return PATH_FAST if len(self._readout_caches) == len(MODES) else PATH_SPLIT

    @property
    def recomputed_batches(self) -> int:
        """Batches whose boundary did not fit the budget: their prefix runs again at each evaluation."""
        return sum(batch is None for batch in self._boundaries)

    def cache_bytes(self) -> int:
        """Memory held by the cached pass (boundary tensors and read-out features)."""
        held = [t for batch in self._boundaries if batch is not None for t in batch] + \
            [t for r in self._readout_caches.values() for t in r.tensors()]
        unique = {t.data_ptr(): t for t in held}  # the `on` features are shared between modes
        return sum(t.numel() * t.element_size() for t in unique.values())

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    @property
    def total(self) -> int:
        return len(self.y)

    def readout(self, mode: str) -> ReadoutCache | None:
        """The cumulative-sum read-out of one mode, where it applies (the oracle and slim ask it for what they need)."""
        return self._readout_caches.get(mode)

    # -- ranking ------------------------------------------------------------------------------
    def ranking(self, criterion: str = "mean") -> torch.Tensor:
        """Channel indices in pruning order (rank 0 = pruned first). Computed once per criterion."""
        return self._rankings.get(criterion, lambda: criteria.get(criterion).rank(self.facts()))

    def scores(self, criterion: str = "mean") -> torch.Tensor:
        return criteria.get(criterion).scores(self.facts())

    def facts(self) -> criteria.LayerFacts:
        """What the criteria may look at (they never see the engine itself)."""
        bn = self.model.get_submodule(self.bn_name) if self.bn_name else None
        return criteria.LayerFacts(self.stats.mean_map, self.stats.mean_abs_map, self.stats.zero_fraction,
                                   self.conv.weight.detach().cpu(),
                                   bn.weight.detach().cpu() if bn is not None and bn.weight is not None else None,
                                   self.taylor_scores)

    def taylor_scores(self) -> torch.Tensor:
        """The first-order Taylor criterion's scores (`capture.taylor_scores`), computed once."""
        if self._split is None:
            raise ValueError("the Taylor criterion needs the model split at the layer, which torch.fx cannot "
                             "do for this model")
        return self._taylor.get("scores", lambda: capture.taylor_scores(self._split, self.x, self.y, self.task,
                                                                      self.device, self.batch_size))

    def reranked_order(self, steps: int, mode: str = "remove", criterion: str = "mean") -> list[int]:
        """The re-ranking procedure of the second pruning report, really done: after each prune, run the
        test set again through the pruned model, re-rank the channels still there, prune the lowest. (It
        costs a full pass per step; `ranking` gives the same order for activation criteria, which is what
        this shows.)"""
        if self._split is None:
            raise ValueError("re-ranking needs the fx split; this model uses the hook fallback")
        return capture.reranked_order(self._split, self.x, self.device, self.batch_size, steps, mode, criterion)

    def mask_for(self, k: int, criterion: str = "mean") -> torch.Tensor:
        self._check_k(k)
        return order_mask(self.ranking(criterion), k, self.channels)

    def _check_k(self, k: int) -> None:
        if not 0 <= k <= self.channels:
            raise ValueError(f"K must be between 0 and {self.channels}, got {k}.")

    # -- evaluation ---------------------------------------------------------------------------
    def _of(self, mode: str) -> Evaluator:
        if mode not in MODES:
            raise ValueError(f"Unknown mode '{mode}'. Modes: {', '.join(MODES)}.")
        return self._evaluators[mode]

    def correct_for_mask(self, mask: torch.Tensor, mode: str = "zero") -> int:
        """Test images classified right with the channels where `mask == 0` pruned."""
        return self._of(mode).correct(mask)

    def predictions(self, k: int, mode: str = "zero", criterion: str = "mean") -> torch.Tensor:
        """The predicted class of every test image with the K lowest-ranked channels pruned (N,)."""
        return self._of(mode).predictions(self.mask_for(k, criterion))

    def correct(self, k: int, mode: str = "zero", criterion: str = "mean") -> int:
        """Exact count with the K lowest-ranked channels pruned; remembered, so asking again is a lookup."""
        known = self.known(k, mode, criterion)
        if known is not None:
            return known
        return self._answers.get((mode, criterion, k), lambda: self.correct_for_mask(self.mask_for(k, criterion), mode))

    def known(self, k: int, mode: str = "zero", criterion: str = "mean") -> int | None:
        """The exact count if it is already known (a lookup, never a computation)."""
        curve = self._curves.peek((mode, criterion))
        if curve is not None:
            return curve[k]
        if k == 0 and self.base_correct is not None:  # nothing pruned: counted during the one pass
            return self.base_correct
        return self._answers.peek((mode, criterion, k))

    def answers(self, mode: str = "zero", criterion: str = "mean") -> dict[int, int]:
        """Every K whose exact count is known so far (the whole curve where it is computed)."""
        curve = self._curves.peek((mode, criterion))
        if curve is not None:
            return dict(enumerate(curve))
        known = {k: c for (m, c_name, k), c in self._answers.items() if m == mode and c_name == criterion}
        return {0: self.base_correct, **known} if self.base_correct is not None else known

    @torch.no_grad()
    def removed_channels_are_silent(self) -> bool:
        """In `remove` mode the batch norm's output is zeroed; the channels are then silent if what the
        statistics are taken on (the activation after it) is exactly zero: run on a few test images."""
        if self._split is None:
            return False
        boundary = self._split.prefix(self.x[:4].to(self.device))
        _, acts = self._split.suffixes["remove"](*boundary, torch.zeros(self.channels, device=self.device))
        return all(bool((a == 0).all()) for a in acts)

    def sample_answer(self, k: int, mode: str = "zero", criterion: str = "mean") -> SampleAnswer:
        """The count on the first batch of test images only: a quick, labelled estimate while the
        exact count over every image is computed (a middle layer costs a suffix pass per K)."""
        return SampleAnswer(self.sample_correct(self.mask_for(k, criterion), mode), self.sample_size, self.total)

    @property
    def sample_size(self) -> int:
        return min(self.batch_size, self.total)

    def sample_correct(self, mask: torch.Tensor, mode: str = "zero") -> int:
        """Right answers among the first batch of test images (`sample_size`) with `mask`'s zeros pruned."""
        return self._of(mode).sample_correct(mask, self.sample_size)

    def coarse_ks(self, points: int = 17) -> list[int]:
        """K at every 1/(points-1) of the channels (17 points: every 1/16), always with 0 and P."""
        return sorted({round(i * self.channels / (points - 1)) for i in range(points)})

    def unknown(self, mode: str = "zero", criterion: str = "mean") -> int:
        """How many Ks from 0 to P have no exact count yet."""
        return self.channels + 1 - len(self.answers(mode, criterion))

    def next_refinement(self, mode: str = "zero", criterion: str = "mean") -> int | None:
        """The K where one more exact count teaches most about the curve: the middle of the gap between
        two known neighbours that is widest times the accuracy change across it (plus one image, so a flat
        gap, which may hide a dip, is filled in its turn). None when no gap is left."""
        known = sorted(self.answers(mode, criterion).items())
        gaps = [((b - a) * (abs(cb - ca) + 1), (a + b) // 2)
                for (a, ca), (b, cb) in zip(known, known[1:]) if b - a > 1]
        return max(gaps)[1] if gaps else None

    def sweep(self, ks: Iterable[int], mode: str = "zero", criterion: str = "mean",
              progress: Progress | None = None) -> list[tuple[int, int]]:
        """(K, correct) for each K, pruning the K lowest-ranked channels; counts already known are not made again."""
        ks = list(ks)
        for k in ks:
            self._check_k(k)
        todo = [k for k in dict.fromkeys(ks) if self.known(k, mode, criterion) is None]
        counts = self._of(mode).sweep(self.ranking(criterion), todo, progress, f"{mode} sweep") if todo else []
        for k, c in zip(todo, counts):
            self._answers.put((mode, criterion, k), c)
        return [(k, self.known(k, mode, criterion)) for k in ks]

    def sweep_order(self, order: Sequence[int], ks: Iterable[int], mode: str = "zero") -> list[tuple[int, int]]:
        """(K, correct) pruning the first K channels of an explicit order (an oracle's, say)."""
        ks = list(ks)
        return list(zip(ks, self._of(mode).sweep(torch.as_tensor(list(order), dtype=torch.long), ks)))

    def curve(self, mode: str = "zero", criterion: str = "mean", progress: Progress | None = None) -> list[int]:
        """Correct counts for every K from 0 to P; computed once per (mode, criterion), then shared."""
        return self._curves.get((mode, criterion),
                                lambda: [c for _, c in self.sweep(range(self.channels + 1), mode, criterion, progress)])


@dataclass(frozen=True)
class SampleAnswer:
    """Accuracy on a fixed sample of the test set, with a 95% Wilson interval for the whole set."""

    correct: int
    n: int
    total: int  # images in the whole test set

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        p, n = self.accuracy, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def default_boundary_budget() -> int:
    """Bytes of boundary tensors one middle-layer engine keeps (PRUNE_EXPLORER_MAX_BOUNDARY_GB, default 1)."""
    return int(float(os.environ.get("PRUNE_EXPLORER_MAX_BOUNDARY_GB", 1)) * 2**30)


def from_checkpoint(ckpt, layer: str | None = None, device: str = "auto", data_root: str | None = None,
                    progress: Progress | None = None, split=None, store=None) -> Engine:
    """The engine for a checkpoint on its data set's test split (or on `split`, e.g. one's own images).
    With a `store` (core/store.py) a pass made before, by this process or another, is read back instead
    of made again, and a new one is kept."""
    split = split if split is not None else ckpt.split(train=False, data_root=data_root)
    model = ckpt.build_model()
    if store is None:
        return Engine(model, split.x, split.y, layer=layer, task=ckpt.spec.task, device=device, progress=progress)
    from .store import data_digest

    dev = pick_device(device)
    key = ("engine", ckpt.digest, data_digest(split.x, split.y), layer or default_layer(model), dev.type)
    saved = store.load(key, dev)
    eng = None
    if saved is not None:
        saved["memos"] = (store.load(key + ("memos",), "cpu") or {}).get("memos")
        try:
            eng = Engine(model, split.x, split.y, layer=layer, task=ckpt.spec.task, device=dev, saved=saved)
        except Exception:  # a file that does not fit this engine: computed again
            store.drop(key)
            store.drop(key + ("memos",))
    if eng is None:
        eng = Engine(model, split.x, split.y, layer=layer, task=ckpt.spec.task, device=dev, progress=progress)
        state = eng.state()
        if state is not None:
            store.save(key, state)
    eng.stored_as = (store, key)
    eng._memos_saved = eng.memo_count()
    return eng


def kept(eng: Engine, name: tuple, make: Callable[[], dict], fits: Callable[[dict], bool] = lambda state: True) -> dict:
    """A further fact about this engine's model, data and layer (an oracle order, say), kept beside the
    engine in its store when it has one (`from_checkpoint(..., store=)`): made once, read back after."""
    if eng.stored_as is None:
        return make()
    from .store import remembered

    store, key = eng.stored_as
    return remembered(store, key + name, make, fits)


def keep_memos(eng: Engine) -> None:
    """Write the engine's curves and counts to its store when it learned something since the last write."""
    if eng.stored_as is None or eng.memo_count() == eng._memos_saved:
        return
    store, key = eng.stored_as
    count = eng.memo_count()
    if store.save(key + ("memos",), {"memos": eng.memo_state()}):
        eng._memos_saved = count
