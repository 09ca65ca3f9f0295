"""Whole-network compression: units, costs, strategies, exact counts, fine-tuning, the CLI."""
import copy
import csv
import dataclasses
import json
import math

import pytest
import torch

from conftest import BUNDLED, ROOT, SUBSET, cli, write_idx
from core import checkpoints, compress, compressed, engine, network, slim, store, tradeoff
from core.naive import prune_plan_copy
from core.tasks import count_correct

_NETS: dict[str, network.Network] = {}


def subset_network(name: str) -> network.Network:
    """The bundled model's network on the first 2,000 test images, built once per test session."""
    if name not in _NETS:
        ckpt = checkpoints.load(BUNDLED[name])
        split = ckpt.split()
        _NETS[name] = network.Network(ckpt.build_model(), split.x[:SUBSET], split.y[:SUBSET], ckpt.spec.task)
    return _NETS[name]


def naive(net: network.Network, plan: compress.Plan) -> int:
    """The literal procedure: copy, zero every planned channel (and in remove mode its batch norm), evaluate all."""
    bns = {layer: bn for u in net.units for layer, bn in zip(u.layers, u.bns)}
    return count_correct(prune_plan_copy(net.model, plan.layers, plan.mode, bns), net.x, net.y, net.task)


def counted_size(model) -> tuple[int, int]:
    params, macs, _ = slim._size(model, (1, 28, 28))
    return macs, params


def test_units_come_from_the_dependency_graph():
    vgg, resnet = subset_network("vgg"), subset_network("resnet")
    assert [u.layers for u in vgg.units] == [("features.0.0",), ("features.2.0",), ("features.4.0",), ("features.6.0",)]
    # layer3's output and res3's second conv meet in the residual add: one unit of 512 channels.
    assert ("layer3.0", "res3.1.0") in [u.layers for u in resnet.units]
    assert all(u.exact_removal for u in resnet.units) and not resnet.left_out


def test_depthwise_layers_are_left_out_with_the_reason():
    ckpt = checkpoints.load(ROOT / "checkpoints" / "fmnist_mobilenet.pt2")
    split = ckpt.split()
    net = network.Network(ckpt.build_model(), split.x[:200], split.y[:200], ckpt.spec.task)
    reasons = {x.layer: x.reason for x in net.left_out}
    assert reasons["blocks.0.dw"] == "its channels reach a grouped convolution (blocks.0.dw)"
    assert [u.name for u in net.units] == ["branch1.0", "branch3.0", "head"]
    with pytest.raises(ValueError, match="blocks.0.dw is left out of whole-network pruning: its channels reach"):
        compress.manual(net, {"blocks.0.dw": 0.5})


def test_single_layer_units_rank_as_the_single_layer_engine_does():
    net = subset_network("vgg")
    ckpt = checkpoints.load(BUNDLED["vgg"])
    split = ckpt.split()
    eng = engine.Engine(ckpt.build_model(), split.x[:SUBSET], split.y[:SUBSET], layer="features.2.0", device="cpu")
    u = net.unit_of("features.2.0")
    for criterion in ("mean", "apoz", "l1_norm", "bn_gamma", "fpgm", "random:3"):
        assert torch.equal(net.ranking(u, criterion), eng.ranking(criterion)), criterion


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_plan_costs_are_the_slim_models_counts(name):
    net = subset_network(name)
    plans = [compress.uniform(net, 0.5), compress.global_(net, 0.3, normaliser="lamp"),
             compress.global_(net, 0.6, of="params", normaliser="none"),
             compress.manual(net, {net.units[0].layers[0]: 0.25, net.units[-1].layers[0]: 0.9})]
    for plan in plans:
        model = compressed.slim_model(net, plan)
        assert counted_size(model) == (net.macs(list(plan.pruned)), net.params(list(plan.pruned))), plan.strategy
    assert counted_size(net.model) == (net.base_macs, net.base_params)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg", "resnet"])
