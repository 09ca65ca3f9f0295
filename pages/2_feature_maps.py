"""Feature maps page: the layer's averaged feature maps as one grid, pruned channels marked."""
import streamlit as st

from core import criteria
from ui import choices, engines, figures, keys, sidebar

with sidebar.page(sidebar.FEATURE_MAPS):  # the frame, and one guard: an unexpected error is one sentence
    st.title("Averaged feature maps")
    eng = engines.current_engine()
    chosen = choices.current()
    criterion, contrast = chosen.criterion, chosen.contrast
    engines.check_criterion(eng, criterion)
    k = choices.k(eng.channels)
    rows, cols = figures.grid_shape(eng.channels)
    st.caption(f"Layer **{eng.layer}**: each of the {eng.channels} small images is one channel's activation "
               f"averaged over all {eng.total:,} test images ({rows} x {cols} grid). "
               + ("Each map is scaled to its own range, so only its pattern shows, not its strength. "
                  if contrast == "map" else "Darker means less active. ")
               + (f"The {k} channels pruned at the current K (ranked by {criteria.get(criterion).label}) are red."
                  if k else "None is pruned at K = 0: move K on the Prune page and the pruned channels turn red."))
    by_score = st.toggle("Order the grid by score (lowest first: the first pruned)", key=keys.ORDER_BY_SCORE)
    fig = engines.feature_map_figure(engines.current_engine_key(), criterion, k, by_score, contrast, eng)
    st.plotly_chart(fig, width="stretch")
