"""Streamlit glue shared by app.py and the pages: checkpoints, the shared engine cache, session choices.

What is shared between sessions (checkpoints, engines) is read-only; what one user chooses lives in
`st.session_state` and in the URL.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import streamlit as st

from core import checkpoints, criteria, engine, inputs, magnitude
from core import data as datasets
from core.cache import EngineCache, OverBudget
from core.checkpoints import Checkpoint
from ui import keys

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = ROOT / "checkpoints"
DEFAULT_MODEL = "fmnist_vgg"
UPLOAD_PREFIX = "upload: "


@st.cache_resource(show_spinner=False)
def engine_cache() -> EngineCache:
    return EngineCache(max_entries=int(os.environ.get("PRUNE_EXPLORER_MAX_ENGINES", 4)),
                       max_bytes=int(float(os.environ.get("PRUNE_EXPLORER_MAX_CACHE_GB", 2)) * 2**30))


@st.cache_resource(max_entries=16, show_spinner=False)
def _checkpoint(digest: str, _data: bytes, name: str) -> Checkpoint:
    return checkpoints.from_bytes(_data, name=name)


@st.cache_resource(max_entries=64, show_spinner=False)
def _bundled_file(path: str, size: int, mtime_ns: int) -> Checkpoint:
    """Read and hash a file once per (path, size, modification time): a replaced file is read again."""
    data = Path(path).read_bytes()
    return _checkpoint(hashlib.sha256(data).hexdigest(), data, Path(path).stem)


def bundled_checkpoints() -> dict[str, Checkpoint]:
    """Every checkpoint in checkpoints/, keyed by file stem; a replaced file has a new digest."""
    found = {}
    for path in sorted([*BUNDLED_DIR.glob("*.pt"), *BUNDLED_DIR.glob("*.pt2")]):  # .pt2: torch.export programs
        info = path.stat()
        found[path.stem] = _bundled_file(str(path), info.st_size, info.st_mtime_ns)
    return found


def loaded_models() -> dict[str, Checkpoint]:
    """Every model of this session by name, as its file was read (bundled first, then uploads)."""
    models = dict(bundled_checkpoints())
    for name, ckpt in st.session_state.setdefault(keys.UPLOADS, {}).items():
        models[UPLOAD_PREFIX + name] = ckpt
    return models


def available_models() -> dict[str, Checkpoint]:
    """Every model of this session by name, each with the input preparation chosen for it, if any."""
    chosen = st.session_state.get(keys.INPUTS, {})
    return {name: _with_choice(ckpt, chosen.get(name)) for name, ckpt in loaded_models().items()}


def _with_choice(ckpt: Checkpoint, token: str | None) -> Checkpoint:
    if not token:
        return ckpt
    try:
        return ckpt.with_prep(inputs.parse(token, datasets.DATASETS.get(ckpt.dataset), ckpt.spec.input_shape[0]))
    except (inputs.PreparationError, checkpoints.CheckpointError):  # a stale or hand-edited choice: ignored
        return ckpt


def choose_preparation(name: str, prep: inputs.Preparation | None) -> None:
    """This session's choice of how model `name`'s inputs are prepared (None: as its file states, or as
    assumed). It becomes part of the model: its cache keys, its URL and what it saves."""
    chosen = st.session_state.setdefault(keys.INPUTS, {})
    models = loaded_models()
    if prep is None or (name in models and prep == models[name].prep):
        chosen.pop(name, None)
    else:
        chosen[name] = prep.token()


def preparation_choice(name: str) -> str | None:
    """The token of the preparation chosen for model `name` in this session, or None."""
    return st.session_state.get(keys.INPUTS, {}).get(name)


@st.cache_resource(max_entries=32, show_spinner=False)
def preparation_hint(digest: str, _ckpt: Checkpoint) -> inputs.Hint | None:
    """A clearly better preparation on a sample, for a model whose file does not state its own."""
    try:
        return inputs.better_preparation(_ckpt)
    except (datasets.DataUnavailable, inputs.PreparationError):
        return None


def channel_models() -> dict[str, Checkpoint]:
    """The models channel pruning applies to: those with at least one conv layer."""
    return {k: c for k, c in available_models().items() if conv_layers(c.digest, c)}


def add_upload(name: str, data: bytes, arch: str | None = None, dataset: str | None = None) -> Checkpoint:
    """Validate an uploaded file; on success it becomes this session's model. Raises CheckpointError.
    `arch`: the architecture the user picked for a state dict that was not recognised; `dataset`: the
    data set the user picked for a `.pt2` program (checked to fit it)."""
    ckpt = checkpoints.from_bytes(data, name=name, arch=arch, dataset=dataset)
    if not ckpt.dataset:  # only the user's own images can test it
        own = st.session_state.get(keys.OWN_DATA)
        if not own:
            raise checkpoints.CheckpointError(
                f"No registered data set fits this program (input {'x'.join(map(str, ckpt.spec.input_shape))}, "
                f"{ckpt.program.signature.outputs} outputs): upload a zip of your own test images below first, "
                "then the program again.")
        try:  # the images must load at the program's size, in as many classes as it has outputs
            classes = len(_image_folder(own["path"], ckpt.spec.input_shape, ckpt.prep).spec.class_names)
        except datasets.DataUnavailable as exc:
            raise checkpoints.CheckpointError(exc.public) from None
        outputs = ckpt.program.signature.outputs
        if classes != outputs and not (outputs == 1 and classes == 2):
            raise checkpoints.CheckpointError(f"The program gives {outputs} outputs, but your images "
                                              f"({own['name']}) are in {classes} classes.")
        add_session_model(name, ckpt)
        keys.hand_off(keys.USE_OWN_DATA, True)
        keys.hand_off(keys.MODEL, UPLOAD_PREFIX + name)
        return ckpt
    try:
        datasets.check_local(ckpt.dataset)  # never a download on upload: that could take minutes offline
        ckpt.split()
    except datasets.DataUnavailable as exc:
        raise checkpoints.CheckpointError(f"Recognised as '{ckpt.arch}', but its data set is not available "
                                          f"here. {exc.public}") from None
    add_session_model(name, ckpt)
    if conv_layers(ckpt.digest, ckpt):
        keys.hand_off(keys.MODEL, UPLOAD_PREFIX + name)  # the sidebar applies it on the next run
    return ckpt


def add_session_model(name: str, ckpt: Checkpoint) -> None:
    """A model of this session only (an upload, or a model fine-tuned here), listed beside the bundled ones."""
    uploads = st.session_state.setdefault(keys.UPLOADS, {})
    uploads.pop(name, None)
    uploads[name] = ckpt
    current = str(st.session_state.get(keys.MODEL, "")).removeprefix(UPLOAD_PREFIX)
    limit = max(1, int(os.environ.get("PRUNE_EXPLORER_MAX_SESSION_UPLOADS", 3)))
    for old in [n for n in uploads if n not in (name, current)][:max(0, len(uploads) - limit)]:
        del uploads[old]  # each session keeps its last few models (the one in use stays)


def current_checkpoint() -> Checkpoint:
    return available_models()[st.session_state[keys.MODEL]]


def device() -> str:
    return str(engine.pick_device(st.session_state.get(keys.DEVICE, "auto")))


@st.cache_resource(max_entries=32, show_spinner=False)
def conv_layers(digest: str, _ckpt: Checkpoint) -> list[engine.ConvInfo]:
    return engine.conv_layers(_ckpt.build_model(), _ckpt.spec.input_shape)


def current_engine() -> engine.Engine:
    """The shared engine for the session's model and layer."""
    return engine_for(current_checkpoint(), st.session_state.get(keys.LAYER))


