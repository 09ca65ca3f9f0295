"""Compress page: prune every layer at once; strategies side by side on an accuracy-vs-MACs chart."""
import streamlit as st

from core import criteria, engine
from core.compress import NORMALISERS
from ui import catalogue, choices, compress, keys, sidebar, words

with sidebar.page(sidebar.COMPRESS):  # the frame, and one guard: an unexpected error is one sentence
    st.markdown("### Compress the whole network")
    ckpt = catalogue.current_checkpoint()
    device = choices.device()
    for key, default in ((keys.CMP_CRITERION, "l1_norm"), (keys.CMP_MODE, "remove"), (keys.CMP_NORMALISER, "none"),
                         (keys.CMP_CAP, 90), (keys.CMP_AXIS, "macs"), (keys.CMP_STEPS, compress.FINETUNE_STEPS)):
        st.session_state.setdefault(key, default)
    row = st.columns([1.3, 1, 1, 1, 1.4])
    row[0].selectbox("Rank channels by", list(criteria.CRITERIA), key=keys.CMP_CRITERION,
                     format_func=compress.criterion_label, help="Within each layer, channels go in this order.")
    row[1].radio("Mode", list(engine.MODES), key=keys.CMP_MODE, horizontal=True,
                 help="\n\n".join(f"**{m}**: {text}" for m, text in engine.MODES.items()))
    row[2].selectbox("Normaliser (global)", list(NORMALISERS), key=keys.CMP_NORMALISER, help=compress.NORMALISER_HELP)
    row[3].selectbox("Per-layer cap", [90, 80, 70, 50], key=keys.CMP_CAP, format_func=lambda v: f"{v}%",
                     help="No layer loses more than this share of its channels (the line 'global, cap off' has none).")
    row[4].radio("x axis", list(compress.AXES), key=keys.CMP_AXIS, horizontal=True,
                 format_func={"macs": "MACs", "params": "parameters", "latency": "latency"}.get)
    s = compress.settings_from_state()
    ckey = compress.chart_key(ckpt, s, device)
    current = compress.job(ckey)
    running = current is not None and current.running
    st.caption(f"{words.plain(ckpt.name)}: every prunable conv layer at once, for targets of 90% ... 20% of the MACs "
               "kept. Every accuracy is exact (the whole test set, as if the weights were zeroed by hand); the grey "
               "band is a random order pruned uniformly (3 seeds). Layers tied by a residual add are one group.",
               help="Strategies: uniform (the same share of every layer); global (one ranking of all channels, "
                    "normalised, no layer past its cap); global with the cap off (a layer can be wiped out); "
                    "sensitivity (Li et al. 2017: the layers that lose least alone are pruned hardest, the "
                    "tolerance found by bisection).")
    if running:
        st.button("Stop", icon=":material/stop:", key=keys.CMP_STOP, on_click=current.stop)
    elif current is None or not current.finished:
        st.button("Resume" if current and current.points else "Compute the chart", type="primary",
                  icon=":material/play_arrow:", key=keys.CMP_START,
                  on_click=lambda: compress.start_chart(ckpt, s, device))

    left, right = st.columns([3, 2])

    @st.fragment(run_every=1.0 if running else None)
    def chart_so_far() -> None:
        now = compress.job(ckey)
        if now is None:
            st.info("Press **Compute the chart**: the lines fill in as each point is counted.")
            return
        now.watched()
        if now.error:
            st.error(words.plain(now.error))
        elif now.running:
            st.progress(min(1.0, now.done / max(now.total, 1)),
                        text=f"{now.done} of {now.total} points · now: {words.plain(now.status)}")
        elif now.status and not now.finished:
            st.caption(f"{words.plain(now.status).capitalize()} after {len(now.points)} points; Resume goes on.")
        if now.running != running:
            st.rerun()
        if not now.points:
            return
        net = compress.network(ckpt, device)
        tuned = compress.tuned_points(ckey, st.session_state[keys.CMP_STEPS])
        selected = compress.selected(now.points)
        base = compress.base_latency(now.points)
        fig = compress.chart(now.points, tuned, net, st.session_state[keys.CMP_AXIS], words.chance_level(ckpt),
                             selected, base)
        st.plotly_chart(fig, key=keys.CMP_CHART, on_select="rerun", selection_mode="points", width="stretch")
        if compress.apply_pick():
            st.rerun()  # the panel beside the chart shows the clicked point
        st.download_button("Download every point (CSV)", compress.points_csv(net, now.points, tuned),
                           file_name=f"tradeoff_{ckpt.name}_{s.mode}_{s.criterion}.csv", key=keys.CMP_CSV)

    with left:
        chart_so_far()
    with right:
        compress.point_panel(ckpt, s, device, ckey)
    sidebar.sync_url()
