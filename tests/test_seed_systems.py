"""Every system of the source documents: architectures, data sets, pair tasks, any conv layer."""
import functools
import io
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_equals_naive, cli, full_engine, subset_engine, write_idx
from core import checkpoints, data, engine, inputs, models
from core.naive import naive_correct, prune_copy
from core.split import conv_layer_names, conv_layers
from core.tasks import predictions

PAIR_CHECKPOINTS = {"pair_cnn": ROOT / "checkpoints" / "fmnist_pair_cnn.pt",
                    "siamese": ROOT / "checkpoints" / "fmnist_siamese.pt"}


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("arch,kwargs", [(a, v) for a, s in models.REGISTRY.items() for v in s.variants])
def test_plain_state_dict_of_every_architecture_is_recognised(arch, kwargs):
    model = models.build(arch, **kwargs)
    ckpt = checkpoints.from_bytes(saved(model.state_dict()))
    assert (ckpt.arch, ckpt.arch_kwargs) == (arch, kwargs)
    assert ckpt.dataset == models.REGISTRY[arch].dataset


def test_report_architectures_have_the_reported_last_conv():
    last = {}
    for arch in ("resnet9", "vgg13_bn", "keras_vgg", "pair_cnn", "siamese"):
        spec = models.REGISTRY[arch]
        last[arch] = conv_layers(models.build(arch), spec.input_shape)[-1]
    assert (last["resnet9"].out_channels, last["resnet9"].out_shape) == (512, (512, 4, 4))
    assert last["vgg13_bn"].out_shape == (512, 2, 2) and last["vgg13_bn"].name == "features.31"
    assert last["keras_vgg"].name == "conv2d_12" and last["keras_vgg"].out_shape == (512, 2, 2)
    assert last["keras_vgg"].in_channels == 512 and last["keras_vgg"].kernel_size == (3, 3)
    assert last["pair_cnn"].out_shape == (64, 5, 5)
    assert last["siamese"].out_channels == 128
    lenet = models.build("lenet300")
    assert sum(p.numel() for p in lenet.parameters()) == 266_610 and not conv_layer_names(lenet)


def _jovian_names(state_dict):
    """The same ResNet9 tensors under another common naming (conv1.., res2), order kept."""
    rename = {"prep": "conv1", "layer1": "conv2", "res1": "res1", "layer2": "conv3", "layer3": "conv4",
              "res3": "res2", "classifier": "classifier"}
    return OrderedDict((rename[k.split(".")[0]] + k[len(k.split(".")[0]):], v) for k, v in state_dict.items())


def test_differently_named_state_dict_is_mapped_by_order_and_shape(tmp_path):
    model = models.build("resnet9", conv_bias=True).eval()
    theirs = _jovian_names(model.state_dict())
    assert "conv4.0.weight" in theirs
    path = tmp_path / "student_resnet9.pt"
    torch.save(theirs, path)
    ckpt = checkpoints.load(path)
    assert ckpt.arch == "resnet9" and ckpt.arch_kwargs == {"conv_bias": True}
    assert ckpt.meta["renamed_tensors"]["conv4.0.weight"] == "layer3.0.weight"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ckpt.build_model()(x), model(x))

    res = cli("info", str(path))
    assert res.returncode == 0, res.stderr
    assert "architecture: resnet9" in res.stdout and "renamed 42 tensors" in res.stdout and "conv1.0.weight -> prep.0.weight" \
        in res.stdout
    assert "res3.1.0: 512->512, 3x3 kernel, output 512x4x4" in res.stdout
    assert "data set: cifar10 (CIFAR-10)" in res.stdout


