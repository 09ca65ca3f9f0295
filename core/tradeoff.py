"""The trade-off chart's points: every strategy at every target, exact, made once and kept.

A point is one plan (core/compress.py) with its exact count and its slim model's counted MACs and
parameters (core/compressed.py); its measured latency and its fine-tuned count are added on request.
Each is a fact about (checkpoint content, test data content, device, line, target, criterion, mode,
normaliser, cap, what the target is a share of), kept in the engine store (core/store.py): a restart
or a second server reads it back. The chart's lines:
- `uniform`, `global` (the normaliser, capped), `global-uncapped` (the same with the cap off: where
  one threshold wipes out a layer), `sensitivity` (Li et al.'s map, the Sensitivity page's, shared);
- the baseline band: `uniform` with a seeded random order (`random:0`, `random:1`, ...).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import torch

from . import compress, compressed
from .compress import DEFAULT_CAP, TARGETS
from .engine import Progress, pick_device
from .network import Network

LINES = ("uniform", "global", "global-uncapped", "sensitivity")
BAND = 3                      # random orders in the baseline band
DEFAULT_CRITERION = "l1_norm"  # Li et al. 2017's rule, the one the sensitivity map was made for
DEFAULT_NORMALISER = "none"    # one raw threshold over all channels: the cap's reason is then seen


@dataclass(frozen=True)
class Settings:
    criterion: str = DEFAULT_CRITERION
    mode: str = "remove"
    normaliser: str = DEFAULT_NORMALISER
    cap: float | None = DEFAULT_CAP
    of: str = "macs"


def band_lines(n: int = BAND) -> list[str]:
    return [f"random:{seed}" for seed in range(n)]


@dataclass
class Point:
    line: str
    target: float
    pruned: list[int]                 # per unit
    layers: dict[str, list[int]]      # the plan: each layer's pruned channels
    correct: int
    total: int
    macs: int
    params: int
    how: str = ""
    notes: list[str] = field(default_factory=list)
    wiped: list[str] = field(default_factory=list)
    latency_b1_ms: float | None = None
    latency_b256_ms: float | None = None
    correct_finetuned: int | None = None
    finetune_steps: int = 0
    finetune_seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def accuracy_finetuned(self) -> float | None:
        return None if self.correct_finetuned is None else self.correct_finetuned / self.total


def network_for(ckpt, device: str = "auto", store=None, data_root: str | None = None, split=None,
                progress: Progress | None = None) -> Network:
    """The checkpoint's network on its test split; its pass's statistics read back from the store when kept."""
    from .store import data_digest, remembered

    split = split if split is not None else ckpt.split(train=False, data_root=data_root)
    dev = pick_device(device)
    model = ckpt.build_model()
    if store is None:
        return Network(model, split.x, split.y, ckpt.spec.task, dev, progress=progress)
    key = ("network", ckpt.digest, data_digest(split.x, split.y), dev.type)
    made: list[Network] = []

    def make() -> dict:
        made.append(Network(model, split.x, split.y, ckpt.spec.task, dev, progress=progress))
        return made[0].saved_stats()

    saved = remembered(store, key, make, lambda s: "stats" in s)
    net = made[0] if made else Network(model, split.x, split.y, ckpt.spec.task, dev, saved_stats=saved)
    net.stored_as = (store, key)
    return net


def plan(net: Network, line: str, target: float, settings: Settings, rows=None) -> compress.Plan:
    """The plan of one line of the chart at one target."""
    s = settings
    if line.startswith("random:"):
        return compress.uniform(net, target, s.of, line, s.mode, s.cap)
    if line == "uniform":
        return compress.uniform(net, target, s.of, s.criterion, s.mode, s.cap)
    if line in ("global", "global-uncapped"):
        cap = None if line == "global-uncapped" else s.cap
        return compress.global_(net, target, s.of, s.criterion, s.mode, s.normaliser, cap)
    if line == "sensitivity":
        return compress.sensitivity(net, rows, target, s.of, s.criterion, s.mode, s.cap)
    raise ValueError(f"Unknown line '{line}'. Lines: {', '.join(LINES)}, random:SEED.")


def _key(net: Network, line: str, target: float, s: Settings) -> tuple | None:
    stored = getattr(net, "stored_as", None)
    if stored is None:
        return None
    return stored[1] + ("point", line, float(target), s.criterion, s.mode, s.normaliser,
                        None if s.cap is None else float(s.cap), s.of)


def point(net: Network, line: str, target: float, settings: Settings, rows=None) -> Point:
    """The exact point of a line at a target (read back from the store when it was made before)."""
    def make() -> dict:
        p = plan(net, line, target, settings, rows)
        counted = compressed.count(net, p)
        return asdict(Point(line, float(target), list(p.pruned), p.layers, counted.correct, counted.total,
                            net.macs(list(p.pruned)), net.params(list(p.pruned)), counted.how,
                            list(p.notes), p.wiped(net)))

    key = _key(net, line, target, settings)
    if key is None:
        return Point(**make())
    from .store import remembered

    return Point(**remembered(net.stored_as[0], key, make, lambda d: "correct" in d))


def as_plan(net: Network, pt: Point, settings: Settings) -> compress.Plan:
    """The plan a point was made from, rebuilt from what it kept."""
    return compress.Plan(pt.line, pt.line if pt.line.startswith("random:") else settings.criterion, settings.mode,
                         tuple(pt.pruned), {k: list(v) for k, v in pt.layers.items()}, pt.target, settings.of,
                         settings.normaliser, settings.cap, tuple(pt.notes))


def measured(net: Network, pt: Point, settings: Settings, repeats: int = 5) -> Point:
    """The point with its slim model's latency for batch 1 and 256 on the network's device type (median of
    at least `repeats` runs; none where the plan cannot be removed for real); kept beside the point."""
    from . import slim

    if pt.latency_b256_ms is not None or pt.wiped:
        return pt

    def make() -> dict:
        model = compressed.slim_model(net, as_plan(net, pt, settings))
        m = slim.measure_together([model], net.input_shape, repeats=repeats, devices=(net.device.type,),
                                  max_seconds=5.0)[0]
        return {"b1": m.latency_ms[(net.device.type, 1)], "b256": m.latency_ms[(net.device.type, 256)],
                "macs": m.macs, "params": m.parameters}

    key = _key(net, pt.line, pt.target, settings)
    if key is None:
        found = make()
    else:
        from .store import remembered

        found = remembered(net.stored_as[0], key + ("latency",), make, lambda d: "b256" in d)
    return replace(pt, latency_b1_ms=found["b1"], latency_b256_ms=found["b256"])


def finetuned(net: Network, pt: Point, settings: Settings, train_x: torch.Tensor, train_y: torch.Tensor,
              recipe: compressed.FinetuneRecipe, progress=None, should_stop: Callable[[], bool] | None = None,
              ) -> tuple[Point, torch.nn.Module | None]:
    """The point with its fine-tuned count, and the fine-tuned model (None where it was read back from the
    store or the run was stopped before its last step: a stopped run is not a result)."""
    import time

    key = _key(net, pt.line, pt.target, settings)
    name = ("finetuned", recipe.steps, recipe.lr, recipe.batch_size, recipe.seed)
    if key is not None:
        found = net.stored_as[0].load(key + name)
        if found is not None and "correct" in found:
            return replace(pt, correct_finetuned=found["correct"], finetune_steps=recipe.steps,
                           finetune_seconds=found["seconds"]), None
    began = time.perf_counter()
    model, losses = compressed.finetune(net, as_plan(net, pt, settings), train_x, train_y, recipe,
                                        progress=progress, should_stop=should_stop)
    seconds = time.perf_counter() - began
    if len(losses) < recipe.steps:
        return pt, None
    right = compressed.count_model(model, net)
    if key is not None:
        net.stored_as[0].save(key + name, {"correct": right, "seconds": seconds})
    return replace(pt, correct_finetuned=right, finetune_steps=recipe.steps, finetune_seconds=seconds), model


def chart_jobs(lines=LINES, targets=TARGETS, band: int = BAND) -> list[tuple[str, float]]:
    """Every (line, target) of a whole chart, the targets in the order a viewer wants them: a few across
    the range first, so that every line has a shape within seconds."""
    first = [t for t in targets if t in (0.5, 0.25, 0.9, 0.2)] or list(targets[:1])
    order = first + [t for t in targets if t not in first]
    return [(line, t) for t in order for line in list(lines) + band_lines(band)]


def chart(net: Network, settings: Settings, rows=None, lines=LINES, targets=TARGETS, band: int = BAND,
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> Iterator[Point]:
    """The chart's points one by one (a caller draws them as they come and may stop between two)."""
    jobs = chart_jobs(lines, targets, band)
    for i, (line, target) in enumerate(jobs):
        if should_stop is not None and should_stop():
            return
        if line == "sensitivity" and rows is None:
            continue
        yield point(net, line, target, settings, rows)
        if progress:
            progress(i + 1, len(jobs), f"{line} at {target:.0%} of the {'MACs' if settings.of == 'macs' else 'parameters'}")


ROW_COLUMNS = ["strategy", "target", "macs", "macs_kept", "params", "params_kept", "latency_b1_ms",
               "latency_b256_ms", "correct", "total", "accuracy", "correct_finetuned", "accuracy_finetuned"]


def row(net: Network, pt: Point) -> list:
    """One CSV row in ROW_COLUMNS' order (the `_finetuned` columns repeat the pruned ones where not fine-tuned)."""
    ft = pt.correct_finetuned if pt.correct_finetuned is not None else pt.correct
    lat = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    return [pt.line, f"{pt.target:g}", pt.macs, f"{pt.macs / net.base_macs:.4f}", pt.params,
            f"{pt.params / net.base_params:.4f}", lat(pt.latency_b1_ms), lat(pt.latency_b256_ms), pt.correct,
            pt.total, f"{pt.accuracy:.4f}", ft, f"{ft / pt.total:.4f}"]
