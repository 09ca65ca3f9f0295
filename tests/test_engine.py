"""The engine against the naive procedure (copy the model, zero the weights, evaluate everything), on the bundled models and real data."""
import threading

import pytest
import torch
from torch import nn

from conftest import assert_equals_naive, subset_engine
from core import criteria, data, engine, models
from core.naive import naive_correct
from core.split import conv_layer_names


def test_engine_equals_naive_procedure(bundled):
    _, eng = bundled
    assert_equals_naive(eng)


def test_unpruned_accuracy_is_the_recorded_one(bundled):
    ckpt, eng = bundled
    assert eng.correct(0) == ckpt.meta["test_correct"]
    assert ckpt.meta["test_accuracy"] >= 0.915


def test_bundled_layer_is_the_last_512_channel_conv(bundled):
    _, eng = bundled
    assert eng.layer == conv_layer_names(eng.model)[-1]
    assert eng.channels == 512 and eng.stats.mean_map.shape == (512, 3, 3)
    assert eng.path == engine.PATH_FAST and eng.bn_name is not None


def test_fast_curve_equals_exact_count_at_every_k(bundled):
    """The cumulative-sum curve (with its near-tie recheck) against the exact read-out of each mask, batch
    by batch, K = 0..512 (not `correct(k)`, which reads the curve once it exists)."""
    _, eng = bundled
    for mode in engine.MODES:
        curve = eng.curve(mode)
        assert len(curve) == 513
        assert curve == [eng.correct_for_mask(eng.mask_for(k), mode) for k in range(513)], mode


def test_split_path_without_readout_equals_naive(bundled):
    ckpt, _ = bundled
    split = data.load(ckpt.dataset)
    eng = engine.Engine(ckpt.build_model(), split.x[:2000], split.y[:2000], device="cpu", fast=False)
    assert eng.path == engine.PATH_SPLIT
    for mode in engine.MODES:
        for k in (0, 100, 511):
            assert eng.correct(k, mode) == naive_correct(eng, k, mode)


