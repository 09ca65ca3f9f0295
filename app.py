"""Streamlit entry point: the shared sidebar (model, layer, criterion, mode, device) and the pages."""
from __future__ import annotations

import streamlit as st
import torch

from core import criteria, engine
from ui import state

st.set_page_config(page_title="Pruning explorer", page_icon=":material/content_cut:", layout="wide")

# Query parameters a link carries, so that it reopens the same view.
URL_KEYS = ("model", "layer", "criterion", "mode", "k")


def init_session() -> None:
    """Once per session: defaults, overridden by the URL."""
    if st.session_state.get("initialised"):
        return
    models = state.channel_models()
    query = st.query_params
    st.session_state["model"] = query.get("model") if query.get("model") in models else state.DEFAULT_MODEL
    st.session_state["criterion"] = query.get("criterion") if query.get("criterion") in criteria.CRITERIA else "mean"
    st.session_state["mode"] = query.get("mode") if query.get("mode") in engine.MODES else "zero"
    if query.get("layer"):
        st.session_state["layer"] = query.get("layer")
    if str(query.get("k", "")).isdigit():
        st.session_state["k"] = int(query.get("k"))
    st.session_state["initialised"] = True


def sidebar() -> None:
    models = state.channel_models()
    if "pending_model" in st.session_state:  # an upload chose a new model on the last run
        st.session_state["model"] = st.session_state.pop("pending_model")
    with st.sidebar:
        st.header("Model")

        def label(key: str) -> str:
            ckpt = models[key]
            acc = ckpt.meta.get("test_accuracy")
            return f"{key} · {ckpt.arch} · {ckpt.dataset}" + (f" · {acc:.2%}" if acc is not None else "")

        st.selectbox("Checkpoint", list(models), key="model", format_func=label)
        ckpt = state.current_checkpoint()
        layers = state.conv_layers(ckpt.digest, ckpt)
        names = [info.name for info in layers]
        if st.session_state.get("layer") not in names:  # first run, or a model without that layer
            if st.session_state.get("layer") is not None:
                st.session_state["k"] = 0
            st.session_state["layer"] = names[-1]
        described = {info.name: info.describe() for info in layers}
        st.selectbox("Conv layer (default: the last)", names, key="layer", format_func=described.get)
        own = st.session_state.get("own_data")
        if own:
            if st.session_state.pop("pending_use_own_data", False):
                st.session_state["use_own_data"] = True
            st.toggle(f"Test data: my images ({own['name']})", key="use_own_data",
                      help=f"Off: the checkpoint's own test set ({ckpt.dataset}).")
        st.header("Pruning")
        st.selectbox("Rank channels by", list(criteria.CRITERIA), key="criterion",
                     format_func=lambda c: criteria.CRITERIA[c].label)
        st.radio("Pruning mode", list(engine.MODES), key="mode", horizontal=True,
                 captions=[engine.MODES[m] for m in engine.MODES])
        devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        st.selectbox("Device", devices, key="device")
        st.caption(f"Running on **{state.device().upper()}**"
                   + ("" if torch.cuda.is_available() else " (no CUDA device on this server)"))


def sync_url() -> None:
    for key in URL_KEYS:
        value = st.session_state.get(key)
        if value is not None and st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


init_session()
sidebar()
page = st.navigation([
    st.Page("views/load.py", title="Load", icon=":material/upload_file:"),
    st.Page("views/feature_maps.py", title="Feature maps", icon=":material/grid_view:"),
    st.Page("views/prune.py", title="Prune", icon=":material/content_cut:", default=True),
    st.Page("views/curve.py", title="Curve", icon=":material/show_chart:"),
    st.Page("views/magnitude.py", title="Magnitude", icon=":material/filter_alt:"),
])
page.run()
sync_url()
