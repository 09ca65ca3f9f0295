"""The Compress page's glue and figures: the whole network pruned at once, strategies on one chart.

The chart is made in a background thread (`Job`), one per (checkpoint, data set, device, settings),
shared by every session that asks for it: its points are facts about the checkpoint, appended only
by the job's thread, so a session only reads them. The order of work is the order a lecture needs:
the plans that need nothing more first (uniform, global, global without its cap, the random band) at
a few targets across the range, then the other targets, then the sensitivity map (Li et al.; the
Sensitivity page's, kept on disk) and its line, then each slim model's latency. Stop takes effect
between two points; Resume goes on from the points made (a bundled model's points are kept on disk,
so a restart reads them back). A job nobody has looked at for `UNWATCHED_S` stops by itself.
Fine-tuning a point (or every point) is a job of the same kind; its model stays in memory for the
download.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field, replace

import plotly.graph_objects as go
import streamlit as st
import torch

from core import compressed, criteria, program, sensitivity, slim, tradeoff
from core.checkpoints import Checkpoint
from core.compress import NORMALISERS, TARGETS
from ui import engines, keys, words

UNWATCHED_S = 20.0
NETWORKS_KEPT = 6  # whole-network views kept in memory, oldest dropped first
FINETUNE_STEPS = 2000
COLOURS = {"uniform": "#1f77b4", "global": "#d62728", "global-uncapped": "#ff7f0e", "sensitivity": "#2ca02c"}
LABELS = {"uniform": "uniform", "global": "global (capped)", "global-uncapped": "global, cap off",
          "sensitivity": "sensitivity (Li et al.)"}
AXES = {"macs": "MACs kept", "params": "parameters kept", "latency": "measured latency, batch 256"}
FONT = 15
UNPRUNED = ("unpruned", 1.0)  # the chart's point for the model as it is


class _Stopped(Exception):
    pass


@dataclass
class Job:
    """A background run: the chart's points, or fine-tuning points; only its thread writes to it."""

    points: dict = field(default_factory=dict)   # (line, target) -> tradeoff.Point
    status: str = ""
    done: int = 0
    total: int = 0
    error: str | None = None
    models: dict = field(default_factory=dict)   # (line, target) -> fine-tuned model (fine-tuning jobs)
    seen: float = field(default_factory=time.monotonic)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    finished: bool = False

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()

    def watched(self) -> None:
        self.seen = time.monotonic()

    def stopping(self) -> bool:
        return self.stop_event.is_set() or time.monotonic() - self.seen > UNWATCHED_S

    def check(self) -> None:
        if self.stop_event.is_set():
            raise _Stopped("stopped")
        if time.monotonic() - self.seen > UNWATCHED_S:
            raise _Stopped("stopped: the page was left")


@st.cache_resource(show_spinner=False)
def _jobs() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


@st.cache_resource(show_spinner=False)
def _networks() -> dict:
    """{(digest, data set, device): Network} made by the jobs: read-only once made (rankings only grow)."""
    return {}


def settings_from_state() -> tradeoff.Settings:
    state = st.session_state
    cap = state.get(keys.CMP_CAP, 90)
    return tradeoff.Settings(state.get(keys.CMP_CRITERION, tradeoff.DEFAULT_CRITERION), state.get(keys.CMP_MODE, "remove"),
                             state.get(keys.CMP_NORMALISER, tradeoff.DEFAULT_NORMALISER), cap / 100)


def chart_key(ckpt: Checkpoint, s: tradeoff.Settings, device: str) -> tuple:
    return ("chart", ckpt.digest, ckpt.dataset, device, s)


def job(key: tuple) -> Job | None:
    return _jobs()[0].get(key)


def _start(key: tuple, target, name: str, carry: dict | None = None) -> Job:
    jobs, lock = _jobs()
    with lock:
        old = jobs.get(key)
        if old is not None and old.running:
            return old
        new = Job(points=dict(carry if carry is not None else (old.points if old else {})),
                  models=dict(old.models) if old else {}, status="starting ...")
        new.thread = threading.Thread(target=target, args=(new,), daemon=True, name=name)
        jobs[key] = new
        new.thread.start()
        return new


