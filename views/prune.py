"""Prune page: slider K, live accuracy, the grid and the curve; and a scrubber that follows the thumb."""
import streamlit as st

from ui import figures, state

st.title("Prune the least active channels")
eng = state.current_engine()
mode, criterion = st.session_state["mode"], st.session_state["criterion"]
accuracy = state.curve(eng, mode, criterion)
ranks = eng.ranking(criterion).argsort().numpy()
maps, scores = eng.stats.mean_map.numpy(), eng.scores(criterion).numpy()
total_params = state.parameter_count(state.current_checkpoint())
if st.session_state.get("k", 0) > eng.channels:
    st.session_state["k"] = eng.channels


@st.fragment
def pruning_view() -> None:
    k = st.slider("Channels pruned (K)", 0, eng.channels, key="k")
    st.query_params["k"] = str(k)
    acc = eng.correct(k, mode, criterion) / eng.total  # exact, and equal to the precomputed curve
    c1, c2, c3 = st.columns(3)
    c1.metric("Test accuracy", f"{acc:.2%}", delta=f"{(acc - accuracy[0]) * 100:+.2f} pts vs K=0",
              delta_color="normal")
    c2.metric("Parameters left", f"{total_params - state.pruned_parameters(eng, k):,}",
              help="Counts each pruned filter's weights, bias and BatchNorm scale and shift as removed.")
    c3.metric("Channels left", f"{eng.channels - k} of {eng.channels}")
    left, right = st.columns([0.55, 0.45])
    left.plotly_chart(figures.feature_map_grid(maps, scores, ranks, k, order_by_score=True,
                                               title="Feature maps by score (pruned: red)"), width="stretch")
    chance = state.chance_level(state.current_checkpoint())
    right.plotly_chart(figures.accuracy_curve({f"{mode}, {criterion}": (list(range(len(accuracy))), accuracy)},
                                              marker=(k, acc), chance=chance), width="stretch")


pruning_view()
task = "binary accuracy: same or different pair" if eng.task == "binary" else "multi-class accuracy"
st.caption(f"Mode **{mode}**, ranking by **{criterion}**, layer **{eng.layer}**, {task}; "
           f"evaluation path: {eng.path}. Re-ranking after every prune (seed 001) would give the same order: "
           "the ranking is this layer's own activation, and a channel's activation does not depend on the "
           "other channels of the layer, so ranking once is enough.")

st.subheader("Live scrubber")
st.caption("Drag this slider: the grid and the marker follow the thumb in the browser, from the precomputed "
           "curve, with no round trip to the server.")
st.plotly_chart(figures.scrubber(maps, scores, ranks, accuracy, k=st.session_state.get("k", 0)), width="stretch")
