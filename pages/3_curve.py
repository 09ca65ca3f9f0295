"""Curve page: accuracy vs K for several models, modes and criteria on one chart, with downloads."""
import csv
import io

import streamlit as st

from core import criteria, data, engine, oracle
from ui import catalogue, choices, engines, figures, keys, sidebar, words

with sidebar.page(sidebar.CURVE):  # the frame, and one guard: an unexpected error is one sentence
    st.title("Accuracy vs channels pruned")
    models = catalogue.channel_models()
    shared = choices.current()  # the sidebar's choices: this page's defaults
    # Two rows, so that no chip is cut short at 1280 px: what is compared, then how it is drawn.
    c1, c3 = st.columns([0.55, 0.45])
    c2, c4, c5 = st.columns([0.3, 0.4, 0.3], vertical_alignment="bottom")
    contrast = [m for m in ("fmnist_vgg", "fmnist_resnet") if m in models]  # a plain VGG against a shortcut
    chosen = c1.multiselect("Models", list(models), default=contrast or [shared.model],
                            key=keys.CURVE_MODELS)
    crits = c3.multiselect("Ranked by", list(criteria.CRITERIA), default=[shared.criterion],
                           key=keys.CURVE_CRITERIA, format_func=lambda c: criteria.CRITERIA[c].label)
    modes = c2.pills("Modes", list(engine.MODES), selection_mode="multi", default=list(engine.MODES),
                     key=keys.CURVE_MODES, help="\n\n".join(f"**{m}**: {text}" for m, text in engine.MODES.items()))
    axis = c4.radio("x axis", ["K", "%"], key=keys.AXIS, format_func={"K": "K", "%": "% of channels"}.get,
                    horizontal=True,
                    help="% of channels compares layers of different widths (64, 128, 512 channels) on one axis.")
    step = c5.number_input("Step in K", min_value=1, max_value=64, value=1, key=keys.CURVE_STEP,
                           help="Every K is exact and cheap here; a step of 32 gives the coarse curve of a sweep "
                                "done by hand.")

    series, styles, rows, chances = {}, {}, [], {}
    for i, name in enumerate(chosen):
        ckpt = models[name]
        eng = engines.engine_for(ckpt, layer=None)
        chance = words.chance_level(ckpt)
        if chance is not None:
            chances[chance] = "chance (same or different pair)" if eng.task == "binary" else "chance"
        ks = list(range(0, eng.channels + 1, int(step)))
        if ks[-1] != eng.channels:
            ks.append(eng.channels)
        xs = [100 * k / eng.channels for k in ks] if axis == "%" else ks
        for mode in modes:
            for j, crit in enumerate(crits):
                acc = engines.curve(eng, mode, crit)
                label = f"{name} · {mode}" + (f" · {criteria.CRITERIA[crit].label}" if len(crits) > 1 else "")
                series[label] = (xs, [acc[k] for k in ks])
                styles[label] = figures.series_style(i, mode, j, len(ks))
                rows += [[name, eng.layer, mode, crit, k, round(acc[k] * eng.total), eng.total, f"{acc[k]:.4f}"]
                         for k in ks]

    if not series:
        st.info("Choose at least one model, mode and criterion.")
        st.stop()
    fig = figures.accuracy_curve(series, chances=chances, styles=styles, percent=axis == "%", height=500,
                                 title="Test accuracy vs channels pruned at each model's last conv layer")
    st.plotly_chart(fig, width="stretch", config={"toImageButtonOptions": {"format": "png", "filename": "accuracy_vs_k",
                                                                            "scale": 2}})
    buf = io.StringIO()
    csv.writer(buf).writerows([["model", "layer", "mode", "criterion", "k", "correct", "total", "accuracy"]] + rows)
    st.download_button("Download CSV", buf.getvalue(), file_name="accuracy_vs_k.csv", mime="text/csv")
    st.caption("Colour: model; solid line: zero, dashed: remove; markers: a second or third ranking. PNG: the camera "
               "icon at the chart's top right. With a shortcut around the pruned layer (ResNet-style) accuracy "
               "degrades gracefully; a plain VGG falls to chance.")

    st.subheader("Which rule picks the channels best?")
    eng = engines.engine_for(models[chosen[0]], layer=None)
    mode = modes[0] if modes else shared.mode
    key = engines.engine_key(models[chosen[0]])
    from ui import compare  # noqa: E402  (after the chart: its import is not needed to draw it)

    if eng.path != engine.PATH_FAST:
        st.caption(f"{words.plain(chosen[0])}: the side-by-side comparison needs every K of every rule, which costs a pass of the "
                   "rest of the network each here; the Sensitivity page gives another coarse view.")
        why = oracle.why_not_exact(eng, mode) or f"the {'remove' if mode == 'zero' else 'zero'} mode's read-out " \
            "is not linear"
        compare.show_coarse(eng, key, mode, shared.criterion, why)
    else:
        names = st.multiselect("Rules", list(criteria.CRITERIA), default=["mean", "apoz", "l1_norm", "taylor"],
                               key=keys.COMPARE_CRITERIA, format_func=lambda c: criteria.CRITERIA[c].label,
                               help="\n\n".join(f"**{c.label}**: {c.explain} ({c.source}) Looks at "
                                                 f"{c.looks_at}." for c in criteria.CRITERIA.values()))
        left, right = st.columns([0.45, 0.55], vertical_alignment="center")
        extras = left.toggle("Random band and greedy oracle", key=keys.COMPARE_ORACLE,
                              help="20 seeded random orders, and the best one-at-a-time order, found by trying every "
                                   "channel at every step. For the bundled models the warm-up finds it beforehand "
                                   "(chosen on the test images, both modes), and it is kept on disk. Otherwise it "
                                   "takes 2-8 s for a bundled model and mode on two CPU cores, 5-16 s when chosen on "
                                   "training images; then every session shares it.")
        pick_on = right.radio("The oracle chooses its order on", list(compare.PICK_ON), format_func=compare.PICK_ON.get,
                              key=keys.COMPARE_PICK_ON, horizontal=True, disabled=catalogue.own_data() is not None,
                              help="On the test images the oracle sees the labels it is scored on: an upper bound. "
                                   "On the last training images (a sixth of them, at most 10,000) it chooses "
                                   "without them, and its order is then "
                                   "scored on the test images: a rule you could use (the model was trained on those "
                                   "images too). Not offered for your own test images.")
        if catalogue.own_data() is not None:
            pick_on = "test"
        why = oracle.why_not_exact(eng, mode)
        if extras and why is not None:
            compare.show_coarse(eng, key, mode, shared.criterion, why)
        try:
            with st.spinner("Ranking the channels by each rule ..."):
                for name in names:
                    engines.curve(eng, mode, name)  # kept on disk with the engine
            with st.spinner(f"The random band and the oracle for {words.plain(chosen[0])}, {mode} ..."):
                band = compare.random_band(key, mode, eng) if extras else None
                single, greedy = compare.oracles(key, mode, pick_on, eng, models[chosen[0]]) \
                    if extras and why is None else (None, None)
        except ValueError as exc:  # e.g. bn_gamma on a layer without batch norm
            st.error(words.plain(exc))
        except data.DataUnavailable as exc:  # the training split, for an order chosen on it
            st.error(words.plain(exc.public))
        else:
            st.plotly_chart(compare.figure(eng, mode, names, band, greedy, words.chance_level(models[chosen[0]]),
                                           pick_on), width="stretch")
            train_images = oracle.training_size(models[chosen[0]]) if pick_on == "train" else 0
            st.dataframe(compare.scoreboard(eng, mode, names, single, greedy, pick_on, train_images),
                         hide_index=True, width="stretch")
            st.caption(f"{words.plain(chosen[0])}, layer {eng.layer}, mode {mode}. Area: mean accuracy over every K; "
                       "an empty 'first K losing 1 point': the rule never loses one. "
                       + ("The oracle looks at the test images' labels, so it is an upper bound, not a rule you could "
                          "use; " if pick_on == "test" else f"The greedy order was chosen on the last {train_images:,} "
                          "training images and is scored here on the test images: a rule you could use; ")
                       + "the greedy order is not guaranteed optimal, and where a rule beats it at some K the "
                         "scoreboard counts it. Spearman is against the single-removal order chosen on the same "
                         "images.",
                       help="Spearman's rank correlation against the single-removal oracle, as in Molchanov et al. "
                            "2017, Table 1.")
