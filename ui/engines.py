"""The engines of the app: one shared cache for every session, built with progress, warmed at start.

An engine is keyed by (checkpoint digest, test data, layer, device) and shared read-only; the
first session to ask builds it while a progress bar shows, and the background warm-up builds the
bundled models' before anyone asks. Also here: what a page asks an engine for, with progress on the
slow paths and a labelled sample's estimate while an exact count is made.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref

import streamlit as st

from core import criteria, data, engine, magnitude, oracle, sensitivity, slim, store
from core.cache import EngineCache, OverBudget
from core.checkpoints import Checkpoint
from ui import catalogue, choices, jobs, keys, words

log = logging.getLogger("prune_explorer")
if not log.handlers:  # the warm-up's steps reach the server's log (Streamlit configures only its own loggers)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

@st.cache_resource(show_spinner=False)
def engine_cache() -> EngineCache:
    return EngineCache(max_entries=int(os.environ.get("PRUNE_EXPLORER_MAX_ENGINES", 8)),
                       max_bytes=int(float(os.environ.get("PRUNE_EXPLORER_MAX_CACHE_GB", 2)) * 2**30))


def current_engine() -> engine.Engine:
    """The shared engine for the session's model and layer."""
    return engine_for(catalogue.current_checkpoint(), choices.current().layer)


def engine_key(ckpt: Checkpoint, layer: str | None = None) -> tuple:
    """The shared cache's key for this session's choices (its own images, its device)."""
    own = catalogue.own_data()
    return make_key(ckpt, own["digest"] if own else ckpt.dataset, layer, choices.device())


def make_key(ckpt: Checkpoint, test_data: str, layer: str | None, device_name: str) -> tuple:
    """(checkpoint digest, data set or own images' digest, layer, device): the one place the key is made.
    The digest includes a chosen input preparation (Checkpoint.with_prep)."""
    layer = layer or catalogue.conv_layers(ckpt)[-1].name  # one cache entry whichever way it is named
    return ckpt.digest, test_data, layer, device_name


class _SessionEngines:
    """The shared cache entries this session holds for models only it has; released when the session
    ends (Streamlit drops a closed session's state, and with it this object)."""

    def __init__(self, cache: EngineCache):
        self.keys: set[tuple] = set()
        weakref.finalize(self, _release_all, cache, self.keys)  # never a reference to self

    def hold(self, cache: EngineCache, key: tuple) -> None:
        if key not in self.keys:
            self.keys.add(key)
            cache.hold(key)


def _release_all(cache: EngineCache, keys: set[tuple]) -> None:
    for key in keys:
        cache.release(key)


def _hold_for_session(ckpt: Checkpoint, key: tuple) -> None:
    if catalogue.is_session_model(ckpt):
        cache = engine_cache()
        st.session_state.setdefault(keys.SESSION_ENGINES, _SessionEngines(cache)).hold(cache, key)


def current_engine_key() -> tuple:
    return engine_key(catalogue.current_checkpoint(), choices.current().layer)


def engine_for(ckpt: Checkpoint, layer: str | None) -> engine.Engine:
    """The shared engine for a checkpoint and layer (None: the last conv); the first build shows progress."""
    key = engine_key(ckpt, layer)
    layer, own = key[2], catalogue.own_data()
    # The preparation's place, made on every run, built or not: the elements below keep their places in the
    # page from one run to the next, so nothing shifts (Streamlit matches elements by their position).
    holder = st.empty()
    cache = engine_cache()
    cached = cache.lookup(key)
    if cached is not None:
        _hold_for_session(ckpt, key)
        return cached
    with holder.status(f"Preparing {words.plain(ckpt.name)}: one pass over the test set ...", expanded=True) as status:
        bar = st.progress(0.0)
        warming = _warmer().progress
        while key in warming and cache.lookup(key) is None:  # the background warm-up is building it
            done, total, label = warming.get(key, (0, 1, ""))
            bar.progress(done / max(total, 1), text=f"{label} (being prepared in the background)")
            time.sleep(0.25)
        try:
            images = catalogue.image_folder(own["path"], ckpt.spec.input_shape, ckpt.prep) if own else None
            if images is not None:  # chosen for another model: its labels must fit this one's outputs
                catalogue.fits(ckpt, images)
            eng = cache.get(key, lambda: engine.from_checkpoint(
                ckpt, layer=layer, device=choices.device(), split=images, store=disk_store(ckpt, own),
                progress=lambda d, t, label: bar.progress(d / t, text=label)))
        except (OverBudget, data.DataUnavailable) as exc:  # one sentence, and the page stops here
            status.update(label=f"{words.plain(ckpt.name)} could not be prepared", state="error", expanded=True)
            st.error(words.plain(getattr(exc, "public", str(exc))))  # never the server's paths
            st.stop()
    holder.empty()
    log.info("%s, layer %s: %s", ckpt.name, layer, _how_made(eng))
    st.toast(f"{words.plain(ckpt.name)} ready: {eng.total:,} test images seen once", icon=":material/check:")
    _hold_for_session(ckpt, key)
    return eng


