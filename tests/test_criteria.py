"""Criteria against independent computations of their definitions; the oracle against brute force."""
import json

import pytest
import torch
from torch import nn

from conftest import BUNDLED, ROOT, cli, full_engine, training_engine
from core import checkpoints, criteria, data, engine, oracle
from core.naive import prune_copy


@pytest.fixture(scope="module")
def vgg_small():
    """The VGG-style model's last conv on the first 1,000 test images, and a fresh copy of the model."""
    ckpt = checkpoints.load(BUNDLED["vgg"])
    split = data.load(ckpt.dataset)
    x, y = split.x[:1000], split.y[:1000]
    return ckpt, x, y, engine.Engine(ckpt.build_model(), x, y, device="cpu")


def _relu_output(model, x):
    """The activation after the last conv's BatchNorm, by a hook on a fresh copy (independent of the engine)."""
    relu = model.features[6][2]
    assert isinstance(relu, nn.ReLU)
    out = []
    handle = relu.register_forward_hook(lambda m, i, o: out.append(o))
    logits = model(x)
    handle.remove()
    return out[0], logits


def _order(scores):
    return torch.sort(scores, stable=True).indices.tolist()


def test_each_criterion_ranks_by_its_definition(vgg_small):
    ckpt, x, y, eng = vgg_small
    model = ckpt.build_model()
    conv, bn = model.features[6][0], model.features[6][1]
    with torch.no_grad():
        act, _ = _relu_output(model, x)
    w = conv.weight.detach().double().flatten(1)
    expected = {
        "mean": act.double().mean((0, 2, 3)),
        "mean_abs": act.double().abs().mean((0, 2, 3)),
        "apoz": 1 - (act == 0).double().mean((0, 2, 3)),
        "l1_norm": w.abs().sum(1),
        "l2_norm": (w ** 2).sum(1).sqrt(),
        "bn_gamma": bn.weight.detach().abs().double(),
        "fpgm": torch.stack([(w - w[i]).norm(dim=1).sum() for i in range(len(w))]),
        "random": torch.rand(512, generator=torch.Generator().manual_seed(0)).double(),
    }
    act, logits = _relu_output(model, x)  # Taylor: autograd through the real model, loss summed over images
    act.retain_grad()
    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    expected["taylor"] = (act * act.grad).double().sum((2, 3)).abs().mean(0)
    for name, want in expected.items():
        got = eng.scores(name).double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), name
        if name not in ("taylor", "fpgm", "mean", "mean_abs"):  # float sums may swap exact near-ties there
            assert eng.ranking(name).tolist() == _order(want.float()), name
    assert set(criteria.CRITERIA) == set(expected)
    assert all(c.explain and c.source and c.looks_at for c in criteria.CRITERIA.values())


def test_bn_gamma_is_refused_where_there_is_no_batch_norm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    eng = engine.Engine(model, torch.randn(20, 1, 8, 8), torch.zeros(20, dtype=torch.long), device="cpu")
    with pytest.raises(ValueError, match="bn_gamma needs a batch norm right after the conv"):
        eng.ranking("bn_gamma")
    assert criteria.get("random:7").name == "random:7"
    assert sorted(eng.ranking("random:7").tolist()) == list(range(4))
    with pytest.raises(ValueError, match="Unknown criterion"):
        criteria.get("random:²")


