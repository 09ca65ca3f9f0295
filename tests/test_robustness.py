"""Hostile and broken input, many users at once: nothing crashes, nothing leaks, nothing is lost."""
import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from PIL import Image
from torch import nn

from conftest import BUNDLED, ROOT, cli, refused_in_child, shown
from core import checkpoints, data, engine, inputs, models, untrusted
from core.naive import naive_correct
from core.split import conv_layer_names
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
        "unknown.pt": (saved(unknown), "is of none of the registered architectures"),
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


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "rank", "sweep", "magnitude"])
def test_every_cli_command_refuses_bad_files_in_one_line(tmp_path, command):
    files = bad_files(tmp_path)
    if command != "info":  # every kind through `info`; the three of the user story through the others
        files = {n: files[n] for n in ("photo.pt", "truncated.pt", "evil.pt")}
    for name, (raw, reason) in files.items():
        path = tmp_path / name
        path.write_bytes(raw)
        extra = [] if command == "info" else ["--out", str(tmp_path / "out.csv")]
        res = cli(command, str(path), *extra)
        assert res.returncode == 2, (command, name, res.stderr)
        assert reason in res.stderr and "Traceback" not in res.stderr, (command, name, res.stderr)
        assert not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_cli_model_without_conv_and_missing_data(tmp_path, monkeypatch):
    lenet = ROOT / "checkpoints" / "fmnist_lenet300.pt"
    res = cli("sweep", str(lenet), "--out", str(tmp_path / "o.csv"))
    assert res.returncode == 2 and "no Conv2d layer" in res.stderr and "Traceback" not in res.stderr
    cifar = tmp_path / "resnet9.pt"
    torch.save(models.build("resnet9").state_dict(), cifar)
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path / "c"))  # nothing downloaded there
    res = cli("rank", str(cifar), "--out", str(tmp_path / "o.csv"))
    assert res.returncode == 2 and "CIFAR-10 was not found" in res.stderr and "--data-root" in res.stderr
    debug = subprocess.run([sys.executable, "-m", "core", "rank", str(cifar), "--out", "o.csv", "--debug"],
                           cwd=ROOT, capture_output=True, text=True)  # a real child: Python prints the traceback
    assert "Traceback" in debug.stderr and "CIFAR-10 was not found" in debug.stderr


def test_app_shows_each_reason_and_keeps_the_model(tmp_path):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    assert any("limited to 100 MB" in c.value for c in at.caption)
    for name, (raw, reason) in bad_files(tmp_path).items():
        at.file_uploader(key="upload").set_value((name, raw, "application/octet-stream")).run()
        assert not at.exception, (name, at.exception)
        assert any(reason in shown(e.value) for e in at.error), (name, [e.value for e in at.error])
        assert at.selectbox(key="model").value == "fmnist_vgg"
        assert next(m.value for m in at.metric if m.label == "Architecture") == "small_vgg"
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------
# Many sessions at once

