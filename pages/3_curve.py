"""Curve page: accuracy vs K for several models, modes and criteria on one chart, with downloads."""
import csv
import io

import streamlit as st

from core import criteria, engine
from ui import figures, keys, sidebar, state

sidebar.show(sidebar.CURVE)
st.title("Accuracy vs channels pruned")
models = state.channel_models()
c1, c2, c3, c4 = st.columns([0.4, 0.2, 0.25, 0.15])
contrast = [m for m in ("fmnist_vgg", "fmnist_resnet") if m in models]  # seed 000's VGG-vs-ResNet contrast
chosen = c1.multiselect("Models", list(models), default=contrast or [st.session_state[keys.MODEL]], key=keys.CURVE_MODELS)
modes = c2.multiselect("Modes", list(engine.MODES), default=[st.session_state[keys.MODE]], key=keys.CURVE_MODES)
crits = c3.multiselect("Criteria", list(criteria.CRITERIA), default=[st.session_state[keys.CRITERION]],
                       key=keys.CURVE_CRITERIA)
step = c4.number_input("Step in K", min_value=1, max_value=64, value=1, key=keys.CURVE_STEP,
                       help="Seed 000 used 32; every K is cheap here.")

series, rows = {}, []
for name in chosen:
    ckpt = models[name]
    eng = state.engine_for(ckpt, layer=None)
    for mode in modes:
        for crit in crits:
            acc = state.curve(eng, mode, crit)
            ks = list(range(0, eng.channels + 1, int(step)))
            if ks[-1] != eng.channels:
                ks.append(eng.channels)
            series[f"{name} · {mode} · {crit}"] = (ks, [acc[k] for k in ks])
            rows += [[name, eng.layer, mode, crit, k, round(acc[k] * eng.total), eng.total, f"{acc[k]:.4f}"]
                     for k in ks]

if not series:
    st.info("Choose at least one model, mode and criterion.")
    st.stop()
fig = figures.accuracy_curve(series)
st.plotly_chart(fig, width="stretch", config={"toImageButtonOptions": {"format": "png", "filename": "accuracy_vs_k",
                                                                        "scale": 2}})
buf = io.StringIO()
csv.writer(buf).writerows([["model", "layer", "mode", "criterion", "k", "correct", "total", "accuracy"]] + rows)
st.download_button("Download CSV", buf.getvalue(), file_name="accuracy_vs_k.csv", mime="text/csv")
st.caption("PNG: the camera icon at the chart's top right saves it as an image. Each model is pruned at its "
           "last conv layer. With a shortcut around that layer (ResNet-style) accuracy degrades gracefully; a "
           "plain VGG falls to chance.")
