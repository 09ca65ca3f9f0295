"""Hostile and broken input, many users at once: nothing crashes, nothing leaks, nothing is lost."""
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from conftest import BUNDLED, ROOT
from core import checkpoints, data, engine, models
from core.cache import EngineCache, OverBudget


class WritesMarker:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def bad_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason the user must read)."""
    good = saved(models.build("small_vgg").state_dict())
    wrong_shape = models.build("small_vgg").state_dict()
    wrong_shape["features.6.0.weight"] = torch.zeros(256, 128, 3, 3)
    nan = models.build("small_vgg").state_dict()
    nan["classifier.weight"][0, 0] = float("nan")
    unknown = {"encoder.weight": torch.zeros(7, 7), "encoder.bias": torch.zeros(7)}
    return {
        "photo.pt": (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(200), "Not a PyTorch checkpoint"),
        "truncated.pt": (good[: len(good) // 3], "Not a readable PyTorch checkpoint"),
        "evil.pt": (saved({"state_dict": WritesMarker(tmp_path / "PWNED")}), "could run code"),
        "unknown.pt": (saved(unknown), "Nearest: '"),
        "shapes.pt": (saved(wrong_shape), "'features.6.0.weight' has shape [256, 128, 3, 3] in the file, but "
                                          "'small_vgg' expects [512, 128, 3, 3]"),
        "nan.pt": (saved(nan), "NaN or infinite"),
    }


def test_each_bad_file_gets_its_reason_and_never_runs_code(tmp_path):
    for name, (raw, reason) in bad_files(tmp_path).items():
        with pytest.raises(checkpoints.CheckpointError) as err:
            checkpoints.from_bytes(raw, name)
        assert reason in str(err.value), (name, str(err.value))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_unknown_architecture_lists_what_was_expected(tmp_path):
    raw, _ = bad_files(tmp_path)["unknown.pt"]
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.from_bytes(raw)
    for arch in models.REGISTRY:
        assert arch in str(err.value)


@pytest.mark.parametrize("command", ["info", "rank", "sweep", "magnitude"])
def test_every_cli_command_refuses_bad_files_in_one_line(tmp_path, command):
    files = bad_files(tmp_path)
    if command != "info":  # every kind through `info`; the three of the user story through the others
        files = {n: files[n] for n in ("photo.pt", "truncated.pt", "evil.pt")}
    for name, (raw, reason) in files.items():
        path = tmp_path / name
        path.write_bytes(raw)
        extra = [] if command == "info" else ["--out", str(tmp_path / "out.csv")]
        res = subprocess.run([sys.executable, "-m", "core", command, str(path), *extra], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, (command, name, res.stderr)
        assert reason in res.stderr and "Traceback" not in res.stderr, (command, name, res.stderr)
        assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "PWNED").exists()


def test_cli_model_without_conv_and_missing_data(tmp_path):
    lenet = ROOT / "checkpoints" / "fmnist_lenet300.pt"
    res = subprocess.run([sys.executable, "-m", "core", "sweep", str(lenet), "--out", str(tmp_path / "o.csv")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "no Conv2d layer" in res.stderr and "Traceback" not in res.stderr
    cifar = tmp_path / "resnet9.pt"
    torch.save(models.build("resnet9").state_dict(), cifar)
    res = subprocess.run([sys.executable, "-m", "core", "rank", str(cifar), "--out", str(tmp_path / "o.csv")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ,
                                                                      "PRUNE_EXPLORER_CACHE": str(tmp_path / "c")})
    assert res.returncode == 2 and "CIFAR-10 was not found" in res.stderr and "--data-root" in res.stderr
    debug = subprocess.run([sys.executable, "-m", "core", "rank", str(cifar), "--out", "o.csv", "--debug"],
                           cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PRUNE_EXPLORER_CACHE": str(tmp_path / "c")})
    assert "Traceback" in debug.stderr


def test_app_shows_each_reason_and_keeps_the_model(tmp_path):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    assert any("limited to 100 MB" in c.value for c in at.caption)
    for name, (raw, reason) in bad_files(tmp_path).items():
        at.file_uploader(key="upload").set_value((name, raw, "application/octet-stream")).run()
        assert not at.exception, (name, at.exception)
        assert any(reason in e.value for e in at.error), (name, [e.value for e in at.error])
        assert at.selectbox(key="model").value == "fmnist_vgg"
        assert next(m.value for m in at.metric if m.label == "Architecture") == "small_vgg"
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------
# Many sessions at once

def test_parallel_sessions_each_see_exactly_their_own_accuracies():
    split = data.load("fashion_mnist")
    x, y = split.x[:1000], split.y[:1000]
    cache = EngineCache(max_entries=4)
    setups = []
    for name, path in BUNDLED.items():
        ckpt = checkpoints.load(path)
        for layer in (None, engine.conv_layer_names(ckpt.build_model())[-3]):
            setups.append((ckpt, layer))

    def build(ckpt, layer):
        return lambda: engine.Engine(ckpt.build_model(), x, y, layer=layer, device="cpu")

    # the naive truth, computed alone first
    jobs = []
    for i, (ckpt, layer) in enumerate(setups):
        eng = cache.get((ckpt.digest, layer), build(ckpt, layer))
        for mode in engine.MODES:
            for k in (i * 7 % eng.channels, eng.channels // 3, eng.channels - i):
                jobs.append((ckpt, layer, mode, k, engine.naive_correct(eng, k, mode)))
    answers, errors = {}, []

    def session(sid):
        try:
            for j, (ckpt, layer, mode, k, _) in enumerate(jobs):
                if (j + sid) % 2:  # each session takes its own half, in its own order
                    continue
                eng = cache.get((ckpt.digest, layer), build(ckpt, layer))
                # the shared curve too, where it is cheap (the fast path); every K otherwise
                use_curve = j % 3 == 0 and eng.path == engine.PATH_FAST
                answers[(sid, j)] = eng.curve(mode)[k] if use_curve else eng.correct(k, mode)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(sid,)) for sid in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(answers) == 4 * len(jobs)
    for (sid, j), got in answers.items():
        assert got == jobs[j][4], (sid, jobs[j][:4])


def test_engine_cache_is_bounded_and_eviction_is_harmless():
    split = data.load("fashion_mnist")
    x, y = split.x[:500], split.y[:500]
    builds = []

    def build(path):
        def make():
            builds.append(path)
            return engine.Engine(checkpoints.load(path).build_model(), x, y, device="cpu")
        return make

    cache = EngineCache(max_entries=1)
    a = cache.get("vgg", build(BUNDLED["vgg"])).correct(300, "remove")
    cache.get("resnet", build(BUNDLED["resnet"]))
    assert cache.lookup("vgg") is None  # evicted
    assert cache.get("vgg", build(BUNDLED["vgg"])).correct(300, "remove") == a  # rebuilt, same answer
    assert builds == [BUNDLED["vgg"], BUNDLED["resnet"], BUNDLED["vgg"]]
    one = cache.lookup("vgg").cache_bytes()
    small = EngineCache(max_entries=10, max_bytes=int(one * 1.5))
    small.get("vgg", build(BUNDLED["vgg"]))
    small.get("resnet", build(BUNDLED["resnet"]))
    assert small.lookup("vgg") is None and small.lookup("resnet") is not None  # bytes bound: LRU evicted
    assert small.nbytes() <= small.max_bytes
    tiny = EngineCache(max_entries=10, max_bytes=one // 2)
    with pytest.raises(OverBudget, match="more than the .* MB the server keeps for all models"):
        tiny.get("vgg", build(BUNDLED["vgg"]))
    assert tiny.lookup("vgg") is None and tiny.nbytes() == 0  # refused, not kept


def test_replaced_file_is_never_served_stale(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(BUNDLED["vgg"].read_bytes())
    first = checkpoints.load(path)
    path.write_bytes(BUNDLED["resnet"].read_bytes())
    second = checkpoints.load(path)
    assert first.digest != second.digest and second.arch == "small_resnet"


def test_cli_writes_only_the_output_file(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PRUNE_EXPLORER_CACHE"}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "core", "sweep", str(BUNDLED["vgg"]), "--ks", "0,100",
                          "--out", "curve.csv"], cwd=work, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in work.iterdir()] == ["curve.csv"]
    written = [p for p in home.rglob("*") if p.is_file()]
    assert all(Path(home, ".cache", "pruning-explorer") in p.parents for p in written), written


def test_hook_fallback_never_touches_the_shared_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = self.conv(x)
            if x.mean() > 100:  # data-dependent: not traceable
                x = -x
            return self.fc(x.mean((2, 3)))

    split = data.load("fashion_mnist")
    eng = engine.Engine(Branchy().eval(), split.x[:200], split.y[:200], device="cpu")
    assert eng.path == engine.PATH_HOOK
    eng.correct(2, "zero")
    assert not eng.model.conv._forward_hooks and not eng.model._forward_hooks
