"""Plotly figures the pages draw. Pure functions of numbers: no streamlit, no torch, easy to test."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui import words

PRUNED_COLOUR = "rgba(220, 38, 38, 0.78)"
CLEAR = "rgba(0, 0, 0, 0)"
FONT = dict(size=15)  # chart text >= 14 px, readable on a projector
# Okabe & Ito's colour-blind-safe palette: one colour per model on the Curve page.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
DASHES = {"zero": "solid", "remove": "dash"}
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x"]


def readable(fig: go.Figure) -> go.Figure:
    """Chart text at least 14 px everywhere (Streamlit's theme sets smaller tick labels)."""
    for update in (fig.update_xaxes, fig.update_yaxes):
        update(tickfont=dict(size=14), title_font=dict(size=15))
    fig.update_annotations(font_size=15)
    fig.update_layout(font=FONT, title_font=dict(size=17), legend_font=dict(size=15),
                      hoverlabel=dict(font_size=14))
    return fig


def grid_shape(channels: int) -> tuple[int, int]:
    """Rows x columns of the feature-map grid: 16 x 32 for 512, 8 x 16 for 128, 8 x 8 for 64."""
    rows = 2 ** (int(math.log2(channels)) // 2) if channels > 1 else 1
    return rows, math.ceil(channels / rows)


def _tile(values: np.ndarray, rows: int, cols: int, fill=np.nan) -> np.ndarray:
    """(P, H, W) -> one (rows*(H+1)-1, cols*(W+1)-1) image, one pixel of gap between maps."""
    p, h, w = values.shape[:3]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1) + values.shape[3:], fill, dtype=float)
    for i in range(p):
        r, c = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = values[i]
    return out