@pytest.mark.slow
def test_parallel_sessions_each_see_exactly_their_own_accuracies():
    split = data.load("fashion_mnist")
    x, y = split.x[:1000], split.y[:1000]
    cache = EngineCache(max_entries=4)
    setups = []
    for name, path in BUNDLED.items():
        ckpt = checkpoints.load(path)
        for layer in (None, conv_layer_names(ckpt.build_model())[-3]):
            setups.append((ckpt, layer))

    def build(ckpt, layer):
        return lambda: engine.Engine(ckpt.build_model(), x, y, layer=layer, device="cpu")

    # the naive truth, computed alone first
    jobs = []
    for i, (ckpt, layer) in enumerate(setups):
        eng = cache.get((ckpt.digest, layer), build(ckpt, layer))
        for mode in engine.MODES:
            for k in (i * 7 % eng.channels, eng.channels // 3, eng.channels - i):
                jobs.append((ckpt, layer, mode, k, naive_correct(eng, k, mode)))
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
    with pytest.raises(OverBudget):  # too large by the caller's estimate: refused before anything is built
        EngineCache(max_bytes=one).get("vgg", lambda: pytest.fail("built"), estimate=one + 1)


def test_replaced_file_is_never_served_stale(tmp_path):
    """The shared cache is keyed by the file's content: a file replaced under the same name gets a new
    engine with the new model's answers, never the old cached one."""
    split = data.load("fashion_mnist")
    x, y = split.x[:300], split.y[:300]
    cache, builds = EngineCache(max_entries=4), []

    def engine_for(path):
        ckpt = checkpoints.load(path)

        def build():
            builds.append(ckpt.arch)
            return engine.Engine(ckpt.build_model(), x, y, device="cpu")
        return cache.get((ckpt.digest, "fashion_mnist", None, "cpu"), build)

    path = tmp_path / "model.pt"
    path.write_bytes(BUNDLED["vgg"].read_bytes())
    first = engine_for(path)
    assert engine_for(path) is first  # the same file: served from the cache
    path.write_bytes(BUNDLED["resnet"].read_bytes())
    second = engine_for(path)
    assert second is not first and builds == ["small_vgg", "small_resnet"]
    truth = engine.Engine(checkpoints.load(BUNDLED["resnet"]).build_model(), x, y, device="cpu")
    assert [second.correct(k, "remove") for k in (0, 256, 500)] == [truth.correct(k, "remove") for k in (0, 256, 500)]
    assert second.curve("zero") != first.curve("zero")


@pytest.mark.slow
def test_cli_writes_only_the_output_file(tmp_path, fmnist_subset):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PRUNE_EXPLORER_CACHE"}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "core", "sweep", str(BUNDLED["vgg"]), "--ks", "0,100",
                          "--out", "curve.csv", "--data-root", str(fmnist_subset)], cwd=work, capture_output=True, text=True, env=env)
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


# ---------------------------------------------------------------------------------------------
# Hostile files: each refused with one sentence, in bounded time and memory (measured in a child
# process), and the uploader's session keeps working.

def bomb_ops(depth: int = 30, base: int = 100_000) -> bytes:
    """Pickle instructions for a 'billion laughs': t(i+1) = (t(i), t(i)) through the memo, 2^depth to hash."""
    out = [b")", b"r" + struct.pack("<I", base)]  # EMPTY_TUPLE, LONG_BINPUT
    for i in range(depth):  # LONG_BINGET t(i) beside t(i) on the stack, TUPLE2, LONG_BINPUT: one object left
        out += [b"j" + struct.pack("<I", base + i), b"\x86", b"r" + struct.pack("<I", base + i + 1)]
    return b"".join(out)


def patched_pickle(raw: bytes, change) -> bytes:
    """`raw` (a torch.save zip) with `change(body)` applied to its pickle, written back uncompressed."""
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        for info in zin.infolist():
            body = zin.read(info)
            zo.writestr(info.filename, change(body) if info.filename.endswith("data.pkl") else body)
    return out.getvalue()


def with_pickle_patch(raw: bytes, placeholder: str, ops: bytes) -> bytes:
    """`raw` with the string `placeholder` in its pickle replaced by `ops`."""
    text = placeholder.encode()
    return patched_pickle(raw, lambda body: body.replace(b"X" + struct.pack("<I", len(text)) + text, ops))


def declared_numel(raw: bytes, numel: int) -> bytes:
    """A torch.save zip of one 1-value storage whose pickle declares `numel` values instead."""
    return patched_pickle(raw, lambda body: re.sub(rb"(X\x03\x00\x00\x00cpuq.)K\x01",
                                                   lambda m: m.group(1) + b"J" + struct.pack("<i", numel), body, count=1))


def past_storage(raw: bytes) -> bytes:
    """A torch.save zip of zeros(7) whose pickle rebuilds a view of 1,000,000 values from those 7."""
    view = b"QK\x00K\x07\x85"  # BINPERSID, offset 0, size (7,)

    def change(body: bytes) -> bytes:
        assert view in body
        return body.replace(view, b"QK\x00J" + struct.pack("<i", 10**6) + b"\x85", 1)
    return patched_pickle(raw, change)


# Globals the weights-only unpickler allows, built from a few bytes: 2 GB at once, or minutes of hashing.
BYTEARRAY_OPS = b"cbuiltins\nbytearray\nJ\xff\xff\xff\x7f\x85R"
COUNTER_OPS = b"ccollections\nCounter\n" + BYTEARRAY_OPS + b"\x85R"


def deflated(raw: bytes) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zin.infolist():
            zo.writestr(info.filename, zin.read(info))
    return out.getvalue()


