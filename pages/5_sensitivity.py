"""Sensitivity page: which layer can lose channels, and how many? Each conv layer pruned alone."""
import streamlit as st

from core import criteria
from ui import catalogue, choices, keys, sensitivity_map, sidebar, words

with sidebar.page(sidebar.SENSITIVITY):  # the frame, and one guard: an unexpected error is one sentence
    st.markdown("### Which layer can lose channels?")
    ckpt = catalogue.current_checkpoint()
    chosen = choices.current()
    criterion, mode = chosen.criterion, chosen.mode
    key = sensitivity_map.result_key(ckpt, criterion, mode)
    layers = [info.name for info in catalogue.conv_layers(ckpt)]
    tied = sensitivity_map.tied_layers(ckpt.digest, ckpt)
    partial = st.session_state.setdefault(keys.SENSITIVITY_ROWS, {}).setdefault(key, [])
    rows = sensitivity_map.complete_rows(key) or partial
    st.caption(f"{words.plain(ckpt.name)}: each conv layer is pruned alone by 0%, 10%, ..., 100% of its channels (ranked by "
               f"{criteria.CRITERIA[criterion].label}, mode {mode}), every other layer left whole; exact counts over "
               "the whole test set. ‡ marks layers whose channels are tied to others by a residual add or a "
               "concatenation: removing them for real would shrink those too.",
               help="Li et al., Pruning Filters for Efficient ConvNets (ICLR 2017), Fig. 2.")

    chart = st.empty()


    def draw(rows_now) -> None:
        if rows_now:  # an empty heatmap would show bare numeric axes
            chart.plotly_chart(sensitivity_map.heatmap(rows_now, tied, layers), width="stretch")


    running = st.session_state.get(keys.SENSITIVITY_RUNNING) == key
    if len(rows) < len(layers) * len(sensitivity_map.FRACTIONS):
        done = len({r.layer for r in rows})
        left, right = st.columns([0.3, 0.7])
        if running:
            left.button("Stop", icon=":material/stop:", key=keys.SENSITIVITY_STOP,
                        on_click=lambda: st.session_state.pop(keys.SENSITIVITY_RUNNING, None))
        else:
            left.button("Compute the sensitivity map" if not rows else "Resume", icon=":material/play_arrow:",
                        key=keys.SENSITIVITY_START, type="primary",
                        on_click=lambda: st.session_state.__setitem__(keys.SENSITIVITY_RUNNING, key))
        right.caption(f"{done} of {len(layers)} layers done. Each layer costs one pass over the test set, then one "
                      "pass of the rest of the network per fraction (the last layer's row is nearly free).")
        draw(rows)
        if running:
            bar = st.progress(len(rows) / (len(layers) * len(sensitivity_map.FRACTIONS)), text="Computing ...")
            total = len(layers) * len(sensitivity_map.FRACTIONS)

            def on_row(row) -> None:
                bar.progress(len(partial) / total, text=f"{row.layer}: {row.fraction:.0%} pruned")
                draw(partial)

            rows = sensitivity_map.compute(ckpt, criterion, mode, choices.device(), partial, on_row)
            st.session_state.pop(keys.SENSITIVITY_RUNNING, None)
            st.rerun()
    else:
        draw(rows)
        st.plotly_chart(sensitivity_map.small_multiples(rows, tied, layers, words.chance_level(ckpt)), width="stretch")
        st.download_button("Download CSV", "layer,channels,fraction,k,correct,total,accuracy\n" + "".join(
            f"{r.layer},{r.channels},{r.fraction:g},{r.k},{r.correct},{r.total},{r.accuracy:.4f}\n" for r in rows),
            file_name=f"sensitivity_{ckpt.name}_{mode}_{criterion}.csv", key=keys.SENSITIVITY_CSV)
    sidebar.sync_url()