def engine_key(ckpt: Checkpoint, layer: str | None = None) -> tuple:
    """The shared cache's key for this session's choices (its own images, its device)."""
    own = own_data()
    return _engine_key(ckpt, own["digest"] if own else ckpt.dataset, layer, device())


def _engine_key(ckpt: Checkpoint, test_data: str, layer: str | None, device_name: str) -> tuple:
    """(checkpoint digest, data set or own images' digest, layer, device): the one place the key is made.
    The digest includes a chosen input preparation (Checkpoint.with_prep)."""
    layer = layer or conv_layers(ckpt.digest, ckpt)[-1].name  # one cache entry whichever way it is named
    return ckpt.digest, test_data, layer, device_name


def current_engine_key() -> tuple:
    return engine_key(current_checkpoint(), st.session_state.get(keys.LAYER))


def engine_for(ckpt: Checkpoint, layer: str | None) -> engine.Engine:
    """The shared engine for a checkpoint and layer (None: the last conv); the first build shows progress."""
    key = engine_key(ckpt, layer)
    layer, own = key[2], own_data()
    cache = engine_cache()
    cached = cache.lookup(key)
    if cached is not None:
        return cached
    with st.status(f"Preparing {ckpt.name}: one pass over the test set ...", expanded=True) as status:
        bar = st.progress(0.0)
        warming = _warmer().progress
        while key in warming and cache.lookup(key) is None:  # the background warm-up is building it
            done, total, label = warming.get(key, (0, 1, ""))
            bar.progress(done / max(total, 1), text=f"{label} (being prepared in the background)")
            time.sleep(0.25)
        try:
            split = _image_folder(own["path"], ckpt.spec.input_shape, ckpt.prep) if own else None
            eng = cache.get(key, lambda: engine.from_checkpoint(
                ckpt, layer=layer, device=device(), split=split,
                progress=lambda d, t, label: bar.progress(d / t, text=label)))
        except (OverBudget, datasets.DataUnavailable) as exc:  # one sentence, and the page stops here
            status.update(label=f"{ckpt.name} could not be prepared", state="error", expanded=True)
            st.error(getattr(exc, "public", str(exc)))  # never the server's paths
            st.stop()
        status.update(label=f"{ckpt.name} ready: {eng.total:,} test images seen once", state="complete",
                      expanded=False)
    return eng


