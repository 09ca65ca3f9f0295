"""The session's shared choices, read in one place: the sidebar's widgets and K.

Pages and helpers read `choices.current()` instead of `st.session_state[...]`, and K through
`choices.k(channels)`, the one place it is clipped to the layer in use (a model or layer switch
keeps K where it still fits).
"""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from core import engine
from ui import keys


DEFAULT_CRITERION, DEFAULT_MODE = "mean", "zero"  # what a new session shows (and the warm-up prepares first)


@dataclass(frozen=True)
class Choices:
    model: str       # the model's name in the catalogue
    layer: str | None  # None until the sidebar has chosen one (the last conv)
    criterion: str
    mode: str
    contrast: str    # the grid's grey scale: "layer" or "map"
    axis: str        # the slider's axis: "K" or "%"
    present: bool    # presentation mode


def current() -> Choices:
    state = st.session_state
    return Choices(str(state.get(keys.MODEL, "")), state.get(keys.LAYER), state.get(keys.CRITERION, DEFAULT_CRITERION),
                   state.get(keys.MODE, DEFAULT_MODE), state.get(keys.CONTRAST, "layer"), state.get(keys.AXIS, "K"),
                   bool(state.get(keys.PRESENT)))


def k(channels: int) -> int:
    """The session's K, clipped to the layer's channels (and kept so)."""
    value = st.session_state[keys.K] = max(0, min(int(st.session_state.get(keys.K, 0)), channels))
    return value


def set_k(value: int) -> None:
    st.session_state[keys.K] = int(value)


def device() -> str:
    """The device the session's engines run on ("auto" resolved)."""
    return str(engine.pick_device(st.session_state.get(keys.DEVICE, "auto")))