@pytest.mark.parametrize("mode", ["remove", "zero"])
def test_every_strategy_counts_what_the_naive_procedure_counts(name, mode):
    net = subset_network(name)
    rows = synthetic_map(net)
    for target in (0.5, 0.25):
        for plan in (compress.uniform(net, target, mode=mode, criterion="mean"),
                     compress.global_(net, target, mode=mode, criterion="l1_norm", normaliser="mean"),
                     compress.global_(net, target, mode=mode, criterion="l1_norm", normaliser="none", cap=None),
                     compress.sensitivity(net, rows, target, mode=mode, criterion="l1_norm")):
            got = compressed.count(net, plan)
            assert got.correct == naive(net, plan), (plan.strategy, target)
            assert got.total == SUBSET
            assert net.kept_share(list(plan.pruned), "macs") <= target
            assert ("slim" in got.how) == (mode == "remove")


def test_uniform_prunes_the_same_fraction_and_as_little_as_the_target_needs():
    net = subset_network("vgg")
    plan = compress.uniform(net, 0.5, criterion="l1_norm")
    fractions = [k / u.channels for k, u in zip(plan.pruned, net.units)]
    assert max(fractions) - min(fractions) <= 1 / 32 + 1e-9  # the same fraction, rounded per layer
    assert net.kept_share(list(plan.pruned), "macs") <= 0.5
    fewer = [max(0, k - 1) for k in plan.pruned]  # one channel fewer in each: the target is missed
    assert net.kept_share(fewer, "macs") > 0.5
    # the first K of each layer in its own order: what the single-layer slider prunes at that K
    for u, unit in enumerate(net.units):
        assert plan.layers[unit.layers[0]] == sorted(net.ranking(u, "l1_norm")[:plan.pruned[u]].tolist())


def test_global_respects_its_cap_and_without_it_wipes_out_a_layer():
    net = subset_network("vgg")
    capped = compress.global_(net, 0.25, criterion="l1_norm", normaliser="none")
    assert all(k <= math.floor(0.9 * u.channels) for k, u in zip(capped.pruned, net.units))
    assert not capped.wiped(net)
    free = compress.global_(net, 0.25, criterion="l1_norm", normaliser="none", cap=None)
    assert "features.0.0" in free.wiped(net)  # the first layer's filters see one input channel: small norms
    assert any(n.startswith("wiped out (every channel pruned") and "features.0.0" in n for n in free.notes)
    got = compressed.count(net, free)
    assert got.correct == naive(net, free) and "one silenced channel in each wiped-out layer" in got.how
    zero = dataclasses.replace(free, mode="zero")
    assert compressed.count(net, zero).correct == naive(net, zero)
    with pytest.raises(ValueError, match="features.0.0 would keep no channel: a conv with no channels is no layer"):
        compressed.slim_model(net, free)
    # the fewest channels meet the target: one fewer misses it
    order = compress.global_order(net, "l1_norm", "none", None)
    assert sum(free.pruned) == len([u for u in order][:sum(free.pruned)])
    fewer = [0] * len(net.units)
    for u in order[:sum(free.pruned) - 1]:
        fewer[u] += 1
    assert net.kept_share(fewer, "macs") > 0.25


def test_an_unreachable_target_says_so():
    net = subset_network("vgg")
    plan = compress.global_(net, 0.001, criterion="l1_norm", cap=0.5)
    assert any(n.startswith("the target 0% of the MACs cannot be met with every unit capped") for n in plan.notes)


