"""The Prune page, the first thing a lecturer sees; the other pages are in pages/ (Streamlit's multipage mode).

One live slider (ui/live_slider.py) moves the grid's pruned overlay, the accuracy and the curve's
marker in the browser while it is dragged; the server hears K on release.
"""
import contextlib

import streamlit as st

with st.spinner("Starting the explorer ..."):  # the server's first run imports PyTorch: show a frame meanwhile
    from core import criteria, engine
    from ui import catalogue, choices, engines, jobs, keys, live_slider, sidebar, words

STATUS_SLOT_PX = 80  # a two-line note with its icon, or a progress bar with its line, or one button

with sidebar.page(sidebar.PRUNE):  # the frame, and one guard: an unexpected error is one sentence
    chosen = choices.current()
    mode, criterion = chosen.mode, chosen.criterion
    st.markdown(f"### Prune K channels, ranked by {criteria.get(criterion).label}")  # the rule in use, always
    ckpt = catalogue.current_checkpoint()
    eng = engines.current_engine()
    key = engines.current_engine_key()
    engines.check_criterion(eng, criterion)
    k = choices.k(eng.channels)

    if eng.path == engine.PATH_FAST:  # the whole curve from one pass: every K is known in the browser
        made = eng.known(eng.channels, mode, criterion) is not None
        with contextlib.nullcontext() if made else st.spinner(  # not made yet: the new choice's name meanwhile
                f"{words.plain(ckpt.name)}: ranking by {criteria.CRITERIA[criterion].label}, mode {mode}, and the "
                "accuracy at every K ..."):
            accuracy = engines.curve(eng, mode, criterion)
        acc, baseline, known = accuracy[k], accuracy[0], {}
    else:  # a middle layer: each K costs a pass of the rest of the network, computed on release
        accuracy = None
        # One slot of fixed height above the slider for whatever this view waits on (the sample's estimate
        # while K is counted, the coarse curve's progress, the button for more points): the slider never moves.
        waiting = st.container(height=STATUS_SLOT_PX, border=False)
        acc, known = engines.accuracy_at(eng, k, mode, criterion, waiting)  # a sample's estimate, then the exact count
        baseline = known[0] if 0 in known else engines.accuracy_at(eng, 0, mode, criterion, waiting)[0]
        jobs.start_coarse_curve(eng, key, mode, criterion)  # every 1/16 of the channels, in the background
        job = key + (mode, criterion)

        @st.fragment(run_every=2)  # in the slot above the slider: in sight at 1280x720
        def curve_in_the_background() -> None:
            """The coarse curve's progress, then a button for more points; redraws the page once when a
            background job this session watched has finished (other sessions' counts wait for its next run,
            so a student's release never redraws the lecturer's page)."""
            watched = st.session_state.setdefault(keys.CURVE_JOBS_WATCHED, set())
            done, total = jobs.coarse_progress(eng, mode, criterion)
            if done < total:
                watched.add(job)
                st.progress(done / total, text=f"Coarse curve: {done} of {total} points (every 1/16 of the channels), "
                                               "computed in the background; each is exact.")
                return
            refining = jobs.refinement_progress(key, mode, criterion)
            if refining is None and job in watched:
                watched.discard(job)
                st.rerun()
            unknown = eng.unknown(mode, criterion)
            if refining is None and unknown > 0:
                slot = st.empty()
                if slot.button(f"Refine the curve: {min(jobs.REFINE_POINTS, unknown)} more exact points",
                               key=keys.REFINE, help="Each point costs a pass of the rest of the network over every "
                                                     "test image; they go where the curve changes most between the "
                                                     "points known so far."):
                    slot.empty()
                    jobs.start_refinement(eng, key, mode, criterion)
                    refining = jobs.refinement_progress(key, mode, criterion)
            if refining is not None:
                watched.add(job)
                st.progress(refining[0] / max(refining[1], 1), text=f"Refining: {refining[0]} of {refining[1]} more "
                                                                    "points, each where the curve is least known; "
                                                                    "each is exact.")

        with waiting:
            curve_in_the_background()

    live_slider.live_slider(
        engine_key=key + (criterion,), maps=eng.stats.mean_map.numpy(), scores=eng.scores(criterion).numpy(),
        order=eng.ranking(criterion).numpy(), k=k, accuracy=accuracy, known=known, baseline=baseline,
        chance=words.chance_level(ckpt), per_filter=engines.removed_per_channel(key, eng),
        total_params=words.parameter_count(ckpt),
        curve_title=f"Accuracy vs K · {mode} · {criteria.CRITERIA[criterion].label}",
        note=words.speed_note(eng), contrast=chosen.contrast, axis=chosen.axis,
        present=chosen.present,
    )
    correct = round(acc * eng.total)
    st.caption(f"Test accuracy at K = {k}: **{acc:.2%}** ({correct:,} of {eng.total:,} right, "
               f"{'binary accuracy: same or different pair' if eng.task == 'binary' else 'multi-class accuracy'}). "
               f"{words.plain(ckpt.name)}, layer {eng.layer}, mode {mode}. Drag the slider, use the arrow keys (PageUp/PageDown: "
               f"32 channels), or press play.")
    if eng.path != engine.PATH_FAST:
        st.caption(words.evaluation_in_words(eng))
    st.query_params[keys.K] = str(k)  # the released K, so a copied link reopens this view

    if st.toggle(f"Which images flipped at K = {k}?", key=keys.SHOW_FLIPS,
                 help="The test images this pruning turned from right to wrong (and from wrong to right), against "
                      "K = 0, and the accuracy of each class."):
        from ui import flips

        with st.spinner("Comparing every test image's prediction at K with K = 0 ..."):
            result = flips.flips(key + (criterion,), k, mode, criterion, eng)
        own = catalogue.own_data()
        names = own["classes"] if own else list(catalogue.test_split(ckpt).spec.class_names)
        flips.show(result, eng.x, eng.y, names, k)

    if st.toggle(f"Recover and realise at K = {k}", key=keys.SHOW_RECOVER,
                 help="Fine-tune the pruned model with the pruned channels held at zero; remove the channels for real "
                      "(Torch-Pruning) and measure parameters, MACs, file size and latency."):
        from ui import recover

        recover.panel(ckpt, eng, k, mode, criterion)