def hostile_checkpoints() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the sentence the user must read)."""
    sd = models.build("small_vgg").state_dict()
    good = {"arch": "small_vgg", "arch_kwargs": {}, "state_dict": sd, "meta": {"dataset": "fashion_mnist"}}
    bomb = "(a decompression bomb)"
    floats = {k: v for k, v in sd.items() if v.is_floating_point()}
    return {
        "bomb_arch.pt": (with_pickle_patch(saved({**good, "arch": "PLACEHOLDER"}), "PLACEHOLDER", bomb_ops()), bomb),
        "bomb_key.pt": (with_pickle_patch(saved({"PLACEHOLDER": torch.zeros(1), **sd}), "PLACEHOLDER", bomb_ops()),
                        bomb),
        "bomb_dataset.pt": (with_pickle_patch(saved({**good, "meta": {"dataset": "PLACEHOLDER"}}), "PLACEHOLDER",
                                              bomb_ops()), bomb),
        "bomb_shallow.pt": (with_pickle_patch(saved({**good, "arch": "PLACEHOLDER"}), "PLACEHOLDER", bomb_ops(18)),
                            "The checkpoint's 'arch' is a tuple, not a text."),
        "width.pt": (saved({**good, "arch_kwargs": {"width": 10**6}}), "has 1,167,093,582 parameters, more than the "
                                                                      "50,000,000 this server accepts"),
        "expand.pt": (saved({"features.0.0.weight": torch.zeros(1).expand(10**9)}),
                      "holds tensors of 3,815 MB once their shared or repeated values are counted as the model will "
                      "hold them, more than the 381 MB"),
        "expand_many.pt": (saved({f"w{i}": torch.zeros(1).expand(10**7) for i in range(12)}),
                           "holds tensors of 420 MB once their shared"),
        "past_storage.pt": (past_storage(saved({"w": torch.zeros(7)})),
                            "rebuilds a tensor of shape [1000000] that reads past the end of its storage of 7 values"),
        "bytearray.pt": (with_pickle_patch(saved({**sd, "PLACEHOLDER": 1}), "PLACEHOLDER", BYTEARRAY_OPS),
                         "builds a 'builtins.bytearray'"),
        "counter.pt": (with_pickle_patch(saved({"meta": "PLACEHOLDER"}), "PLACEHOLDER", COUNTER_OPS),
                       "builds a 'collections.Counter'"),
        "storage.pt": (declared_numel(saved({"w": torch.zeros(1)}), 2**30), "MB of tensors, more than the 381 MB"),
        "deflated.pt": (deflated(saved(good)), "is compressed, which torch.save never does"),
        "complex.pt": (saved({**sd, **{k: v.to(torch.complex64) for k, v in floats.items()}}), "holds complex64 values"),
        "complex_nan.pt": (saved({**sd, "classifier.bias": torch.full((10,), complex(float("nan"), 0))}),
                           "holds complex64 values"),
        "int.pt": (saved({**sd, **{k: v.long() for k, v in floats.items()}}), "holds int64 values"),
        "bool.pt": (saved({**sd, "classifier.bias": torch.ones(10, dtype=torch.bool)}), "holds bool values"),
        "nan_view.pt": (saved({**sd, "classifier.weight": torch.full((1,), float("inf")).expand(10, 512)}),
                        "NaN or infinite"),
        "accuracy_text.pt": (saved({**good, "meta": {"test_accuracy": "high"}}),
                             "The checkpoint's 'meta.test_accuracy' is a str, not a number."),
        "accuracy_nan.pt": (saved({**good, "meta": {"test_accuracy": float("nan")}}), "outside 0 to 1"),
        "in_channels.pt": (saved({**good, "arch_kwargs": {"in_channels": 3},
                                  "state_dict": models.build("small_vgg", in_channels=3).state_dict()}),
                           "does not make a model that takes 1x28x28 inputs"),
        "classes0.pt": (saved({**good, "arch_kwargs": {"num_classes": 0}}), "'arch_kwargs.num_classes' is 0"),
        "classes5.pt": (saved({**good, "arch_kwargs": {"num_classes": 5},
                               "state_dict": models.build("small_vgg", num_classes=5).state_dict()}),
                        "the model gives 5 outputs, but 'fashion_mnist' has 10 classes"),
        "pairs.pt": (saved({**good, "meta": {"dataset": "fashion_mnist_pairs"}}),
                     "does not fit its data set 'fashion_mnist_pairs'"),
        "arch_list.pt": (saved({**good, "arch": ["small_vgg"]}), "The checkpoint's 'arch' is a list, not a text."),
        "kwargs_text.pt": (saved({**good, "arch_kwargs": {"width": "512"}}), "'arch_kwargs.width' is a str"),
        "kwargs_negative.pt": (saved({**good, "arch_kwargs": {"width": -5}}), "'arch_kwargs.width' is -5"),
        "kwargs_list.pt": (saved({**good, "arch_kwargs": [1]}), "'arch_kwargs' is a list, not a dict"),
        "kwargs_unknown.pt": (saved({**good, "arch_kwargs": {"depth": 3}}), "takes no argument 'depth'"),
        "meta_list.pt": (saved({**good, "meta": [1]}), "The checkpoint's 'meta' is a list, not a dict."),
        "dataset_int.pt": (saved({**good, "meta": {"dataset": 7}}), "'meta.dataset' is an int, not a text."),
        "int_keys.pt": (saved({**good, "state_dict": {1: torch.zeros(1)}}), "has a key that is an int"),
        "plain_int_keys.pt": (saved({1: torch.zeros(1)}), "has a key that is an int"),
    }


def test_hostile_checkpoints_are_refused_in_bounded_time_and_memory(tmp_path):
    files = hostile_checkpoints()
    results = refused_in_child(tmp_path, "checkpoint", {n: raw for n, (raw, _) in files.items()},
                               BUNDLED["vgg"].read_bytes())
    assert set(results) == set(files)
    for name, (seconds, grown, message) in results.items():
        assert files[name][1] in message, (name, message)
        assert "\n" not in message and "Traceback" not in message and "/" not in message.split("'")[0], (name, message)
        assert seconds < 3 and grown < 300, (name, seconds, grown)  # the bombs alone would take minutes and GBs


@pytest.mark.parametrize("name", ["bomb_key.pt", "width.pt", "deflated.pt"])
def test_cli_info_refuses_bombs_quickly_with_bounded_memory(tmp_path, name):
    raw, reason = hostile_checkpoints()[name]
    path = tmp_path / name
    path.write_bytes(raw)
    err, status_file = tmp_path / "stderr", tmp_path / "status"
    # The child records its own peak memory (VmHWM of its own address space) as it exits: a fork's
    # rusage would start at this large test process's peak instead.
    child = ("import atexit, runpy, sys; status, target = sys.argv[1:3]; "
             "atexit.register(lambda: open(status, 'w').write(open('/proc/self/status').read())); "
             "sys.argv = ['core', 'info', target]; runpy.run_module('core', run_name='__main__')")
    start = time.perf_counter()
    with open(err, "w") as stderr:
        proc = subprocess.Popen(["sh", "-c", 'ulimit -t 60; exec "$0" "$@"', sys.executable, "-c", child,
                                 str(status_file), str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name}: `info` still running after 90 s")
    message = err.read_text()
    assert code == 2 and reason in message and "Traceback" not in message, message
    peak_kb = int(next(line.split()[1] for line in status_file.read_text().splitlines() if line.startswith("VmHWM")))
    assert peak_kb < 1_500_000, peak_kb  # torch itself and a small model, not gigabytes


def test_pickle_scan_accepts_every_registered_architecture_quickly():
    for arch in models.REGISTRY:
        raw = saved(models.build(arch).state_dict())
        start = time.perf_counter()
        untrusted.check_checkpoint(raw)
        assert time.perf_counter() - start < 0.5, arch
    legacy = io.BytesIO()
    torch.save(models.build("small_vgg").state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert checkpoints.from_bytes(legacy.getvalue()).arch == "small_vgg"  # pre-1.6 files: five pickles, scanned
    legacy_bomb = b"\x80\x02" + bomb_ops() + b"."
    with pytest.raises(checkpoints.CheckpointError, match="decompression bomb"):
        checkpoints.from_bytes(legacy_bomb)
    many = b"\x80\x02]q\x00(" + b"K\x00" * 1_000_000 + b"e."  # 2 MB of instructions: refused at the budget
    start = time.perf_counter()
    with pytest.raises(untrusted.Refused, match="pickle instructions"):
        untrusted.scan_pickle(many)
    assert time.perf_counter() - start < 10


def test_bombs_inside_a_program_are_refused_before_its_reader_unpickles_them():
    program = (ROOT / "checkpoints" / "fmnist_mobilenet.pt2").read_bytes()
    prefix = next(n for n in zipfile.ZipFile(io.BytesIO(program)).namelist() if n.endswith("archive_format"))
    prefix = prefix[: -len("archive_format")]
    nested = with_pickle_patch(saved({"PLACEHOLDER": torch.zeros(1)}), "PLACEHOLDER", bomb_ops())
    for member in (b"\x80\x02}(" + bomb_ops() + b"K\x01u.", nested):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zo:
            for info in zipfile.ZipFile(io.BytesIO(program)).infolist():
                zo.writestr(info, zipfile.ZipFile(io.BytesIO(program)).read(info))
            zo.writestr(prefix + "data/weights/extra", member)
        start = time.perf_counter()
        with pytest.raises(checkpoints.CheckpointError, match="decompression bomb"):
            checkpoints.from_bytes(buf.getvalue())
        assert time.perf_counter() - start < 5
    assert checkpoints.from_bytes(program).arch == "MobileNetish"  # the real program passes the same checks


def test_parameter_budget_comes_from_the_environment(monkeypatch):
    raw = saved({"arch": "small_vgg", "arch_kwargs": {}, "state_dict": models.build("small_vgg").state_dict(),
                 "meta": {}})
    monkeypatch.setenv("PRUNE_EXPLORER_MAX_PARAMS", "100000")
    with pytest.raises(checkpoints.CheckpointError, match="more than the .* this server accepts"):
        checkpoints.from_bytes(raw)
    monkeypatch.delenv("PRUNE_EXPLORER_MAX_PARAMS")
    assert checkpoints.from_bytes(raw).arch == "small_vgg"


def test_ks_range_is_checked_before_the_list_is_built():
    from core.__main__ import parse_ks

    start = time.perf_counter()
    with pytest.raises(ValueError, match="between 0 and 512"):
        parse_ks("0:100000000", 512)
    with pytest.raises(ValueError, match="neither"):
        parse_ks("1" * 5000 + ":2", 512)
    assert time.perf_counter() - start < 0.5
    assert parse_ks("0:513:32", 512)[-1] == 512 and parse_ks("512:-1:-256", 512) == [512, 256, 0]


def test_data_set_that_needs_a_download_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))
    for name in ("mnist", "cifar10", "mnist_pairs"):
        start = time.perf_counter()
        with pytest.raises(data.DataUnavailable, match="was not found"):
            data.check_local(name)
        assert time.perf_counter() - start < 1, name
    data.check_local("fashion_mnist")  # here (the Debian package or the cache)


# ---------------------------------------------------------------------------------------------
# Zips of one's own images

def png(width: int = 28, height: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (min(width, 64), min(height, 64))).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    if (width, height) != (min(width, 64), min(height, 64)):  # only the header claims the size
        raw[16:24] = struct.pack(">II", width, height)
        raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def zipped(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in entries:
            if isinstance(body, zipfile.ZipInfo):
                zf.writestr(body, name)
            else:
                zf.writestr(name, body)
    return buf.getvalue()


def hostile_zips() -> dict[str, tuple[bytes, str]]:
    link = zipfile.ZipInfo("cls/link.png")
    link.external_attr = 0o120777 << 16
    return {
        "empty.zip": (zipped([]), "'empty.zip' holds no images"),
        "text.zip": (zipped([("cls/a.png", b"hello")]), "'cls/a.png' in 'text.zip' is not an image"),
        "symlink.zip": (zipped([("/etc/passwd", link)]), "holds a symbolic link"),
        "wide.zip": (zipped([("cls/a.png", png(15000, 15000))]), "larger than the 16,777,216 pixels per image"),
        "long_name.zip": (zipped([("cls/" + "a" * 300 + ".png", png())]), "a name longer than 200 characters"),
        "clash.zip": (zipped([("cls/a.png", png()), ("cls/a.png/b.png", png())]),
                      "both a file and a folder named 'cls/a.png'"),
        "flat.zip": (zipped([("a.png", png())]), "images outside class folders"),
        "inflates.zip": (zipped([("cls/a.png", bytes(300 * 2**20))]), "unpacks to 300 MB, more than the 200 MB"),
        "many.zip": (zipped([(f"cls/{i}.png", b"") for i in range(10_001)]), "more than the 10,000"),
        "pixels.zip": (zipped([(f"cls/{i}.png", png(4000, 4000)) for i in range(14)]), "more than 200,000,000 pixels"),
        "slip.zip": (zipped([("../../evil.png", png())]), "tries to write outside its folder"),
        "not_a_zip.zip": (b"PK\x03\x04 nothing", "is not a readable zip file"),
        "classes.zip": (zipped([(f"c{i}/a.png", png(1, 1)) for i in range(1001)]),
                        "holds 1,001 class folders, more than the 1,000 this product shows"),
        "index.zip": (zipped([("0_a/a.png", png()), ("99999999999999999999_b/a.png", png())]),
                      "the class folder '99999999999999999999_b' starts with an index of 99999999999999999999; "
                      "indices must be below 1,000"),
    }


def test_images_are_budgeted_at_the_model_size_before_any_is_resized(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))
    folder = data.unpack_zip(zipped([(f"mine/c{i % 2}/{i}.png", png(1, 1)) for i in range(16)]), "tiny.zip")
    assert len(data.load_image_folder(folder, (1, 28, 28), inputs.Preparation((0.5,), (0.5,)))) == 16
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailable, match=r"would take 2,197 MB once its 16 images are resized to the "
                                                   r"model's 1x6000x6000 input, more than the 1,024 MB"):
        data.load_image_folder(folder, (1, 6000, 6000), inputs.Preparation((0.5,), (0.5,)))
    assert time.perf_counter() - start < 2  # refused before 16 images of 6000 x 6000 were made


def test_labels_beyond_the_model_outputs_are_refused_in_one_line(tmp_path):
    for name in ("0_tshirt", "12_extra"):
        (tmp_path / "mine" / name).mkdir(parents=True)
        (tmp_path / "mine" / name / "a.png").write_bytes(png())
    result = cli("rank", str(BUNDLED["vgg"]), "--image-folder", str(tmp_path / "mine"), "--criterion", "taylor",
                 "--out", str(tmp_path / "o.csv"))
    assert result.returncode == 2, result.stderr
    assert "the model gives 10 outputs, but the test images' class folders go up to index 12" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_hostile_zips_are_refused_in_bounded_time_and_memory(tmp_path):
    files = hostile_zips()
    good = zipped([("mine/0_a/1.png", png()), ("mine/1_b/2.png", png())])
    results = refused_in_child(tmp_path, "zip", {n: raw for n, (raw, _) in files.items()}, good)
    for name, (seconds, grown, message) in results.items():
        assert files[name][1] in message, (name, message)
        assert "\n" not in message and str(tmp_path) not in message, (name, message)
        assert seconds < 3 and grown < 300, (name, seconds, grown)
    kept = [p.name for p in (tmp_path / "cache" / "uploads").iterdir()]
    assert kept == [hashlib.sha256(good).hexdigest()[:16]]  # the good zip only: nothing refused is left behind


def test_unpacked_zips_are_reused_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))
    monkeypatch.setenv("PRUNE_EXPLORER_MAX_UNPACKED", "2")
    zips = [zipped([(f"mine/0_a/{i}.png", png()), ("mine/1_b/x.png", png())]) for i in range(3)]
    first = data.unpack_zip(zips[0], "a.zip")
    assert data.unpack_zip(zips[0], "a.zip") == first  # the same zip: the same folder
    time.sleep(0.02)
    data.unpack_zip(zips[1], "b.zip")
    time.sleep(0.02)
    data.unpack_zip(zips[2], "c.zip")
    assert len(list((tmp_path / "uploads").iterdir())) == 2 and not first.exists()  # least recently used removed
    with pytest.raises(data.DataUnavailable, match="no longer on the server; upload the zip again|no longer on the"):
        data.load_image_folder(first, (1, 28, 28), inputs.Preparation((0.5,), (0.5,)))


# ---------------------------------------------------------------------------------------------
# The uploader's session keeps working

def test_session_keeps_working_after_hostile_uploads(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))  # no MNIST here: it must not be downloaded
    files = hostile_checkpoints()
    sd = models.build("small_vgg").state_dict()
    mnist = saved({"arch": "small_vgg", "arch_kwargs": {}, "state_dict": sd, "meta": {"dataset": "mnist"}})
    uploads = [(n, *files[n]) for n in ("bomb_arch.pt", "bomb_dataset.pt", "width.pt", "accuracy_text.pt",
                                        "pairs.pt", "in_channels.pt", "complex.pt")]
    uploads.append(("mnist.pt", mnist, "MNIST was not found"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    for name, raw, reason in uploads:
        start = time.perf_counter()
        at.file_uploader(key="upload").set_value((name, raw, "application/octet-stream")).run()
        assert time.perf_counter() - start < 30, name
        assert not at.exception, (name, at.exception)
        assert any(reason in shown(e.value) for e in at.error), (name, [e.value for e in at.error])
        assert at.selectbox(key="model").value == "fmnist_vgg"
    at.file_uploader(key="upload_images").set_value(("wide.zip", hostile_zips()["wide.zip"][0], "application/zip"))
    at.run()
    assert not at.exception and any("pixels per image" in shown(e.value) for e in at.error), [e.value for e in at.error]
    at.switch_page("app.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model").value == "fmnist_vgg"


@pytest.mark.slow
def test_each_session_keeps_a_bounded_number_of_uploads(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_MAX_SESSION_UPLOADS", "2")
    raw = saved(models.build("small_vgg").state_dict())
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    for i in range(4):
        at.file_uploader(key="upload").set_value((f"mine{i}.pt", raw, "application/octet-stream")).run()
        assert not at.exception and not at.error, (i, at.exception, [e.value for e in at.error])
    assert list(at.session_state["uploads"]) == ["upload: mine2.pt", "upload: mine3.pt"]  # the oldest dropped first


def test_an_unexpected_error_is_one_sentence_and_the_session_goes_on(caplog, monkeypatch):
    """The app's own handler (ui/guard.py): a page that fails shows one sentence with a reference the
    server's log holds beside the traceback; no traceback or path reaches the visitor."""
    monkeypatch.delenv("PRUNE_EXPLORER_PROPAGATE_ERRORS")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.session_state["k"] = "not a number"  # stands for any bug: the page compares it with an int
    at.run()
    assert not at.exception, at.exception
    (error,) = [e.value for e in at.error]
    ref = re.search(r"reference ([0-9a-f]{8}) in the server's log", error).group(1)
    assert error.endswith("Your session keeps its model and settings: change a setting, open another page, or "
                          "reload.") and "/" not in error.replace("server's log", "")
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)
    at.session_state["k"] = 5
    at.run()
    assert not at.exception and not at.error
    assert at.selectbox(key="model").value == "fmnist_vgg"


