"""Recover and realise: fine-tuning with pruned channels held at zero; removal for real, exact and measured."""

import json

import pytest
import torch

from conftest import BUNDLED, ROOT, cli, full_engine, shown
from core import checkpoints, data, engine, slim
from core.tasks import count_correct
from core.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def small():
    split = data.load("fashion_mnist")
    x, y = split.x[:2000], split.y[:2000]
    vgg = checkpoints.load(BUNDLED["vgg"])
    return x, y, engine.Engine(vgg.build_model(), x, y, device="cpu")


def test_finetuning_keeps_pruned_channels_at_zero_and_is_deterministic(small):
    x, y, eng = small
    train = data.load("fashion_mnist", train=True)
    cfg = FinetuneConfig(k=480, layer=eng.layer, mode="remove", steps=4)
    first, losses = finetune(eng, cfg, train.x, train.y)
    second, _ = finetune(eng, cfg, train.x, train.y)
    assert len(losses) == 4
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    pruned = eng.ranking("mean")[:480]
    conv, bn = first.get_submodule(eng.layer), first.get_submodule(eng.bn_name)
    assert (conv.weight[pruned] == 0).all() and (conv.bias[pruned] == 0).all()
    assert (bn.weight[pruned] == 0).all() and (bn.bias[pruned] == 0).all()
    kept = eng.ranking("mean")[480:]
    assert not torch.equal(conv.weight[kept], eng.model.get_submodule(eng.layer).weight[kept])  # it trained
    assert all(not p.requires_grad for p in eng.model.parameters())  # the shared engine's model untouched


@pytest.mark.parametrize("mode", ["remove", "zero"])
def test_slim_model_counts_exactly_what_the_masked_model_counts(small, mode):
    x, y, eng = small
    for k in (1, 256, 480):
        result = slim.slim(eng, k, mode)
        assert result.exact and result.model.get_submodule(eng.layer).out_channels == 512 - k
        assert count_correct(result.model, x, y) == eng.correct(k, mode), (mode, k)
    assert result.folded == (mode == "zero")
    assert result.shrunk == ["features.6.0: out channels", "features.6.1: out channels", "classifier: in channels"]


@pytest.mark.parametrize("mode", ["zero", "remove"])
def test_slim_state_dict_with_its_widths_loads_back_and_counts_the_same(small, tmp_path, mode):
    x, y, eng = small
    vgg = checkpoints.load(BUNDLED["vgg"])
    result = slim.slim(eng, 480, mode)
    widths = slim.widths(vgg.arch, vgg.arch_kwargs, result.model)
    assert widths == {**vgg.arch_kwargs, "width": 32}
    checkpoints.save(tmp_path / "slim.pt", vgg.arch, widths, result.model, {"dataset": vgg.dataset})
    again = checkpoints.load(tmp_path / "slim.pt")  # the safe loader, as an upload
    assert (again.arch, again.arch_kwargs) == (vgg.arch, widths)
    assert count_correct(again.build_model(), x, y) == eng.correct(480, mode)
    resnet = checkpoints.load(BUNDLED["resnet"])
    eng = engine.Engine(resnet.build_model(), x[:200], y[:200], layer="res3.0.0", device="cpu")
    model = slim.slim(eng, 100, "remove").model  # the bottleneck conv: nothing else shares its channels
    assert slim.widths(resnet.arch, resnet.arch_kwargs, model) == {**resnet.arch_kwargs, "bottleneck": 28}


def test_residual_shortcut_ties_the_last_conv_to_the_blocks_input(small):
    x, y, _ = small
    eng = engine.Engine(checkpoints.load(BUNDLED["resnet"]).build_model(), x, y, device="cpu")
    result = slim.slim(eng, 256, "remove")
    assert not result.exact and {"layer3.0", "layer3.1"} <= set(result.tied)
    assert result.model.get_submodule("layer3.0").out_channels == 256  # the shortcut's source shrank too


