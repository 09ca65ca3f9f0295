"""The Load page's "Inputs" section: how the model in use reads its images, and the choice of it.

A model's preprocessing is part of the model (core/inputs.py). Here the page says which preparation
is in use and where it comes from, lets the user choose another (none, the data set's usual mean and
std, or their own), and, where the file does not say, offers the one a sample check finds clearly
better.
"""
from __future__ import annotations

import streamlit as st

from core import data, inputs
from core.checkpoints import Checkpoint
from ui import catalogue, keys, words

CUSTOM = "custom"


def show(name: str, ckpt: Checkpoint) -> None:
    prep = ckpt.prep
    st.markdown(f"**Inputs:** {prep.describe()} ({prep.source}).")
    if prep.source == inputs.ASSUMED:
        st.caption("The file does not say how its images were prepared in training, so the data set's usual "
                   "normalisation is assumed. If the accuracy looks wrong, choose how the model was trained "
                   "below; `meta` in the export lines (*Export your model as a .pt2 program*, above) records it "
                   "in the file.")
    if prep.source != inputs.FROM_FILE:  # assumed, or chosen here: a sample check may know better
        hint = catalogue.preparation_hint(ckpt.digest, ckpt)
        if hint is not None:
            st.warning(hint.sentence, icon=":material/tune:")
            if st.button(f"Use {hint.better.describe()}", key=keys.PREP_USE_HINT):
                _choose(name, hint.better)
    _choice(name, ckpt)


def _choice(name: str, ckpt: Checkpoint) -> None:
    """A radio of the usual preparations and one's own; a change replaces the model's preparation."""
    spec = data.DATASETS.get(ckpt.dataset)
    channels = ckpt.spec.input_shape[0]
    unchosen = _unchosen(name, ckpt)
    options = {unchosen.token(): unchosen, inputs.NONE.token(): inputs.NONE}
    usual = inputs.usual(spec, channels)
    options.setdefault(usual.token(), usual)

    def label(token: str, p: inputs.Preparation) -> str:  # one bracket of notes at most
        said = []
        if token == unchosen.token() and unchosen.source == inputs.FROM_FILE:
            said.append("as the file states")
        if token == usual.token() and spec is not None:
            said.append(f"{spec.title}'s usual statistics")
        return p.describe() + (f" ({'; '.join(said)})" if said else "")

    labels = {token: label(token, p) for token, p in options.items()}
    current = ckpt.prep.token()
    if current not in options:
        options[current] = ckpt.prep
        labels[current] = ckpt.prep.describe()
    picked = st.radio("How this model's inputs are prepared", [*options, CUSTOM], index=[*options].index(current),
                      format_func=lambda t: labels.get(t, "my own mean and std ..."),
                      help="Every image is scaled to pixels in [0, 1] and then, per channel, (x - mean) / std, "
                           "as the model was trained. The wrong choice makes a good model look broken.")
    if picked == CUSTOM:
        _custom(name, channels)
    elif picked != current:
        _choose(name, options[picked])


def _custom(name: str, channels: int) -> None:
    left, right, go = st.columns([2, 2, 1], vertical_alignment="bottom")
    mean = left.text_input("Mean (one per channel, or one for all)", key=keys.PREP_MEAN, placeholder="0.5")
    std = right.text_input("Std", key=keys.PREP_STD, placeholder="0.5")
    if go.button("Apply", key=keys.PREP_APPLY):
        try:
            prep = inputs.from_numbers(mean.replace(",", " ").split(), std.replace(",", " ").split(), channels)
        except inputs.PreparationError as exc:
            st.error(words.plain(exc))
            return
        _choose(name, prep)


def _unchosen(name: str, ckpt: Checkpoint) -> inputs.Preparation:
    """The preparation without this session's choice: as the file states, or as assumed."""
    loaded = catalogue.loaded_models().get(name)
    return loaded.prep if loaded is not None else ckpt.prep


def _choose(name: str, prep: inputs.Preparation) -> None:
    catalogue.choose_preparation(name, prep)
    st.rerun()
