"""The Curve page's comparison of rules: criteria side by side, the random band, the oracle, a scoreboard.

The oracle orders and the random band are facts about one engine and mode, computed once and
shared by every session (Streamlit's resource cache), never changed afterwards.
"""
from __future__ import annotations

import functools

import plotly.graph_objects as go
import streamlit as st

from core import criteria, engine, oracle
from core.checkpoints import Checkpoint
from ui import engines, keys

SEEDS = criteria.BAND_SEEDS
FONT = 15


PICK_ON = {"test": "the test images (an upper bound)", "train": "training images (a usable rule)"}


@st.cache_resource(max_entries=16, show_spinner=False)
def oracles(key: tuple, mode: str, pick_on: str, _eng: engine.Engine,
            _ckpt: Checkpoint) -> tuple[oracle.OracleOrder, oracle.OracleOrder]:
    """(single, greedy) for one engine and mode, chosen on the test images or on the last training
    images (`oracle.training_size`) and then scored on the test images; raises ValueError where the
    read-out is not linear. Kept on disk with a bundled model's engine (`oracle.chosen`)."""
    picker = functools.cache(lambda: oracle.training_engine(_ckpt, _eng))  # one pass for both orders, if any
    return tuple(oracle.chosen(_eng, kind, mode, pick_on, _ckpt, picker=picker) for kind in ("single", "greedy"))


def coarse_counts(eng: engine.Engine, mode: str, progress=None) -> tuple[list[int], list[int]]:
    """The coarse oracle's (ks, counts), kept with a bundled model's engine on disk."""
    def make() -> dict:
        found = oracle.chosen(eng, "sampled", mode, progress=progress)
        ks = eng.coarse_ks()
        return {"ks": ks, "counts": [c for _, c in eng.sweep_order(found.order, ks, mode)]}
    state = engine.kept(eng, ("coarse oracle", mode), make, lambda state: state.get("ks") == eng.coarse_ks())
    return state["ks"], state["counts"]


def show_coarse(eng: engine.Engine, key: tuple, mode: str, criterion: str, why: str) -> None:
    """The coarse oracle where the exact ones do not apply: why, then on request its curve."""
    st.info(f"The exact oracles need one linear layer right after this conv; here {why}. A coarse version "
            f"instead: each channel pruned alone on the first {eng.sample_size:,} test images (a sample), and "
            "that order scored exactly over every test image at every 1/16 of the channels.")
    if not st.toggle("Coarse oracle", key=keys.COARSE_ORACLE,
                     help=f"{eng.channels} passes of the rest of the network over the sample, then 17 over every "
                          "test image for the order and 17 for the sidebar's rule; shared by every session."):
        return
    ks, counts = engines.shared_result(("coarse oracle", key, mode), lambda progress: coarse_counts(eng, mode, progress),
                                       "Each channel alone, on a sample:")
    engines.check_criterion(eng, criterion)  # the sidebar's rule, drawn beside it, may not apply here
    with st.spinner(f"The sidebar's rule at the same {len(ks)} K, over every test image ..."):
        fig = coarse_figure(eng, mode, criterion, ks, counts)
    st.plotly_chart(fig, width="stretch")


def coarse_figure(eng: engine.Engine, mode: str, criterion: str, ks: list[int], counts: list[int]) -> go.Figure:
    fig = go.Figure()
    rule = [c for _, c in eng.sweep(ks, mode, criterion)]
    fig.add_trace(go.Scatter(x=ks, y=[c / eng.total for c in rule], name=criteria.get(criterion).label,
                             mode="lines+markers", line=dict(width=3)))
    fig.add_trace(go.Scatter(x=ks, y=[c / eng.total for c in counts], mode="lines+markers",
                             name=f"single-removal order from {eng.sample_size:,} test images "
                                  "(a reference, not a bound)",
                             line=dict(color="black", dash="dash", width=3)))
    fig.update_layout(font=dict(size=FONT), height=420, margin=dict(l=10, r=10, t=50, b=40),
                      title=f"A coarse oracle ({eng.layer}, {mode}): exact at every 1/16 of the channels",
                      xaxis_title="channels pruned (K)", yaxis_title="test accuracy", yaxis_tickformat=".0%")
    return fig