class _Warmer:
    """Builds the bundled models' engines in one background thread, into the shared cache, under
    the keys `engine_for` uses; `progress` holds the one being built: {key: (done, total, label)}."""

    def __init__(self):
        self.progress: dict[tuple, tuple[int, int, str]] = {}
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, jobs) -> None:
        """Start the thread unless it was started before; `jobs()` lists (key, checkpoint, device)."""
        with self._lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, args=(jobs(),), name="warm-bundled-models",
                                               daemon=True)
                self.thread.start()

    def _run(self, jobs) -> None:
        cache = engine_cache()
        built = []
        for key, ckpt, dev in jobs:
            self.progress[key] = (0, 1, f"Preparing {ckpt.name}")

            def report(done, total, label, key=key):
                self.progress[key] = (done, total, label)
            try:
                eng = cache.get(key, lambda: engine.from_checkpoint(ckpt, layer=key[2], device=dev, progress=report))
            except Exception:  # a missing data set etc.: the page that needs it shows the reason
                continue
            finally:
                self.progress.pop(key, None)
            built.append(eng)
            if eng.path == engine.PATH_FAST:  # both modes' curves: flipping zero/remove is then a lookup
                for mode in engine.MODES:
                    eng.curve(mode, "mean")
        for eng in built:  # then the other criteria
            if eng.path == engine.PATH_FAST:
                for name, rule in criteria.CRITERIA.items():
                    if rule.looks_at == criteria.GRADIENTS:  # a backward pass: computed when first asked for
                        continue
                    try:
                        eng.ranking(name)
                    except ValueError:  # a rule this layer refuses (bn_gamma without a batch norm): none to warm
                        continue
                    for mode in engine.MODES:
                        eng.curve(mode, name)


@st.cache_resource(show_spinner=False)
def _warmer() -> _Warmer:
    return _Warmer()


def warm_bundled_models() -> None:
    """Once per server process: build every bundled model's engine (last conv, automatic device) in
    the background, the default model first, so that the first visitor of each finds it ready.
    Off under AppTest (no real server) and with PRUNE_EXPLORER_WARM=0."""
    from streamlit.runtime import Runtime

    warmer = _warmer()
    if warmer.thread is not None or os.environ.get("PRUNE_EXPLORER_WARM", "1") == "0" \
            or type(Runtime._instance) is not Runtime:
        return
    def jobs():
        dev = str(engine.pick_device("auto"))
        models = {name: c for name, c in bundled_checkpoints().items() if conv_layers(c.digest, c)}  # as loaded
        first = (DEFAULT_MODEL, "fmnist_resnet")  # the lecture's comparison: a plain VGG against a shortcut
        order = sorted(models, key=lambda name: (name not in first, first.index(name) if name in first else 0, name))
        jobs = [(_engine_key(models[name], models[name].dataset, None, dev), models[name], dev) for name in order]
        return jobs[:engine_cache().max_entries]  # never evict the default model by warming another
    warmer.start(jobs)