def _how_made(eng: engine.Engine) -> str:
    """For the server's log: whether the pass was read back (another process or a restart made it)."""
    return "read back from the engine store" if eng.restored else f"one pass over {eng.total:,} images made"


def disk_store(ckpt: Checkpoint, own: dict | None):
    """Where a bundled model's engine is kept on disk (core/store.py), shared by restarts and by every
    server process on this machine; None for a model or images only one session has: an upload is
    never kept beyond its session."""
    if own is not None or catalogue.is_session_model(ckpt):
        return None
    return store.default()


class _Warmer:
    """Builds the bundled models' engines in one background thread, into the shared cache, under
    the keys `engine_for` uses, then what a lecture shows of them in order of need: both modes' curves
    of the default criterion, every other criterion's, the Taylor scores (a backward pass each), the
    Curve page's random band and oracle orders (chosen on the test images, both modes), the
    Sensitivity page's map of the default rule and mode, the Magnitude page's grid for its default
    model (both thresholds), and the Compress page's chart of the default model. With the engine store all of it is read back on a second start.
    `progress` holds the engine being built: {key: (done, total, label)}; `status()` is the line the
    sidebar shows."""

    SENSITIVITY_FRACTIONS = sensitivity.DEFAULT_FRACTIONS  # what the Sensitivity page shows (a test may take fewer)

    def __init__(self):
        self.progress: dict[tuple, tuple[int, int, str]] = {}
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps, self.done, self.label = 0, 0, ""

    def start(self, jobs, magnitude_model=None, compress_model=None) -> None:
        """Start the thread unless it was started before; `jobs()` lists (key, checkpoint, device);
        `magnitude_model` is the Magnitude page's default checkpoint, `compress_model` the Compress page's
        (or None)."""
        with self._lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, args=(jobs(), magnitude_model, compress_model),
                                               name="warm-bundled-models", daemon=True)
                self.thread.start()

    def status(self) -> str | None:
        """"Preparing the lecture: ..." while it runs, "Ready: ..." once done; None before it starts."""
        if not self.steps:
            return None
        if self.done < self.steps:
            return f"Preparing the lecture: step {self.done} of {self.steps}, {self.label}"
        return f"Ready: every bundled model, criterion, mode, oracle and sensitivity map prepared ({self.steps} steps)."

    def _step(self, label: str) -> None:
        self.label = label
        log.info("warm-up %d/%d: %s", self.done, self.steps, label)

    def _run(self, jobs, magnitude_model=None, compress_model=None) -> None:
        cache = engine_cache()
        built = []
        rules = [n for n, rule in criteria.CRITERIA.items() if rule.looks_at != criteria.GRADIENTS]
        gradients = [n for n, rule in criteria.CRITERIA.items() if rule.looks_at == criteria.GRADIENTS]
        per_model = 1 + len(rules) + len(gradients) + 2  # the pass, each rule, the oracles, the sensitivity map
        self.steps = len(jobs) * per_model + (magnitude_model is not None) + (compress_model is not None)
        for key, ckpt, dev in jobs:
            self._step(f"{ckpt.name}: one pass over the test set")
            self.progress[key] = (0, 1, f"Preparing {ckpt.name}")

            def report(done, total, label, key=key):
                self.progress[key] = (done, total, label)
            try:
                eng = cache.get(key, lambda: engine.from_checkpoint(ckpt, layer=key[2], device=dev, progress=report,
                                                                    store=store.default()))
            except Exception:  # a missing data set etc.: the page that needs it shows the reason
                self.done += per_model
                continue
            finally:
                self.progress.pop(key, None)
            self.done += 1
            log.info("%s: %s", ckpt.name, _how_made(eng))
            built.append((ckpt, eng))
            self._curves(ckpt, eng, [choices.DEFAULT_CRITERION])  # both modes: flipping zero/remove is then a lookup
        others = [n for n in rules if n != choices.DEFAULT_CRITERION]
        for names in (others, gradients):  # then the other criteria, backward passes last
            for ckpt, eng in built:
                self._curves(ckpt, eng, names)
        for ckpt, eng in built:
            self._oracles(ckpt, eng)
        for ckpt, eng in built:
            self._sensitivity(ckpt, eng)
        if magnitude_model is not None:
            self._magnitude(magnitude_model)
        if compress_model is not None:
            self._compress(compress_model, str(engine.pick_device("auto")))
        self.done = self.steps  # every step accounted, the models that failed included
        self._step("ready")

    def _curves(self, ckpt, eng: engine.Engine, names: list[str]) -> None:
        for name in names:
            self._step(f"{ckpt.name}: {criteria.CRITERIA[name].label}")
            if eng.path == engine.PATH_FAST:  # elsewhere each K costs a pass: computed when asked for
                try:
                    eng.ranking(name)
                    for mode in engine.MODES:
                        eng.curve(mode, name)
                except ValueError:  # a rule this layer refuses (bn_gamma without a batch norm): none to warm
                    pass
            self.done += 1
        engine.keep_memos(eng)


    def _oracles(self, ckpt, eng: engine.Engine) -> None:
        """The Curve page's extras: the random band's curves, and the oracle orders on the test images
        (the exact ones, or the coarse one where the read-out is not linear), both modes."""
        self._step(f"{ckpt.name}: the random band and the oracle orders")
        if eng.path == engine.PATH_FAST:
            try:
                for mode in engine.MODES:
                    for name in criteria.random_orders():
                        eng.curve(mode, name)
                    kinds = ("single", "greedy") if oracle.why_not_exact(eng, mode) is None else ("sampled",)
                    for kind in kinds:
                        oracle.chosen(eng, kind, mode)
            except Exception:  # never fatal to the warm-up: the page computes it when asked and says why not
                log.exception("warm-up: the oracles of %s", ckpt.name)
            engine.keep_memos(eng)
        self.done += 1

    def _sensitivity(self, ckpt, eng: engine.Engine) -> None:
        """The Sensitivity page's map for the default rule and mode, into the engine store (where the page
        reads it back); without a store there is nowhere to keep it, and it is counted when asked for."""
        kept = store.default()
        if kept is not None:
            self._step(f"{ckpt.name}: the sensitivity map")
            try:
                sensitivity.kept_map(ckpt, choices.DEFAULT_CRITERION, choices.DEFAULT_MODE, self.SENSITIVITY_FRACTIONS,
                                     device=str(eng.device), store=kept)
            except Exception:
                log.exception("warm-up: the sensitivity map of %s", ckpt.name)
        self.done += 1


    def _compress(self, ckpt, dev: str) -> None:
        """The Compress page's chart of the default model (default settings, before fine-tuning; its sensitivity
        map too), into the engine store: "Compute the chart" then reads every point back in seconds."""
        from core import tradeoff

        kept = store.default()
        if kept is not None:
            self._step(f"{ckpt.name}: the Compress page's chart")
            try:
                s = tradeoff.Settings()
                net = tradeoff.network_for(ckpt, dev, kept)
                rows, _ = sensitivity.kept_map(ckpt, s.criterion, s.mode, device=dev, store=kept)
                for _ in tradeoff.chart(net, s, rows):
                    pass
            except Exception:
                log.exception("warm-up: the Compress chart of %s", ckpt.name)
        self.done += 1

    def _magnitude(self, ckpt) -> None:
        """The Magnitude page's slider grid, both thresholds, into the engine store (the page reads it back)."""
        kept = store.default()
        if kept is not None:
            self._step(f"{ckpt.name}: the magnitude slider's grid")
            try:
                for per_layer in (False, True):
                    magnitude.kept_grid(ckpt, per_layer, kept)
            except Exception:
                log.exception("warm-up: the magnitude grid of %s", ckpt.name)
        self.done += 1


