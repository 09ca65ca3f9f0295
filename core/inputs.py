"""How a model's inputs are prepared: part of the model, never assumed silently.

A model trained on pixels in [0, 1] and one trained on normalised pixels read the same images very
differently: the same CNN drops from 85% to about 30% when fed the other preparation. So every
checkpoint carries a `Preparation`: pixels scaled to [0, 1], then, per channel, `(x - mean) / std`
(mean 0 and std 1: not normalised). It comes from the file (`meta["input"]`, written by
`python -m core export`), from the user's choice, or, where neither says, it is the data set's usual
statistics, and then every page and command says that it was assumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

FROM_FILE, CHOSEN, ASSUMED = "stated in the file", "chosen by you", "assumed: the file does not say"
MAX_CHANNELS = 64


class PreparationError(ValueError):
    """A preparation that cannot be used; the message says why in one sentence."""


@dataclass(frozen=True)
class Preparation:
    """Pixels in [0, 1], then `(x - mean) / std` per channel (one value: the same for every channel)."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    source: str = field(default=ASSUMED, compare=False)  # where it came from: not part of its identity

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not 1 <= len(self.mean) <= MAX_CHANNELS:
            raise PreparationError(f"The input preparation needs one mean and one std per channel (or one of "
                                   f"each for all); got {len(self.mean)} means and {len(self.std)} stds.")
        if not all(math.isfinite(v) and abs(v) <= 1e3 for v in self.mean) or \
                not all(math.isfinite(v) and 1e-6 <= v <= 1e3 for v in self.std):
            raise PreparationError("The input preparation's mean must be finite numbers and its std positive "
                                   "numbers (at most 1000).")

    @property
    def normalised(self) -> bool:
        return any(m != 0 for m in self.mean) or any(s != 1 for s in self.std)

    def stats(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std for each of `channels` channels (a single value is repeated)."""
        if len(self.mean) == channels:
            return self.mean, self.std
        if len(self.mean) == 1:
            return self.mean * channels, self.std * channels
        raise PreparationError(f"The input preparation gives {len(self.mean)} means, but the model takes "
                               f"{channels} channels.")

    def fits(self, channels: int) -> bool:
        return len(self.mean) in (1, channels)

    def token(self) -> str:
        """A short, exact text for URLs, cache keys and the CLI: `none` or `MEAN,STD` (`/` between channels)."""
        if not self.normalised:
            return "none"
        return f"{'/'.join(map(repr, self.mean))},{'/'.join(map(repr, self.std))}"

    def describe(self) -> str:
        """In words, for the pages and the CLI."""
        if not self.normalised:
            return "pixels scaled to [0, 1], not normalised"
        return (f"pixels scaled to [0, 1], then normalised with mean {_numbers(self.mean)} and std "
                f"{_numbers(self.std)}")

    def to_meta(self) -> dict:
        """The `input` field of a checkpoint's meta (or a program's `meta.json`)."""
        if not self.normalised:
            return {"scale": "0-1", "normalize": None}
        return {"scale": "0-1", "mean": list(self.mean), "std": list(self.std)}

    def with_source(self, source: str) -> "Preparation":
        return Preparation(self.mean, self.std, source)


NONE = Preparation((0.0,), (1.0,))


def _numbers(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _floats(raw, what: str) -> tuple[float, ...]:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= MAX_CHANNELS or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise PreparationError(f"The checkpoint's {what} is not a list of 1 to {MAX_CHANNELS} numbers.")
    return tuple(float(v) for v in raw)


def from_meta(meta: dict) -> Preparation | None:
    """The preparation a checkpoint's meta states: `input` ({"scale": "0-1", "mean": [...], "std": [...]}
    or {"scale": "0-1", "normalize": null}), or the older `normalization` ({"mean", "std"}) of the
    bundled checkpoints; None where it says nothing."""
    raw = meta.get("input")
    if raw is not None:
        if not isinstance(raw, dict):
            raise PreparationError("The checkpoint's 'meta.input' is not a dict like "
                                   "{\"scale\": \"0-1\", \"mean\": [...], \"std\": [...]}.")
        scale = raw.get("scale", "0-1")
        if scale != "0-1":
            raise PreparationError(f"The checkpoint's 'meta.input.scale' is {str(scale)[:20]!r}; this product "
                                   "reads images as pixels in [0, 1] (\"0-1\").")
        if "normalize" in raw and raw["normalize"] is None and "mean" not in raw:
            return NONE.with_source(FROM_FILE)
        return Preparation(_floats(raw.get("mean"), "'meta.input.mean'"), _floats(raw.get("std"), "'meta.input.std'"),
                           FROM_FILE)
    legacy = meta.get("normalization")
    if isinstance(legacy, dict) and "mean" in legacy and "std" in legacy:
        return Preparation(_floats(legacy["mean"], "'meta.normalization.mean'"),
                           _floats(legacy["std"], "'meta.normalization.std'"), FROM_FILE)
    return None


def usual(spec, channels: int) -> Preparation:
    """A data set's usual statistics (`spec`: a `core.data.DataSpec`, or None: 0.5 and 0.5, the common
    choice for images of unknown origin)."""
    if spec is not None and len(spec.mean) in (1, channels):
        return Preparation(tuple(spec.mean), tuple(spec.std), ASSUMED)
    return Preparation((0.5,), (0.5,), ASSUMED)


def parse(text: str, spec, channels: int) -> Preparation:
    """The CLI's `--normalize none|dataset|MEAN,STD` (`/` between channels: `0.49/0.48/0.45,0.25/0.24/0.26`)."""
    text = text.strip()
    if text == "none":
        return NONE.with_source(CHOSEN)
    if text == "dataset":
        return usual(spec, channels).with_source(CHOSEN)
    parts = text.split(",")
    if len(parts) != 2:
        raise PreparationError(f"--normalize '{text[:40]}' is none, dataset, or MEAN,STD (e.g. 0.2860,0.3530; "
                               "'/' between channels).")
    return from_numbers(parts[0].split("/"), parts[1].split("/"), channels)


