"""Every layer at lecture speed: middle-layer answers (memory budget, sample, memo) and the sensitivity map."""

import time

import pytest

from conftest import BUNDLED, ROOT, cli
from core import checkpoints, data, engine, sensitivity
from core.naive import naive_correct
from core.split import conv_layer_names


@pytest.fixture(scope="module")
def vgg():
    ckpt = checkpoints.load(BUNDLED["vgg"])
    split = data.load(ckpt.dataset)
    return ckpt, split.x[:2000], split.y[:2000]


def _naive(eng, k, mode, criterion="mean"):
    return naive_correct(eng, k, mode, criterion)


@pytest.mark.slow
def test_middle_layer_over_its_memory_budget_recomputes_and_stays_exact(vgg):
    ckpt, x, y = vgg
    full = engine.Engine(ckpt.build_model(), x, y, layer="features.4.0", device="cpu")
    budget = full.cache_bytes() // 2 + 1  # room for one batch of two
    eng = engine.Engine(ckpt.build_model(), x, y, layer="features.4.0", device="cpu", boundary_budget=budget)
    assert eng.path == engine.PATH_SPLIT and eng.recomputed_batches == 1 and eng.cache_bytes() <= budget
    p = eng.channels
    for mode in engine.MODES:
        for k in (1, p // 2):
            assert eng.correct(k, mode) == full.correct(k, mode) == _naive(eng, k, mode), (mode, k)


@pytest.mark.slow
def test_sample_answer_is_the_first_batch_and_known_answers_are_lookups(vgg):
    ckpt, x, y = vgg
    eng = engine.Engine(ckpt.build_model(), x, y, layer="features.2.0", device="cpu")
    k = eng.channels // 2
    sample = eng.sample_answer(k, "remove")
    first = engine.Engine(ckpt.build_model(), x[:1000], y[:1000], layer="features.2.0", device="cpu")
    assert (sample.n, sample.total) == (1000, 2000)
    assert sample.correct == _naive(first, k, "remove")  # exactly the first 1,000 images
    low, high = sample.interval()
    assert low < sample.accuracy < high and high - low < 0.07
    assert eng.known(k, "remove") is None
    exact = eng.correct(k, "remove")
    assert eng.known(k, "remove") == exact == _naive(eng, k, "remove")
    assert eng.coarse_ks() == [round(i * eng.channels / 16) for i in range(17)]
    assert eng.correct(0) == eng.base_correct == _naive(eng, 0, "zero")  # counted in the one pass


@pytest.mark.slow
def test_refinement_fills_the_least_known_gap_first_and_ends_with_every_k(vgg):
    ckpt, x, y = vgg
    eng = engine.Engine(ckpt.build_model(), x[:300], y[:300], layer="features.2.0", device="cpu")
    for k in eng.coarse_ks():
        eng.correct(k, "remove")
    known = eng.answers("remove")
    assert eng.unknown("remove") == eng.channels + 1 - len(eng.coarse_ks())
    gaps = [((b - a) * (abs(known[b] - known[a]) + 1), (a + b) // 2)
            for a, b in zip(eng.coarse_ks(), eng.coarse_ks()[1:])]
    assert eng.next_refinement("remove") == max(gaps)[1]
    while (k := eng.next_refinement("remove")) is not None:
        assert eng.known(k, "remove") is None  # never a K already counted
        eng.correct(k, "remove")
    assert sorted(eng.answers("remove")) == list(range(eng.channels + 1)) and eng.unknown("remove") == 0
    assert eng.next_refinement("zero") is None  # only K = 0 is known there: no gap between two known points
    assert [eng.answers("remove")[k] for k in (5, 37)] == [_naive(eng, k, "remove") for k in (5, 37)]


@pytest.mark.slow
def test_sensitivity_rows_equal_the_naive_procedure(vgg):
    ckpt, x, y = vgg
    model = ckpt.build_model()
    rows = list(sensitivity.sensitivity(model, x[:1000], y[:1000], criterion="mean", mode="remove",
                                        fractions=(0.3, 1), device="cpu"))
    assert [r.layer for r in rows] == [n for n in conv_layer_names(model) for _ in range(2)]
    engines = {name: engine.Engine(model, x[:1000], y[:1000], layer=name, device="cpu", fast=False)
               for name in conv_layer_names(model)}  # for the ranking and the naive copy of each layer
    for r in rows:
        eng = engines[r.layer]
        assert r.k == round(r.fraction * r.channels) and r.total == 1000
        assert r.correct == _naive(eng, r.k, "remove"), r


def test_layers_tied_by_a_residual_add_or_concatenation_are_marked():
    resnet = checkpoints.load(BUNDLED["resnet"]).build_model()
    tied = sensitivity.ties(resnet)
    assert tied["res3.1.0"] == "residual add" and "layer3.0" in tied and "prep.0.0" not in tied
    assert sensitivity.ties(checkpoints.load(BUNDLED["vgg"]).build_model()) == {}
    mobilenet = checkpoints.load(ROOT / "checkpoints" / "fmnist_mobilenet.pt2").build_model()
    tied = sensitivity.ties(mobilenet)
    assert tied["branch1.0"] == tied["branch3.0"] == "concatenation" and tied["blocks.2.pw"] == "residual add"
    assert "head" not in tied


@pytest.mark.slow
def test_cli_sensitivity_writes_one_row_per_layer_and_fraction(tmp_path, fmnist_subset):
    from core.naive import prune_copy
    from core.tasks import count_correct

    out = tmp_path / "s.csv"
    # Fractions 0 and 1: K = 0 is counted by each layer's one pass, so each layer costs one more pass only;
    # on a --data-root of the first 2,000 test images (the rows' arithmetic is the same on any number).
    res = cli("sensitivity", str(BUNDLED["resnet"]), "--fractions", "0,1", "--mode", "remove", "--out", str(out),
              "--device", "cpu", "--data-root", str(fmnist_subset))
    assert res.returncode == 0, res.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "layer,channels,fraction,k,correct,total,accuracy" and len(lines) == 1 + 6 * 2
    split = data.load("fashion_mnist", data_root=str(fmnist_subset))
    assert len(split) == 2000 and {line.split(",")[5] for line in lines[1:]} == {"2000"}
    model = checkpoints.load(BUNDLED["resnet"]).build_model()
    last = [line.split(",") for line in lines if line.startswith("res3.1.0,")]
    whole_layer = prune_copy(model, "res3.1.0", range(512), "remove", "res3.1.1")
    assert last[1][:5] == ["res3.1.0", "512", "1", "512", str(count_correct(whole_layer, split.x, split.y))]
    assert int(last[1][4]) > 0.85 * 2000  # the shortcut keeps most of the accuracy
    unpruned = {line.split(",")[4] for line in lines[1:] if line.split(",")[2] == "0"}
    assert unpruned == {str(count_correct(model, split.x, split.y))}  # every layer at K = 0
    assert "(tied by residual add)" in res.stdout


def _until(condition, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_sensitivity_page_stops_in_one_click_resumes_and_stops_when_left(vgg, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from ui import keys, sensitivity_map

    ckpt, _, _ = vgg
    monkeypatch.setattr(sensitivity_map, "UNWATCHED_S", 600.0)  # the test looks at the job, not the page
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/5_sensitivity.py").run()
    assert not at.exception, at.exception
    assert [b.label for b in at.button if b.key == keys.SENSITIVITY_START] == ["Compute the sensitivity map"]
    at.button(key=keys.SENSITIVITY_START).click().run()
    job = sensitivity_map.job((ckpt.digest, ckpt.dataset, "mean", "zero"))
    _until(lambda: len(job.rows) >= 2)
    at.run()
    at.button(key=keys.SENSITIVITY_STOP).click().run()  # one click
    job.thread.join(timeout=30)
    assert not job.running and job.status == "stopped"
    counted = list(job.rows)
    at.run()
    assert not at.exception, at.exception
    assert [b.label for b in at.button if b.key == keys.SENSITIVITY_START] == ["Resume"]
    assert any(c.value.startswith(f"{len(counted)} of 44 cells done (4 layers x 11 fractions)") for c in at.caption)
    assert any(c.value.startswith(f"Stopped after {len(counted)} cells") for c in at.caption)
    heatmap = at.get("plotly_chart")[0]
    assert '"features.0.0"' in heatmap.proto.spec and f'"{counted[1].accuracy:.0%}"' in heatmap.proto.spec
    assert counted[0].correct == ckpt.meta["test_correct"]  # K = 0: the whole test set, as the file records
    at.button(key=keys.SENSITIVITY_START).click().run()  # Resume goes on from the rows counted
    resumed = sensitivity_map.job((ckpt.digest, ckpt.dataset, "mean", "zero"))
    assert resumed is not job and resumed.rows[:len(counted)] == counted
    _until(lambda: len(resumed.rows) > len(counted))
    assert len({(r.layer, r.fraction) for r in resumed.rows}) == len(resumed.rows)  # nothing counted twice
    monkeypatch.setattr(sensitivity_map, "UNWATCHED_S", 1.0)
    at.switch_page("app.py")  # leaving the page: nobody watches the job any more
    resumed.thread.join(timeout=60)
    assert not resumed.running and resumed.status == "stopped: the page was left"