def _random_engine(arch, n=64, **kwargs):
    """A randomly initialised model with non-trivial BatchNorm statistics, on random inputs."""
    torch.manual_seed(0)
    model = models.build(arch, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    spec = models.REGISTRY[arch]
    x = torch.randn(n, *spec.input_shape)
    with torch.no_grad():  # labels = the model's own answers, so accuracy starts at 100%
        y = predictions(model(x), spec.task)
    return engine.Engine(model, x, y, task=spec.task, device="cpu", batch_size=32, **kwargs.get("engine", {}))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet9", "vgg13_bn", "keras_vgg"])
def test_cifar_architectures_prune_exactly(arch):
    eng = _random_engine(arch)
    assert eng.correct(0) == eng.total
    for mode in engine.MODES:
        for k in (1, 256, 511, 512):
            assert eng.correct(k, mode) == naive_correct(eng, k, mode), (arch, mode, k)


def test_keras_order_zeroes_the_batchnorm_after_the_activation():
    eng = _random_engine("keras_vgg")
    assert eng.layer == "conv2d_12" and eng.bn_name == "batch_normalization_10"
    pruned = eng.ranking()[:300]
    outputs = {}
    for mode in engine.MODES:
        model = prune_copy(eng.model, eng.layer, pruned.tolist(), mode, eng.bn_name)
        bn = model.get_submodule(eng.bn_name)
        bn.register_forward_hook(lambda m, i, o, mode=mode: outputs.__setitem__(mode, o[:, pruned]))
        with torch.no_grad():
            model(eng.x)
    # remove: the channel outputs exactly zero after its BatchNorm; zero: BatchNorm's constant remains
    assert bool((outputs["remove"] == 0).all()) and not bool((outputs["zero"] == 0).all())
    assert eng.correct(300, "remove") == naive_correct(eng, 300, "remove")


@pytest.mark.slow
def test_every_conv_layer_of_a_model_can_be_pruned():
    eng_layers = conv_layer_names(models.build("resnet9"))
    assert len(eng_layers) == 8
    torch.manual_seed(0)
    model = models.build("resnet9").eval()
    x = torch.randn(32, 3, 32, 32)
    y = model(x).argmax(1)
    for layer in ("prep.0", "res1.0.0", "layer2.0"):
        eng = engine.Engine(model, x, y, layer=layer, device="cpu")
        for k in (1, eng.channels // 2, eng.channels):
            assert eng.correct(k, "remove") == naive_correct(eng, k, "remove"), (layer, k)


# ---------------------------------------------------------------------------------------------
# The bundled pair networks, on real Fashion-MNIST pairs

@functools.lru_cache(maxsize=None)
def pair(name):
    return checkpoints.load(PAIR_CHECKPOINTS[name]), full_engine(PAIR_CHECKPOINTS[name])


@pytest.fixture(scope="module", params=sorted(PAIR_CHECKPOINTS))
def pair_engine(request):
    return pair(request.param)


def test_pair_networks_are_well_above_chance_and_exact(pair_engine):
    ckpt, eng = pair_engine
    assert eng.task == "binary" and eng.total == 10_000
    assert eng.correct(0) == ckpt.meta["test_correct"] and ckpt.meta["test_accuracy"] > 0.85
    assert_equals_naive(eng, "mean_abs" if ckpt.arch == "pair_cnn" else "mean")  # each report's own ranking


@pytest.mark.slow
def test_siamese_prunes_both_calls_and_averages_both():
    ckpt = checkpoints.load(PAIR_CHECKPOINTS["siamese"])
    eng = subset_engine(ckpt)  # the first 2,000 pairs: an average is the same computation over any number
    assert eng.layer == "feature_extractor.8" and eng.channels == 128
    assert eng.stats.mean_map.shape == (128, 7, 7)
    model = ckpt.build_model()
    total = torch.zeros(128, 7, 7, dtype=torch.float64)
    calls = []

    def accumulate(module, inputs, output):
        calls.append(1)
        total.add_(output.double().sum(0))

    model.feature_extractor[10].register_forward_hook(accumulate)
    with torch.no_grad():
        model(eng.x)
    assert len(calls) == 2  # the shared extractor ran on both images
    torch.testing.assert_close(eng.stats.mean_map, (total / (2 * eng.total)).float(), rtol=1e-4, atol=1e-6)
    from ui.figures import grid_shape
    assert grid_shape(eng.channels) == (8, 16)


def test_leaky_relu_pair_cnn_has_negative_mean_activations():
    _, eng = pair("pair_cnn")
    assert float(eng.stats.mean_map.min()) < 0  # why the second report ranked by mean |activation|
    assert not torch.equal(eng.ranking("mean"), eng.ranking("mean_abs"))


@pytest.mark.slow
def test_reranking_after_every_prune_gives_the_same_order():
    ckpt = checkpoints.load(ROOT / "checkpoints" / "fmnist_vgg.pt")
    split = data.load("fashion_mnist")
    eng = engine.Engine(ckpt.build_model(), split.x[:1000], split.y[:1000], device="cpu")
    for criterion in ("mean", "mean_abs"):
        for mode in engine.MODES:
            assert eng.reranked_order(4, mode, criterion) == eng.ranking(criterion)[:4].tolist()


# ---------------------------------------------------------------------------------------------
# Data sets, from small files in the real formats

def test_mnist_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28))
    labels = np.arange(12) % 10
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    split = data.load("mnist", False, str(tmp_path))
    assert split.x.shape == (12, 1, 28, 28) and split.y.tolist() == labels.tolist()
    torch.testing.assert_close(split.x[3, 0], (torch.tensor(images[3]).float() / 255 - 0.1307) / 0.3081)
    pairs = data.load("mnist_pairs", False, str(tmp_path))
    assert pairs.x.shape == (12, 2, 28, 28)


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, n)]}


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, i)))
    test = _cifar_batch(6, 0)
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    split = data.load("cifar10", False, str(tmp_path))
    assert split.x.shape == (6, 3, 32, 32) and split.y.tolist() == [int(v) for v in test[b"labels"]]
    red = test[b"data"][0].reshape(3, 32, 32)[0].astype(np.float32) / 255
    torch.testing.assert_close(split.x[0, 0], (torch.tensor(red) - 0.4914) / 0.2470)
    assert len(data.load("cifar10", True, str(tmp_path))) == 20


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Marker(str(marker)), b"labels": [0]}))
    with pytest.raises(data.DataUnavailable, match="refusing"):
        data.read_cifar_batch(folder / "test_batch")
    assert not marker.exists()


