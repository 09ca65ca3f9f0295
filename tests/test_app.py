"""Streamlit AppTest: every page runs, the slider gives the engine's exact value, bad uploads change nothing."""
import io
import json
import re

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import BUNDLED, ROOT, full_engine, shown
from core import checkpoints, engine, inputs, models, program
from core.naive import naive_correct

APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def vgg_engine(app_engines):
    return full_engine(BUNDLED["vgg"])


@pytest.fixture(autouse=True)
def _engines_ready(app_engines):
    """Every page run here finds the bundled models' engines built (conftest.app_engines)."""


@pytest.fixture
def app():
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    return at


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def live(at) -> dict:
    """The data the Prune page's live slider component received (what the browser draws from)."""
    (component,) = at.get("bidi_component")
    return json.loads(component.proto.json)


def set_k(at, k: int):
    """What a release of the live slider does: the component's callback writes K (ui.live_slider)."""
    at.session_state["k"] = k
    return at.run()


def accuracy_text(at) -> str:
    """The Prune page states the exact accuracy at the server's K in words: 'Test accuracy at K = 3: **93.33%**'."""
    text = next(c.value for c in at.main.caption if c.value.startswith("Test accuracy at K ="))
    return re.search(r"\*\*([0-9.]+%)\*\*", text).group(1)


def test_prune_page_live_slider_gets_the_engines_exact_curve(app, vgg_engine):
    data = live(app)
    assert data["channels"] == 512 and data["k"] == 0 and (data["rows"], data["cols"]) == (16, 32)
    assert data["accuracy"] == [round(c / 1e4, 6) for c in vgg_engine.curve("zero")]
    assert data["channel_of"] == vgg_engine.ranking("mean").tolist()  # tiles in pruning order
    assert accuracy_text(app) == f"{vgg_engine.correct(0) / 1e4:.2%}"
    for k, mode in ((256, "zero"), (480, "remove")):
        app.radio(key="mode").set_value(mode).run()
        set_k(app, k)
        assert not app.exception
        assert live(app)["k"] == k and live(app)["accuracy"][k] == round(vgg_engine.correct(k, mode) / 1e4, 6)
        assert accuracy_text(app) == f"{vgg_engine.correct(k, mode) / 1e4:.2%}"
        assert app.query_params["k"] == [str(k)] or app.query_params["k"] == str(k)


def test_contrast_axis_and_presentation_mode_reach_the_live_view():
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"present": "1"})
    at.run()
    assert at.toggle(key="present").value is True and live(at)["present"] is True
    assert any("display: none" in h.proto.body for h in at.get("html"))  # the sidebar and captions hidden
    layer_tiles = live(at)["tiles"]
    at.radio(key="contrast").set_value("map").run()
    assert live(at)["tiles"] != layer_tiles
    at.radio(key="axis").set_value("%").run()
    assert live(at)["axis"] == "%"
    assert at.query_params.get("present") == "1"
    at.button(key="exit_present").click().run()
    assert at.toggle(key="present").value is False and live(at)["present"] is False
    assert "present" not in at.query_params, at.query_params  # a link copied now opens the normal view


def test_a_middle_layer_shows_last_known_values_and_says_why(app):
    """A middle layer's curve is not precomputed: the live view gets the accuracies known so far."""
    app.selectbox(key="layer").set_value("features.4.0").run()
    assert not app.exception, app.exception
    data = live(app)
    coarse = {round(i * 128 / 16) for i in range(17)}  # filled in by the background coarse curve
    known = {k for k, _ in data["known"]}
    assert data["accuracy"] is None and data["k"] == 0 and 0 in known and known <= coarse
    assert "computed when you release the slider" in data["note"]
    set_k(app, 100)
    assert {0, 100} <= {k for k, _ in live(app)["known"]} <= coarse | {100}
    assert any("computed when you release" in c.value for c in app.main.caption)


def test_a_middle_layers_curve_fills_in_then_refines_on_request(app):
    """The coarse curve arrives in the background; the Refine button adds 16 exact points where the curve
    is least known, and the page redraws with them."""
    import time

    app.selectbox(key="layer").set_value("features.4.0").run()
    coarse = {round(i * 128 / 16) for i in range(17)}

    def known_when(ready) -> set[int]:
        for _ in range(600):  # the background thread counts; each run of the page reads what it has
            known = {k for k, _ in live(app.run())["known"]}
            if ready(known):
                return known
            time.sleep(0.5)
        raise AssertionError(f"the points did not arrive: {sorted(known)}")

    before = known_when(lambda known: coarse <= known)  # (other tests may have counted more Ks of this engine)
    app.button(key="refine").click().run()
    assert not app.exception, app.exception
    known = known_when(lambda known: len(known) >= len(before) + 16)
    assert len(known) == len(before) + 16 and before < known
    eng = engine.Engine(checkpoints.load(BUNDLED["vgg"]).build_model(), *_test_set(), layer="features.4.0",
                        device="cpu")
    new = [(k, acc) for k, acc in live(app)["known"] if k not in before]
    assert new[0][1] == naive_correct(eng, new[0][0], "zero") / eng.total  # the naive procedure, once
    for k, acc in new[1::5]:  # and new points are a fresh engine's exact counts (each costs a pass: a few)
        assert acc == eng.correct(k) / eng.total, k


