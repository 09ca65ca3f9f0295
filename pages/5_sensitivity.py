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
    st.caption(f"{words.plain(ckpt.name)}: each conv layer is pruned alone by 0%, 10%, ..., 100% of its channels (ranked by "
               f"{criteria.CRITERIA[criterion].label}, mode {mode}), every other layer left whole; exact counts over "
               "the whole test set. ‡ marks layers whose channels are tied to others by a residual add or a "
               "concatenation: removing them for real would shrink those too.",
               help="Li et al., Pruning Filters for Efficient ConvNets (ICLR 2017), Fig. 2.")
    complete = sensitivity_map.complete_rows(key) or sensitivity_map.read_back(ckpt, key, choices.device())
    if complete is None:
        sensitivity_map.progress_view(ckpt, key, layers, tied, criterion, mode, choices.device())
    else:
        st.plotly_chart(sensitivity_map.heatmap(complete, tied, layers), width="stretch")
        st.plotly_chart(sensitivity_map.small_multiples(complete, tied, layers, words.chance_level(ckpt)),
                        width="stretch")
        st.download_button("Download CSV", "layer,channels,fraction,k,correct,total,accuracy\n" + "".join(
            f"{r.layer},{r.channels},{r.fraction:g},{r.k},{r.correct},{r.total},{r.accuracy:.4f}\n" for r in complete),
            file_name=f"sensitivity_{ckpt.name}_{mode}_{criterion}.csv", key=keys.SENSITIVITY_CSV)
    sidebar.sync_url()
