"""The Sensitivity page's glue and figures: each conv layer pruned alone by each fraction of its channels.

The map is counted in a background thread (`MapJob`), one per (checkpoint, data set, criterion,
mode), so the page stays live: Stop takes effect within one count (one Ks pass, or one batch of a
layer's first pass), Resume goes on from the rows counted so far, and a job nobody has looked at for
`UNWATCHED_S` stops by itself (leaving the page stops it). The rows are facts about the checkpoint:
every session sees the same job; only its thread appends to them. A finished map is kept, shared,
and for a bundled model also on disk (`sensitivity.kept_map`): a restart or another server process
reads it back, and the warm-up counts the default rule's map before anyone asks.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core import sensitivity
from core.checkpoints import Checkpoint
from core.split import conv_layer_names
from core.sensitivity import Row
from ui import engines, keys

FRACTIONS = sensitivity.DEFAULT_FRACTIONS
FONT = 15
UNWATCHED_S = 15.0  # a job whose page nobody has shown for this long stops (the page polls every second)


class _Stopped(Exception):
    """Raised inside the job's progress callback to stop a layer's first pass part-way."""


@dataclass
class MapJob:
    rows: list[Row] = field(default_factory=list)  # appended only by the job's thread
    status: str = ""                               # what it is counting now, or why it stopped
    error: str | None = None
    seen: float = field(default_factory=time.monotonic)  # when a page last showed it
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()

    def watched(self) -> None:
        self.seen = time.monotonic()

    def check(self) -> None:
        if self.stop_event.is_set():
            raise _Stopped("stopped")
        if time.monotonic() - self.seen > UNWATCHED_S:
            raise _Stopped("stopped: the page was left")


@st.cache_resource(show_spinner=False)
def _jobs() -> tuple[dict, dict, threading.Lock]:
    """({key: MapJob} of this server, {key: rows} of finished maps, the lock that starts jobs)."""
    return {}, {}, threading.Lock()


def result_key(ckpt: Checkpoint, criterion: str, mode: str) -> tuple:
    return ckpt.digest, ckpt.dataset, criterion, mode


def complete_rows(key: tuple) -> list[Row] | None:
    return _jobs()[1].get(key)


def read_back(ckpt: Checkpoint, key: tuple, device: str) -> list[Row] | None:
    """The finished map from the engine store (counted by the warm-up, a restart ago, or by another
    server process), now also kept in memory; None where none is kept."""
    kept = engines.disk_store(ckpt, None)
    if kept is None:
        return None
    rows = sensitivity.read_back(kept, _store_key(key, device, ckpt))
    if rows is not None:
        _jobs()[1].setdefault(key, rows)
    return rows


@st.cache_resource(max_entries=64, show_spinner=False)
def _store_key(key: tuple, device: str, _ckpt: Checkpoint) -> tuple:
    """Hashing the test set once per map and device, not on every page run."""
    return sensitivity.store_key(_ckpt, key[2], key[3], FRACTIONS, device)


def job(key: tuple) -> MapJob | None:
    """The map's job, running or stopped (its rows so far), if one was started on this server."""
    return _jobs()[0].get(key)


def cells(layers: list[str]) -> int:
    return len(layers) * len(FRACTIONS)


def start(ckpt: Checkpoint, criterion: str, mode: str, device: str) -> MapJob:
    """Start counting the map (or go on from a stopped job's rows); a running job is returned as it is."""
    key = result_key(ckpt, criterion, mode)
    jobs, complete, lock = _jobs()
    with lock:
        old = jobs.get(key)
        if old is not None and old.running:
            return old
        new = MapJob(rows=list(old.rows) if old else [], status="starting ...")
        on_disk = engines.disk_store(ckpt, None)
        kept = on_disk, _store_key(key, device, ckpt) if on_disk else None  # where a finished map is kept
        new.thread = threading.Thread(target=_count, args=(new, key, ckpt, criterion, mode, device, complete, kept),
                                      daemon=True, name=f"sensitivity map {criterion} {mode}")
        jobs[key] = new
        new.thread.start()
        return new


def _count(job_: MapJob, key: tuple, ckpt: Checkpoint, criterion: str, mode: str, device: str,
           complete: dict, kept: tuple) -> None:
    def progress(done: int, total: int, what: str) -> None:
        job_.check()
        job_.status = what

    try:
        split, model = ckpt.split(), ckpt.build_model()
        done = {(r.layer, r.fraction) for r in job_.rows}
        layers = [n for n in conv_layer_names(model) if any((n, f) not in done for f in FRACTIONS)]
        for row in sensitivity.sensitivity(model, split.x, split.y, ckpt.spec.task, criterion, mode, FRACTIONS,
                                           device, layers=layers, progress=progress):
            if (row.layer, row.fraction) not in done:
                job_.rows.append(row)
            job_.check()
        complete.setdefault(key, list(job_.rows))
        sensitivity.keep(*kept, complete[key])
        job_.status = "done"
    except _Stopped as exc:
        job_.status = str(exc)
    except Exception as exc:  # shown on the page in one sentence; the thread must not die silently
        job_.error = f"The sensitivity map stopped: {type(exc).__name__}: {exc}"[:300]


def progress_view(ckpt: Checkpoint, key: tuple, layers: list[str], tied: dict, criterion: str, mode: str,
                  device: str) -> None:
    """Start / Stop / Resume and the rows so far, redrawn every second while the job runs (a fragment:
    the rest of the page is not run again); a finished map reruns the page to show the whole view."""
    current = job(key)
    if current is not None and current.running:
        st.button("Stop", icon=":material/stop:", key=keys.SENSITIVITY_STOP, on_click=current.stop)
    else:
        st.button("Resume" if current and current.rows else "Compute the sensitivity map", type="primary",
                    icon=":material/play_arrow:", key=keys.SENSITIVITY_START,
                    on_click=lambda: start(ckpt, criterion, mode, device))

    @st.fragment(run_every=1.0 if current is not None and current.running else None)
    def rows_so_far() -> None:
        now = job(key)
        if now is not None and complete_rows(key) is not None:
            st.rerun()  # finished while shown: the whole view (both charts, the CSV)
        rows = list(now.rows) if now else []
        st.caption(f"{len(rows)} of {cells(layers)} cells done ({len(layers)} layers x {len(FRACTIONS)} "
                      "fractions). Each layer costs one pass over the test set, then one pass of the rest of the "
                      "network per fraction (the last layer's row is nearly free).")
        if now is not None:
            now.watched()
            if now.error:
                st.error(now.error)
            elif now.running:
                st.progress(len(rows) / cells(layers), text=f"Counting: {now.status}")
            elif now.status:
                st.caption(f"{now.status.capitalize()} after {len(rows)} cells; Resume goes on from there.")
            if now.running != (current is not None and current.running):
                st.rerun()  # started or stopped elsewhere: the buttons change
        if rows:  # an empty heatmap would show bare numeric axes
            st.plotly_chart(heatmap(rows, tied, layers), width="stretch")

    rows_so_far()


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
                      title="Test accuracy with one layer pruned",
                      xaxis=dict(title="share of the layer's channels pruned", type="category"),  # "10%": labels
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