def per_map_contrast(maps: np.ndarray) -> np.ndarray:
    """Each map stretched to its own 0..1 range, so that weak channels show their pattern too."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0.0)


def grid_layers(maps: np.ndarray, scores: np.ndarray, ranks: np.ndarray, order_by_score: bool):
    """The grid image, the per-pixel rank (for marking pruned maps) and hover data, in display order."""
    channels = maps.shape[0]
    rows, cols = grid_shape(channels)
    shown = np.argsort(ranks, kind="stable") if order_by_score else np.arange(channels)
    h, w = maps.shape[1:]
    image = _tile(maps[shown], rows, cols)
    rank_image = _tile(np.broadcast_to(ranks[shown, None, None] + 0.5, (channels, h, w)), rows, cols)
    info = np.stack([shown, scores[shown], ranks[shown]], axis=1)
    hover = _tile(np.broadcast_to(info[:, None, None, :], (channels, h, w, 3)), rows, cols)
    return image, rank_image, hover


def pruned_colourscale(k: int, channels: int) -> list:
    """Colours pixels whose rank is below K; the rank image holds rank + 0.5 on a 0..P scale."""
    t = k / channels
    if k <= 0:
        return [[0, CLEAR], [1, CLEAR]]
    if k >= channels:
        return [[0, PRUNED_COLOUR], [1, PRUNED_COLOUR]]
    return [[0, PRUNED_COLOUR], [t, PRUNED_COLOUR], [t, CLEAR], [1, CLEAR]]


def _grid_traces(maps, scores, ranks, k, order_by_score):
    image, rank_image, hover = grid_layers(maps, scores, ranks, order_by_score)
    finite = image[np.isfinite(image)]
    base = go.Heatmap(
        z=image, customdata=hover, colorscale="gray", zmin=float(finite.min()), zmax=float(finite.max()),
        showscale=False, hoverongaps=False, name="feature maps",
        hovertemplate="channel %{customdata[0]:.0f}<br>score %{customdata[1]:.4g}<br>rank %{customdata[2]:.0f}"
                      "<extra></extra>",
    )
    overlay = go.Heatmap(
        z=rank_image, zmin=0, zmax=maps.shape[0], colorscale=pruned_colourscale(k, maps.shape[0]),
        showscale=False, hoverinfo="skip", name="pruned",
    )
    return base, overlay


def _style_grid_axes(fig):
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")


def feature_map_grid(maps: np.ndarray, scores: np.ndarray, ranks: np.ndarray, k: int = 0,
                     order_by_score: bool = False, title: str = "", contrast: str = "layer",
                     height: int | None = None) -> go.Figure:
    """The P averaged feature maps as one grey grid; the K pruned channels covered in red.
    contrast: "layer" (one grey scale for all maps) or "map" (each map stretched to its own range)."""
    shown = per_map_contrast(maps) if contrast == "map" else maps
    base, overlay = _grid_traces(shown, scores, ranks, k, order_by_score)
    fig = go.Figure([base, overlay])
    rows, cols = grid_shape(maps.shape[0])
    _style_grid_axes(fig)
    fig.update_layout(title=title or f"{maps.shape[0]} averaged feature maps ({rows} x {cols})", font=FONT,
                      margin=dict(l=10, r=10, t=40, b=10), height=height or max(300, 30 * rows + 60))
    return readable(fig)


def accuracy_curve(series: dict[str, tuple[list[float], list[float]]], marker: tuple[float, float] | None = None,
                   chances: dict[float, str] | None = None, title: str = "Test accuracy vs channels pruned",
                   styles: dict[str, dict] | None = None, percent: bool = False, height: int = 520) -> go.Figure:
    """One line per (model, mode, criterion); `styles[name]` gives its line and marker (see
    `series_style`); x is K, or the % of the layer's channels when `percent`; a dotted line at each
    chance level; an optional marker at the current K."""
    fig = go.Figure()
    x_hover = "%{x:.1f}% of channels" if percent else "K = %{x}"
    for name, (xs, acc) in series.items():
        style = (styles or {}).get(name, {})
        shown = words.plot_text(name)  # a model's name: its file's, whatever that holds
        fig.add_scatter(x=xs, y=acc, mode="lines+markers" if style.get("marker") else "lines", name=shown,
                        line=style.get("line"), marker=style.get("marker"),
                        hovertemplate=x_hover + "<br>accuracy %{y:.2%}<extra>" + shown + "</extra>")
    for level, label in (chances or {}).items():
        fig.add_hline(y=level, line_dash="dot", line_color="grey", annotation_text=label,
                      annotation_position="bottom left", annotation_font=FONT)
    if marker is not None:
        fig.add_scatter(x=[marker[0]], y=[marker[1]], mode="markers", name="current K",
                        marker=dict(size=13, color="#dc2626", line=dict(width=2, color="white")),
                        hovertemplate=x_hover + "<br>accuracy %{y:.2%}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="% of channels pruned" if percent else "channels pruned (K)",
                      yaxis_title="test accuracy", yaxis_tickformat=".0%", yaxis_range=[0, 1.02], font=FONT,
                      xaxis_ticksuffix="%" if percent else "", height=height,
                      margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(font=dict(size=15), orientation="v", x=1.01, y=1, xanchor="left"))
    return readable(fig)


def series_style(model_index: int, mode: str, criterion_index: int, points: int) -> dict:
    """Colour per model, dash per mode, marker symbol per criterion (sparse markers, every ~1/8 of K)."""
    style = {"line": dict(color=PALETTE[model_index % len(PALETTE)], dash=DASHES.get(mode, "dot"), width=3)}
    if criterion_index:
        style["marker"] = dict(symbol=SYMBOLS[criterion_index % len(SYMBOLS)], size=9,
                               maxdisplayed=9 if points > 9 else 0)
    return style


def accuracy_vs_sparsity(before: tuple[list[float], list[float]], after: list[tuple[float, float]],
                         current: tuple[float, float] | None = None, log_remaining: bool = False) -> go.Figure:
    """Accuracy against the fraction of weights pruned: without retraining (line), after (points).
    `log_remaining`: x is the fraction of weights that remain, on a log axis, so 90%, 99% and 99.9%
    pruned are evenly spaced instead of squeezed against the right edge."""
    def x(values):
        return [max(1 - v, 1e-4) for v in values] if log_remaining else list(values)

    hover = ("%{customdata:.1%} pruned<br>accuracy %{y:.2%}<extra></extra>")
    fig = go.Figure()
    fig.add_scatter(x=x(before[0]), y=before[1], customdata=list(before[0]), mode="lines+markers",
                    name="pruned, no retraining", hovertemplate=hover, line=dict(width=3))
    if after:
        fig.add_scatter(x=x([a[0] for a in after]), y=[a[1] for a in after], customdata=[a[0] for a in after],
                        mode="markers", name="after retraining", hovertemplate=hover,
                        marker=dict(size=13, symbol="diamond", color="#16a34a"))
    if current is not None:
        fig.add_scatter(x=x([current[0]]), y=[current[1]], customdata=[current[0]], mode="markers", name="current",
                        hovertemplate=hover, marker=dict(size=14, color="#dc2626", line=dict(width=2, color="white")))
    if log_remaining:
        fig.update_xaxes(type="log", autorange="reversed", title="weights remaining (log scale; pruning grows to the right)",
                         tickvals=[1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001],
                         ticktext=["100%", "50%", "20%", "10%", "5%", "2%", "1%", "0.5%", "0.1%"])
    else:
        fig.update_xaxes(title="weights pruned", tickformat=".0%")
    fig.update_layout(title="Test accuracy vs weights pruned", yaxis_title="test accuracy", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=40, b=10), font=FONT, height=420,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"))
    return readable(fig)


def weight_histograms(weights: dict[str, np.ndarray], bins: int = 120) -> go.Figure:
    """One histogram per layer of the weights still there (zeros left out, as the paper shows); the
    band around 0 where every weight was pruned (|w| below the smallest surviving |w|) is shaded."""
    fig = make_subplots(rows=1, cols=len(weights), subplot_titles=list(weights))
    for i, (name, w) in enumerate(weights.items(), start=1):
        nonzero = w[w != 0]
        fig.add_trace(go.Histogram(x=nonzero, nbinsx=bins, name=name, showlegend=False, marker_color="#0072B2",
                                   hovertemplate="weight %{x}<br>count %{y}<extra></extra>"), row=1, col=i)
        if nonzero.size and nonzero.size < w.size:
            t = float(np.abs(nonzero).min())
            fig.add_vrect(x0=-t, x1=t, fillcolor="#dc2626", opacity=0.25, line_width=0, row=1, col=i)
    fig.update_annotations(font=FONT)
    fig.update_layout(title="Weights left per layer (zeros left out; red band: pruned)", height=320, font=FONT,
                      margin=dict(l=10, r=10, t=70, b=10), bargap=0.02)
    return readable(fig)


def first_layer_maps(w: np.ndarray, image_shape: tuple[int, int]) -> go.Figure:
    """|W| of the first layer: per input pixel, how many weights survive and their mean |w|,
    reshaped to the input image so its outline shows."""
    h, wd = image_shape
    alive = (w != 0).sum(0).reshape(h, wd)
    mean_abs = np.abs(w).mean(0).reshape(h, wd)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["weights left per input pixel", "mean |w| per input pixel"],
                        horizontal_spacing=0.12)
    fig.add_trace(go.Heatmap(z=alive, colorscale="Viridis", colorbar=dict(x=0.44, len=0.9),
                             hovertemplate="pixel (%{y}, %{x})<br>%{z} weights<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=mean_abs, colorscale="Viridis",
                             hovertemplate="pixel (%{y}, %{x})<br>mean |w| %{z:.4f}<extra></extra>"), row=1, col=2)
    for col in (1, 2):
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{'' if col == 1 else col}", visible=False, row=1, col=col)
        fig.update_xaxes(visible=False, row=1, col=col)
    fig.update_annotations(font=FONT)
    fig.update_layout(title=f"First layer |W|, reshaped to the {h} x {wd} input", height=400, font=FONT,
                      margin=dict(l=10, r=10, t=80, b=10))
    return readable(fig)


def weight_matrix(w: np.ndarray, name: str) -> go.Figure:
    """The whole |W| matrix (neurons x inputs): the paper's figure; the 28-pixel rows show as stripes.
    Pruned weights are white; the grey scale tops out at the 95th percentile of the surviving |w|, so
    that the many small weights are not all white."""
    magnitude = np.abs(w)
    alive = magnitude[magnitude > 0]
    top = float(np.percentile(alive, 95)) if alive.size else 1.0
    fig = go.Figure(go.Heatmap(z=magnitude, colorscale="Greys", zmin=0, zmax=top, showscale=True,
                               colorbar=dict(title="|w|"),
                               hovertemplate="neuron %{y}, input %{x}<br>|w| %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="neuron")
    fig.update_xaxes(title="input pixel (row by row)")
    fig.update_layout(title=f"|W| of {name} (white: pruned)", height=360, font=FONT,
                      margin=dict(l=10, r=10, t=40, b=10))
    return readable(fig)