def network(ckpt: Checkpoint, device: str, progress=None):
    nets = _networks()
    nkey = (ckpt.digest, ckpt.dataset, device)
    found = nets.get(nkey)
    if found is None:
        found = nets[nkey] = tradeoff.network_for(ckpt, device, engines.disk_store(ckpt, None), progress=progress)
        while len(nets) > NETWORKS_KEPT:  # each holds its test split and a copy of the model
            nets.pop(next(iter(nets)), None)
    return found


def start_chart(ckpt: Checkpoint, s: tradeoff.Settings, device: str) -> Job:
    """Start making the chart (or go on from a stopped job's points)."""
    def run(j: Job) -> None:
        def progress(done, total, what):
            j.check()
            j.status = what

        try:
            net = network(ckpt, device, progress)
            if UNPRUNED not in j.points:
                right = compressed.count_model(net.model, net)
                j.points[UNPRUNED] = tradeoff.Point("unpruned", 1.0, [0] * len(net.units), {}, right, len(net.y),
                                                    net.base_macs, net.base_params, "the model as it is")
            plain = [(line, t) for line, t in tradeoff.chart_jobs() if line != "sensitivity"]
            j.total = len(tradeoff.chart_jobs()) + 1
            for line, t in plain:
                _add(j, net, s, line, t, None)
            j.status = "the sensitivity map (each layer pruned alone)"
            rows, _ = sensitivity.kept_map(ckpt, s.criterion, s.mode, device=device,
                                           store=engines.disk_store(ckpt, None), progress=progress)
            for line, t in tradeoff.chart_jobs(lines=("sensitivity",), band=0):
                _add(j, net, s, line, t, rows)
            for n, (where, pt) in enumerate(list(j.points.items())):
                j.check()
                j.status = f"latency of the slim models ({n + 1} of {len(j.points)})"
                j.points[where] = tradeoff.measured(net, pt, s)
            j.status, j.finished = "done", True
        except _Stopped as exc:
            j.status = str(exc)
        except Exception as exc:  # shown in one sentence; the thread must not die silently
            j.error = f"The chart stopped: {type(exc).__name__}: {exc}"[:300]

    return _start(chart_key(ckpt, s, device), run, "compress chart")


def _add(j: Job, net, s: tradeoff.Settings, line: str, target: float, rows) -> None:
    j.check()
    if (line, target) not in j.points:
        j.status = f"{LABELS.get(line, line)} at {target:.0%} of the MACs"
        j.points[(line, target)] = tradeoff.point(net, line, target, s, rows)
    j.done = len(j.points)


def finetune_key(ckey: tuple, steps: int) -> tuple:
    return ("finetune",) + ckey + (steps,)


def start_finetune(ckpt: Checkpoint, s: tradeoff.Settings, device: str, steps: int, points: list) -> Job:
    """Fine-tune each of `points` in turn (seeded; the models kept for the download)."""
    ckey = chart_key(ckpt, s, device)

    def run(j: Job) -> None:
        try:
            net = network(ckpt, device)
            train = ckpt.split(train=True)
            recipe = compressed.FinetuneRecipe(steps=steps)
            for n, pt in enumerate(points):
                where = (pt.line, pt.target)
                if where in j.points:
                    continue
                j.total, j.done = len(points), n

                def progress(step, total, loss, n=n, pt=pt):
                    j.status = (f"{LABELS.get(pt.line, pt.line)} at {pt.target:.0%}: step {step} of {total}, "
                                f"loss {loss:.3f} (point {n + 1} of {len(points)})")
                    j.done = n + step / total

                done, model = tradeoff.finetuned(net, pt, s, train.x, train.y, recipe, progress, j.stopping)
                j.check()
                j.points[where] = done
                if model is not None:
                    j.models[where] = model
            j.status, j.finished = "done", True
        except _Stopped as exc:
            j.status = str(exc)
        except Exception as exc:
            j.error = f"Fine-tuning stopped: {type(exc).__name__}: {exc}"[:300]

    return _start(finetune_key(ckey, steps), run, "compress fine-tuning")