@st.cache_resource(show_spinner=False)
def _warmer() -> _Warmer:
    return _Warmer()


def warm_bundled_models() -> None:
    """Once per server process: build every bundled model's engine (last conv, automatic device) in
    the background, the default model first, so that the first visitor of each finds it ready.
    Off with PRUNE_EXPLORER_WARM=0 (the tests set it: a test that times a page must not share the
    CPU with the warm-up)."""
    warmer = _warmer()
    if warmer.thread is not None or os.environ.get("PRUNE_EXPLORER_WARM", "1") == "0":
        return
    def jobs():
        dev = str(engine.pick_device("auto"))
        models = {name: c for name, c in catalogue.bundled_checkpoints().items() if catalogue.conv_layers(c)}  # as loaded
        first = (catalogue.DEFAULT_MODEL, "fmnist_resnet")  # the lecture's comparison: a plain VGG against a shortcut
        order = sorted(models, key=lambda name: (name not in first, first.index(name) if name in first else 0, name))
        jobs = [(make_key(models[name], models[name].dataset, None, dev), models[name], dev) for name in order]
        return jobs[:engine_cache().max_entries]  # never evict the default model by warming another
    bundled = catalogue.bundled_checkpoints()
    warmer.start(jobs, bundled.get(catalogue.MAGNITUDE_MODEL), bundled.get(catalogue.DEFAULT_MODEL))


def warm_status() -> str | None:
    """The warm-up's status line (None where it is off)."""
    return _warmer().status()


