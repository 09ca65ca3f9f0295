"""The Prune page's "Recover and realise" panel: fine-tune the pruned model, remove the channels for
real, and measure both models on this machine."""
from __future__ import annotations

import hashlib
import io

import plotly.graph_objects as go
import streamlit as st
import torch

from core import checkpoints, engine, program, slim
from core.tasks import count_correct
from core.checkpoints import Checkpoint
from core.finetune import FinetuneConfig, finetune
from ui import catalogue, engines, keys, words

LATENCY_SHARES = (0, 1 / 4, 1 / 2, 3 / 4, 7 / 8, 15 / 16, 31 / 32)  # of the layer's channels, where MACs fall fastest


def latency_ks(channels: int) -> list[int]:
    """The Ks the latency chart removes: shares of the layer, and the last K that leaves one channel."""
    return sorted({k for k in (round(channels * share) for share in LATENCY_SHARES) if k < channels} | {channels - 1})


def panel(ckpt: Checkpoint, eng: engine.Engine, k: int, mode: str, criterion: str) -> None:
    st.markdown("#### Can it recover? Fine-tune with the pruned channels held at zero")
    _finetune(ckpt, eng, k, mode, criterion)
    st.markdown("#### Is it really smaller and faster? Remove the channels for real")
    _realise(ckpt, eng, k, mode, criterion)


def _finetune(ckpt: Checkpoint, eng: engine.Engine, k: int, mode: str, criterion: str) -> None:
    if ckpt.program is not None:
        st.caption("Fine-tuning in the app is for the registered architectures; for a .pt2 program use "
                   "`python -m core finetune MODEL.pt2 --k K`.")
        return
    left, right = st.columns([0.3, 0.7])
    steps = left.number_input("Steps (128 images each)", 10, 2000, 300, step=50, key=keys.FT_STEPS)
    running = st.session_state.get(keys.FT_RUNNING)
    if not running:
        right.button(f"Fine-tune {steps} steps at K = {k} ({mode})", key=keys.FT_START, type="primary",
                     icon=":material/model_training:",
                     on_click=lambda: st.session_state.__setitem__(keys.FT_RUNNING, True))
        return
    right.button("Stop", key=keys.FT_STOP, icon=":material/stop:",
                 on_click=lambda: st.session_state.__setitem__(keys.FT_RUNNING, False))
    bar, chart = st.progress(0.0, text="Fine-tuning ..."), st.empty()
    losses: list[float] = []

    def progress(done: int, total: int, loss: float) -> None:
        losses.append(loss)
        bar.progress(done / total, text=f"step {done} of {total}: loss {loss:.3f}")
        if done % 10 == 0 or done == total:
            chart.line_chart({"training loss": losses}, height=180)

    cfg = FinetuneConfig(k=k, layer=eng.layer, criterion=criterion, mode=mode, steps=int(steps))
    train = ckpt.split(train=True)
    model, done = finetune(eng, cfg, train.x, train.y, progress=progress)
    st.session_state[keys.FT_RUNNING] = False
    after = count_correct(model, eng.x, eng.y, eng.task)
    name = f"{ckpt.name} · K={k} {mode} · {len(done)} steps"
    meta = ckpt.saved_meta(test_accuracy=after / eng.total, test_correct=after, test_total=eng.total,
                           finetuned={**cfg.describe(), "from": ckpt.name})
    state_dict = {key: v.detach().clone() for key, v in model.state_dict().items()}
    digest = hashlib.sha256(repr((ckpt.digest, cfg.describe())).encode()).hexdigest()
    tuned = Checkpoint(ckpt.arch, dict(ckpt.arch_kwargs), state_dict, meta, digest, name, input_prep=ckpt.prep)
    catalogue.add_session_model(catalogue.FINE_TUNED_PREFIX + name, tuned)
    before = eng.correct(k, mode, criterion)
    st.success(f"Accuracy at K = {k}: {before / eng.total:.2%} right after pruning -> {after / eng.total:.2%} after "
               f"{len(done)} steps. Added to this session's models as **{words.plain(catalogue.FINE_TUNED_PREFIX + name)}** (sidebar, "
               "Curve page).")


@st.cache_resource(max_entries=8, show_spinner=False)
def _slim(key: tuple, k: int, mode: str, criterion: str, _eng: engine.Engine) -> slim.SlimResult:
    return slim.slim(_eng, k, mode, criterion)