# -- figures ----------------------------------------------------------------------------------
def _x(pt, axis: str, net) -> float | None:
    if axis == "macs":
        return pt.macs / net.base_macs
    if axis == "params":
        return pt.params / net.base_params
    return pt.latency_b256_ms


def chart(points: dict, tuned: dict, net, axis: str, chance: float | None, selected: tuple | None,
          base_latency: float | None) -> go.Figure:
    """Accuracy against the share kept (or latency): a line per strategy, the fine-tuned points dashed,
    the random band shaded, the unpruned model as a star, the selected point ringed."""
    fig = go.Figure()
    seeds = sorted({line for line, _ in points if line.startswith("random:")})
    if seeds:
        by_target: dict = {}
        for (line, t), pt in points.items():
            x = _x(pt, axis, net)
            if line in seeds and x is not None:
                by_target.setdefault(t, []).append((x, pt.accuracy))
        full = sorted((t, v) for t, v in by_target.items() if len(v) == len(seeds))
        if full:
            xs = [sum(x for x, _ in v) / len(v) for _, v in full]
            lo = [min(a for _, a in v) for _, v in full]
            hi = [max(a for _, a in v) for _, v in full]
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", fillcolor="rgba(128,128,128,0.2)",
                                     line=dict(width=0), hoverinfo="skip",
                                     name=f"random order, uniform ({len(seeds)} seeds)"))
    for line in tradeoff.LINES:
        mine = sorted(((t, pt) for (ln, t), pt in points.items() if ln == line and _x(pt, axis, net) is not None),
                      key=lambda tp: -tp[0])
        if not mine:
            continue
        fig.add_trace(go.Scatter(
            x=[_x(pt, axis, net) for _, pt in mine], y=[pt.accuracy for _, pt in mine], mode="lines+markers",
            name=LABELS[line], line=dict(color=COLOURS[line], width=3),
            marker=dict(size=[16 if pt.wiped else 9 for _, pt in mine],
                        symbol=["x" if pt.wiped else "circle" for _, pt in mine]),
            customdata=[[line, t] for t, _ in mine],
            hovertemplate=[f"{LABELS[line]}, target {t:.0%}<br>accuracy %{{y:.2%}}"
                           + (f"<br>wiped out: {words.plain(', '.join(pt.wiped))}" if pt.wiped else "")
                           + "<extra></extra>" for t, pt in mine]))
        after = [(t, tuned[(line, t)]) for t, _ in mine if (line, t) in tuned and tuned[(line, t)].correct_finetuned is not None]
        if after:
            fig.add_trace(go.Scatter(
                x=[_x(points[(line, t)], axis, net) for t, _ in after], y=[pt.accuracy_finetuned for _, pt in after],
                mode="lines+markers", name=f"{LABELS[line]}, fine-tuned", line=dict(color=COLOURS[line], dash="dash"),
                marker=dict(symbol="diamond", size=10), customdata=[[line, t] for t, _ in after],
                hovertemplate="fine-tuned: %{y:.2%}<extra></extra>"))
    base_x = {"macs": 1.0, "params": 1.0, "latency": base_latency}[axis]
    if base_x is not None and UNPRUNED in points:
        fig.add_trace(go.Scatter(x=[base_x], y=[points[UNPRUNED].accuracy], mode="markers", name="unpruned",
                                 marker=dict(symbol="star", size=18, color="black"),
                                 hovertemplate="unpruned: %{y:.2%}<extra></extra>"))
    if selected in points and _x(points[selected], axis, net) is not None:
        pt = points[selected]
        fig.add_trace(go.Scatter(x=[_x(pt, axis, net)], y=[pt.accuracy], mode="markers", showlegend=False,
                                 marker=dict(size=24, color="rgba(0,0,0,0)", line=dict(width=3, color="black")),
                                 hoverinfo="skip"))
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="grey", annotation_text="chance",
                      annotation_position="bottom right")
    xaxis = dict(title=AXES[axis], tickformat=".0%", range=[0, 1.04]) if axis != "latency" else \
        dict(title=AXES[axis] + " (ms, median of the runs)")
    fig.update_layout(font=dict(size=FONT), height=470, margin=dict(l=10, r=10, t=30, b=10), xaxis=xaxis,
                      yaxis=dict(title="test accuracy", tickformat=".0%", range=[0, 1.02]),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), clickmode="event+select")
    return fig