def from_numbers(mean: list[str], std: list[str], channels: int) -> Preparation:
    """One's own mean and std, as texts of numbers (one per channel, or one for all)."""
    try:
        numbers = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except ValueError:
        raise PreparationError(f"The mean and std must be numbers; got {'/'.join(mean)[:30]!r} and "
                               f"{'/'.join(std)[:30]!r}.") from None
    prep = Preparation(*numbers, CHOSEN)  # checks the counts and ranges, in one sentence
    if not prep.fits(channels):
        raise PreparationError(f"The preparation gives {len(prep.mean)} means, but the model takes {channels} "
                               "channels.")
    return prep


# -- which preparation fits: a check on a sample, where the file does not say --------------------

SAMPLE_IMAGES = 500


@dataclass(frozen=True)
class Hint:
    """Another preparation that scores clearly better than the one in use, on a labelled sample."""

    current: Preparation
    current_accuracy: float
    better: Preparation
    better_accuracy: float
    sample: int
    chance: float

    @property
    def sentence(self) -> str:
        near = " (near chance)" if self.current_accuracy < self.chance + 0.25 * (1 - self.chance) else ""
        return (f"On a sample of the first {self.sample:,} test images this model scores "
                f"{self.current_accuracy:.1%}{near} with {self.current.describe()}, but {self.better_accuracy:.1%} "
                f"with {self.better.describe()}: it was probably trained that way.")


def candidates(ckpt) -> list[Preparation]:
    """The preparations a user may mean: not normalised, and the data set's usual statistics."""
    from . import data

    usual_prep = usual(data.DATASETS.get(ckpt.dataset), ckpt.spec.input_shape[0])
    return [NONE] + ([usual_prep] if usual_prep != NONE else [])


def better_preparation(ckpt, sample: int = SAMPLE_IMAGES, margin: float = 0.10) -> Hint | None:
    """A candidate preparation that is right on at least `margin` more of a fixed sample of test images
    than the one in use (10 points on 500 images: about five standard errors), else None (a few hundred images through the model: well under a second for
    the bundled models on two cores)."""
    from . import data
    from .tasks import count_correct

    spec = data.DATASETS.get(ckpt.dataset)
    if spec is None:
        return None
    model = ckpt.build_model()
    scores = {}
    for prep in {ckpt.prep, *candidates(ckpt)}:
        split = data.load(ckpt.dataset, False, None, prep)
        n = min(sample, len(split))
        scores[prep] = (count_correct(model, split.x[:n], split.y[:n], ckpt.spec.task) / n, n)
    current, n = scores[ckpt.prep]
    best = max(scores, key=lambda p: scores[p][0])
    if scores[best][0] - current < margin:
        return None
    return Hint(ckpt.prep, current, best, scores[best][0], n, 1 / len(spec.class_names))
