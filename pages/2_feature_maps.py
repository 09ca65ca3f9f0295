"""Feature maps page: the layer's averaged feature maps as one grid, pruned channels marked."""
import streamlit as st

from core import criteria
from ui import figures, guard, keys, sidebar, state

with guard.page():  # an unexpected error: one sentence, the session intact (ui/guard.py)
    sidebar.show(sidebar.FEATURE_MAPS)
    st.title("Averaged feature maps")
    eng = state.current_engine()
    criterion = st.session_state[keys.CRITERION]
    state.check_criterion(eng, criterion)
    k = min(st.session_state.get(keys.K, 0), eng.channels)
    rows, cols = figures.grid_shape(eng.channels)
    contrast = st.session_state[keys.CONTRAST]
    st.caption(f"Layer **{eng.layer}**: each of the {eng.channels} small images is one channel's activation "
               f"averaged over all {eng.total:,} test images ({rows} x {cols} grid). "
               + ("Each map is scaled to its own range, so only its pattern shows, not its strength. "
                  if contrast == "map" else "Darker means less active. ")
               + (f"The {k} channels pruned at the current K (ranked by {criteria.get(criterion).label}) are red."
                  if k else "None is pruned at K = 0: move K on the Prune page and the pruned channels turn red."))
    by_score = st.toggle("Order the grid by score (lowest first: the first pruned)", key=keys.ORDER_BY_SCORE)
    fig = state.feature_map_figure(state.current_engine_key(), criterion, k, by_score, contrast, eng)
    st.plotly_chart(fig, width="stretch")
