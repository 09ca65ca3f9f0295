"""Load page: the bundled checkpoints, an upload of one's own, and a summary of the model in use."""
import streamlit as st

from core import checkpoints, data, program
from core.models import REGISTRY
from ui import catalogue, choices, engines, keys, preparation, sidebar, words

with sidebar.page(sidebar.LOAD):  # the frame, and one guard: an unexpected error is one sentence
    st.title("Load a model")

    st.subheader("Bundled checkpoints")
    st.dataframe(
        [{"name": name, "architecture": c.arch, "data set": c.dataset,
          "test accuracy": f"{c.meta.get('test_accuracy', float('nan')):.2%}",
          "parameters": f"{words.parameter_count(c):,}", "trained by": c.meta.get("train_command", "")}
         for name, c in catalogue.bundled_checkpoints().items()],
        hide_index=True, width="stretch",
    )

    st.subheader("Upload your own")
    st.markdown(
        "**Any CNN** as a `torch.export` program (`.pt2`), torchvision's models included, exported with the "
        "lines below (the example's size is your model's input; `meta` says how its images were prepared). "
        "Its graph and weights are read without running anything in the file, and only known tensor "
        "operators are accepted. "
        "Or a state dict saved with `torch.save(model.state_dict(), 'model.pt')` for one of the registered "
        f"architectures ({', '.join(f'`{a}`' for a in REGISTRY)}), or a checkpoint in this app's format "
        "(`{'arch', 'arch_kwargs', 'state_dict', 'meta'}`), read with `weights_only=True`: "
        "a whole pickled model is refused, because loading it could run code."
    )
    with st.expander("Export your model as a .pt2 program"):
        st.code(program.EXPORT_LINES, language="python")
    st.caption(f"Uploads are limited to {st.get_option('server.maxUploadSize')} MB (`.streamlit/config.toml`).")
    dataset = st.selectbox("Test a .pt2 program on", ["", *data.DATASETS], key=keys.UPLOAD_DATASET,
                           format_func=lambda d: data.DATASETS[d].title if d else "the first data set that fits",
                           help="A program says what input it takes and how many outputs it gives; the data set "
                                "must have that image shape and that many classes (one output: a yes/no task).")
    upload = st.file_uploader("Checkpoint file", type=["pt", "pth", "pt2"], key=keys.UPLOAD)
    handled = (upload.file_id, dataset) if upload is not None else None
    if upload is not None and st.session_state.get(keys.LAST_UPLOAD) != handled:
        try:
            ckpt = catalogue.add_upload(upload.name, upload.getvalue(), dataset=dataset or None)
        except checkpoints.CheckpointError as exc:
            st.error(f"{words.plain(upload.name)} was not loaded. {words.plain(exc)}")
            if getattr(exc, "how_to", None):  # a model of one's own architecture: the lines that export it
                st.code(exc.how_to, language="python")
            st.caption(f"Still using **{words.plain(choices.current().model)}**.")
            if isinstance(exc, checkpoints.UnknownArchitecture):  # let the user say which it is
                arch = st.selectbox("Load it as", list(REGISTRY), index=None, key=keys.UPLOAD_ARCH,
                                    placeholder="pick the architecture it was saved from")
                if arch is not None:
                    try:
                        ckpt = catalogue.add_upload(upload.name, upload.getvalue(), arch=arch)
                    except checkpoints.CheckpointError as exc2:
                        st.error(f"Not as '{arch}' either. {words.plain(exc2)}")
                    else:
                        st.session_state[keys.LAST_UPLOAD] = handled
                        st.rerun()
        else:
            st.session_state[keys.LAST_UPLOAD] = handled
            if catalogue.conv_layers(ckpt):
                st.rerun()
            st.info(f"{words.plain(upload.name)} is a '{words.plain(ckpt.arch)}' with no conv layer, so channel pruning does not apply. "
                    "It is listed on the Magnitude page.")

    st.subheader("Your own test images")
    st.markdown("A zip of an image folder: one sub-folder per class, named so that they sort in the order of the "
                "model's classes (e.g. `0_tshirt/`, `1_trouser/`, ...). Images are resized to the model's input.")
    zipped = st.file_uploader("Image folder (.zip)", type=["zip"], key=keys.UPLOAD_IMAGES)
    if zipped is not None and st.session_state.get(keys.LAST_IMAGES) != zipped.file_id:
        try:
            own = catalogue.add_own_data(zipped.name, zipped.getvalue())
        except data.DataUnavailable as exc:
            st.error(f"{words.plain(zipped.name)} was not loaded. {words.plain(exc.public)}")
        else:
            st.session_state[keys.LAST_IMAGES] = zipped.file_id
            st.rerun()
    if st.session_state.get(keys.OWN_DATA):
        own = st.session_state[keys.OWN_DATA]
        st.caption(f"Uploaded: **{words.plain(own['name'])}**, {own['images']} images in classes "
                   f"{words.plain(', '.join(own['classes']))}. "
                   "Choose it under *Test data* in the sidebar.")

    st.subheader("Model in use")
    ckpt = catalogue.current_checkpoint()
    eng = engines.current_engine()
    baseline = ckpt.meta.get("test_accuracy")
    c1, c2, c3 = st.columns(3)
    c1.metric("Architecture", ckpt.arch)
    c2.metric("Parameters", f"{words.parameter_count(ckpt):,}")
    c3.metric("Baseline test accuracy", f"{eng.correct(0) / eng.total:.2%}",
              help="Measured now on the whole test set, with the inputs prepared as below"
              + (f"; the checkpoint records {baseline:.2%}" if baseline else ""))
    preparation.show(choices.current().model, ckpt)
    st.caption(f"{words.plain(words.summary_in_words(ckpt))}. Data set: **{ckpt.dataset}** ({eng.total:,} test images). "
               f"Pruned layer: **{eng.layer}** ({eng.channels} channels). "
               + words.evaluation_in_words(eng))
    st.dataframe([{"conv layer": i.name, "in": i.in_channels, "out": i.out_channels,
                   "kernel": "x".join(map(str, i.kernel_size)), "output": "x".join(map(str, i.out_shape))}
                  for i in catalogue.conv_layers(ckpt)], hide_index=True)