def test_measure_counts_parameters_and_macs(small):
    _, _, eng = small
    before = slim.measure(eng.model, (1, 28, 28), batches=(1,), repeats=2)
    after = slim.measure(slim.slim(eng, 480, "remove").model, (1, 28, 28), batches=(1,), repeats=2)
    assert before.parameters == sum(p.numel() for p in eng.model.parameters())
    conv = eng.model.get_submodule(eng.layer)  # the last conv alone: 512 x 128 x 3 x 3 MACs at 3 x 3 positions
    assert before.macs - after.macs >= 480 * 128 * 9 * 9
    assert after.parameters < before.parameters and after.file_bytes < before.file_bytes
    assert set(before.latency_ms) == {("cpu", 1)} and before.latency_ms[("cpu", 1)] > 0


REFUSED_512 = ("K = 512: removing for real keeps at least one of the layer's 512 channels, so K goes from 0 to 511 "
               "here; a conv with no channels is no layer.")


def test_removing_every_channel_is_refused_in_words_and_one_channel_left_is_exact(small):
    x, y, eng = small
    with pytest.raises(ValueError) as refused:
        slim.slim(eng, 512, "remove")
    assert str(refused.value) == REFUSED_512
    result = slim.slim(eng, 511, "remove")
    assert result.model.get_submodule(eng.layer).out_channels == 1
    assert count_correct(result.model, x, y) == eng.correct(511, "remove")