def check_criterion(eng: engine.Engine, criterion: str) -> None:
    """Stop the page with one sentence when a criterion does not apply to this layer (e.g. bn_gamma
    without a batch norm, taylor on a model torch.fx cannot split)."""
    try:
        eng.ranking(criterion)
    except ValueError as exc:
        st.error(f"{criteria.get(criterion).label}: {exc} Choose another rule in the sidebar.")
        st.stop()


def curve(eng: engine.Engine, mode: str, criterion: str) -> list[float]:
    """Accuracy for every K (a lookup once computed); progress shown on the slow paths."""
    if eng.path == engine.PATH_FAST:
        counts = eng.curve(mode, criterion)
    else:
        bar = st.progress(0.0, text=f"Computing the {mode} curve ...")
        counts = eng.curve(mode, criterion, progress=lambda d, t, label: bar.progress(d / t, text=label))
        bar.empty()
    return [c / eng.total for c in counts]


def accuracy_at(eng: engine.Engine, k: int, mode: str, criterion: str) -> tuple[float, dict[int, float]]:
    """One K's exact accuracy where the whole curve is not precomputed (a middle layer), and every
    accuracy of this engine, mode and criterion known so far (the engine remembers them: they are
    facts about the model, shared by every session). While the exact count runs (a pass of the rest
    of the network over every test image), an estimate from a fixed sample is shown, labelled as one."""
    if eng.known(k, mode, criterion) is None:
        sample = eng.sample_answer(k, mode, criterion)
        low, high = sample.interval()
        note = st.info(f"K = {k}: about **{sample.accuracy:.1%}** on a sample (the first {sample.n:,} test images; "
                       f"95% interval {low:.1%} to {high:.1%}). The exact count over all {sample.total:,} images "
                       "follows ...", icon=":material/hourglass_top:")
        with _foreground(eng), st.spinner(f"Evaluating K = {k} on every test image ..."):
            eng.correct(k, mode, criterion)
        note.empty()
    known = {kk: c / eng.total for kk, c in eng.answers(mode, criterion).items()}
    return known[k], known


@st.cache_resource(show_spinner=False)
def _background() -> dict:
    """Background curve jobs shared by every session: {job: thread}, {job: [done, total]}, busy counters
    per engine, and one stop event set when the server exits (so no thread dies inside PyTorch)."""
    shared = {"threads": {}, "progress": {}, "busy": {}, "lock": threading.Lock(), "stop": threading.Event()}

    def stop() -> None:
        shared["stop"].set()
        deadline = time.monotonic() + 60  # each finishes the count it is in; all within a minute
        for thread in list(shared["threads"].values()):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    atexit.register(stop)
    return shared


@contextlib.contextmanager
def _foreground(eng: engine.Engine):
    """While a session waits for an exact count, background curves of that engine pause."""
    shared = _background()
    with shared["lock"]:
        shared["busy"][id(eng)] = shared["busy"].get(id(eng), 0) + 1
    try:
        yield
    finally:
        with shared["lock"]:
            shared["busy"][id(eng)] -= 1


def _start_job(eng: engine.Engine, job: tuple, points: int, next_k, label: str) -> None:
    """Count up to `points` exact Ks in a background thread, each chosen by `next_k()` (None: done),
    pausing while any session waits for an exact count of this engine. One thread per job."""
    shared = _background()
    progress = [0, points]

    def run() -> None:
        for i in range(points):
            while shared["busy"].get(id(eng), 0) and not shared["stop"].is_set():
                time.sleep(0.05)
            k = None if shared["stop"].is_set() else next_k()
            if k is None:
                break
            eng.correct(k, job[1], job[2])
            progress[0] = i + 1
        progress[1] = progress[0]

    shared["progress"][job] = progress
    shared["threads"][job] = threading.Thread(target=run, daemon=True, name=label)
    shared["threads"][job].start()


def _running(job: tuple) -> bool:
    thread = _background()["threads"].get(job)
    return thread is not None and thread.is_alive()