@pytest.mark.parametrize("query, k", [
    ({"k": "²"}, 0), ({"k": "1" * 5000}, 0), ({"k": "-3"}, 0), ({"k": "99999"}, 512),  # K clamped to the channels
    ({"layer": "nope"}, 0), ({"model": "../../etc/passwd"}, 0), ({"criterion": "__class__", "mode": "x"}, 0),
    ({"present": "<script>alert(1)</script>"}, 0),
])
def test_hostile_url_values_open_the_default_view(query, k):
    """A link is typed by anyone: every value the URL carries is checked before it is used; an unknown
    one falls back to the default, and the page states an accuracy as usual."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for name, value in query.items():
        at.query_params[name] = value
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="model").value == "fmnist_vgg"
    layer = at.selectbox(key="layer")
    assert layer.index == len(layer.options) - 1  # the last conv, the default
    assert (at.selectbox(key="criterion").value, at.radio(key="mode").value) == ("mean", "zero")
    assert at.toggle(key="present").value is False
    assert any(c.value.startswith(f"Test accuracy at K = {k}: ") for c in at.caption), [c.value for c in at.caption]


@pytest.mark.slow
def test_the_warm_up_skips_rules_a_model_refuses_and_warms_the_rest(tmp_path, monkeypatch):
    """The pair model's last conv has no batch norm, so bn_gamma refuses it: the background warm-up
    must go on to the other rules (and models) instead of dying on that refusal; its oracle orders
    and its sensitivity map end in the engine store, where a page (or another process) reads them."""
    from core import checkpoints, criteria, engine, oracle, sensitivity, store
    from ui import catalogue, choices, engines

    monkeypatch.setenv("PRUNE_EXPLORER_DISK_CACHE_GB", "1")
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))

    ckpt = checkpoints.load(ROOT / "checkpoints" / "fmnist_pair_cnn.pt")
    layer = catalogue.conv_layers(ckpt)[-1].name
    key = (ckpt.digest, ckpt.dataset, layer, "cpu")
    engines.engine_cache()._engines.pop(key, None)  # built by an earlier test without the store: made here
    warmer = engines._Warmer()
    warmer.SENSITIVITY_FRACTIONS = (0.0, 0.5)  # the map's cost is not this test's subject: two columns of it
    assert warmer.status() is None
    warmer._run([(key, ckpt, "cpu")])  # raised ValueError from bn_gamma before
    eng = engines.engine_cache().lookup(key)
    assert eng is not None and eng.bn_name is None and eng.path == engine.PATH_FAST
    warmed = {name for name in criteria.CRITERIA if name != "bn_gamma"}  # Taylor's backward pass included
    assert all(eng.answers(mode, name) and len(eng.answers(mode, name)) == eng.channels + 1
               for name in warmed for mode in engine.MODES)
    steps = 1 + len(criteria.CRITERIA) + 2  # the pass, each rule, the oracles, the sensitivity map
    kept = store.default()
    again = engine.from_checkpoint(ckpt, layer=layer, device="cpu", store=kept)
    assert again.restored and all(again.known(k, "remove", "random:19") is not None for k in (0, eng.channels))
    assert oracle.why_not_exact(eng, "zero")  # two branches meet after the layer: the coarse oracle is warmed
    with monkeypatch.context() as m:  # read back, never made again
        m.setattr(oracle, "sampled_single", lambda *a, **kw: pytest.fail("the coarse oracle was made again"))
        found = oracle.chosen(again, "sampled", "zero")
    assert found == oracle.sampled_single(eng, "zero")  # what it reads back is what the search finds
    rows = sensitivity.read_back(kept, sensitivity.store_key(ckpt, choices.DEFAULT_CRITERION, choices.DEFAULT_MODE,
                                                             (0.0, 0.5), "cpu"))
    assert rows and {r.layer for r in rows} == {info.name for info in catalogue.conv_layers(ckpt)}
    assert warmer.status() == f"Ready: every bundled model, criterion, mode, oracle and sensitivity map prepared ({steps} steps)."


@pytest.mark.slow
def test_a_sessions_own_engines_are_released_when_the_session_ends(monkeypatch):
    import gc

    from ui import engines

    raw = saved({"arch": "small_vgg", "arch_kwargs": {}, "state_dict": models.build("small_vgg").state_dict(),
                 "meta": {"dataset": "fashion_mnist"}})
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/1_load.py").run()
    at.file_uploader(key="upload").set_value(("mine.pt", raw, "application/octet-stream")).run()
    at.switch_page("app.py").run()
    assert not at.exception and at.selectbox(key="model").value == "upload: mine.pt", at.exception
    cache = engines.engine_cache()
    own = [key for key in list(cache._engines) if key[0] == checkpoints.from_bytes(raw, "mine.pt").digest]
    assert len(own) == 1 and cache.lookup(own[0]) is not None
    gc.collect()  # earlier tests' sessions end now, releasing their own models: not this test's subject
    shared = [key for key in list(cache._engines) if key not in own]
    del at  # the session ends: Streamlit drops its state
    gc.collect()
    assert cache.lookup(own[0]) is None, "the session's own engine outlived it"
    assert all(cache.lookup(key) is not None for key in shared)  # the bundled models' engines stay


def test_the_sidebar_shows_the_warm_up_line_until_ready():
    from ui import engines

    warmer = engines._warmer()  # the server's one warm-up (off in the tests): its counters set by hand
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    try:
        warmer.steps, warmer.done, warmer.label = 10, 3, "fmnist_resnet: APoZ (share of zeros)"
        at.run()
        assert not at.exception, at.exception
        assert "Preparing the lecture: step 3 of 10, fmnist_resnet: APoZ (share of zeros)" in \
            [c.value for c in at.sidebar.caption]
        warmer.done = 10
        at.run()
        assert "Ready: every bundled model, criterion, mode, oracle and sensitivity map prepared (10 steps)." in \
            [c.value for c in at.sidebar.caption]
    finally:
        warmer.steps = warmer.done = 0
