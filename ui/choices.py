"""The session's shared choices, read in one place: the sidebar's widgets and K.

Pages and helpers read `choices.current()` instead of `st.session_state[...]`, and K through
`choices.k(channels)`, the one place it is fitted to the layer in use (a model or layer switch keeps K
between layers of one width, and its share of the channels between widths).
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
    """The session's K for a layer of `channels` (and kept so): the same K where the layer is as wide as
    the one K was used on (two models compared at the same K), otherwise the same share of its channels
    (K = 200 of 512 becomes 25 of 64, not all 64 pruned); always within 0 to `channels`."""
    state = st.session_state
    value, of = int(state.get(keys.K, 0)), state.get(keys.K_OF)
    if of and of != channels:
        value = round(value * channels / of)
    state[keys.K], state[keys.K_OF] = max(0, min(value, channels)), channels
    return state[keys.K]


def set_k(value: int) -> None:
    st.session_state[keys.K] = int(value)


def device() -> str:
    """The device the session's engines run on ("auto" resolved)."""
    return str(engine.pick_device(st.session_state.get(keys.DEVICE, "auto")))