def start_coarse_curve(eng: engine.Engine, key: tuple, mode: str, criterion: str) -> None:
    """Compute the 17-point coarse curve of a middle layer in the background, once per engine (`key`:
    its cache key; an evicted engine's id() may be reused), mode and criterion."""
    job = (key, mode, criterion, "coarse")
    with _background()["lock"]:
        missing = [k for k in eng.coarse_ks() if eng.known(k, mode, criterion) is None]
        if missing and not _running(job):
            _start_job(eng, job, len(missing), lambda: next((k for k in missing if eng.known(k, mode, criterion)
                                                             is None), None), f"coarse curve {mode} {criterion}")


def coarse_progress(eng: engine.Engine, mode: str, criterion: str) -> tuple[int, int]:
    """(coarse points known, coarse points in all)."""
    ks = eng.coarse_ks()
    return sum(eng.known(k, mode, criterion) is not None for k in ks), len(ks)


REFINE_POINTS = 16


def start_refinement(eng: engine.Engine, key: tuple, mode: str, criterion: str) -> None:
    """16 more exact points of a middle layer's curve, in the background, each where the curve is least
    known (`Engine.next_refinement`); a second request while one runs is ignored."""
    job = (key, mode, criterion, "refine")
    with _background()["lock"]:
        if not _running(job):
            _start_job(eng, job, min(REFINE_POINTS, eng.unknown(mode, criterion)), lambda: eng.next_refinement(mode, criterion),
                       f"refine curve {mode} {criterion}")


def refinement_progress(key: tuple, mode: str, criterion: str) -> tuple[int, int] | None:
    """(points counted, points asked) of a refinement running now, else None."""
    job = (key, mode, criterion, "refine")
    return tuple(_background()["progress"][job]) if _running(job) else None


def speed_note(eng: engine.Engine) -> str:
    """Why the whole curve is (or is not) precomputed, in plain words."""
    if eng.path == engine.PATH_FAST:
        return ""
    if eng.path == engine.PATH_HOOK:
        return ("This model cannot be split at this layer, so every K runs the whole model over the test set; "
                "the accuracy is computed when you release the slider.")
    return ("After this layer, the network mixes channels before its classifier, so every K needs a pass of the "
            "rest of the network over the test set; the accuracy is computed when you release the slider.")


@st.cache_data(max_entries=64, show_spinner=False)
def feature_map_figure(key: tuple, criterion: str, k: int, by_score: bool, contrast: str, _eng: engine.Engine):
    """The Feature maps page's grid, built once per (engine key, criterion, K, order, contrast)."""
    from ui import figures

    ranks = _eng.ranking(criterion).argsort().numpy()
    rows, _ = figures.grid_shape(_eng.channels)
    return figures.feature_map_grid(_eng.stats.mean_map.numpy(), _eng.scores(criterion).numpy(), ranks, k, by_score,
                                    contrast=contrast, height=max(420, 34 * rows + 60))


def summary_in_words(ckpt: Checkpoint) -> str:
    """The summary of a checkpoint's architecture (registered, or a .pt2 program), and what it reproduces."""
    text = ckpt.spec.summary[:1].upper() + ckpt.spec.summary[1:]
    return text + (f" (after {ckpt.spec.provenance})" if ckpt.spec.provenance else "")


def evaluation_in_words(eng: engine.Engine) -> str:
    """How this engine evaluates a K, for the UI; with the technical reason where the fast path does
    not apply (`Engine.fast_reason`)."""
    if eng.path == engine.PATH_FAST:
        return "The whole accuracy curve of this layer comes from one pass over the test set."
    return speed_note(eng) + (f" Why: {eng.fast_reason}." if eng.fast_reason else "")


def pruned_parameters(eng: engine.Engine, k: int) -> int:
    """Weights removed with K filters: each filter's weights and bias, and its BatchNorm's scale and shift."""
    conv = eng.conv
    per_filter = conv.weight[0].numel() + (1 if conv.bias is not None else 0) + (2 if eng.bn_name else 0)
    return k * per_filter


def parameter_count(ckpt: Checkpoint) -> int:
    return sum(v.numel() for k, v in ckpt.state_dict.items() if not k.endswith(("running_mean", "running_var",
                                                                                 "num_batches_tracked")))


