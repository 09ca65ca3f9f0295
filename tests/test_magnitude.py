"""Magnitude pruning with retraining (Han et al. 2015) on the bundled LeNet-300-100."""
import csv

import pytest
import torch

from conftest import ROOT, cli
from core import checkpoints, data, magnitude
from core.tasks import count_correct

LENET = ROOT / "checkpoints" / "fmnist_lenet300.pt"


@pytest.fixture(scope="module")
def lenet():
    return checkpoints.load(LENET)


@pytest.fixture(scope="module")
def order(lenet):
    return magnitude.MagnitudeOrder(lenet.build_model())


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9, 0.999])
def test_achieved_sparsity_equals_the_target(order, target):
    sizes = dict(zip(order.names, order.sizes))
    glob = order.masks(target)
    assert sum(int((~m).sum()) for m in glob.values()) == round(target * order.total)
    per = order.masks(target, per_layer=True)
    for name, m in per.items():
        assert int((~m).sum()) == round(target * sizes[name])  # to the weight, in each layer


def test_global_and_per_layer_thresholds_are_as_defined(lenet, order):
    weights = {n: w.detach().abs() for n, w in magnitude.prunable_weights(lenet.build_model()).items()}
    glob = order.masks(0.9)
    pruned = torch.cat([weights[n][~m] for n, m in glob.items()])
    kept = torch.cat([weights[n][m] for n, m in glob.items()])
    assert float(pruned.max()) <= float(kept.min())  # one threshold over every layer
    per = order.masks(0.9, per_layer=True)
    for n, m in per.items():
        assert float(weights[n][~m].max()) <= float(weights[n][m].min())  # one threshold per layer
    fractions = {n: float((~m).float().mean()) for n, m in glob.items()}
    assert max(fractions.values()) - min(fractions.values()) > 0.05  # global prunes the layers unevenly
    assert any(not torch.equal(glob[n], per[n]) for n in glob)


def test_accuracy_at_zero_sparsity_equals_the_unpruned_model(lenet, order):
    split = data.load("fashion_mnist")
    model = lenet.build_model()
    pruned = magnitude.apply_masks(model, order.masks(0.0))
    assert count_correct(pruned, split.x, split.y) == count_correct(model, split.x, split.y) == \
        lenet.meta["test_correct"]


def test_pruned_weights_stay_exactly_zero_after_retraining(lenet, order):
    train = data.load("fashion_mnist", train=True)
    masks = order.masks(0.8)
    model = lenet.build_model()
    before = {n: w.detach().clone() for n, w in magnitude.prunable_weights(model).items()}
    retrained = magnitude.retrain(model, masks, train.x[:3000], train.y[:3000], epochs=1)
    for name, w in magnitude.prunable_weights(retrained).items():
        assert bool((w[~masks[name]] == 0).all()), name
        assert not torch.equal(w[masks[name]], before[name][masks[name]])  # the rest did learn
    for name, w in magnitude.prunable_weights(model).items():
        assert torch.equal(w, before[name])  # the model given is untouched
    assert type(retrained) is type(model)


def test_iterative_schedule_records_every_step(lenet):
    split = data.load("fashion_mnist")
    train = data.load("fashion_mnist", train=True)
    final, masks, steps = magnitude.iterative_prune(lenet.build_model(), [0.5, 0.8], 1,
                                                    (train.x[:2000], train.y[:2000]), (split.x, split.y))
    assert [s.step for s in steps] == [1, 2] and [s.sparsity for s in steps] == [0.5, 0.8]
    assert steps[1].sparsity_after.compression == pytest.approx(5.0, rel=1e-3)
    assert steps[1].sparsity_after.overall_nonzero == sum(int(m.sum()) for m in masks.values())
    assert count_correct(final, split.x, split.y) / len(split) == steps[1].accuracy_after


@pytest.mark.slow
def test_cli_writes_one_row_per_step(tmp_path):
    out, ckpt = tmp_path / "mag.csv", tmp_path / "pruned.pt"
    res = cli("magnitude", str(LENET), "--schedule", "0.5,0.9", "--retrain-epochs", "0", "--per-layer", "--out", str(out), "--save-checkpoint", str(ckpt))
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["step", "sparsity", "accuracy_before", "accuracy_after", "nonzero", "compression"]
    assert [float(r["sparsity"]) for r in rows] == [0.5, 0.9]
    assert rows[1]["accuracy_before"] == rows[1]["accuracy_after"]  # no retraining asked
    assert int(rows[1]["nonzero_fc1"]) == 784 * 300 - round(0.9 * 784 * 300)
    saved = checkpoints.load(ckpt)
    assert magnitude.sparsity_of(saved.build_model()).overall_nonzero == int(rows[1]["nonzero"])
    bad = cli("magnitude", str(LENET), "--schedule", "0.9,1.5", "--out", str(out))
    assert bad.returncode == 2 and "--schedule" in bad.stderr and "Traceback" not in bad.stderr
