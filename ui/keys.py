"""Every `st.session_state` key of the app, in one place, and the one hand-off between runs.

A page or helper never writes a string key of its own: it imports the name from here. Widget keys
double as session-state keys (Streamlit stores a keyed widget's value under its key).

The hand-off: Streamlit refuses a write to a widget's key once that widget has been drawn in the
current run. An upload on the Load page happens after the sidebar (which draws the `MODEL` and
`USE_OWN_DATA` widgets) has been drawn, so it cannot set them directly. Instead it calls
`hand_off(MODEL, name)` and reruns; the next run's sidebar calls `apply_hand_offs()` before it
draws any widget, which moves each handed-off value into its widget key. Nothing else is deferred.
"""
from __future__ import annotations

from typing import Any

import streamlit as st

# --- choices shared by every page (sidebar widgets, also carried in the URL) -------------------
MODEL = "model"            # the model in use: a bundled file stem, "upload: NAME" or "fine-tuned: NAME"
LAYER = "layer"            # the conv layer being pruned
CRITERION = "criterion"    # ranking criterion, a key of core.criteria.CRITERIA
MODE = "mode"              # pruning mode, a key of core.engine.MODES
DEVICE = "device"          # "auto", "cpu" or "cuda"
USE_OWN_DATA = "use_own_data"  # toggle: evaluate on the uploaded image folder instead of the test set
PRESENT = "present"        # presentation mode: no sidebar, no captions, larger text
CONTRAST = "contrast"      # grid colour scale: "layer" (one range for all maps) or "map" (each its own)
AXIS = "axis"              # x axis of the curve and the slider readout: "K" or "%"

# --- values that are not widgets ---------------------------------------------------------------
K = "k"                    # channels pruned; kept across pages and models (as a share where widths differ)
K_OF = "k_of"              # the channel count of the layer K was last used on
INITIALISED = "initialised"  # defaults and URL applied once per session
LINK_MODEL_MISSING = "link_model_missing"  # the URL's model, when this server has no such model (said once)
HANDOFFS = "handoffs"      # {widget key: value} to apply before the next run's sidebar (see above)
UPLOADS = "uploads"        # {label: Checkpoint}: the models only this session has (catalogue.add_session_model)
INPUTS = "inputs"          # {model name: preparation token} chosen on the Load page (core/inputs.py); in the URL
OWN_DATA = "own_data"      # the uploaded image folder: {"name", "path", "digest", "images", "classes"}
LAST_UPLOAD = "last_upload"    # (file_id, chosen data set) of the checkpoint upload already handled
LAST_IMAGES = "last_images"    # file_id of the image-folder upload already handled
MAG_RETRAINED = "mag_retrained"  # {checkpoint digest: [{sparsity, per_layer, epochs, accuracy}]}
SESSION_ENGINES = "session_engines"  # the shared engines this session holds for its own models (ui/engines.py)
MAG_MODELS = "mag_models"  # {(digest, sparsity, per_layer): the session's retrained model}