@pytest.mark.slow
def test_cli_rank_writes_the_engines_order(tmp_path, bundled):
    ckpt, eng = bundled
    out = tmp_path / "apoz.csv"
    path = next(p for p in BUNDLED.values() if checkpoints.load(p).digest == ckpt.digest)
    res = cli("rank", str(path), "--criterion", "apoz", "--out", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == eng.ranking("apoz").tolist()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("mode", ["zero", "remove"])
def test_greedy_oracle_equals_brute_force_and_single_equals_naive(mode):
    torch.manual_seed(0)
    model = _Tiny().eval()
    with torch.no_grad():
        model.bn.bias.normal_(0, 0.5)
    x = torch.randn(300, 1, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 3
    eng = engine.Engine(model, x, y, device="cpu", batch_size=100)
    assert eng.path == engine.PATH_FAST

    def naive(channels):
        pruned = prune_copy(eng.model, eng.layer, channels, mode, eng.bn_name)
        with torch.no_grad():
            logits = pruned(x)
        loss = float(nn.functional.cross_entropy(logits.double(), y, reduction="sum"))
        return int((logits.argmax(1) == y).sum()), loss

    single = oracle.single(eng, mode)
    want = sorted(range(10), key=lambda c: (-naive([c])[0], naive([c])[1], c))
    assert single.order == want and single.correct_after == [naive([c])[0] for c in want]
    pruned, brute = [], []
    for _ in range(10):
        scores = {c: naive(pruned + [c]) for c in range(10) if c not in pruned}
        best = min(scores, key=lambda c: (-scores[c][0], scores[c][1], c))
        pruned.append(best)
        brute.append(scores[best][0])
    found = oracle.greedy(eng, mode)
    assert found.order == pruned and found.correct_after == brute


@pytest.mark.slow
def test_greedy_oracle_beats_every_criterion_on_area(vgg_small):
    _, _, _, eng = vgg_small
    found = oracle.greedy(eng, "remove")
    assert sorted(found.order) == list(range(512))
    area = sum(found.correct_after)
    for name in criteria.CRITERIA:
        assert area >= sum(eng.curve("remove", name)[1:]), name


@pytest.mark.slow
def test_an_order_picked_on_training_images_is_scored_on_the_test_images(vgg_small):
    ckpt, x, y, eng = vgg_small
    picker = training_engine(ckpt, eng)
    train = data.load(ckpt.dataset, train=True)
    assert picker.total == 10_000 and torch.equal(picker.y, train.y[-10_000:]) and picker.layer == eng.layer
    single = oracle.scored_on(eng, oracle.single(picker, "remove"), "remove")
    greedy = oracle.scored_on(eng, oracle.greedy(picker, "remove"), "remove")
    assert sorted(greedy.order) == list(range(512)) and greedy.order != oracle.greedy(eng, "remove").order

    def naive(channels):
        pruned = prune_copy(eng.model, eng.layer, channels, "remove", eng.bn_name)
        with torch.no_grad():
            return int((pruned(x).argmax(1) == y).sum())

    for k in (1, 200, 480):
        assert greedy.correct_after[k - 1] == naive(greedy.order[:k])
    for i in (0, 300, 511):
        assert single.correct_after[i] == naive([single.order[i]])


def test_oracle_refuses_without_the_linear_read_out(vgg_small):
    ckpt, x, y, _ = vgg_small
    eng = engine.Engine(ckpt.build_model(), x[:200], y[:200], layer="features.4.0", device="cpu")
    with pytest.raises(ValueError, match="the oracle needs the cumulative-sum read-out"):
        oracle.single(eng)
    eng = engine.Engine(ckpt.build_model(), x[:200], y[:200], layer="features.4.0", device="cpu", batch_size=100)
    coarse = oracle.sampled_single(eng, "remove")  # the coarse version: each channel alone on the first 100

    def naive(channel):
        pruned = prune_copy(eng.model, eng.layer, [channel], "remove", eng.bn_name)
        with torch.no_grad():
            return int((pruned(x[:100]).argmax(1) == y[:100]).sum())

    assert sorted(coarse.order) == list(range(128)) and coarse.correct_after == sorted(coarse.correct_after)[::-1]
    for i in (0, 64, 127):
        assert coarse.correct_after[i] == naive(coarse.order[i])


@pytest.mark.slow
def test_curve_page_offers_a_coarse_oracle_where_the_read_out_is_not_linear(app_engines):
    from streamlit.testing.v1 import AppTest

    from ui import keys

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.session_state[keys.CURVE_MODELS] = ["fmnist_siamese"]  # the page's first run draws only it,
    at.session_state[keys.CURVE_MODES] = ["zero"]  # in one mode (each K of its curve costs a read-out here)
    at.session_state[keys.COMPARE_CRITERIA] = ["mean"]  # one rule: the coarse oracle is this test's subject
    at.switch_page("pages/3_curve.py").run()
    assert at.multiselect(key=keys.CURVE_MODELS).value == ["fmnist_siamese"]
    at.toggle(key=keys.COMPARE_ORACLE).set_value(True).run()
    assert not at.exception, at.exception
    assert any("The exact oracles need one linear layer right after this conv; here the read-out goes on" in i.value
               for i in at.info)
    at.toggle(key=keys.COARSE_ORACLE).set_value(True).run()
    assert not at.exception, at.exception
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("A coarse oracle (") for t in titles), titles


def test_predictions_at_k_are_the_pruned_models_and_flips_follow(vgg_small):
    ckpt, x, y, eng = vgg_small
    k = 400
    pruned = prune_copy(eng.model, eng.layer, eng.ranking("mean")[:k].tolist(), "remove", eng.bn_name)
    with torch.no_grad():
        want = pruned(x).argmax(1)
        base = eng.model(x).argmax(1)
    assert torch.equal(eng.predictions(k, "remove"), want)
    from ui import flips

    result = flips.flips(("t",), k, "remove", "mean", eng)
    assert result["broke"] == torch.nonzero((base == y) & (want != y)).flatten().tolist()
    assert result["fixed"] == torch.nonzero((base != y) & (want == y)).flatten().tolist()
    assert sum(b for _, b, _ in result["per_class"]) == eng.correct(0)
    names = data.DATASETS["fashion_mnist"].class_names
    for which, true_side in (("broke", 0), ("fixed", 1)):  # the gallery's captions: answer at K = 0 → now
        for i, caption in zip(result[which], flips.captions(result, which, names)):
            then, now = caption.split(" → ")
            assert then != now and (then, now)[true_side] == names[int(y[i])], (which, caption)
    assert sum(a for _, _, a in result["per_class"]) == eng.correct(k, "remove")


def test_scoreboard_rows(vgg_small):
    _, _, _, eng = vgg_small
    assert oracle.spearman([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0 and oracle.spearman([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    s = oracle.score("mean", eng.curve("zero", "mean"), eng.total, eng.ranking("mean").tolist(),
                     eng.ranking("mean").tolist())
    acc = [c / eng.total for c in eng.curve("zero", "mean")]
    assert s.spearman == 1.0 and abs(s.area - sum(acc) / 513) < 1e-12
    assert acc[s.first_point_lost] <= acc[0] - 0.01 < min(acc[:s.first_point_lost])


@pytest.mark.slow
def test_prune_page_shows_which_images_flipped_at_k(app_engines):
    from streamlit.testing.v1 import AppTest

    from ui import keys

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.session_state[keys.K] = 400
    at.toggle(key=keys.SHOW_FLIPS).set_value(True).run()
    assert not at.exception, at.exception
    eng = full_engine(BUNDLED["vgg"])
    before, after = eng.predictions(0), eng.predictions(400)
    broke = int(((before == eng.y) & (after != eng.y)).sum())
    assert any(f"**{broke:,} images right at K = 0, wrong now**" in m.value for m in at.markdown)
    table = next(df.value for df in at.dataframe if "at K = 400" in df.value.columns)
    assert len(table) == 10 and table["class"].tolist()[0] == "T-shirt/top"


@pytest.mark.slow
def test_curve_page_compares_rules_with_a_scoreboard(app_engines):
    from streamlit.testing.v1 import AppTest

    from ui import keys

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.switch_page("pages/3_curve.py").run()
    assert not at.exception, at.exception
    board = next(df.value for df in at.dataframe if "area under the curve" in df.value.columns)
    assert board["rule"].tolist() == ["mean activation", "APoZ (share of zeros)", "filter L1 norm",
                                      "first-order Taylor"]
    eng = full_engine(BUNDLED["vgg"])
    mean = [c / eng.total for c in eng.curve("zero", "mean")]
    assert board["area under the curve"].tolist()[0] == f"{sum(mean) / len(mean):.2%}"
    at.multiselect(key=keys.COMPARE_CRITERIA).set_value(["bn_gamma", "random"]).run()
    assert not at.exception, at.exception
    at.toggle(key=keys.COMPARE_ORACLE).set_value(True)
    at.radio(key=keys.COMPARE_PICK_ON).set_value("train").run()
    assert not at.exception, at.exception
    board = next(df.value for df in at.dataframe if "area under the curve" in df.value.columns)
    ckpt = checkpoints.load(BUNDLED["vgg"])
    picked = oracle.scored_on(eng, oracle.greedy(training_engine(ckpt, eng), "zero"), "zero")
    best = [eng.correct(0, "zero") / eng.total] + [c / eng.total for c in picked.correct_after]
    assert board["rule"].tolist()[-1] == "greedy order picked on training images"
    assert board["area under the curve"].tolist()[-1] == f"{sum(best) / len(best):.2%}"
    assert board["looks at"].tolist()[-1] == "the last 10,000 training images"


def test_a_criterion_that_does_not_apply_gets_one_sentence_on_the_page():
    from streamlit.testing.v1 import AppTest

    from ui import keys

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.query_params.update({"model": "fmnist_pair_cnn"})  # a link: no other model's engine is built first
    at.run()
    at.selectbox(key=keys.CRITERION).set_value("bn_gamma").run()
    assert not at.exception, at.exception  # the pair CNN's last conv (features.13) has no batch norm after it
    assert [e.value for e in at.error] == ["batch-norm |gamma|: bn_gamma needs a batch norm right after the conv; "
                                           "this layer has none. Choose another rule in the sidebar."]