def _test_set():
    from core import data

    split = data.load("fashion_mnist")
    return split.x, split.y


def test_url_reopens_the_same_view(vgg_engine):
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"k": "300", "mode": "remove"})
    at.run()
    assert live(at)["k"] == 300
    assert accuracy_text(at) == f"{vgg_engine.correct(300, 'remove') / 1e4:.2%}"


def test_a_link_to_a_model_this_server_lacks_says_so(vgg_engine):
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"model": "upload: mine.pt2", "k": "3"})
    at.run()
    assert not at.exception
    (note,) = [i.value for i in at.info if "The link names the model" in i.value]
    assert "`upload: mine.pt2`" in note and "showing **fmnist_vgg** instead" in note
    assert at.session_state["model"] == "fmnist_vgg" and at.query_params["model"] == "fmnist_vgg"


def test_switching_to_resnet_keeps_k_and_accuracy_at_k_512(app):
    set_k(app, 512)
    app.selectbox(key="model").set_value("fmnist_resnet").run()
    assert live(app)["k"] == 512  # the same K on the other model, to compare them
    app.radio(key="mode").set_value("remove").run()
    eng = full_engine(BUNDLED["resnet"])
    assert accuracy_text(app) == f"{eng.correct(512, 'remove') / 1e4:.2%}"
    assert float(accuracy_text(app).rstrip("%")) > 50


def test_a_switch_to_a_narrower_layer_keeps_the_share_of_channels_pruned(app):
    set_k(app, 200)
    app.selectbox(key="model").set_value("fmnist_vgg").run()
    app.selectbox(key="layer").set_value("features.2.0").run()  # 64 channels: 200 of 512 is 25 of 64
    assert not app.exception, app.exception
    assert app.session_state["k"] == 25 and live(app)["k"] == 25
    app.selectbox(key="layer").set_value("features.6.0").run()  # and back: 25 of 64 is 200 of 512
    assert app.session_state["k"] == 200 and live(app)["k"] == 200


def test_every_page_runs(app):
    for page in ("pages/1_load.py", "pages/2_feature_maps.py", "pages/3_curve.py", "pages/4_magnitude.py",
                 "pages/5_sensitivity.py", "app.py"):
        app.switch_page(page).run()
        assert not app.exception, (page, app.exception)
    app.switch_page("pages/1_load.py").run()
    assert metric(app, "Architecture") == "small_vgg"
    assert metric(app, "Baseline test accuracy") == "93.33%"


@pytest.mark.parametrize("page", ["pages/1_load.py", "pages/2_feature_maps.py", "pages/3_curve.py",
                                  "pages/4_magnitude.py"])
def test_a_deep_link_to_any_page_draws_it_with_the_sidebar(page):
    """Streamlit's pages/ mode: every page script draws the one shared sidebar itself."""
    at = AppTest.from_file(APP, default_timeout=300)
    at.switch_page(page).run()
    assert not at.exception, at.exception
    from ui import sidebar

    titles = [link.label for link in at.sidebar.get("page_link")]
    assert titles == [p.title for p in sidebar.PAGES] and titles[0] == "Prune" and "Magnitude" in titles
    assert at.toggle(key="present") is not None and at.selectbox(key="device").value == "auto"


def test_sidebar_choices_survive_a_page_switch(app):
    app.selectbox(key="model").set_value("fmnist_resnet").run()
    app.radio(key="mode").set_value("remove").run()
    for page in ("pages/2_feature_maps.py", "pages/3_curve.py", "pages/1_load.py", "app.py"):
        app.switch_page(page).run()
        assert not app.exception, (page, app.exception)
    assert app.selectbox(key="model").value == "fmnist_resnet" and app.radio(key="mode").value == "remove"


def test_feature_map_page_shows_a_16_by_32_grid(app):
    app.session_state["k"] = 0
    app.switch_page("pages/2_feature_maps.py").run()
    assert not app.exception
    assert any("16 x 32" in c.value for c in app.caption)
    assert any("None is pruned at K = 0" in c.value for c in app.caption)  # not "The 0 channels pruned"
    app.session_state["k"] = 5
    app.run()
    assert any("The 5 channels pruned at the current K" in c.value for c in app.caption)


