"""torch.export programs (.pt2): safe reading, crafted archives, and the engine on exported graphs.

The naive reference here is the program's own: load the (trusted, test-made) file with
`torch.export.load`, zero the pruned channels in its state dict, run it on every image.
"""
import functools
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, cli, shown
from core import checkpoints, engine, program
from core.split import conv_layers

MOBILENET = ROOT / "checkpoints" / "fmnist_mobilenet.pt2"


# -- a CNN the registry has never seen: depthwise, grouped, concatenation, residual, SiLU/Hardswish

class Zoo(nn.Module):
    def __init__(self, head: str = "avg"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 8, 3, padding=1)
        self.last = nn.Conv2d(16, 16, 1, bias=False)
        self.last_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.head = head

    def forward(self, x):
        x = self.stem(x)
        x = x + nn.functional.hardswish(self.dw_bn(self.dw(x)))            # residual add
        x = torch.relu(self.grouped(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)  # concatenated branches
        x = nn.functional.hardswish(self.last_bn(self.last(x)))
        if self.head == "max":
            pooled = x.amax(dim=(2, 3))
        elif self.head == "adaptive_max":  # aten.adaptive_max_pool2d gives (values, indices), read by getitem
            pooled = torch.flatten(nn.functional.adaptive_max_pool2d(x, 1), 1)
        elif self.head == "max_indices":  # max_pool2d_with_indices, then getitem
            pooled = torch.flatten(nn.functional.max_pool2d(x, 14, return_indices=True)[0], 1)
        else:
            pooled = x.mean(dim=(2, 3))
        return self.fc(pooled)


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial BatchNorm so that `remove` differs from `zero`
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    return model.eval()


def _export(model: nn.Module, path: Path, input_shape=(1, 28, 28), meta=None) -> Path:
    program.save(model, input_shape, path, meta)
    return path


@functools.lru_cache(maxsize=4)
def _program(path: Path, mtime: float):
    """The program in a file this test wrote (trusted), and a copy of its weights as loaded."""
    ep = torch.export.load(str(path))
    return ep, {name: t.clone() for name, t in ep.state_dict.items()}


def _naive(path: Path, x, y, layer: str, channels, mode: str, bn: str | None) -> int:
    ep, loaded = _program(path, path.stat().st_mtime)
    sd = ep.state_dict
    with torch.no_grad():
        for name, t in loaded.items():  # the weights as in the file, then the pruned channels zeroed
            sd[name].copy_(t)
        sd[f"{layer}.weight"][channels] = 0
        if f"{layer}.bias" in sd:
            sd[f"{layer}.bias"][channels] = 0
        if mode == "remove" and bn:
            sd[f"{bn}.weight"][channels], sd[f"{bn}.bias"][channels] = 0, 0
            sd[f"{bn}.running_mean"][channels], sd[f"{bn}.running_var"][channels] = 0, 1
        return int((ep.module()(x).argmax(1) == y).sum())


@pytest.mark.slow
@pytest.mark.parametrize("head", ["avg", "max", "adaptive_max", "max_indices"])
def test_every_conv_of_an_unseen_cnn_equals_the_naive_procedure(tmp_path, head):
    torch.manual_seed(0)
    model = _randomised(Zoo(head), seed=1)
    path = _export(model, tmp_path / "zoo.pt2")
    x = torch.randn(400, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 10  # some wrong answers, so pruning can also fix some
    ckpt = checkpoints.load(path)
    names = [info.name for info in conv_layers(ckpt.build_model(), ckpt.spec.input_shape)]
    assert names == ["stem.0", "dw", "grouped", "left", "right", "last"]  # module paths as written
    for layer in names:
        eng = engine.Engine(ckpt.build_model(), x, y, layer=layer, device="cpu", batch_size=150)
        p = eng.channels
        for mode in engine.MODES:
            for k in (0, 1, p // 2, p):
                channels = eng.ranking()[:k].tolist()
                assert eng.correct(k, mode) == _naive(path, x, y, layer, channels, mode, eng.bn_name), \
                    (layer, mode, k)
    assert eng.path == engine.PATH_FAST  # the last conv reads out through a linear layer


def test_statistics_are_taken_after_the_activation(tmp_path):
    model = _randomised(Zoo(), seed=2)
    ckpt = checkpoints.load(_export(model, tmp_path / "zoo.pt2"))
    x = torch.randn(64, 1, 28, 28)
    eng = engine.Engine(ckpt.build_model(), x, torch.zeros(64, dtype=torch.long), layer="stem.0", device="cpu")
    assert eng.bn_name == "stem.1"
    with torch.no_grad():
        expected = model.stem(x).double().mean(0).float()  # conv, BatchNorm, SiLU
    assert torch.allclose(eng.stats.mean_map, expected, atol=1e-5)


@pytest.fixture(scope="module")
def bundled_programs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("programs")
    out = {}
    for name in ("fmnist_vgg", "fmnist_resnet", "fmnist_pair_cnn", "fmnist_siamese"):
        source, path = ROOT / "checkpoints" / f"{name}.pt", folder / f"{name}.pt2"
        res = cli("export", str(source), "--out", str(path))
        assert res.returncode == 0, res.stderr
        out[name] = (checkpoints.load(source), checkpoints.load(path))
    return out


def test_each_bundled_model_gives_identical_counts_as_a_program(bundled_programs):
    for name, (ckpt, prog) in bundled_programs.items():
        assert prog.program is not None and prog.dataset == ckpt.dataset and prog.spec.task == ckpt.spec.task
        split = ckpt.split()  # the first 2,000 test images: two forms of one model, image by image
        x, y = split.x[:2000], split.y[:2000]
        original = engine.Engine(ckpt.build_model(), x, y, task=ckpt.spec.task, device="cpu")
        exported = engine.Engine(prog.build_model(), x, y, task=prog.spec.task, device="cpu")
        assert exported.layer == original.layer and exported.path == original.path == engine.PATH_FAST, name
        p = original.channels
        ks = sorted({0, 1, p // 4, p // 2, p - 1, p})
        for mode in engine.MODES:
            assert exported.sweep(ks, mode) == original.sweep(ks, mode), (name, mode)
            assert exported.predictions(p // 2, mode).tolist() == original.predictions(p // 2, mode).tolist()


def test_the_bundled_mobilenet_is_a_program_of_an_unregistered_architecture():
    from core import models

    ckpt = checkpoints.load(MOBILENET)
    assert ckpt.program is not None and ckpt.arch == "MobileNetish" and ckpt.arch not in models.REGISTRY
    assert ckpt.dataset == "fashion_mnist" and ckpt.meta["test_accuracy"] > 0.88
    layers = conv_layers(ckpt.build_model(), ckpt.spec.input_shape)
    assert any(info.name == "blocks.0.dw" for info in layers) and layers[-1].name == "head"
    groups = {n: m.groups for n, m in ckpt.build_model().named_modules() if isinstance(m, nn.Conv2d)}
    assert groups["blocks.0.dw"] == 16  # depthwise


@pytest.mark.slow
@pytest.mark.parametrize("layer,images", [("head", "all"), ("head", "2,000"), ("blocks.2.pw", "2,000")])
def test_cli_sweep_of_the_mobilenet_equals_the_naive_procedure(tmp_path, layer, images, fmnist_subset):
    """What a user would run: sweep a .pt2 at its last conv and at a middle one, both modes; over the whole
    test set at K = 0 and half the channels, and over the first 2,000 test images (a --data-root of them)
    at the edges and at a middle layer, where each K costs a pass of the rest of the network."""
    from core import data

    root = [] if images == "all" else ["--data-root", str(fmnist_subset)]
    split = data.load("fashion_mnist", data_root=root[1] if root else None)
    ckpt = checkpoints.load(MOBILENET)
    channels = dict((i.name, i.out_channels) for i in conv_layers(ckpt.build_model(), (1, 28, 28)))[layer]
    ks = {("head", "all"): [0, channels // 2], ("head", "2,000"): [1, channels]}.get((layer, images), [1, channels // 2])
    rank = cli("rank", str(MOBILENET), "--layer", layer, "--out", str(tmp_path / "rank.csv"), "--device", "cpu", *root)
    assert rank.returncode == 0, rank.stderr
    order = [int(line.split(",")[1]) for line in (tmp_path / "rank.csv").read_text().splitlines()[1:]]
    bn = {"head": "head_bn", "blocks.2.pw": "blocks.2.pw_bn"}[layer]
    naive = functools.lru_cache(lambda k, mode: _naive(MOBILENET, split.x, split.y, layer, order[:k],
                                                        mode if k else "zero", bn))  # K = 0: one pass for both
    for mode in engine.MODES:
        out = tmp_path / f"{mode}.csv"
        res = cli("sweep", str(MOBILENET), "--dataset", "fashion_mnist", "--layer", layer, "--mode", mode,
                  "--ks", ",".join(map(str, ks)), "--out", str(out), "--device", "cpu", *root)
        assert res.returncode == 0, res.stderr
        rows = [line.split(",") for line in out.read_text().splitlines()]
        assert rows[0] == ["k", "correct", "total", "accuracy"]
        for (k, correct, total, _), want_k in zip(rows[1:], ks, strict=True):
            assert int(k) == want_k and int(total) == len(split) == (10_000 if images == "all" else 2000)
            assert int(correct) == naive(want_k, mode), (mode, k)


# -- refusals ------------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _code_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_RunsCode(f"touch {marker}"), buf)
    return buf.getvalue()


def _rewrite(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    prefix = next(n for n in members if n.endswith("archive_format"))[: -len("archive_format")]
    change(members, prefix)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def _pickle_in_weight(marker):
    def change(members, prefix):
        name = prefix + "data/weights/model_weights_config.json"
        config = json.loads(members[name])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        members[name] = json.dumps(config).encode()
        members[prefix + "data/weights/" + entry["path_name"]] = _code_pickle(marker)
    return change


def _pickle_in_sample_inputs(marker):
    def change(members, prefix):
        members[prefix + "data/sample_inputs/model.pt"] = _code_pickle(marker)
    return change


def _code_in_shape_expression(marker):
    def change(members, prefix):
        doc = members[prefix + "models/model.json"].decode()
        exprs = set(json.loads(doc) and __import__("re").findall(r'"expr_str": "([^"]*)"', doc))
        assert exprs, "the test model should carry a symbolic batch size"
        payload = f"__import__('os').system('touch {marker}')"
        for e in exprs:
            doc = doc.replace(json.dumps(e)[1:-1], payload.replace("'", "\\u0027"))
        members[prefix + "models/model.json"] = doc.encode()
    return change


CRAFTED = {"weight": _pickle_in_weight, "sample inputs": _pickle_in_sample_inputs,
           "shape expression": _code_in_shape_expression}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(CRAFTED))
def test_crafted_archives_run_no_code_and_get_one_sentence(tmp_path, where):
    marker = tmp_path / "CODE_RAN"
    good = _export(_randomised(Zoo(), 3), tmp_path / "good.pt2")
    bad = _rewrite(good, tmp_path / "bad.pt2", CRAFTED[where](marker))
    # The danger is real: torch's own loader runs the code in these files (in a child process).
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(bad)!r})"], capture_output=True)
    assert marker.exists(), f"the crafted archive ({where}) should run code under torch.export.load"
    marker.unlink()
    for attempt in (lambda: checkpoints.from_bytes(bad.read_bytes()), lambda: checkpoints.load(bad)):
        with pytest.raises(checkpoints.CheckpointError) as exc:
            attempt()
        message = str(exc.value)
        assert message.startswith("Refused: ") and "\n" not in message and message.endswith(".")
        assert ("could run code" in message) or ("shape expression" in message)
    assert not marker.exists()
    res = cli("info", str(bad))
    assert res.returncode == 2 and res.stderr.startswith("error: Refused: ") and res.stderr.count("\n") == 1
    assert not marker.exists()


def test_guard_code_in_the_file_is_never_executed(tmp_path):
    marker = tmp_path / "CODE_RAN"
    good = _export(_randomised(Zoo(), 4), tmp_path / "good.pt2")

    def change(members, prefix):
        doc = json.loads(members[prefix + "models/model.json"])
        doc["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        members[prefix + "models/model.json"] = json.dumps(doc).encode()

    bad = _rewrite(good, tmp_path / "guards.pt2", change)
    ckpt = checkpoints.load(bad)
    ckpt.build_model()(torch.zeros(2, 1, 28, 28))
    assert not marker.exists()


class _Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x).flatten(2).sort(dim=-1).values  # an operator not on the list
        return self.fc(x[..., -1])


def test_unknown_operator_is_refused_by_name(tmp_path):
    path = _export(_Sorts().eval(), tmp_path / "sorts.pt2")
    with pytest.raises(checkpoints.CheckpointError, match=r"operator 'aten\.sort\.default'"):
        checkpoints.load(path)


def test_fixed_batch_size_is_refused_with_the_way_to_export(tmp_path):
    ep = torch.export.export(Zoo().eval(), (torch.zeros(1, 1, 28, 28),))
    torch.export.save(ep, tmp_path / "fixed.pt2")
    with pytest.raises(checkpoints.CheckpointError, match=r"fixed batch size of 1; export it with a dynamic batch "
                                                          r"dimension: .*Dim\('batch'\)"):
        checkpoints.load(tmp_path / "fixed.pt2")


def test_data_set_must_fit_the_program(tmp_path):
    path = _export(Zoo().eval(), tmp_path / "zoo.pt2")
    assert checkpoints.load(path).meta["fitting_datasets"] == ["fashion_mnist", "mnist"]
    with pytest.raises(checkpoints.CheckpointError, match=r"takes 1x28x28 inputs, but 'cifar10' has 3x32x32"):
        checkpoints.load(path, dataset="cifar10")
    five = Zoo().eval()
    five.fc = nn.Linear(16, 5)
    path = _export(five, tmp_path / "five.pt2")
    with pytest.raises(checkpoints.CheckpointError, match=r"gives 5 outputs, but 'fashion_mnist' has 10 classes"):
        checkpoints.load(path, dataset="fashion_mnist")
    assert checkpoints.load(path).meta["fitting_datasets"] == []


@pytest.mark.slow
def test_magnitude_on_a_program_writes_a_program(tmp_path):
    path = _export(_randomised(Zoo(), 5), tmp_path / "zoo.pt2", meta={"dataset": "fashion_mnist"})
    out = tmp_path / "pruned.pt2"
    res = cli("magnitude", str(path), "--schedule", "0.5", "--retrain-epochs", "0", "--out", str(tmp_path / "steps.csv"), "--save-checkpoint", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    pruned = checkpoints.load(out)
    weights = [m.weight for m in pruned.build_model().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.49 < zeros < 0.51


def test_app_loads_an_uploaded_program_and_refuses_a_crafted_one(tmp_path):
    from streamlit.testing.v1 import AppTest

    from ui import keys

    marker = tmp_path / "CODE_RAN"
    good = _export(_randomised(Zoo(), 6), tmp_path / "zoo.pt2")
    bad = _rewrite(good, tmp_path / "bad.pt2", _pickle_in_weight(marker))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    at.file_uploader(key=keys.UPLOAD).set_value(("bad.pt2", bad.read_bytes(), "application/octet-stream")).run()
    assert not at.exception and not marker.exists()
    assert any("could run code" in shown(e.value) for e in at.error)
    assert at.selectbox(key=keys.MODEL).value == "fmnist_vgg"  # the refusal changed nothing
    at.file_uploader(key=keys.UPLOAD).set_value(("zoo.pt2", good.read_bytes(), "application/octet-stream")).run()
    assert not at.exception, at.exception
    assert at.selectbox(key=keys.MODEL).value == "upload: zoo.pt2"
    assert next(m.value for m in at.metric if m.label == "Architecture") == "Zoo"
    at.switch_page("app.py").run()  # the Prune page: the program's last conv, its exact accuracy
    assert not at.exception, at.exception
    ckpt = checkpoints.load(good)
    eng = engine.from_checkpoint(ckpt, device="cpu")
    assert at.selectbox(key=keys.LAYER).value == eng.layer == "last"
    text = next(c.value for c in at.main.caption if c.value.startswith("Test accuracy at K ="))
    assert f"**{eng.correct(0) / eng.total:.2%}**" in text


def test_app_tests_a_program_no_data_set_fits_on_ones_own_images(tmp_path):
    from PIL import Image
    from streamlit.testing.v1 import AppTest

    from ui import keys

    five = Zoo().eval()
    five.fc = nn.Linear(16, 5)  # five outputs: no registered data set has five classes
    path = _export(five, tmp_path / "five.pt2")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in range(5):
            for i in range(4):
                img = io.BytesIO()
                Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(img, format="PNG")
                z.writestr(f"{c}_class/{i}.png", img.getvalue())
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    at.file_uploader(key=keys.UPLOAD).set_value(("five.pt2", path.read_bytes(), "application/octet-stream")).run()
    assert any("No registered data set fits this program (input 1x28x28, 5 outputs): upload a zip" in shown(e.value)
               for e in at.error)
    at.file_uploader(key=keys.UPLOAD_IMAGES).set_value(("mine.zip", buf.getvalue(), "application/zip")).run()
    at.file_uploader(key=keys.UPLOAD).set_value(("five.pt2", path.read_bytes(), "application/octet-stream")).run()
    assert not at.exception, at.exception
    assert at.selectbox(key=keys.MODEL).value == "upload: five.pt2"
    at.switch_page("app.py").run()
    assert not at.exception, at.exception
    text = next(c.value for c in at.main.caption if c.value.startswith("Test accuracy at K ="))
    assert "of 20 right" in text
