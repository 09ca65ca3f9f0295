"""The model catalogue of a session: the bundled checkpoints, its uploads, its own images.

Checkpoints are read once per file content and shared by every session, read-only; what one user
uploads or chooses (a model's input preparation, their own test images) lives in their session.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import streamlit as st

from core import checkpoints, data, inputs, split, trial
from core.checkpoints import Checkpoint
from ui import choices, keys

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DIR = ROOT / "checkpoints"
DEFAULT_MODEL = "fmnist_vgg"
MAGNITUDE_MODEL = "fmnist_lenet300"  # the Magnitude page's default: the paper's LeNet-300-100
UPLOAD_PREFIX = "upload: "          # how a session's own models are listed: by where they came from
FINE_TUNED_PREFIX = "fine-tuned: "


@st.cache_resource(max_entries=16, show_spinner=False)
def _checkpoint(digest: str, _content: bytes, name: str) -> Checkpoint:
    return checkpoints.from_bytes(_content, name=name)


@st.cache_resource(max_entries=64, show_spinner=False)
def _bundled_file(path: str, size: int, mtime_ns: int) -> Checkpoint:
    """Read and hash a file once per (path, size, modification time): a replaced file is read again."""
    content = Path(path).read_bytes()
    return _checkpoint(hashlib.sha256(content).hexdigest(), content, Path(path).stem)


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
    models.update(st.session_state.setdefault(keys.UPLOADS, {}))
    return models


def available_models() -> dict[str, Checkpoint]:
    """Every model of this session by name, each with the input preparation chosen for it, if any."""
    chosen = st.session_state.get(keys.INPUTS, {})
    return {name: _with_choice(ckpt, chosen.get(name)) for name, ckpt in loaded_models().items()}


def _with_choice(ckpt: Checkpoint, token: str | None) -> Checkpoint:
    if not token:
        return ckpt
    try:
        return ckpt.with_prep(inputs.parse(token, data.DATASETS.get(ckpt.dataset), ckpt.spec.input_shape[0]))
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
    except (data.DataUnavailable, inputs.PreparationError):
        return None


@st.cache_resource(max_entries=32, show_spinner=False)
def _conv_layers(file_digest: str, _ckpt: Checkpoint) -> list[split.ConvInfo]:
    return split.conv_layers(_ckpt.build_model(), _ckpt.spec.input_shape)


def conv_layers(ckpt: Checkpoint) -> list[split.ConvInfo]:
    """The model's conv layers with their output shapes; once per file (a chosen preparation changes none)."""
    return _conv_layers(ckpt.file_digest, ckpt)


def channel_models() -> dict[str, Checkpoint]:
    """The models channel pruning applies to: those with at least one conv layer."""
    return {k: c for k, c in available_models().items() if conv_layers(c)}


def add_upload(name: str, content: bytes, arch: str | None = None, dataset: str | None = None) -> Checkpoint:
    """Validate an uploaded file; on success it becomes this session's model. Raises CheckpointError.
    `arch`: the architecture the user picked for a state dict that was not recognised; `dataset`: the
    data set the user picked for a `.pt2` program (checked to fit it)."""
    ckpt = checkpoints.from_bytes(content, name=name, arch=arch, dataset=dataset)
    if not ckpt.dataset:  # only the user's own images can test it
        own = st.session_state.get(keys.OWN_DATA)
        if not own:
            raise checkpoints.CheckpointError(
                f"No registered data set fits this program (input {'x'.join(map(str, ckpt.spec.input_shape))}, "
                f"{ckpt.program.signature.outputs} outputs): upload a zip of your own test images below first, "
                "then the program again.")
        try:  # the images must load at the program's size, in as many classes as it has outputs; not
            # through the shared cache: the program may yet be refused, and nothing of it may stay there
            images = data.load_image_folder(own["path"], ckpt.spec.input_shape, ckpt.prep)
        except data.DataUnavailable as exc:
            raise checkpoints.CheckpointError(exc.public) from None
        classes, outputs = len(images.spec.class_names), ckpt.program.signature.outputs
        if classes != outputs and not (outputs == 1 and classes == 2):
            raise checkpoints.CheckpointError(f"The program gives {outputs} outputs, but your images "
                                              f"({own['name']}) are in {classes} classes.")
        _first_run(ckpt, images)
        add_session_model(UPLOAD_PREFIX + name, ckpt)
        keys.hand_off(keys.USE_OWN_DATA, True)
        keys.hand_off(keys.MODEL, UPLOAD_PREFIX + name)
        return ckpt
    try:
        data.check_local(ckpt.dataset)  # never a download on upload: that could take minutes offline
        test = ckpt.split()
    except data.DataUnavailable as exc:
        raise checkpoints.CheckpointError(f"Recognised as '{ckpt.arch}', but its data set is not available "
                                          f"here. {exc.public}") from None
    _first_run(ckpt, test)
    add_session_model(UPLOAD_PREFIX + name, ckpt)
    if conv_layers(ckpt):
        keys.hand_off(keys.MODEL, UPLOAD_PREFIX + name)  # the sidebar applies it on the next run
    return ckpt