def _upload(at, name: str, data: bytes):
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream")).run()


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("name,data,reason", [
    ("photo.pt", b"\xff\xd8\xff\xe0JFIF not a checkpoint", "Not a PyTorch checkpoint"),
    ("evil.pt", _bytes({"model": Evil()}), "could run code"),
])
def test_bad_upload_shows_an_error_and_keeps_the_model(app, name, data, reason):
    app.switch_page("pages/1_load.py").run()
    _upload(app, name, data)
    assert not app.exception
    assert any(reason in shown(e.value) for e in app.error), [e.value for e in app.error]
    assert app.selectbox(key="model").value == "fmnist_vgg"
    assert metric(app, "Architecture") == "small_vgg"


def test_good_upload_becomes_the_model(app):
    app.switch_page("pages/1_load.py").run()
    model = models.build("small_resnet")
    _upload(app, "mine.pth", _bytes(model.state_dict()))
    assert not app.exception and not app.error
    assert app.selectbox(key="model").value == "upload: mine.pth"
    assert metric(app, "Architecture") == "small_resnet"


def test_siamese_feature_maps_are_an_8_by_16_grid(app):
    app.switch_page("pages/2_feature_maps.py").run()
    app.selectbox(key="model").set_value("fmnist_siamese").run()
    assert not app.exception, app.exception
    assert any("8 x 16 grid" in c.value for c in app.caption)


@pytest.mark.parametrize("model,channels,grid", [("fmnist_pair_cnn", 64, "8 x 8")])
def test_pair_networks_on_the_prune_page_with_binary_accuracy(app, model, channels, grid):
    app.selectbox(key="model").set_value(model).run()
    assert not app.exception, app.exception
    assert live(app)["channels"] == channels
    set_k(app, channels // 2)
    eng = full_engine(ROOT / "checkpoints" / f"{model}.pt")
    assert eng.task == "binary"
    assert accuracy_text(app) == f"{eng.correct(channels // 2) / eng.total:.2%}"
    assert any("binary accuracy" in c.value for c in app.caption)
    app.switch_page("pages/2_feature_maps.py").run()
    assert any(grid + " grid" in c.value for c in app.caption)


def test_cifar_state_dict_is_recognised_but_missing_data_is_explained(app, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))  # nothing downloaded there
    app.switch_page("pages/1_load.py").run()
    _upload(app, "resnet9.pt", _bytes(models.build("resnet9").state_dict()))
    errors = " ".join(e.value for e in app.error)
    assert "Recognised as 'resnet9'" in errors and "CIFAR-10 was not found" in errors and "--data-root" in errors
    assert app.selectbox(key="model").value == "fmnist_vgg"


def test_own_image_folder_zip_becomes_the_test_data(app, tmp_path, monkeypatch):
    import zipfile

    import numpy as np
    from PIL import Image

    from core import data

    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path / "cache"))
    split = data.load("fashion_mnist")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(40):
            label = int(split.y[i])
            pixels = ((split.x[i, 0] * 0.3530 + 0.2860) * 255).round().clamp(0, 255).byte().numpy()
            png = io.BytesIO()
            Image.fromarray(np.asarray(pixels)).save(png, format="PNG")
            zf.writestr(f"mine/{label}_class/{i}.png", png.getvalue())
    app.switch_page("pages/1_load.py").run()
    app.file_uploader(key="upload_images").set_value(("mine.zip", buf.getvalue(), "application/zip")).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.toggle(key="use_own_data").value is True
    app.switch_page("app.py").run()
    set_k(app, 400)
    folder = data.unpack_zip(buf.getvalue(), "mine.zip")
    own = data.load_image_folder(folder, (1, 28, 28), inputs.Preparation((0.2860,), (0.3530,)))
    eng = engine.from_checkpoint(checkpoints.load(BUNDLED["vgg"]), device="cpu", split=own)
    assert eng.total == 40
    assert accuracy_text(app) == f"{eng.correct(400) / 40:.2%}"


def _histogram_data(at) -> list:
    """The weight histograms' data, from the Plotly figure the page sent."""
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        if any(trace.get("type") == "histogram" for trace in spec["data"]):
            return [trace.get("x") for trace in spec["data"] if trace.get("type") == "histogram"]
    raise AssertionError("no histogram on the page")