def check_criterion(eng: engine.Engine, criterion: str) -> None:
    """Stop the page with one sentence when a criterion does not apply to this layer (e.g. bn_gamma
    without a batch norm, taylor on a model torch.fx cannot split)."""
    try:
        eng.ranking(criterion)
    except ValueError as exc:
        st.error(f"{criteria.get(criterion).label}: {words.plain(exc)} Choose another rule in the sidebar.")
        st.stop()


def curve(eng: engine.Engine, mode: str, criterion: str) -> list[float]:
    """Accuracy for every K (a lookup once computed); progress shown on the slow paths."""
    if eng.path == engine.PATH_FAST:
        counts = eng.curve(mode, criterion)
    else:
        bar = st.progress(0.0, text=f"Computing the {mode} curve ...")
        counts = eng.curve(mode, criterion, progress=lambda d, t, label: bar.progress(d / t, text=label))
        bar.empty()
    engine.keep_memos(eng)  # a restart reads it back (a lookup when nothing is new)
    return [c / eng.total for c in counts]


def accuracy_at(eng: engine.Engine, k: int, mode: str, criterion: str, where=None) -> tuple[float, dict[int, float]]:
    """One K's exact accuracy where the whole curve is not precomputed (a middle layer), and every
    accuracy of this engine, mode and criterion known so far (the engine remembers them: they are
    facts about the model, shared by every session). While the exact count runs (a pass of the rest
    of the network over every test image), an estimate from a fixed sample is shown, labelled as one,
    in `where` (a container of fixed height above the slider, so that the slider never moves)."""
    if eng.known(k, mode, criterion) is None:
        sample = eng.sample_answer(k, mode, criterion)
        low, high = sample.interval()
        with where if where is not None else st.container():
            note = st.info(f"K = {k}: about **{sample.accuracy:.1%}** on a sample (the first {sample.n:,} test images; "
                           f"95% interval {low:.1%} to {high:.1%}). The exact count over all {sample.total:,} images "
                           "follows ...", icon=":material/hourglass_top:")
            with jobs.shared().foreground(eng):  # the note says what runs: a spinner too would not fit the slot
                eng.correct(k, mode, criterion)
            note.empty()
        engine.keep_memos(eng)
    known = {kk: c / eng.total for kk, c in eng.answers(mode, criterion).items()}
    return known[k], known


@st.cache_resource(show_spinner=False)
def _results() -> tuple[dict, dict, threading.Lock]:
    """({key: result}, {key: the lock its maker holds}, the lock guarding both dicts)."""
    return {}, {}, threading.Lock()


RESULTS_KEPT = 64


def shared_result(key: tuple, make, text: str):
    """`make(progress)`'s result, made once per server for `key` and shared by every session (never
    changed after), with a progress bar on this page while it is made (`text`, then what `make` says).
    Not st.cache_resource: Streamlit records the bar's updates made inside a cached function and
    replays them into other runs, where the bar no longer exists. Oldest results dropped past 64."""
    results, makers, guard = _results()
    found = results.get(key)  # one read: another session may drop the oldest result meanwhile
    if found is not None:
        return found
    bar = st.progress(0.0, text=text)
    with guard:
        maker = makers.setdefault(key, threading.Lock())
    with maker:  # a second session asking for the same result waits for the first one's
        found = results.get(key)  # made by the session this one waited for
        if found is None:
            found = make(lambda d, t, label: bar.progress(d / max(t, 1), text=f"{text} {label} ({d} of {t})"))
            with guard:
                results[key] = found
                makers.pop(key, None)
                while len(results) > RESULTS_KEPT:
                    results.pop(next(iter(results)))
    bar.empty()
    return found


@st.cache_data(max_entries=64, show_spinner=False)
def feature_map_figure(key: tuple, criterion: str, k: int, by_score: bool, contrast: str, _eng: engine.Engine):
    """The Feature maps page's grid, built once per (engine key, criterion, K, order, contrast)."""
    from ui import figures

    ranks = _eng.ranking(criterion).argsort().numpy()
    rows, cols = figures.grid_shape(_eng.channels)
    # Square tiles across the main column of a 1280-px screen (about 800 px), never taller than what is left of
    # a 720-px screen under the page's title and controls; a wider screen leaves room at the sides instead.
    height = int(min(460, max(300, rows * 800 / cols + 50)))
    return figures.feature_map_grid(_eng.stats.mean_map.numpy(), _eng.scores(criterion).numpy(), ranks, k, by_score,
                                    contrast=contrast, height=height)


@st.cache_data(max_entries=64, show_spinner=False)
def removed_per_channel(key: tuple, _eng: engine.Engine) -> int:
    """Parameters one removed channel takes away, as Torch-Pruning removes it (core/slim.py), so that the
    slider's "Parameters left" is the slim model's count at every K."""
    return slim.removed_per_channel(_eng)
