"""The Magnitude page's sparsity slider: a Streamlit components v2 custom component (assets/sparsity_slider.*).

The browser gets, once per model and threshold, the exact accuracy and the weights left at every
step of the precomputed grid (`magnitude.GRID`), so while the thumb moves it redraws the metrics
itself, as the Prune page's slider does; the server hears the chosen step on release and writes its
sparsity (in %) to `st.session_state[keys.MAG_SPARSITY]`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import streamlit as st

from ui import keys

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_PERCENT = 90.0

_component = st.components.v2.component(
    "pruning_explorer.sparsity_slider",
    html=(ASSETS / "sparsity_slider.html").read_text(),
    css=(ASSETS / "sparsity_slider.css").read_text(),
    js=(ASSETS / "sparsity_slider.js").read_text(),
)


def chosen_percent() -> float:
    """The session's sparsity in %, on the grid (a value from elsewhere snaps to the nearest step)."""
    return float(st.session_state.get(keys.MAG_SPARSITY, DEFAULT_PERCENT))


def nearest(grid: list[float], percent: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] * 100 - percent))


def sparsity_slider(*, signature: tuple, grid: dict, total_images: int, baseline: float) -> int:
    """Draw the slider; returns the grid index the server shows (the session's sparsity, snapped)."""
    index = nearest(grid["grid"], chosen_percent())
    st.session_state[keys.MAG_SPARSITY] = round(grid["grid"][index] * 100, 1)
    data = {"signature": hashlib.sha1(repr(signature).encode()).hexdigest()[:16], "index": index,
            "grid": grid["grid"], "accuracy": [round(c / total_images, 6) for c in grid["correct"]],
            "nonzero": grid["nonzero"], "total": grid["total"], "baseline": baseline}
    _component(key=keys.MAG_SLIDER, data=data, on_index_change=lambda: _released(grid["grid"]))
    return index


def _released(grid: list[float]) -> None:
    index = st.session_state[keys.MAG_SLIDER].get("index")
    if index is not None and 0 <= int(index) < len(grid):
        st.session_state[keys.MAG_SPARSITY] = round(grid[int(index)] * 100, 1)