def test_lamp_normaliser_is_the_square_over_the_squares_ranked_after():
    scores = torch.tensor([3.0, 1.0, 2.0])
    ranking = torch.sort(scores, stable=True).indices  # 1, 2, 3
    got = compress.normalised(scores, ranking, "lamp")
    assert torch.allclose(got, torch.tensor([1 / 14, 4 / 13, 9 / 9], dtype=torch.float64))
    assert torch.allclose(compress.normalised(scores, ranking, "max"), torch.tensor([1 / 3, 2 / 3, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="Unknown normaliser 'median'"):
        compress.normalised(scores, ranking, "median")


def synthetic_map(net):
    """A sensitivity map where the first unit loses nothing up to 80% and the others lose a point per 10%."""
    from core.sensitivity import Row

    rows = []
    for i, unit in enumerate(net.units):
        for layer in unit.layers:
            for step in range(11):
                f = step / 10
                lost = (0 if f <= 0.8 else 0.5) if i == 0 else 0.01 * step
                rows.append(Row(layer, unit.channels, f, round(f * unit.channels), round((0.9 - lost) * 1000), 1000))
    return rows


def test_sensitivity_prunes_the_layers_that_lose_least_hardest():
    net = subset_network("vgg")
    plan = compress.sensitivity(net, synthetic_map(net), 0.6, criterion="l1_norm")
    fractions = [k / u.channels for k, u in zip(plan.pruned, net.units)]
    assert plan.pruned[0] >= math.floor(0.8 * net.units[0].channels)  # free up to 80%: pruned that far at least
    assert max(fractions[1:]) - min(fractions[1:]) <= 0.02  # equally sensitive: equally pruned
    assert net.kept_share(list(plan.pruned), "macs") <= 0.6
    assert plan.notes[0].startswith("each unit pruned as far as it alone loses at most")


def test_manual_ratios_and_their_errors():
    net = subset_network("resnet")
    plan = compress.manual(net, {"res3.1.0": 0.5, "prep.0.0": 0.25})
    assert plan.layers["layer3.0"] == plan.layers["res3.1.0"] and len(plan.layers["layer3.0"]) == 256
    assert len(plan.layers["prep.0.0"]) == 8
    with pytest.raises(ValueError, match="the fraction for prep.0.0 must lie between 0 and 1, got 1.5"):
        compress.manual(net, {"prep.0.0": 1.5})
    with pytest.raises(ValueError, match="'nope' is not a conv layer of this model"):
        compress.manual(net, {"nope": 0.5})
    with pytest.raises(ValueError, match="a target is the share of the MACs or parameters to keep"):
        compress.plan_for(net, "uniform", 0)


def test_finetuning_is_seeded_stoppable_and_keeps_the_channels_pruned():
    net = subset_network("vgg")
    ckpt = checkpoints.load(BUNDLED["vgg"])
    train = ckpt.split(train=True)
    x, y = train.x[:512], train.y[:512]
    plan = compress.uniform(net, 0.5)
    recipe = compressed.FinetuneRecipe(steps=3)
    a, losses = compressed.finetune(net, plan, x, y, recipe)
    b, _ = compressed.finetune(net, plan, x, y, recipe)
    assert len(losses) == 3 and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert counted_size(a)[0] == net.macs(list(plan.pruned))  # the slim model was trained
    zero = dataclasses.replace(plan, mode="zero")
    masked, _ = compressed.finetune(net, zero, x, y, recipe)  # zero mode: the masked model, channels held at 0
    for layer, idx in plan.layers.items():
        assert masked.get_submodule(layer).weight[idx].abs().sum() == 0
    calls = []
    _, stopped = compressed.finetune(net, plan, x, y, compressed.FinetuneRecipe(steps=50),
                                     should_stop=lambda: len(calls) >= 2, progress=lambda *a: calls.append(a))
    assert len(stopped) == 2


def test_points_are_kept_and_read_back(tmp_path, monkeypatch):
    net = copy.copy(subset_network("vgg"))
    kept = store.Store(tmp_path, 2**30)
    net.stored_as = (kept, ("network", "test"))
    s = tradeoff.Settings()
    first = tradeoff.point(net, "uniform", 0.5, s)
    monkeypatch.setattr(compressed, "count", lambda *a, **k: pytest.fail("counted again"))
    again = tradeoff.point(net, "uniform", 0.5, s)
    assert again == first and again.correct == naive(net, tradeoff.as_plan(net, first, s))
    assert [j for j in tradeoff.chart_jobs(targets=(0.9, 0.5, 0.2), band=1)][:2] == [("uniform", 0.9), ("global", 0.9)]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """A --data-root with the first 2,000 test and 2,000 training images, in the real files' format."""
    from core import data

    root = tmp_path_factory.mktemp("fmnist_small")
    for train in (False, True):
        for path in data.locate("fashion_mnist", train=train):
            write_idx(root / path.name.removesuffix(".gz"), data.read_idx(path)[:SUBSET])
    return root


@pytest.mark.slow
def test_cli_compress_writes_the_row_the_plan_and_the_slim_program(small_root, tmp_path):
    out, plan_out, saved = tmp_path / "row.csv", tmp_path / "plan.json", tmp_path / "slim.pt2"
    r = cli("compress", BUNDLED["vgg"], "--strategy", "global", "--normaliser", "lamp", "--target-macs", "0.5",
            "--finetune-steps", "20", "--data-root", small_root, "--no-cache", "--repeats", "2",
            "--out", out, "--plan-out", plan_out, "--save", saved)
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(out.open()))
    assert rows[0] == tradeoff.ROW_COLUMNS and len(rows) == 2
    row = dict(zip(rows[0], rows[1]))
    plan = json.loads(plan_out.read_text())
    assert set(plan) == {"mode", "criterion", "layers"} and plan["mode"] == "remove" and plan["criterion"] == "l1_norm"
    net = subset_network("vgg")
    p = compress.Plan("global", "l1_norm", "remove", tuple(len(plan["layers"].get(u.layers[0], [])) for u in net.units),
                      plan["layers"])
    assert int(row["correct"]) == naive(net, p) and int(row["total"]) == SUBSET
    assert int(row["macs"]) == net.macs(list(p.pruned)) and float(row["macs_kept"]) <= 0.5
    assert float(row["latency_b256_ms"]) > 0
    sweep = cli("sweep", saved, "--ks", "0", "--data-root", small_root, "--no-cache", "--out", tmp_path / "s.csv")
    assert sweep.returncode == 0, sweep.stderr
    assert list(csv.reader((tmp_path / "s.csv").open()))[1][1] == row["correct_finetuned"]


@pytest.mark.slow
def test_cli_manual_and_its_errors(small_root, tmp_path):
    out, plan_out = tmp_path / "row.csv", tmp_path / "plan.json"
    r = cli("compress", BUNDLED["vgg"], "--strategy", "manual", "--ratios", "features.6.0=0.5,features.0.0=0.25",
            "--finetune-steps", "0", "--data-root", small_root, "--no-cache", "--repeats", "1",
            "--out", out, "--plan-out", plan_out)
    assert r.returncode == 0, r.stderr
    row = dict(zip(*csv.reader(out.open())))
    assert row["correct_finetuned"] == row["correct"]
    assert {k: len(v) for k, v in json.loads(plan_out.read_text())["layers"].items()} == {"features.0.0": 8, "features.6.0": 256}
    bad = cli("compress", BUNDLED["vgg"], "--strategy", "uniform", "--data-root", small_root, "--no-cache",
              "--out", out, "--plan-out", plan_out)
    assert bad.returncode == 2 and "--strategy uniform needs --target-macs F or --target-params F" in bad.stderr
    bad = cli("compress", BUNDLED["vgg"], "--strategy", "global", "--target-macs", "0.5", "--max-ratio", "2",
              "--data-root", small_root, "--no-cache", "--out", out, "--plan-out", plan_out)
    assert bad.returncode == 2 and "--max-ratio 2: a per-layer cap between 0 and 1 (0.9), or off" in bad.stderr


@pytest.mark.slow
def test_cli_tradeoff_writes_every_point(small_root, tmp_path):
    out = tmp_path / "points.csv"
    r = cli("tradeoff", BUNDLED["vgg"], "--strategies", "uniform,global-uncapped", "--targets", "0.5,0.25",
            "--seeds", "1", "--data-root", small_root, "--no-cache", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert sorted((p["strategy"], p["target"]) for p in rows) == sorted(
        (line, t) for line in ("uniform", "global-uncapped", "random:0") for t in ("0.5", "0.25"))
    assert "wiped out: features.0.0" in r.stdout  # global-uncapped at 25%, l1 norm, no normaliser
