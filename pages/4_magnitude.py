"""Magnitude page: Han et al. 2015 on LeNet-300-100: prune by |w|, see what survives, retrain."""
import numpy as np
import streamlit as st

from core import magnitude
from ui import catalogue, figures, keys, magnitude_models, sidebar, sparsity_slider

with sidebar.page(sidebar.MAGNITUDE):  # the frame, and one guard: an unexpected error is one sentence
    st.title("Magnitude pruning with retraining")
    st.caption("Set the weights with the smallest |w| to zero, then retrain the rest with the pruned weights held at "
               "zero (Han et al. 2015, *Learning both Weights and Connections for Efficient Neural Networks*).")
    models = catalogue.available_models()
    names = list(models)
    c1, c2 = st.columns([0.5, 0.5])
    name = c1.selectbox("Model", names, index=names.index(catalogue.MAGNITUDE_MODEL)
                        if catalogue.MAGNITUDE_MODEL in names else 0,
                        key=keys.MAG_MODEL)
    ckpt = models[name]
    per_layer = c2.radio("Threshold", ["global", "per layer"], horizontal=True, key=keys.MAG_THRESHOLD,
                         help="global: one |w| threshold over every layer (the paper's way); per layer: the same "
                              "fraction pruned in each layer.") == "per layer"
    found = magnitude_models.grid(ckpt, per_layer)
    total = len(catalogue.test_split(ckpt))
    base_accuracy = found["correct"][0] / total  # the grid starts at 0%: the model as trained
    index = sparsity_slider.sparsity_slider(signature=(ckpt.digest, per_layer), grid=found, total_images=total,
                                            baseline=base_accuracy)
    sparsity, correct = found["grid"][index], found["correct"][index]
    accuracy = correct / total
    pruned = magnitude_models.pruned_model(ckpt, sparsity, per_layer)
    st.caption(f"Test accuracy with {sparsity:.1%} of the weights pruned, before retraining: **{accuracy:.2%}** "
               f"({correct:,} of {total:,} right). Drag the slider or use the arrow keys: each of its "
               f"{len(found['grid'])} steps was counted once over every test image, for this model and threshold.")

    retrained = st.session_state.setdefault(keys.MAG_RETRAINED, {}).setdefault(ckpt.digest, [])
    with st.form("retrain"):
        epochs = st.number_input("Epochs", 1, 20, 1, key=keys.MAG_EPOCHS)
        go_retrain = st.form_submit_button(f"Retrain {int(epochs)} epoch(s) at this sparsity")
    if go_retrain:
        with st.status("Retraining on the server (your session only) ...", expanded=True) as status:
            bar = st.progress(0.0)
            model, after = magnitude_models.retrain(ckpt, sparsity, per_layer, int(epochs),
                                                   lambda d, t, label: bar.progress(d / t, text=label))
            retrained.append({"sparsity": sparsity, "per_layer": per_layer, "epochs": int(epochs), "accuracy": after})
            magnitude_models.keep_retrained(ckpt, sparsity, per_layer, model)
            status.update(label=f"Retrained: {after:.2%} at {sparsity:.1%} sparsity", state="complete", expanded=False)
    if retrained:
        st.dataframe([{"sparsity": f"{r['sparsity']:.1%}", "threshold": "per layer" if r["per_layer"] else "global",
                       "epochs": r["epochs"], "accuracy after retraining": f"{r['accuracy']:.2%}",
                       "vs baseline": f"{(r['accuracy'] - base_accuracy) * 100:+.2f} pts"} for r in retrained],
                     hide_index=True)

    log_axis = st.radio("Accuracy vs sparsity, x axis", ["log", "linear"], horizontal=True, key=keys.MAG_AXIS,
                        format_func={"log": "weights remaining (log)",
                                     "linear": "weights pruned (linear)"}.get) == "log"
    grid, curve = found["grid"], [c / total for c in found["correct"]]
    st.plotly_chart(figures.accuracy_vs_sparsity((grid, curve), [(r["sparsity"], r["accuracy"]) for r in retrained
                                                                 if r["per_layer"] == per_layer], (sparsity, accuracy),
                                                 log_remaining=log_axis), width="stretch")

    # What the figures below show: the retrained model at this sparsity when there is one, else the pruned one.
    own = magnitude_models.retrained_model(ckpt, sparsity, per_layer)
    shown = pruned
    if own is not None:
        which = st.radio("Show the weights of", ["retrained", "pruned"], horizontal=True, key=keys.MAG_SHOW,
                         format_func={"retrained": "the retrained model",
                                      "pruned": "the pruned model before retraining"}.get)
        shown = own if which == "retrained" else pruned
    shown_report = magnitude.sparsity_of(shown)
    weights = {n: w.detach().cpu().numpy() for n, w in magnitude.prunable_weights(shown).items()}
    st.plotly_chart(figures.weight_histograms(weights), width="stretch")
    st.dataframe([{"layer": n, "weights": shown_report.total[n], "non-zero": shown_report.nonzero[n],
                   "kept": f"{shown_report.nonzero[n] / shown_report.total[n]:.1%}"} for n in shown_report.total],
                 hide_index=True)

    first_name, first = next(iter(weights.items()))
    if first.ndim == 2 and first.shape[1] == int(np.prod(ckpt.spec.input_shape)) and ckpt.spec.input_shape[0] == 1:
        st.plotly_chart(figures.first_layer_maps(first, ckpt.spec.input_shape[1:]), width="stretch")
        st.plotly_chart(figures.weight_matrix(first, first_name), width="stretch")

    st.subheader("Hidden neurons that fire for one test image")
    split = catalogue.test_split(ckpt)
    index = st.number_input("Test image", 0, len(split) - 1, 0, key=keys.MAG_IMAGE)
    fired = magnitude.firing_neurons(shown, split.x[index])
    unpruned = magnitude.firing_neurons(magnitude_models.base_model(ckpt), split.x[index])
    left, right = st.columns([0.25, 0.75])
    if split.x.shape[1] == 1:
        left.image(((split.x[index, 0] - split.x[index, 0].min()) / (np.ptp(split.x[index, 0].numpy()) + 1e-8)).numpy(),
                   width=140, caption=f"label: {split.spec.class_names[int(split.y[index])]}")
    label = "firing (retrained)" if shown is own and own is not None else "firing (pruned)"
    right.dataframe([{"layer": n, "units": next(m.out_features for mn, m in shown.named_modules() if mn == n),
                      label: fired[n], "firing (unpruned)": unpruned[n]} for n in fired], hide_index=True)