@st.cache_resource(max_entries=16, show_spinner=False)
def _measure(key: tuple, ks: tuple, mode: str, criterion: str, _models: tuple, shape: tuple) -> list[slim.Measured]:
    """The models with K in `ks` removed, measured together (timed in turns: slim.measure_together)."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return slim.measure_together(list(_models), shape, repeats=10, devices=devices)


def _realise(ckpt: Checkpoint, eng: engine.Engine, k: int, mode: str, criterion: str) -> None:
    if not st.toggle(f"Remove the {k} channels for real and measure", key=keys.SLIM_SHOW,
                     help="Torch-Pruning's dependency graph cuts the channels out of the conv, its batch norm and "
                          "every layer that reads them; then both models are measured on this server."):
        return
    key = engines.engine_key(ckpt, eng.layer)
    try:
        with st.spinner("Removing the channels ..."):
            result = _slim(key, k, mode, criterion, eng)
    except ValueError as exc:
        st.error(words.plain(exc))
        return
    right = count_correct(result.model, eng.x, eng.y, eng.task)
    masked = eng.correct(k, mode, criterion)
    st.caption("Layers that shrank together: " + "; ".join(result.shrunk))
    if result.tied:
        st.warning(f"{', '.join(result.tied)} share these channels through a residual add or a concatenation: the "
                   "shortcut carries the block's input around the pruned conv, so in the masked model those "
                   "channels still carry the input. Removing them for real cuts the shortcut's channels too, "
                   f"which is a different model: {right / eng.total:.2%} right, against {masked / eng.total:.2%} "
                   "for the masked one.")
    else:
        st.caption(f"The slim model gets {right:,} of {eng.total:,} test images right, exactly as the masked one "
                   + ("(zero mode's batch-norm constant is folded into the read-out's bias)." if result.folded
                      else "."))
    with st.spinner("Measuring both models on this server ..."):
        shape = tuple(ckpt.spec.input_shape)
        before, after = _measure(key, (0, k), mode, criterion, (eng.model, result.model), shape)
    rows = []
    for label, m in (("original", before), (f"slim (K = {k})", after)):
        row = {"model": label, "parameters": f"{m.parameters:,}", "MACs": f"{m.macs:,}",
               "file": f"{m.file_bytes / 1e6:.2f} MB"}
        row.update({f"{dev} batch {b} (ms)": m.latency_text((dev, b)) for dev, b in m.latency_ms})
        rows.append(row)
    st.dataframe(rows, hide_index=True, width="stretch")
    st.caption(f"Latency: median of {after.runs} runs per model after warm-up, the middle half of the runs in "
               "brackets; the two models are timed in turns, so other users' work on this server slows both "
               "alike. " + speedup_in_words(before, after) + " MACs: PyTorch's FlopCounterMode.")
    meta = ckpt.saved_meta(test_correct=right, test_total=eng.total, test_accuracy=right / eng.total,
                           slimmed={"from": ckpt.name, "layer": eng.layer, "k": k, "mode": mode,
                                    "criterion": criterion})
    buf = io.BytesIO()
    program.save(result.model, shape, buf, meta)
    left, right_col = st.columns(2)
    left.download_button("Download the slim model (.pt2)", buf.getvalue(), key=keys.SLIM_DOWNLOAD,
                         file_name=f"{ckpt.name}_K{k}_{mode}_slim.pt2", icon=":material/download:",
                         help="A torch.export program: upload it on the Load page and it gives the same accuracy.")
    widths = slim.widths(ckpt.arch, ckpt.arch_kwargs, result.model) if ckpt.program is None else None
    if widths is None:
        right_col.caption("As a state dict: only where a registered architecture has an argument for this "
                          "layer's width; here the .pt2 program carries the new shapes.")
    else:
        buf = io.BytesIO()
        checkpoints.save(buf, ckpt.arch, widths, result.model, meta)
        right_col.download_button(f"Download as a state dict (.pt, {ckpt.arch} with {_changed(ckpt, widths)})",
                                  buf.getvalue(), key=keys.SLIM_DOWNLOAD_STATE, icon=":material/download:",
                                  file_name=f"{ckpt.name}_K{k}_{mode}_slim.pt",
                                  help="This product's checkpoint format: the architecture's name, its constructor "
                                       "arguments with the new width, the weights and how they were made.")
    if st.toggle("Latency and MACs against K", key=keys.SLIM_CURVE,
                 help=f"Removes and measures at K = {', '.join(map(str, latency_ks(eng.channels)))} (the last "
                      "keeps one channel: a conv with none is no layer): where do fewer MACs stop buying time?"):
        models, ks = [], latency_ks(eng.channels)
        bar = st.progress(0.0, text="Removing ...")
        for i, kk in enumerate(ks):
            models.append(_slim(key, kk, mode, criterion, eng).model)
            bar.progress((i + 1) / len(ks), text=f"Removed K = {kk}")
        bar.empty()
        with st.spinner(f"Measuring the {len(ks)} models in turns ..."):
            points = list(zip(ks, _measure(key, tuple(ks), mode, criterion, tuple(models), shape)))
        st.plotly_chart(_latency_figure(points), width="stretch")


def speedup_in_words(before: slim.Measured, after: slim.Measured) -> str:
    """Each latency's change, or "within the noise" where the middle halves of the two models' runs overlap."""
    said = []
    for dev, b in before.latency_ms:
        (lo0, hi0), (lo1, hi1) = before.spread_ms[(dev, b)], after.spread_ms[(dev, b)]
        if lo1 <= hi0 and lo0 <= hi1:
            said.append(f"{dev} batch {b}: within the noise")
        else:
            said.append(f"{dev} batch {b}: {before.latency_ms[(dev, b)] / after.latency_ms[(dev, b)]:.2f}x as fast")
    return "Slim against original, " + "; ".join(said) + "."


def _changed(ckpt, widths: dict) -> str:
    """The arguments the slim model changes, in words: 'width=32'."""
    changed = [f"{name}={value}" for name, value in widths.items() if ckpt.arch_kwargs.get(name) != value]
    return ", ".join(changed) or "its widths unchanged"


def _latency_figure(points) -> go.Figure:
    ks = [k for k, _ in points]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ks, y=[m.macs / points[0][1].macs for _, m in points], name="MACs (share of K=0)"))
    for dev_batch in points[0][1].latency_ms:
        base = points[0][1].latency_ms[dev_batch]
        fig.add_trace(go.Scatter(x=ks, y=[m.latency_ms[dev_batch] / base for _, m in points],
                                 name=f"latency {dev_batch[0]} batch {dev_batch[1]} (share of K=0)"))
    fig.update_layout(font=dict(size=15), height=380, xaxis_title="channels removed (K)",
                      yaxis_title="share of the original", yaxis_tickformat=".0%",
                      title="Fewer MACs, and what they buy in time")
    return fig