def chance_level(ckpt: Checkpoint) -> float | None:
    """Accuracy of guessing: 1 / number of classes (a half for the pair networks)."""
    spec = datasets.DATASETS.get(ckpt.dataset)
    return 1 / len(spec.class_names) if spec else None


def own_data() -> dict | None:
    """This session's own test images, when uploaded and chosen in the sidebar."""
    own = st.session_state.get(keys.OWN_DATA)
    return own if own and st.session_state.get(keys.USE_OWN_DATA) else None


def add_own_data(name: str, data: bytes) -> dict:
    """Unpack a zip of an image folder into the cache and check it reads. Raises DataUnavailable."""
    path = datasets.unpack_zip(data, name)
    ckpt = current_checkpoint()
    split = _image_folder(str(path), ckpt.spec.input_shape, ckpt.prep)
    own = {"name": name, "path": str(path), "digest": "image_folder:" + hashlib.sha256(data).hexdigest(),
           "images": len(split), "classes": list(split.spec.class_names)}
    st.session_state[keys.OWN_DATA] = own
    keys.hand_off(keys.USE_OWN_DATA, True)  # the sidebar applies it on the next run
    return own


@st.cache_resource(max_entries=4, show_spinner=False)
def _image_folder(path: str, input_shape: tuple, prep: inputs.Preparation) -> datasets.DataSplit:
    return datasets.load_image_folder(path, input_shape, prep)


# ---------------------------------------------------------------------------------------------
# Magnitude pruning (the Magnitude page). Base models and orders are shared and read-only.

@st.cache_resource(max_entries=8, show_spinner=False)
def _base_model(digest: str, _ckpt: Checkpoint):
    return _ckpt.build_model()


def base_model(ckpt: Checkpoint):
    return _base_model(ckpt.digest, ckpt)


@st.cache_resource(max_entries=8, show_spinner=False)
def _magnitude_order(digest: str, _ckpt: Checkpoint):
    return magnitude.MagnitudeOrder(base_model(_ckpt))


def test_split(ckpt: Checkpoint) -> datasets.DataSplit:
    return ckpt.split()


def magnitude_model(ckpt: Checkpoint, sparsity: float, per_layer: bool):
    """A pruned copy (the shared base model is never touched)."""
    masks = _magnitude_order(ckpt.digest, ckpt).masks(sparsity, per_layer)
    return magnitude.apply_masks(base_model(ckpt), masks)


@st.cache_data(max_entries=2000, show_spinner=False)
def _magnitude_accuracy(digest: str, sparsity: float, per_layer: bool, _ckpt: Checkpoint) -> float:
    split = test_split(_ckpt)
    model = magnitude_model(_ckpt, sparsity, per_layer)
    return engine.count_correct(model, split.x, split.y, _ckpt.spec.task) / len(split)


def magnitude_accuracy(ckpt: Checkpoint, sparsity: float, per_layer: bool) -> float:
    return _magnitude_accuracy(ckpt.digest, round(sparsity, 4), per_layer, ckpt)


def keep_retrained(ckpt: Checkpoint, sparsity: float, per_layer: bool, model) -> None:
    """Keep the session's retrained model for this sparsity, so the page's figures show it (the last 4)."""
    kept = st.session_state.setdefault(keys.MAG_MODELS, {})
    kept[(ckpt.digest, round(sparsity, 4), per_layer)] = model.cpu()
    while len(kept) > 4:
        kept.pop(next(iter(kept)))


def retrained_model(ckpt: Checkpoint, sparsity: float, per_layer: bool):
    """The session's retrained model at this sparsity and threshold, or None."""
    return st.session_state.get(keys.MAG_MODELS, {}).get((ckpt.digest, round(sparsity, 4), per_layer))


def magnitude_retrain(ckpt: Checkpoint, sparsity: float, per_layer: bool, epochs: int, progress):
    """Retrain a private pruned copy for this session; returns (model, test accuracy)."""
    masks = _magnitude_order(ckpt.digest, ckpt).masks(sparsity, per_layer)
    train = ckpt.split(train=True)
    model = magnitude.retrain(base_model(ckpt), masks, train.x, train.y, epochs, device=device(), progress=progress,
                              task=ckpt.spec.task)
    split = test_split(ckpt)
    return model, engine.count_correct(model, split.x, split.y, ckpt.spec.task) / len(split)