def test_latency_chart_spans_the_layer_up_to_one_channel_left():
    from ui import recover

    assert recover.latency_ks(512) == [0, 128, 256, 384, 448, 480, 496, 511]
    assert recover.latency_ks(128) == [0, 32, 64, 96, 112, 120, 124, 127]
    assert recover.latency_ks(2) == [0, 1]


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_parameters_left_is_the_slim_models_count_at_every_k(small, name):
    x, y, _ = small
    ckpt = checkpoints.load(BUNDLED[name])
    eng = engine.Engine(ckpt.build_model(), x[:256], y[:256], device="cpu")
    from ui import words

    per = slim.removed_per_channel(eng)
    total = words.parameter_count(ckpt)  # the Load page's count, and the slider's at K = 0
    assert total == sum(p.numel() for p in eng.model.parameters())  # the slim table's
    for k in (1, eng.channels // 2, eng.channels - 1):
        left = slim.slim(eng, k, "remove").model
        assert sum(p.numel() for p in left.parameters()) == total - k * per, (name, k)


class _Sleeper(torch.nn.Module):
    """A model whose run takes 5 ms, and 300 ms on its `spike`-th call: one burst of other work."""

    def __init__(self, spike: int | None = None):
        super().__init__()
        self.lin, self.calls, self.spike = torch.nn.Linear(4, 2), 0, spike

    def forward(self, x):
        import time

        self.calls += 1
        time.sleep(0.3 if self.calls == self.spike else 0.005)
        return self.lin(x.flatten(1))


def test_one_slow_run_is_not_shown_as_a_speed_up():
    from ui import recover

    original, same = slim.measure_together([_Sleeper(spike=6), _Sleeper()], (4,), batches=(1,), repeats=10)
    assert original.runs == same.runs >= 10
    low, high = original.spread_ms[("cpu", 1)]
    assert 5 <= low <= original.latency_ms[("cpu", 1)] <= high < 100  # the spike is outside the middle half
    assert recover.speedup_in_words(original, same) == "Slim against original, cpu batch 1: within the noise."
    assert original.latency_text(("cpu", 1)).count("(") == 1


def test_cli_slim_of_every_channel_exits_2_in_one_sentence(fmnist_subset, tmp_path):
    out = tmp_path / "slim.pt2"
    res = cli("slim", str(BUNDLED["vgg"]), "--k", "512", "--data-root", fmnist_subset, "--device", "cpu",
              "--out", str(out))
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "error: " + REFUSED_512, res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_slim_program_sweeps_to_the_masked_count(tmp_path):
    out = tmp_path / "slim.pt2"
    res = cli("slim", str(BUNDLED["vgg"]), "--k", "480", "--mode", "remove", "--repeats", "2", "--out", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "(equal)" in res.stdout and "parameters" in res.stdout and "MACs" in res.stdout
    sweep = tmp_path / "s.csv"
    res = cli("sweep", str(out), "--dataset", "fashion_mnist", "--ks", "0", "--out", str(sweep), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    vgg = full_engine(BUNDLED["vgg"])
    assert sweep.read_text().splitlines()[1].split(",")[1] == str(vgg.correct(480, "remove"))


@pytest.mark.slow
def test_prune_page_fine_tunes_and_removes_for_real(monkeypatch, app_engines):
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.testing.v1 import AppTest

    from ui import keys

    downloads = {}  # what the page's download buttons hand the browser, by file name
    keep = MemoryMediaFileStorage.load_and_get_id

    def record(self, data, mimetype, kind, filename=None):
        if filename:
            downloads[filename] = data
        return keep(self, data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.run()
    at.session_state[keys.K] = 480
    at.radio(key=keys.MODE).set_value("remove").run()
    at.toggle(key=keys.SHOW_RECOVER).set_value(True).run()
    at.number_input(key=keys.FT_STEPS).set_value(10).run()
    at.button(key=keys.FT_START).click().run()
    assert not at.exception, at.exception
    name = "fine-tuned: fmnist_vgg · K=480 remove · 10 steps"
    assert any(name in shown(s.value) for s in at.success), [s.value for s in at.success]
    at.run()  # the sidebar, drawn before the panel, lists the new model on the next run
    assert any(o.startswith(name + " (") for o in at.selectbox(key=keys.MODEL).options)
    at.toggle(key=keys.SLIM_SHOW).set_value(True).run()
    assert not at.exception, at.exception
    eng = full_engine(BUNDLED["vgg"])
    assert any(f"gets {eng.correct(480, 'remove'):,} of 10,000 test images right, exactly" in c.value
               for c in at.caption)
    table = next(df.value for df in at.dataframe if "MACs" in df.value.columns)
    assert table["model"].tolist() == ["original", "slim (K = 480)"]
    assert int(table["parameters"][1].replace(",", "")) < int(table["parameters"][0].replace(",", ""))
    # The latency chart removes up to the last K that leaves one channel; K = P is refused in words.
    at.toggle(key=keys.SLIM_CURVE).set_value(True).run()
    assert not at.exception, at.exception
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                 if "what they buy" in json.loads(c.proto.spec)["layout"]["title"]["text"])
    assert chart["data"][0]["x"] == [0, 128, 256, 384, 448, 480, 496, 511]
    at.session_state[keys.K] = 512
    at.run()
    assert not at.exception, at.exception
    assert [shown(e.value) for e in at.error] == [REFUSED_512]
    at.session_state[keys.K] = 480
    # Both downloads load back on the Load page and give the slim model's accuracy at K = 0.
    want = f"{eng.correct(480, 'remove') / 1e4:.2%}"
    for name in ("fmnist_vgg_K480_remove_slim.pt2", "fmnist_vgg_K480_remove_slim.pt"):
        at.switch_page("pages/1_load.py").run()
        at.file_uploader(key=keys.UPLOAD).set_value((name, downloads[name], "application/octet-stream")).run()
        assert not at.exception and not at.error, (name, [e.value for e in at.error])
        assert at.selectbox(key=keys.MODEL).value == "upload: " + name
        at.session_state[keys.K] = 0
        at.switch_page("app.py").run()
        assert not at.exception, at.exception
        text = next(c.value for c in at.main.caption if c.value.startswith("Test accuracy at K = 0:"))
        assert f"**{want}**" in text, (name, text)
