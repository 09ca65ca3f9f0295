"""The Magnitude page's glue: pruned copies, the slider's grid of accuracies, this session's retrained models.

The base model and the order of its weights are built once per checkpoint and shared, read-only;
every pruned or retrained model is a copy, and a retrained one lives in its session only.
"""
from __future__ import annotations

import streamlit as st

from core import magnitude
from core.checkpoints import Checkpoint
from core.tasks import count_correct
from ui import catalogue, choices, engines, keys


@st.cache_resource(max_entries=8, show_spinner=False)
def _base_model(file_digest: str, _ckpt: Checkpoint):
    return _ckpt.build_model()


def base_model(ckpt: Checkpoint):
    return _base_model(ckpt.file_digest, ckpt)


@st.cache_resource(max_entries=8, show_spinner=False)
def _order(file_digest: str, _ckpt: Checkpoint):
    return magnitude.MagnitudeOrder(base_model(_ckpt))


def pruned_model(ckpt: Checkpoint, sparsity: float, per_layer: bool):
    """A pruned copy (the shared base model is never touched)."""
    masks = _order(ckpt.file_digest, ckpt).masks(sparsity, per_layer)
    return magnitude.apply_masks(base_model(ckpt), masks)


def grid(ckpt: Checkpoint, per_layer: bool) -> dict:
    """The slider's grid: exact accuracy and weights left at every step of `magnitude.GRID`, counted once
    per model and threshold (a progress bar meanwhile), shared by every session, kept on disk for a
    bundled model (the warm-up counts the default model's)."""
    return engines.shared_result(
        ("magnitude grid", ckpt.digest, per_layer),
        lambda progress: magnitude.kept_grid(ckpt, per_layer, engines.disk_store(ckpt, None), progress=progress),
        f"Counting the slider's {len(magnitude.GRID)} steps once for this model:")


def keep_retrained(ckpt: Checkpoint, sparsity: float, per_layer: bool, model) -> None:
    """Keep the session's retrained model for this sparsity, so the page's figures show it (the last 4)."""
    kept = st.session_state.setdefault(keys.MAG_MODELS, {})
    kept[(ckpt.digest, round(sparsity, 4), per_layer)] = model.cpu()
    while len(kept) > 4:
        kept.pop(next(iter(kept)))


def retrained_model(ckpt: Checkpoint, sparsity: float, per_layer: bool):
    """The session's retrained model at this sparsity and threshold, or None."""
    return st.session_state.get(keys.MAG_MODELS, {}).get((ckpt.digest, round(sparsity, 4), per_layer))


def retrain(ckpt: Checkpoint, sparsity: float, per_layer: bool, epochs: int, progress):
    """Retrain a private pruned copy for this session; returns (model, test accuracy)."""
    masks = _order(ckpt.file_digest, ckpt).masks(sparsity, per_layer)
    train = ckpt.split(train=True)
    model = magnitude.retrain(base_model(ckpt), masks, train.x, train.y, epochs, device=choices.device(), progress=progress,
                              task=ckpt.spec.task)
    split = catalogue.test_split(ckpt)
    return model, count_correct(model, split.x, split.y, ckpt.spec.task) / len(split)