def test_statistics_are_the_averaged_activation_after_conv_and_batchnorm(bundled):
    """Independent check: a hook on the ReLU right after the conv's BatchNorm, in a fresh copy (on the
    first 2,000 images: an average is the same computation over any number)."""
    ckpt, _ = bundled
    eng = subset_engine(ckpt)
    model = ckpt.build_model()
    relu = {n: m for n, m in model.named_modules()}[eng.bn_name.rsplit(".", 1)[0] + ".2"]
    assert isinstance(relu, nn.ReLU)
    total = torch.zeros(eng.stats.mean_map.shape, dtype=torch.float64)
    def accumulate(module, inputs, output):  # returns None: the output stays as it is
        total.add_(output.double().sum(0))

    relu.register_forward_hook(accumulate)
    with torch.no_grad():
        model(eng.x)
    torch.testing.assert_close(eng.stats.mean_map, (total / eng.total).float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("criterion", ["mean", "mean_abs", "l1_norm"])
def test_ranking_is_ascending_order_of_the_statistic(bundled, criterion):
    _, eng = bundled
    order, scores = eng.ranking(criterion), eng.scores(criterion)
    assert sorted(order.tolist()) == list(range(eng.channels))
    ranked = scores[order]
    assert bool((ranked[1:] >= ranked[:-1]).all())
    assert torch.equal(order, torch.argsort(scores, stable=True))


def test_mask_for_prunes_the_k_lowest(bundled):
    _, eng = bundled
    mask = eng.mask_for(10)
    assert int((mask == 0).sum()) == 10
    assert set(torch.nonzero(mask == 0).flatten().tolist()) == set(eng.ranking()[:10].tolist())
    with pytest.raises(ValueError, match="between 0 and 512"):
        eng.mask_for(513)


@pytest.mark.slow
def test_shortcut_keeps_accuracy_when_the_whole_layer_is_removed():
    """The first pruning report's observation: with the last block bypassed, ResNet stays far above chance;
    VGG collapses."""
    from conftest import BUNDLED, full_engine

    acc = {}
    for name, path in BUNDLED.items():
        eng = full_engine(path)
        acc[name] = eng.correct(eng.channels, "remove") / eng.total
    assert acc["resnet"] > 0.5
    assert acc["vgg"] == pytest.approx(0.10, abs=0.005)


def test_engine_never_mutates_the_model_it_was_given(bundled):
    ckpt, _ = bundled
    model = ckpt.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = data.load(ckpt.dataset)
    eng = engine.Engine(model, split.x[:500], split.y[:500], device="cpu")
    eng.correct(300, "remove")
    naive_correct(eng, 300, "remove")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the hook fallback is used."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.sum() > 0:
            x = x * 1.0
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_hook_fallback_is_exact_and_says_so():
    torch.manual_seed(0)
    model = Branchy().eval()
    with torch.no_grad():
        model.bn2.running_mean.uniform_(-1, 1)
        model.bn2.bias.uniform_(-1, 1)
    split = data.load("fashion_mnist")
    eng = engine.Engine(model, split.x[:1000], split.y[:1000], device="cpu", batch_size=250)
    assert eng.path == engine.PATH_HOOK and eng.layer == "conv2" and eng.bn_name == "bn2"
    for mode in engine.MODES:
        for k in (0, 5, 16):
            assert eng.correct(k, mode) == naive_correct(eng, k, mode)


def test_model_without_conv_is_refused_with_a_clear_message():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    split = data.load("fashion_mnist")
    with pytest.raises(ValueError, match="no Conv2d layer"):
        engine.Engine(model, split.x[:10], split.y[:10], device="cpu")


def test_unknown_layer_lists_the_conv_layers():
    split = data.load("fashion_mnist")
    with pytest.raises(ValueError, match="Conv layers: features.0.0"):
        engine.Engine(models.build("small_vgg"), split.x[:10], split.y[:10], layer="classifier", device="cpu")


def test_any_conv_layer_can_be_pruned():
    split = data.load("fashion_mnist")
    model = models.build("small_vgg").eval()
    eng = engine.Engine(model, split.x[:500], split.y[:500], layer="features.2.0", device="cpu")
    assert eng.channels == 64 and eng.stats.mean_map.shape == (64, 14, 14)
    for k in (0, 32, 64):
        assert eng.correct(k, "remove") == naive_correct(eng, k, "remove")


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        engine.pick_device("cuda")
    assert engine.pick_device("auto").type == "cpu"


def test_unknown_criterion_and_mode_are_named():
    with pytest.raises(ValueError, match="Unknown criterion 'gradcam'. Criteria: mean, mean_abs, apoz, l1_norm"):
        criteria.get("gradcam")


def test_near_tie_recheck_gives_the_exact_counts(bundled, monkeypatch):
    """With the tolerance so wide that every image counts as a near tie, every prediction of the
    curve comes from the exact recomputation: it must still equal the exact count at each K."""
    from core.readout import ReadoutCache

    _, eng = bundled
    monkeypatch.setattr(ReadoutCache, "TIE_TOLERANCE", 1e9)
    ks = [0, 1, 100, 300, 511, 512]
    order = eng.ranking("mean")
    for mode in engine.MODES:  # sweep_order: never a remembered count, always the read-out's sweep
        assert [c for _, c in eng.sweep_order(order, ks, mode)] == \
            [eng.correct_for_mask(eng.mask_for(k), mode) for k in ks] == [eng.correct(k, mode) for k in ks]


def test_a_ready_curve_never_waits_behind_another_being_computed():
    """Under a class, the warm-up computes one criterion's curve while students look up another's:
    the lookup must not wait; two callers of the same missing entry share one computation. (The
    engine keeps its curves, rankings and counts in `Memo`s.)"""
    memo = engine.Memo()
    ready = memo.get(("zero", "mean"), lambda: [1, 2, 3])
    started, release, calls = threading.Event(), threading.Event(), []

    def slow():  # stands in for a long computation of another entry
        calls.append(1)
        started.set()
        release.wait(60)
        return [0]

    workers = [threading.Thread(target=memo.get, args=(("zero", "slow"), slow)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        assert started.wait(60)
        looked_up = []
        lookup = threading.Thread(target=lambda: looked_up.append(memo.get(("zero", "mean"), lambda: None)))
        lookup.start()
        lookup.join(30)  # it would wait for `release` (60 s) if entries shared one lock
        assert looked_up == [ready]
    finally:
        release.set()
        for worker in workers:
            worker.join(60)
    assert calls == [1] and memo.peek(("zero", "slow")) == [0]