def plan_bars(net, pt) -> go.Figure:
    """The fraction of each unit pruned; a wiped-out unit in red."""
    names = [u.name for u in net.units]
    share = [k / u.channels for k, u in zip(pt.pruned, net.units)]
    colours = ["#d62728" if k == u.channels else "#1f77b4" for k, u in zip(pt.pruned, net.units)]
    fig = go.Figure(go.Bar(x=share, y=names, orientation="h", marker_color=colours,
                           text=[f"{k}/{u.channels}" for k, u in zip(pt.pruned, net.units)], textposition="auto",
                           hovertemplate="%{y}: %{x:.0%} pruned<extra></extra>"))
    fig.update_layout(font=dict(size=FONT - 2), height=60 + 34 * len(names), margin=dict(l=10, r=10, t=30, b=10),
                      title="share of each layer pruned", xaxis=dict(range=[0, 1], tickformat=".0%"),
                      yaxis=dict(autorange="reversed"))
    return fig


def points_csv(net, points: dict, tuned: dict) -> str:
    rows = [",".join(tradeoff.ROW_COLUMNS)]
    for where, pt in sorted(points.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        done = tuned.get(where)
        if done is not None and done.correct_finetuned is not None:
            pt = replace(pt, correct_finetuned=done.correct_finetuned)
        rows.append(",".join(str(v) for v in tradeoff.row(net, pt)))
    return "\n".join(rows) + "\n"


def slim_program(ckpt: Checkpoint, net, s: tradeoff.Settings, pt, model) -> tuple[bytes, torch.nn.Module]:
    """The point's model as a .pt2 program (fine-tuned where it was, else the slim model), with its meta."""
    plan = tradeoff.as_plan(net, pt, s)
    if model is None:
        model = compressed.slim_model(net, plan)
        # in zero mode the slim model lacks the pruned channels' constants: its own count, not the plan's
        right = compressed.count_model(model, net) if compressed.removal_exact(net, plan) else pt.correct
    else:
        right = pt.correct_finetuned if pt.correct_finetuned is not None else pt.correct
    meta = ckpt.saved_meta(test_correct=right, test_total=pt.total, test_accuracy=right / pt.total,
                           compressed={"from": ckpt.name, "strategy": pt.line, "target": pt.target,
                                       "mode": s.mode, "criterion": s.criterion,
                                       "finetune_steps": pt.finetune_steps})
    buf = io.BytesIO()
    program.save(model, net.input_shape, buf, meta)
    return buf.getvalue(), model


def state_dict_file(ckpt: Checkpoint, model) -> tuple[bytes | None, str]:
    """A state dict with the architecture's arguments where one registered builder makes these shapes."""
    if ckpt.program is not None:
        return None, "a .pt2 program's architecture is not registered: the program carries the new shapes"
    kwargs = slim.widths(ckpt.arch, ckpt.arch_kwargs, model)
    if kwargs is None:
        return None, (f"no argument of {ckpt.arch} sets every pruned layer's width, so only the .pt2 program "
                      "carries these shapes")
    from core import checkpoints

    buf = io.BytesIO()
    checkpoints.save(buf, ckpt.arch, kwargs, model, ckpt.saved_meta())
    return buf.getvalue(), ""


def criterion_label(name: str) -> str:
    return criteria.get(name).label


NORMALISER_HELP = ("How each layer's scores are made comparable before one ranking of every channel: none (raw "
                   "scores: layers with small filters or weak activations go first), mean or max (each layer's "
                   "scores divided by their mean or largest), LAMP (Lee et al. 2021: a channel's squared score over "
                   "the sum of the squares of the channels ranked after it in its layer).")
__all__ = ["NORMALISERS", "TARGETS"]


# -- the page's parts -------------------------------------------------------------------------

def base_latency(points: dict) -> float | None:
    pt = points.get(UNPRUNED)
    return pt.latency_b256_ms if pt is not None else None


def tuned_points(ckey: tuple, steps: int) -> dict:
    found = job(finetune_key(ckey, steps))
    return dict(found.points) if found is not None else {}


def selected(points: dict) -> tuple | None:
    """The point the panel shows: the one picked (on the chart or in the two boxes), else the best at 50%."""
    picked = st.session_state.get(keys.CMP_PICKED)
    if picked in points:
        return picked
    mine = [(where[1] == 0.5, pt.correct, where) for where, pt in points.items() if where[0] in tradeoff.LINES]
    return max(mine)[2] if mine else None


def apply_pick() -> bool:
    """A point clicked on the chart becomes the selected one (True where that is new: the page reruns)."""
    state = st.session_state.get(keys.CMP_CHART)
    try:
        picked = [p for p in state["selection"]["points"] if p.get("customdata")]
    except (KeyError, TypeError):
        return False
    if not picked:
        return False
    line, target = picked[0]["customdata"][:2]
    if (line, target) == st.session_state.get(keys.CMP_CLICKED):
        return False
    st.session_state[keys.CMP_CLICKED] = (line, target)
    st.session_state[keys.CMP_PICKED] = (line, float(target))
    return True


def _picked_in_boxes() -> None:
    st.session_state[keys.CMP_PICKED] = (st.session_state[keys.CMP_LINE], st.session_state[keys.CMP_TARGET])


def point_panel(ckpt: Checkpoint, s: tradeoff.Settings, device: str, ckey: tuple) -> None:
    current = job(ckey)
    if current is None or not [w for w in current.points if w[0] in tradeoff.LINES]:
        st.caption("The selected point's plan, its accuracy before and after fine-tuning, its MACs, parameters and "
                   "latency show here; click a point on the chart.")
        return
    points = dict(current.points)
    chosen = selected(points)
    lines = [ln for ln in tradeoff.LINES + tuple(tradeoff.band_lines()) if any(w[0] == ln for w in points)]
    st.session_state[keys.CMP_LINE], st.session_state[keys.CMP_TARGET] = chosen
    a, b = st.columns(2)
    a.selectbox("Strategy", lines, key=keys.CMP_LINE, format_func=lambda ln: LABELS.get(ln, ln),
                on_change=_picked_in_boxes)
    b.selectbox("Target (MACs kept)", list(TARGETS), key=keys.CMP_TARGET, format_func=lambda t: f"{t:.0%}",
                on_change=_picked_in_boxes)
    where = (st.session_state[keys.CMP_LINE], st.session_state[keys.CMP_TARGET])
    pt = points.get(where)
    if pt is None:
        st.caption("This point is not counted yet.")
        return
    net = network(ckpt, device)
    base = points.get(UNPRUNED)
    steps = int(st.session_state[keys.CMP_STEPS])
    m = st.columns(2) + st.columns(2)  # two by two: four in a row do not fit beside the chart
    m[0].metric("Test accuracy", f"{pt.accuracy:.2%}",
                delta=f"{100 * (pt.accuracy - base.accuracy):+.2f} pts" if base else None)
    m[1].metric("MACs kept", f"{pt.macs / net.base_macs:.1%}", help=f"{pt.macs:,} of {net.base_macs:,} per image, counted")
    m[2].metric("Parameters kept", f"{pt.params / net.base_params:.1%}", help=f"{pt.params:,} of {net.base_params:,}")
    lat = pt.latency_b256_ms
    m[3].metric("Latency, batch 256", f"{lat:.0f} ms" if lat is not None else "-",
                delta=(f"{lat / base.latency_b256_ms:.0%} of the original" if lat and base and base.latency_b256_ms else None),
                delta_color="off", help="Median of the timed runs on this server's "
                f"{net.device.type.upper()} (batch 1: {pt.latency_b1_ms:.1f} ms)" if pt.latency_b1_ms else
                "Measured after every point is counted.")
    for note in pt.notes:
        st.caption(words.plain(note[0].upper() + note[1:]) + ".")
    st.caption(f"{pt.correct:,} of {pt.total:,} test images right, counted on {words.plain(pt.how)}.")
    st.plotly_chart(plan_bars(net, pt), width="stretch", config={"displayModeBar": False})
    if pt.wiped:
        st.warning("A layer lost every channel: this plan cannot be removed for real or fine-tuned (a conv with no "
                   "channels is no layer). Turn the cap on.", icon=":material/warning:")
        return
    _finetune_part(ckpt, s, device, ckey, pt, points, steps)


def _finetune_part(ckpt: Checkpoint, s: tradeoff.Settings, device: str, ckey: tuple, pt, points: dict,
                   steps: int) -> None:
    where = (pt.line, pt.target)
    ft = job(finetune_key(ckey, steps))
    running = ft is not None and ft.running
    a, b, c = st.columns([1, 1.2, 1.2])
    a.number_input("Steps", 50, 20000, step=250, key=keys.CMP_STEPS,
                   help="Fine-tuning steps of 128 training images (Adam, learning rate 1e-3 decayed to 0, "
                        "left-right flips, seed 0): 2,000 took about 2 minutes for the VGG-style model at 50% "
                        "of its MACs on 2 CPU cores.")
    if running:
        b.button("Stop fine-tuning", icon=":material/stop:", key=keys.CMP_FT_STOP, on_click=ft.stop)
    else:
        b.button("Fine-tune this point", type="primary", key=keys.CMP_FT_START, icon=":material/model_training:",
                 on_click=lambda: start_finetune(ckpt, s, device, steps, [pt]))
        every = [p for w, p in points.items() if w[0] in tradeoff.LINES and not p.wiped]
        c.button(f"Fine-tune every point ({len(every)})", key=keys.CMP_FT_ALL,
                 help="One after another in the background; the dashed lines show them as they finish.",
                 on_click=lambda: start_finetune(ckpt, s, device, steps, every))

    @st.fragment(run_every=1.0 if running else None)
    def progress() -> None:
        now = job(finetune_key(ckey, steps))
        if now is None:
            return
        now.watched()
        if now.error:
            st.error(words.plain(now.error))
        elif now.running:
            st.progress(min(1.0, now.done / max(now.total, 1)), text=words.plain(now.status))
        elif now.status and not now.finished:
            st.caption(words.plain(now.status).capitalize() + ": a stopped run is not a result.")
        if now.running != running:
            st.rerun()

    progress()
    done = ft.points.get(where) if ft is not None else None
    if done is not None and done.correct_finetuned is not None:
        st.metric("After fine-tuning", f"{done.accuracy_finetuned:.2%}",
                  delta=f"{100 * (done.accuracy_finetuned - done.accuracy):+.2f} pts in {done.finetune_seconds:.0f} s "
                        f"({done.finetune_steps} steps)")
    model = ft.models.get(where) if ft is not None else None
    tuned = done is not None and done.correct_finetuned is not None
    if tuned and model is None:
        st.caption("Counted a restart ago (kept on disk); fine-tune it again here to download that model.")
    blob, model = _program_bytes(ckey, where, steps if model is not None else 0, ckpt, s, done if model else pt, model)
    d1, d2 = st.columns(2)
    what = "the slim model" if not compressed.removal_exact(network(ckpt, device), tradeoff.as_plan(
        network(ckpt, device), pt, s)) else "the model (zero mode: not removable exactly)"
    d1.download_button(f"Download {what} (.pt2)" + (", fine-tuned" if model is not None and tuned else ""),
                       blob, file_name=f"{ckpt.name}_{pt.line}_{round(pt.target * 100)}macs.pt2", key=keys.CMP_DOWNLOAD,
                       icon=":material/download:")
    state, why = state_dict_file(ckpt, model)
    if state is not None:
        d2.download_button("Download as a state dict (.pt)", state, key=keys.CMP_DOWNLOAD_STATE,
                           file_name=f"{ckpt.name}_{pt.line}_{round(pt.target * 100)}macs.pt")
    else:
        d2.caption(words.plain(why[0].upper() + why[1:]) + ".")


@st.cache_resource(max_entries=16, show_spinner="Writing the slim model as a .pt2 program ...")
def _program_bytes(ckey: tuple, where: tuple, steps: int, _ckpt: Checkpoint, _s, _pt, _model):
    """The download's bytes, made once per point (and fine-tuning) and shared: torch.export takes a second."""
    net = network(_ckpt, ckey[3])
    return slim_program(_ckpt, net, _s, _pt, _model)