def test_magnitude_page_live_accuracy_and_retraining(app):
    from core import data, magnitude
    from core.tasks import count_correct

    app.switch_page("pages/4_magnitude.py").run()
    assert not app.exception, app.exception
    assert app.selectbox(key="mag_model").value == "fmnist_lenet300"
    ckpt = checkpoints.load(ROOT / "checkpoints" / "fmnist_lenet300.pt")
    model = ckpt.build_model()
    split = data.load("fashion_mnist")
    slider = _sparsity_slider(app)  # the browser's data: every step of the grid, counted the literal way
    assert slider["grid"] == list(magnitude.GRID) and slider["index"] == magnitude.GRID.index(0.9)
    for s in (0.0, 0.5, 0.95, 0.999):
        pruned = magnitude.apply_masks(model, magnitude.MagnitudeOrder(model).masks(s))
        i = magnitude.GRID.index(s)
        assert slider["accuracy"][i] == round(count_correct(pruned, split.x, split.y) / 1e4, 6), s
        assert slider["nonzero"][i] == magnitude.sparsity_of(pruned).overall_nonzero
    app.session_state["mag_sparsity"] = 95.0  # what a release of the slider writes (ui.sparsity_slider)
    app.run()
    pruned = magnitude.apply_masks(model, magnitude.MagnitudeOrder(model).masks(0.95))
    assert _sparsity_slider(app)["index"] == magnitude.GRID.index(0.95)
    assert f"Test accuracy with 95.0% of the weights pruned, before retraining: " \
           f"**{count_correct(pruned, split.x, split.y) / 1e4:.2%}**" in " ".join(c.value for c in app.main.caption)
    histograms_before = _histogram_data(app)
    app.button[0].click().run()  # the form's "Retrain 1 epoch(s)" button
    assert not app.exception, app.exception
    assert any("after retraining" in str(df.value.columns.tolist()) for df in app.dataframe)
    # the figures now show the retrained model: same zeros, other surviving weights
    assert app.radio(key="mag_show").value == "retrained"
    assert _histogram_data(app) != histograms_before
    assert any("firing (retrained)" in df.value.columns for df in app.dataframe)
    app.radio(key="mag_show").set_value("pruned").run()
    assert _histogram_data(app) == histograms_before
    # the shared base model is untouched by the session's retraining
    shared = magnitude_models_base().state_dict()
    assert all(torch.equal(shared[n], w) for n, w in model.state_dict().items())


def _sparsity_slider(at) -> dict:
    """The data the Magnitude page's slider component received (what the browser redraws from)."""
    (component,) = [c for c in at.get("bidi_component") if "nonzero" in json.loads(c.proto.json)]
    return json.loads(component.proto.json)


def magnitude_models_base():
    from ui import magnitude_models

    return magnitude_models.base_model(checkpoints.load(ROOT / "checkpoints" / "fmnist_lenet300.pt"))


def test_live_slider_tiles_are_in_pruning_order_with_either_contrast():
    """The bytes the browser draws: map i of the pruning order at offset i*H*W; 'layer' shares one grey
    range, 'map' stretches each map to its own (so a weak channel is not black)."""
    import numpy as np

    from ui import live_slider

    maps = np.random.default_rng(0).random((8, 2, 3))
    maps[5] *= 0.01  # a weak channel
    order = np.argsort(maps.mean((1, 2)), kind="stable")
    layer = np.frombuffer(live_slider.tiles(maps, order, "layer"), np.uint8).reshape(8, 2, 3)
    own = np.frombuffer(live_slider.tiles(maps, order, "map"), np.uint8).reshape(8, 2, 3)
    assert order[0] == 5 and layer[0].max() <= 3 and own[0].max() == 255 and own[0].min() == 0
    assert layer.max() == 255 and layer.min() == 0
    assert np.array_equal(np.argsort(layer[3].ravel(), kind="stable"), np.argsort(maps[order[3]].ravel(), kind="stable"))
    assert live_slider.k_ticks(512) == [0, 128, 256, 384, 512] and live_slider.k_ticks(64) == [0, 16, 32, 48, 64]


def test_unrecognised_state_dict_can_be_loaded_as_a_picked_architecture(app):
    """Keys in another order and under other names: not recognised, so the user picks; a state dict
    that still does not fit is explained by its first missing tensor."""
    sd = models.build("small_vgg").state_dict()  # (integer BatchNorm counters left out: weights must be floats)
    shuffled = dict(reversed([(f"m{i}", v) for i, v in enumerate(v for k, v in sd.items()
                                                                 if "num_batches_tracked" not in k)]))
    app.switch_page("pages/1_load.py").run()
    _upload(app, "odd.pt", _bytes(shuffled))
    assert any("is of none of the registered architectures" in shown(e.value) and "export the model as a .pt2" in
               e.value for e in app.error)
    assert any(c.value == program.EXPORT_LINES for c in app.code)  # the lines that export it, under the upload
    app.selectbox(key="upload_arch").set_value("small_vgg").run()
    assert any("Not as 'small_vgg' either" in shown(e.value) and "is missing" in shown(e.value) for e in app.error)
    assert app.selectbox(key="model").value == "fmnist_vgg"


def test_old_state_dict_without_batchnorm_counters_is_recognised():
    sd = {k: v for k, v in models.build("small_resnet").state_dict().items() if "num_batches_tracked" not in k}
    ckpt = checkpoints.from_bytes(_bytes(sd))
    assert ckpt.arch == "small_resnet" and ckpt.build_model() is not None
