"""The frame drawn once around every page: navigation, page config, styles, the session's defaults, the sidebar.

Each page script (app.py is the Prune page, the others are in pages/: Streamlit's multipage mode)
runs its body inside `with sidebar.page(PAGE):`, which draws this frame and guards the page, so a
deep link to any page on a fresh server draws that page with its sidebar, and Streamlit's AppTest
and the real server run the same code. (Not `st.navigation`: with a pages/ folder beside app.py,
AppTest runs a page file alone, without the entry script that would draw the frame.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from core import criteria, engine
from ui import catalogue, choices, engines, guard, keys, words

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True)
class Page:
    path: str      # the page file, relative to the repository root, as st.page_link wants it
    title: str
    icon: str
    url_path: str  # its address ("" for the Prune page, the default)
    channel_controls: bool = True  # model, layer, criterion and mode apply to this page
    model_control: bool = False    # without the channel controls: the model still applies


PRUNE = Page("app.py", "Prune", ":material/content_cut:", "")
LOAD = Page("pages/1_load.py", "Load", ":material/upload_file:", "load")
FEATURE_MAPS = Page("pages/2_feature_maps.py", "Feature maps", ":material/grid_view:", "feature_maps")
CURVE = Page("pages/3_curve.py", "Curve", ":material/show_chart:", "curve", channel_controls=False)
MAGNITUDE = Page("pages/4_magnitude.py", "Magnitude", ":material/filter_alt:", "magnitude", channel_controls=False)
SENSITIVITY = Page("pages/5_sensitivity.py", "Sensitivity", ":material/grid_on:", "sensitivity")
COMPRESS = Page("pages/6_compress.py", "Compress", ":material/compress:", "compress", channel_controls=False,
                model_control=True)
PAGES = (PRUNE, LOAD, FEATURE_MAPS, CURVE, SENSITIVITY, COMPRESS, MAGNITUDE)

# Query parameters a link carries, so that it reopens the same view.
URL_KEYS = (keys.MODEL, keys.LAYER, keys.CRITERION, keys.MODE, keys.K)


@contextlib.contextmanager
def page(which: Page):
    """Every page's body runs inside this: the frame first (`show`), then the page, all within the one
    error guard (ui/guard.py)."""
    drawn = False
    with guard.page():
        show(which)
        drawn = True
        yield
    if not drawn:  # the frame itself failed: its sentence is on the page, the body is skipped
        st.stop()


def show(page: Page) -> None:
    """Page config, styles, session defaults, background warm-up and the sidebar."""
    st.set_page_config(page_title=f"{page.title} · Pruning explorer", page_icon=str(ASSETS / "logo.png"),
                       layout="wide")
    _styles()
    first_run = not st.session_state.get(keys.INITIALISED)
    if first_run:
        _init_choices()
    keys.apply_hand_offs()
    keys.keep_widget_values()
    with st.sidebar:  # drawn before the models are read, so the first paint has the frame
        st.markdown("**Pruning explorer**")
        for p in PAGES:
            st.page_link(p.path, label=p.title, icon=p.icon)
        st.toggle("Presentation mode", key=keys.PRESENT,
                  help="Hides this sidebar and the explanations and enlarges the text, for a projector. "
                       "The link `?present=1` opens it directly.")
    if first_run:
        with st.spinner("Reading the models ..."):  # a session's first run reads every checkpoint
            _init_model()
    missing = st.session_state.pop(keys.LINK_MODEL_MISSING, None)
    if missing is not None:
        st.info(f"The link names the model `{missing.replace('`', '')}`, which this server does not have (an "
                f"upload stays only in the session that uploaded it): showing **{catalogue.DEFAULT_MODEL}** instead.",
                icon=":material/link_off:")
    engines.warm_bundled_models()
    with st.sidebar:
        if page.channel_controls:
            _channel_controls()
        else:
            if page.model_control:
                _model_control()
            _device_control()
        _warm_up_line()
    sync_url()
    if st.session_state.get(keys.PRESENT):
        st.button("Exit presentation mode", key=keys.EXIT_PRESENT, on_click=_exit_presentation,
                  type="tertiary", icon=":material/close_fullscreen:")


def _warm_up_line() -> None:
    """The background warm-up's status line, redrawn every two seconds while it runs (a fragment: the
    page itself is not run again); "Ready: ..." once every bundled model is prepared."""
    if engines.warm_status() is None:
        return

    @st.fragment(run_every=2.0 if not engines.warm_status().startswith("Ready") else None)
    def line() -> None:
        st.caption(words.plain(engines.warm_status()), help="In the background, in order of need: every bundled "
                   "model's pass over the test set, its curves for every rule and mode, the Taylor scores, the "
                   "Curve page's random band and oracle orders, the Sensitivity page's map, the Magnitude page's "
                   "grid, the Compress page's chart. Kept on disk, so a restart reads them back in seconds.")

    line()


def _exit_presentation() -> None:
    st.session_state[keys.PRESENT] = False


def _init_choices() -> None:
    """A session's first run: the defaults that need no model, overridden by the URL."""
    query = st.query_params
    st.session_state[keys.CRITERION] = (query.get("criterion") if query.get("criterion") in criteria.CRITERIA
                                        else choices.DEFAULT_CRITERION)
    st.session_state[keys.MODE] = query.get("mode") if query.get("mode") in engine.MODES else choices.DEFAULT_MODE
    st.session_state[keys.DEVICE] = "auto"
    st.session_state[keys.PRESENT] = query.get("present") in ("1", "true", "yes")
    st.session_state[keys.CONTRAST] = "layer"
    st.session_state[keys.AXIS] = "K"
    if query.get("layer"):
        st.session_state[keys.LAYER] = query.get("layer")
    k = str(query.get("k", ""))
    st.session_state[keys.K] = int(k) if k.isascii() and k.isdigit() and len(k) <= 6 else 0  # not "²", not 10**5000