# --- widgets of one page -----------------------------------------------------------------------
LIVE_SLIDER = "live_slider"    # the Prune page's live slider component (its state holds "k")
EXIT_PRESENT = "exit_present"
ORDER_BY_SCORE = "order_by_score"
UPLOAD = "upload"
UPLOAD_ARCH = "upload_arch"
COMPARE_CRITERIA, COMPARE_ORACLE = "compare_criteria", "compare_oracle"  # the Curve page's comparison
COARSE_ORACLE = "coarse_oracle"  # the Curve page's coarse oracle, where the exact ones do not apply
COMPARE_PICK_ON = "compare_pick_on"  # the oracle chooses its order on the test or the training images
SHOW_RECOVER = "show_recover"  # the Prune page's toggle: fine-tune, remove for real, measure
FT_STEPS, FT_START, FT_STOP = "ft_steps", "ft_start", "ft_stop"
FT_RUNNING = "ft_running"  # a fine-tuning run is under way in this session (its Stop button clears it)
SLIM_SHOW, SLIM_DOWNLOAD, SLIM_CURVE = "slim_show", "slim_download", "slim_curve"
SLIM_DOWNLOAD_STATE = "slim_download_state"  # the slim model as a state dict with its widths
SHOW_FLIPS = "show_flips"  # the Prune page's toggle: which images flipped at K
CURVE_JOBS_WATCHED = "curve_jobs_watched"  # middle-layer curves whose background job this session shows
REFINE = "refine"  # the button asking for more exact points of a middle layer's curve
SENSITIVITY_START, SENSITIVITY_STOP, SENSITIVITY_CSV = "sensitivity_start", "sensitivity_stop", "sensitivity_csv"
UPLOAD_DATASET = "upload_dataset"  # the data set a .pt2 program is tested on ("" = the first that fits)
UPLOAD_IMAGES = "upload_images"
PREP_MEAN, PREP_STD, PREP_APPLY = "prep_mean", "prep_std", "prep_apply"  # the Load page's custom preparation
PREP_USE_HINT = "prep_use_hint"  # the Load page's button taking the preparation a sample check suggests
CURVE_MODELS, CURVE_MODES, CURVE_CRITERIA, CURVE_STEP = "curve_models", "curve_modes", "curve_criteria", "curve_step"
MAG_MODEL, MAG_THRESHOLD, MAG_SPARSITY = "mag_model", "mag_threshold", "mag_sparsity"  # sparsity: % on the grid
MAG_SLIDER = "mag_slider"  # the Magnitude page's sparsity slider component (its state holds "index")
MAG_EPOCHS, MAG_IMAGE, MAG_AXIS, MAG_SHOW = "mag_epochs", "mag_image", "mag_axis", "mag_show"
# the Compress page: its settings, the chart job, the selected point, fine-tuning and downloads
CMP_CRITERION, CMP_MODE, CMP_NORMALISER, CMP_CAP, CMP_AXIS = "cmp_criterion", "cmp_mode", "cmp_normaliser", "cmp_cap", "cmp_axis"
CMP_START, CMP_STOP, CMP_CSV, CMP_CHART = "cmp_start", "cmp_stop", "cmp_csv", "cmp_chart"
CMP_LINE, CMP_TARGET = "cmp_line", "cmp_target"  # the selected point
CMP_PICKED = "cmp_picked"    # (line, target) the user chose, on the chart or in the two boxes
CMP_CLICKED = "cmp_clicked"  # the chart selection last applied (a new click moves the choice)
CMP_STEPS, CMP_FT_START, CMP_FT_ALL, CMP_FT_STOP = "cmp_steps", "cmp_ft_start", "cmp_ft_all", "cmp_ft_stop"
CMP_DOWNLOAD, CMP_DOWNLOAD_STATE = "cmp_download", "cmp_download_state"

# Sidebar widgets drawn on every page: kept when the page changes (see `keep_widget_values`).
SHARED_WIDGETS = (MODEL, LAYER, CRITERION, MODE, DEVICE, USE_OWN_DATA, PRESENT, CONTRAST, AXIS)


def hand_off(widget_key: str, value: Any) -> None:
    """Set a widget's value at the start of the next run (the caller then calls `st.rerun()`)."""
    st.session_state.setdefault(HANDOFFS, {})[widget_key] = value


def apply_hand_offs() -> None:
    """Called once per run by the sidebar, before it draws a widget."""
    for widget_key, value in st.session_state.pop(HANDOFFS, {}).items():
        st.session_state[widget_key] = value


def keep_widget_values() -> None:
    """Streamlit gives each page's widgets their own identity and forgets a widget's value when a
    run does not draw it; re-assigning the shared sidebar widgets' values before they are drawn
    carries them to the page being opened."""
    for widget_key in SHARED_WIDGETS:
        if widget_key in st.session_state:
            st.session_state[widget_key] = st.session_state[widget_key]
