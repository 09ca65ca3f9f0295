"""The Sensitivity page's glue and figures: each conv layer pruned alone by each fraction of its channels.

Computed in the page's own run, layer by layer, so a rerun (the Stop button, any click) interrupts
it; rows computed so far stay in the session and the run resumes where it stopped. A complete map is
a fact about the checkpoint: it is shared by every session, written once per key, never changed.
"""
from __future__ import annotations

import threading

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core import sensitivity
from core.checkpoints import Checkpoint
from core.split import conv_layer_names
from core.sensitivity import Row

FRACTIONS = sensitivity.DEFAULT_FRACTIONS
FONT = 15


@st.cache_resource(show_spinner=False)
def _complete() -> tuple[dict, threading.Lock]:
    """{(digest, data set, criterion, mode): rows} of finished maps, shared, each written once."""
    return {}, threading.Lock()


def result_key(ckpt: Checkpoint, criterion: str, mode: str) -> tuple:
    return ckpt.digest, ckpt.dataset, criterion, mode


def complete_rows(key: tuple) -> list[Row] | None:
    return _complete()[0].get(key)


def compute(ckpt: Checkpoint, criterion: str, mode: str, device: str, partial: list[Row], on_row) -> list[Row]:
    """Rows for every layer and fraction; `partial` (this session's rows so far) are not recomputed."""
    split = ckpt.split()
    model = ckpt.build_model()
    done = {(r.layer, r.fraction) for r in partial}
    layers = [n for n in conv_layer_names(model)
              if any((n, f) not in done for f in FRACTIONS)]
    for row in sensitivity.sensitivity(model, split.x, split.y, ckpt.spec.task, criterion, mode, FRACTIONS,
                                       device, layers=layers):
        if (row.layer, row.fraction) not in done:
            partial.append(row)
            on_row(row)
    store, lock = _complete()
    with lock:
        store.setdefault(result_key(ckpt, criterion, mode), list(partial))
    return partial


@st.cache_resource(max_entries=16, show_spinner=False)
def tied_layers(digest: str, _ckpt: Checkpoint) -> dict[str, str]:
    return sensitivity.ties(_ckpt.build_model())


def _label(layer: str, tied: dict[str, str]) -> str:
    return f"{layer} ‡" if layer in tied else layer


def heatmap(rows: list[Row], tied: dict[str, str], layers: list[str]) -> go.Figure:
    """Layers (rows, in network order) x fraction pruned (columns): test accuracy."""
    cols = [f"{f:.0%}" for f in FRACTIONS]
    by = {(r.layer, f"{r.fraction:.0%}"): r for r in rows}
    z = [[by[(layer, c)].accuracy if (layer, c) in by else None for c in cols] for layer in layers]
    text = [[f"{v:.0%}" if v is not None else "" for v in line] for line in z]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=[_label(n, tied) for n in layers], text=text,
                               texttemplate="%{text}", zmin=0, zmax=1, colorscale="RdYlGn",
                               colorbar=dict(title="accuracy", tickformat=".0%"),
                               hovertemplate="%{y}<br>%{x} of its channels pruned<br>accuracy %{z:.2%}"
                                             "<extra></extra>"))
    fig.update_layout(font=dict(size=FONT), height=max(320, 60 + 42 * len(layers)), margin=dict(l=10, r=10, t=40, b=40),
                      title="Test accuracy with one layer pruned", xaxis_title="fraction of the layer's channels pruned",
                      yaxis=dict(autorange="reversed"))
    return fig


def small_multiples(rows: list[Row], tied: dict[str, str], layers: list[str], chance: float | None) -> go.Figure:
    cols = 4
    nrows = (len(layers) + cols - 1) // cols
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[_label(n, tied) for n in layers],
                        shared_yaxes=True, vertical_spacing=0.12 if nrows > 1 else 0.2)
    for i, layer in enumerate(layers):
        mine = sorted((r for r in rows if r.layer == layer), key=lambda r: r.fraction)
        fig.add_trace(go.Scatter(x=[r.fraction for r in mine], y=[r.accuracy for r in mine], mode="lines+markers",
                                 name=layer, showlegend=False, line=dict(color="#1f77b4"),
                                 hovertemplate=f"{layer}<br>%{{x:.0%}} pruned: %{{y:.2%}}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
        if chance is not None:
            fig.add_hline(y=chance, line_dash="dot", line_color="grey", row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    fig.update_xaxes(range=[0, 1], tickformat=".0%")
    fig.update_layout(font=dict(size=FONT), height=260 * nrows + 40, margin=dict(l=10, r=10, t=40, b=20))
    fig.update_annotations(font_size=FONT)
    return fig