def _first_run(ckpt: Checkpoint, test: data.DataSplit) -> None:
    """An upload joins the session only once it has run: its memory estimated, then a few real images."""
    try:
        trial.check_on(ckpt, test)
    except trial.TrialError as exc:
        raise checkpoints.CheckpointError(str(exc)) from None


def add_session_model(label: str, ckpt: Checkpoint) -> None:
    """A model of this session only, listed beside the bundled ones under `label`: UPLOAD_PREFIX or
    FINE_TUNED_PREFIX and its name."""
    models = st.session_state.setdefault(keys.UPLOADS, {})
    models.pop(label, None)
    models[label] = ckpt
    current = st.session_state.get(keys.MODEL, "")
    limit = max(1, int(os.environ.get("PRUNE_EXPLORER_MAX_SESSION_UPLOADS", 3)))
    for old in [n for n in models if n not in (label, current)][:max(0, len(models) - limit)]:
        del models[old]  # each session keeps its last few models (the one in use stays)


def is_session_model(ckpt: Checkpoint) -> bool:
    """A model only this session has (an upload, a model fine-tuned here), not a bundled file."""
    return ckpt.file_digest not in {c.file_digest for c in bundled_checkpoints().values()}


def current_checkpoint() -> Checkpoint:
    return available_models()[choices.current().model]


def own_data() -> dict | None:
    """This session's own test images, when uploaded and chosen in the sidebar."""
    own = st.session_state.get(keys.OWN_DATA)
    return own if own and st.session_state.get(keys.USE_OWN_DATA) else None


def add_own_data(name: str, content: bytes) -> dict:
    """Unpack a zip of an image folder into the cache and check it reads. Raises DataUnavailable. Whether
    it fits a model is checked when they meet (`fits`): the images may be for a program not uploaded yet."""
    path = data.unpack_zip(content, name)
    ckpt = current_checkpoint()
    images = image_folder(str(path), ckpt.spec.input_shape, ckpt.prep)
    own = {"name": name, "path": str(path), "digest": "image_folder:" + hashlib.sha256(content).hexdigest(),
           "images": len(images), "classes": list(images.spec.class_names)}
    st.session_state[keys.OWN_DATA] = own
    keys.hand_off(keys.USE_OWN_DATA, True)  # the sidebar applies it on the next run
    return own


@st.cache_resource(max_entries=4, show_spinner=False)
def image_folder(path: str, input_shape: tuple, prep: inputs.Preparation) -> data.DataSplit:
    return data.load_image_folder(path, input_shape, prep)


def fits(ckpt: Checkpoint, images: data.DataSplit) -> None:
    """One's own images for this model: its first run on them (the labels within its outputs, the memory
    of one batch). Raises DataUnavailable with the reason."""
    try:
        trial.check_on(ckpt, images)
    except trial.TrialError as exc:
        raise data.DataUnavailable(f"These images do not fit {ckpt.name}: {str(exc).removeprefix('Refused: ')}") \
            from None


def test_split(ckpt: Checkpoint) -> data.DataSplit:
    return ckpt.split()