def oracle_label(pick_on: str) -> str:
    return "greedy oracle (upper bound)" if pick_on == "test" else "greedy order picked on training images"


@st.cache_resource(max_entries=16, show_spinner=False)
def random_band(key: tuple, mode: str, _eng: engine.Engine) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max accuracy over 20 seeded random orders, for every K."""
    curves = [[c / _eng.total for c in _eng.curve(mode, name)] for name in criteria.random_orders()]
    engine.keep_memos(_eng)
    by_k = list(zip(*curves))
    return [sum(v) / len(v) for v in by_k], [min(v) for v in by_k], [max(v) for v in by_k]


def scoreboard(eng: engine.Engine, mode: str, names: list[str], single: oracle.OracleOrder | None,
               greedy: oracle.OracleOrder | None, pick_on: str = "test", train_images: int = 0) -> list[dict]:
    """One row per criterion (and the greedy oracle): area under the curve, K at the first point lost,
    Spearman's rank correlation of its order with the single-removal oracle's."""
    reference = single.order if single else None
    best = [eng.correct(0, mode)] + greedy.correct_after if greedy is not None else None
    rows = []
    for name in names:
        counts = eng.curve(mode, name)
        s = oracle.score(name, counts, eng.total, eng.ranking(name).tolist(), reference)
        beats = sum(c > b for c, b in zip(counts, best)) if best else None
        rows.append(_row(criteria.get(name).label, s, criteria.get(name).looks_at, beats))
    if greedy is not None:
        s = oracle.score("oracle", best, eng.total, greedy.order, reference)
        looks_at = "the test labels: not a usable rule" if pick_on == "test" else \
            f"the last {train_images:,} training images"
        rows.append(_row(oracle_label(pick_on), s, looks_at, None))
    return rows


def _row(label: str, s: oracle.Score, looks_at: str, beats: int | None) -> dict:
    return {"rule": label, "area under the curve": f"{s.area:.2%}",
            # One type per column (Arrow refuses a column mixing words and numbers): numbers or None.
            "first K losing 1 point": s.first_point_lost,
            "Spearman vs single-removal oracle": None if s.spearman is None else round(s.spearman, 2),
            "K where it beats the greedy oracle": beats,
            "looks at": looks_at}


def figure(eng: engine.Engine, mode: str, names: list[str], band, greedy: oracle.OracleOrder | None,
           chance: float | None, pick_on: str = "test") -> go.Figure:
    ks = list(range(eng.channels + 1))
    fig = go.Figure()
    if band is not None:
        mean, low, high = band
        fig.add_trace(go.Scatter(x=ks + ks[::-1], y=high + low[::-1], fill="toself", line=dict(width=0),
                                 fillcolor="rgba(120,120,120,0.25)", name=f"random, min-max of {SEEDS} seeds",
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=ks, y=mean, name=f"random, mean of {SEEDS}", line=dict(color="grey", width=2)))
    for i, name in enumerate(names):
        acc = [c / eng.total for c in eng.curve(mode, name)]
        fig.add_trace(go.Scatter(x=ks, y=acc, name=criteria.get(name).label, line=dict(width=3)))
    if greedy is not None:
        acc = [eng.correct(0, mode) / eng.total] + [c / eng.total for c in greedy.correct_after]
        fig.add_trace(go.Scatter(x=ks, y=acc, name=oracle_label(pick_on),
                                 line=dict(color="black", dash="dash", width=3)))
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="grey", annotation_text="chance")
    fig.update_layout(font=dict(size=FONT), height=480, margin=dict(l=10, r=10, t=50, b=40),
                      title=f"Which rule picks the channels best? ({eng.layer}, {mode})",
                      xaxis_title="channels pruned (K)", yaxis_title="test accuracy", yaxis_tickformat=".0%",
                      legend=dict(font=dict(size=FONT)))
    return fig
