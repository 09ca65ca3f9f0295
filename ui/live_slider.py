"""The Prune page's one slider: a Streamlit components v2 custom component (assets/live_slider.*).

The browser gets, once per (model, layer, criterion, mode, contrast), the feature maps as bytes in
pruning order and the precomputed accuracy for every K, so while the thumb moves it redraws the
grid's pruned overlay, the accuracy metric and the curve's marker itself; the server hears K on
release. Keyboard: arrows +-1, PageUp/PageDown +-32, Home/End; a play button sweeps K from 0 to P.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import streamlit as st

from ui import choices, figures, keys

ASSETS = Path(__file__).resolve().parents[1] / "assets"

_component = st.components.v2.component(
    "pruning_explorer.live_slider",
    html=(ASSETS / "live_slider.html").read_text(),
    css=(ASSETS / "live_slider.css").read_text(),
    js=(ASSETS / "live_slider.js").read_text(),
)


def tiles(maps: np.ndarray, order: np.ndarray, contrast: str) -> bytes:
    """(P, H, W) maps in pruning order as grey bytes: one range for the whole layer ("layer"), or each
    map stretched to its own range ("map"), so that weak channels of early layers are not all black."""
    shown = maps[order].astype(np.float64)
    if contrast == "map":
        lo = shown.min(axis=(1, 2), keepdims=True)
        span = shown.max(axis=(1, 2), keepdims=True) - lo
    else:
        lo, span = shown.min(), shown.max() - shown.min()
    scaled = np.where(span > 0, (shown - lo) / np.where(span > 0, span, 1), 0.0)
    return np.round(scaled * 255).astype(np.uint8).tobytes()


def k_ticks(channels: int) -> list[int]:
    """Round tick marks on a K axis: 0, 128, ..., 512 for 512 channels; 0, 16, ..., 64 for 64."""
    step = max(1, 2 ** max(0, int(np.log2(channels)) - 2))
    return list(range(0, channels + 1, step))


@st.cache_data(max_entries=64, show_spinner=False)
def payload(signature: str, _maps: np.ndarray, _scores: np.ndarray, _order: np.ndarray, contrast: str) -> dict:
    """The part of the data that depends only on the layer, criterion and contrast (cached by signature)."""
    channels, h, w = _maps.shape
    rows, cols = figures.grid_shape(channels)
    return {"channels": channels, "rows": rows, "cols": cols, "h": h, "w": w,
            "tiles": base64.b64encode(tiles(_maps, _order, contrast)).decode(),
            "channel_of": _order.tolist(), "scores": [float(f"{s:.5g}") for s in _scores[_order]],
            "k_ticks": k_ticks(channels)}


def live_slider(*, engine_key: tuple, maps: np.ndarray, scores: np.ndarray, order: np.ndarray, k: int,
                accuracy: list[float] | None, known: dict[int, float], baseline: float, chance: float | None,
                per_filter: int, total_params: int, curve_title: str, note: str, contrast: str = "layer",
                axis: str = "K", present: bool = False) -> None:
    """Draw the live view; a released K is written to `st.session_state[keys.K]` before the next run.

    `order`: channel indices in pruning order; `accuracy`: every K's accuracy, or None where the
    curve is not precomputed (then `known` holds the accuracies computed so far, {K: accuracy})."""
    signature = hashlib.sha1(repr((engine_key, contrast, order[:64].tolist())).encode()).hexdigest()[:16]
    data = dict(payload(signature, maps, scores, order, contrast))
    rows, cols = data["rows"], data["cols"]
    data.update(
        signature=signature, k=int(k), accuracy=[round(a, 6) for a in accuracy] if accuracy else None,
        known=sorted(known.items()), known_accuracy=known.get(k, baseline), baseline=baseline, chance=chance,
        per_filter=per_filter, total_params=total_params, axis=axis, present=present, curve_title=curve_title,
        note=note,
        grid_caption=f"{data['channels']} averaged feature maps ({rows} x {cols}), in pruning order: the lowest "
                     f"score first; pruned in red. Hover for channel, score and rank.",
    )
    _component(key=keys.LIVE_SLIDER, data=data, on_k_change=_released)


def _released() -> None:
    k = st.session_state[keys.LIVE_SLIDER].get("k")
    if k is not None:
        choices.set_k(int(k))