def _init_model() -> None:
    """A session's first run, after the sidebar's frame is drawn: the model, from the URL if it names one."""
    models = catalogue.channel_models()
    model = st.query_params.get("model")
    st.session_state[keys.MODEL] = model if model in models else catalogue.DEFAULT_MODEL
    if model and model not in models:  # said once on the page, not silently replaced
        st.session_state[keys.LINK_MODEL_MISSING] = str(model)[:200]
    token = st.query_params.get("inputs")
    if model in models and isinstance(token, str) and len(token) <= 400:  # checked again where it is used
        st.session_state.setdefault(keys.INPUTS, {})[model] = token
    st.session_state[keys.INITIALISED] = True


def _styles() -> None:
    css = (ASSETS / "app.css").read_text()
    if st.session_state.get(keys.PRESENT, st.query_params.get("present") in ("1", "true", "yes")):
        css += (ASSETS / "present.css").read_text()
    st.html(f"<style>{css}</style>")


def _model_label(models: dict) -> callable:
    def label(key: str) -> str:
        ckpt = models[key]
        acc = ckpt.meta.get("test_accuracy")
        return f"{key} ({acc:.1%})" if acc is not None else key
    return label


def _model_control() -> None:
    models = catalogue.channel_models()
    st.header("Model")
    st.selectbox("Checkpoint", list(models), key=keys.MODEL, format_func=_model_label(models),
                 help="The bundled models were trained on Fashion-MNIST; the Load page lists them.")
    ckpt = catalogue.current_checkpoint()
    st.caption(f"{words.plain(ckpt.arch)} · {words.plain(ckpt.dataset)}")


def _channel_controls() -> None:
    _model_control()
    ckpt = catalogue.current_checkpoint()
    layers = catalogue.conv_layers(ckpt)
    names = [info.name for info in layers]
    if st.session_state.get(keys.LAYER) not in names:  # first run, or a model without that layer
        st.session_state[keys.LAYER] = names[-1]
    channels = next(info.out_channels for info in layers if info.name == st.session_state[keys.LAYER])
    choices.k(channels)  # keep K where it fits
    described = {info.name: f"{info.name} ({info.out_channels} channels)" for info in layers}
    st.selectbox("Conv layer", names, key=keys.LAYER, format_func=described.get,
                 help="Default: the last conv layer, whose whole accuracy curve is computed at once.")
    own = st.session_state.get(keys.OWN_DATA)
    if own:
        st.toggle(f"Test data: my images ({own['name']})", key=keys.USE_OWN_DATA,
                  help=f"Off: the checkpoint's own test set ({ckpt.dataset}).")
    st.header("Pruning")
    st.selectbox("Rank channels by", list(criteria.CRITERIA), key=keys.CRITERION,
                 format_func=lambda c: criteria.CRITERIA[c].label,
                 help="Channels with the lowest score are pruned first.\n\n" + "\n\n".join(
                     f"**{c.label}**: {c.explain} *{c.source}* Looks at {c.looks_at}."
                     for c in criteria.CRITERIA.values()))
    chosen = criteria.get(choices.current().criterion)
    st.caption(f"{chosen.explain} Looks at {chosen.looks_at}.")
    st.radio("Pruning mode", list(engine.MODES), key=keys.MODE, horizontal=True,
             help="\n\n".join(f"**{m}**: {text}" for m, text in engine.MODES.items()))
    st.radio("Grid contrast", ["layer", "map"], key=keys.CONTRAST, horizontal=True,
             format_func={"layer": "whole layer", "map": "each map"}.get,
             help="Whole layer: one grey scale for all maps, so weak channels look dark. Each map: every map "
                  "stretched to its own range, so the patterns of weak channels show too.")
    st.radio("Slider axis", ["K", "%"], key=keys.AXIS, horizontal=True,
             format_func={"K": "channels (K)", "%": "% of channels"}.get)
    _device_control()


def _device_control() -> None:
    devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    st.selectbox("Device", devices, key=keys.DEVICE)
    st.caption(f"Running on **{choices.device().upper()}**"
               + ("" if torch.cuda.is_available() else " (no CUDA device on this server)"))


def sync_url() -> None:
    """Write the session's choices into the URL, so a copied link reopens the same view."""
    for key in URL_KEYS:
        value = st.session_state.get(key)
        if value is not None and st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)
    if st.session_state.get(keys.PRESENT):  # a copied link opens presentation mode only while it is on
        if st.query_params.get("present") != "1":
            st.query_params["present"] = "1"
    elif "present" in st.query_params:
        del st.query_params["present"]
    token = catalogue.preparation_choice(str(st.session_state.get(keys.MODEL)))  # the model's chosen inputs
    if token and st.query_params.get("inputs") != token:
        st.query_params["inputs"] = token
    elif not token and "inputs" in st.query_params:
        del st.query_params["inputs"]