def test_pairs_are_deterministic_and_labelled_by_class():
    labels = data.load("fashion_mnist").y
    first, second, same = data.make_pairs(labels, seed=3)
    again = data.make_pairs(labels, seed=3)
    assert torch.equal(second, again[1]) and torch.equal(same, again[2])
    assert torch.equal(same, (labels[first] == labels[second]).long())
    assert 0.45 < float(same.float().mean()) < 0.55
    assert not torch.equal(second, data.make_pairs(labels, seed=4)[1])


def test_image_folder_and_zip_upload(tmp_path):
    import zipfile

    root = tmp_path / "shapes"
    for cls, value in (("dark", 20), ("light", 230)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (40, 40), value).save(root / cls / f"{i}.png")
    split = data.load_image_folder(root, (1, 28, 28), inputs.Preparation((0.5,), (0.5,)))
    assert split.x.shape == (6, 1, 28, 28) and split.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.spec.class_names == ("dark", "light")
    torch.testing.assert_close(split.x[0], torch.full((1, 28, 28), (20 / 255 - 0.5) / 0.5))
    numbered = tmp_path / "numbered"
    (numbered / "7_sneaker").mkdir(parents=True)
    Image.new("L", (28, 28), 0).save(numbered / "7_sneaker" / "a.png")
    assert data.load_image_folder(numbered, (1, 28, 28), inputs.Preparation((0.5,), (0.5,))).y.tolist() == [7]

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in root.rglob("*.png"):
            zf.write(p, p.relative_to(tmp_path))
    unpacked = data.unpack_zip(buf.getvalue(), "shapes.zip")
    assert sorted(p.name for p in unpacked.iterdir()) == ["dark", "light"]

    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    with pytest.raises(data.DataUnavailable, match="outside its folder"):
        data.unpack_zip(evil.getvalue(), "evil.zip")


def test_cli_sweeps_on_an_image_folder(tmp_path):
    split = data.load("fashion_mnist")
    for i in range(30):
        folder = tmp_path / "imgs" / f"{int(split.y[i])}_class"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((split.x[i, 0] * 0.3530 + 0.2860) * 255).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "c.csv"
    res = cli("sweep", str(ROOT / "checkpoints" / "fmnist_vgg.pt"), "--image-folder", str(tmp_path / "imgs"), "--ks", "0,256", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = out.read_text().splitlines()
    own = data.load_image_folder(tmp_path / "imgs", (1, 28, 28), inputs.Preparation((0.2860,), (0.3530,)))
    eng = engine.from_checkpoint(checkpoints.load(ROOT / "checkpoints" / "fmnist_vgg.pt"), device="cpu", split=own)
    assert rows[1].split(",")[:3] == ["0", str(eng.correct(0)), "30"]
    assert rows[2].split(",")[:2] == ["256", str(eng.correct(256))]
