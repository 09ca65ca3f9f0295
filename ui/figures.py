"""Plotly figures the pages draw. Pure functions of numbers: no streamlit, no torch, easy to test."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PRUNED_COLOUR = "rgba(220, 38, 38, 0.78)"
CLEAR = "rgba(0, 0, 0, 0)"


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


def _style_grid_axes(fig, row=None, col=None):
    kw = {"row": row, "col": col} if row else {}
    fig.update_xaxes(visible=False, constrain="domain", **kw)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x" if not row else "x", **kw)


def feature_map_grid(maps: np.ndarray, scores: np.ndarray, ranks: np.ndarray, k: int = 0,
                     order_by_score: bool = False, title: str = "") -> go.Figure:
    """The P averaged feature maps as one grey grid; the K pruned channels covered in red."""
    base, overlay = _grid_traces(maps, scores, ranks, k, order_by_score)
    fig = go.Figure([base, overlay])
    rows, cols = grid_shape(maps.shape[0])
    _style_grid_axes(fig)
    fig.update_layout(title=title or f"{maps.shape[0]} averaged feature maps ({rows} x {cols})",
                      margin=dict(l=10, r=10, t=40, b=10), height=max(260, 26 * rows + 60))
    return fig


def accuracy_curve(series: dict[str, tuple[list[int], list[float]]], marker: tuple[int, float] | None = None,
                   chance: float | None = None, title: str = "Test accuracy vs channels pruned") -> go.Figure:
    """One line per (model, mode, criterion); an optional marker at the current K."""
    fig = go.Figure()
    for name, (ks, acc) in series.items():
        fig.add_scatter(x=ks, y=acc, mode="lines", name=name,
                        hovertemplate="K = %{x}<br>accuracy %{y:.2%}<extra>" + name + "</extra>")
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="grey", annotation_text="chance")
    if marker is not None:
        fig.add_scatter(x=[marker[0]], y=[marker[1]], mode="markers", name="current K",
                        marker=dict(size=13, color="#dc2626", line=dict(width=2, color="white")),
                        hovertemplate="K = %{x}<br>accuracy %{y:.2%}<extra></extra>")
    fig.update_layout(title=title, xaxis_title="channels pruned (K)", yaxis_title="test accuracy",
                      yaxis_tickformat=".0%", yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=-0.35))
    return fig


def scrubber(maps: np.ndarray, scores: np.ndarray, ranks: np.ndarray, accuracy: list[float],
             k: int = 0, order_by_score: bool = True) -> go.Figure:
    """Grid and curve with Plotly's own slider: every step is precomputed, so it follows the thumb
    in the browser with no server round trip."""
    channels = maps.shape[0]
    ks = list(range(channels + 1))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.56, 0.44], horizontal_spacing=0.1)
    base, overlay = _grid_traces(maps, scores, ranks, k, order_by_score)
    fig.add_trace(base, row=1, col=1)
    fig.add_trace(overlay, row=1, col=1)
    fig.add_scatter(x=ks, y=accuracy, mode="lines", name="accuracy", row=1, col=2, line=dict(color="#2563eb"),
                    hovertemplate="K = %{x}<br>accuracy %{y:.2%}<extra></extra>")
    fig.add_scatter(x=[k], y=[accuracy[k]], mode="markers", name="current K", row=1, col=2,
                    marker=dict(size=13, color="#dc2626", line=dict(width=2, color="white")))
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", row=1, col=1)
    fig.update_xaxes(title_text="channels pruned (K)", range=[-5, channels + 5], row=1, col=2)
    fig.update_yaxes(title_text="test accuracy", tickformat=".0%", range=[0, 1.02], row=1, col=2)
    fig.frames = [go.Frame(
        name=str(j),
        data=[go.Heatmap(colorscale=pruned_colourscale(j, channels)),
              go.Scatter(x=[j], y=[accuracy[j]])],
        traces=[1, 3],
        layout=go.Layout(title_text=_scrub_title(j, channels, accuracy)),
    ) for j in ks]
    fig.update_layout(
        title_text=_scrub_title(k, channels, accuracy), showlegend=False, height=520,
        margin=dict(l=10, r=10, t=50, b=10),
        sliders=[dict(
            active=k, currentvalue=dict(prefix="K = ", font=dict(size=16)), pad=dict(t=30),
            ticklen=0, font=dict(color=CLEAR),  # 513 step labels would be unreadable
            steps=[dict(label=str(j), method="animate",
                        args=[[str(j)], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                             transition=dict(duration=0))]) for j in ks],
        )],
    )
    return fig


def _scrub_title(k: int, channels: int, accuracy: list[float]) -> str:
    return f"K = {k} of {channels} pruned · test accuracy {accuracy[k]:.2%}"


def accuracy_vs_sparsity(before: tuple[list[float], list[float]], after: list[tuple[float, float]],
                         current: tuple[float, float] | None = None) -> go.Figure:
    """Accuracy against the fraction of weights pruned: without retraining (line), after (points)."""
    fig = go.Figure()
    fig.add_scatter(x=before[0], y=before[1], mode="lines+markers", name="pruned, no retraining",
                    hovertemplate="sparsity %{x:.1%}<br>accuracy %{y:.2%}<extra></extra>")
    if after:
        fig.add_scatter(x=[a[0] for a in after], y=[a[1] for a in after], mode="markers", name="after retraining",
                        marker=dict(size=12, symbol="diamond", color="#16a34a"),
                        hovertemplate="sparsity %{x:.1%}<br>accuracy %{y:.2%}<extra></extra>")
    if current is not None:
        fig.add_scatter(x=[current[0]], y=[current[1]], mode="markers", name="current",
                        marker=dict(size=13, color="#dc2626", line=dict(width=2, color="white")))
    fig.update_layout(title="Test accuracy vs weights pruned", xaxis_title="sparsity (fraction of weights at zero)",
                      xaxis_tickformat=".0%", yaxis_title="test accuracy", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=-0.4))
    return fig


def weight_histograms(weights: dict[str, np.ndarray], bins: int = 80) -> go.Figure:
    """One histogram per layer of the weights still there (zeros left out, as the paper shows)."""
    fig = make_subplots(rows=1, cols=len(weights), subplot_titles=list(weights))
    for i, (name, w) in enumerate(weights.items(), start=1):
        nonzero = w[w != 0]
        fig.add_trace(go.Histogram(x=nonzero, nbinsx=bins, name=name, showlegend=False,
                                   hovertemplate="weight %{x}<br>count %{y}<extra></extra>"), row=1, col=i)
    fig.update_layout(title="Weight distribution per layer (non-zero weights)", height=300,
                      margin=dict(l=10, r=10, t=60, b=10), bargap=0.02)
    return fig


def first_layer_maps(w: np.ndarray, image_shape: tuple[int, int]) -> go.Figure:
    """|W| of the first layer: per input pixel, how many weights survive and their mean |w|,
    reshaped to the input image so its outline shows."""
    h, wd = image_shape
    alive = (w != 0).sum(0).reshape(h, wd)
    mean_abs = np.abs(w).mean(0).reshape(h, wd)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["non-zero weights per input pixel", "mean |w| per input pixel"],
                        horizontal_spacing=0.08)
    fig.add_trace(go.Heatmap(z=alive, colorscale="Viridis", colorbar=dict(x=0.45, len=0.9),
                             hovertemplate="pixel (%{y}, %{x})<br>%{z} weights<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=mean_abs, colorscale="Viridis",
                             hovertemplate="pixel (%{y}, %{x})<br>mean |w| %{z:.4f}<extra></extra>"), row=1, col=2)
    for col in (1, 2):
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{'' if col == 1 else col}", visible=False, row=1, col=col)
        fig.update_xaxes(visible=False, row=1, col=col)
    fig.update_layout(title="First layer |W|, reshaped to the 28 x 28 input", height=380,
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


def weight_matrix(w: np.ndarray, name: str) -> go.Figure:
    """The whole |W| matrix (neurons x inputs): the paper's figure; the 28-pixel rows show as stripes."""
    fig = go.Figure(go.Heatmap(z=np.abs(w), colorscale="Greys", showscale=False,
                               hovertemplate="neuron %{y}, input %{x}<br>|w| %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="neuron")
    fig.update_xaxes(title="input pixel (row-major 28 x 28)")
    fig.update_layout(title=f"|W| of {name}", height=330, margin=dict(l=10, r=10, t=40, b=10))
    return fig
