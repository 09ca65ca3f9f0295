import atexit
import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, engine  # noqa: E402

BUNDLED = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt"}

# `./run test` runs two pytest workers (pytest-xdist), one per core: each then computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# Uploads and downloads go to a cache of this test run's own (workers must not prune each other's uploads,
# and a developer's cache is left alone); the browser tests' servers inherit it.
os.environ["PRUNE_EXPLORER_CACHE"] = _CACHE = tempfile.mkdtemp(prefix="prune-explorer-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# A page's unexpected error reaches the test (AppTest's `exception`, the browser's error box) instead of
# ui/guard.py's sentence; the test of that sentence unsets it.
os.environ["PRUNE_EXPLORER_PROPAGATE_ERRORS"] = "1"
# No background warm-up of the bundled models in the tests' servers and AppTest runs: a test that
# times a page must not share the CPU with it (the warm-up's own test runs it directly).
os.environ.setdefault("PRUNE_EXPLORER_WARM", "0")
# No engine kept on disk (core/store.py) unless a test asks for it: each test makes the pass it checks,
# and no test writes hundreds of megabytes it never reads (tests/test_store.py turns it on).
os.environ["PRUNE_EXPLORER_DISK_CACHE_GB"] = "0"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args) -> CliResult:
    """`python -m core ARGS` run in this process: the CLI's own parser, commands and error handling
    (`core.__main__.main`), without starting Python and importing torch again. Paths are taken as
    given (pass absolute ones). tests/test_cli.py also runs the CLI as a real child process."""
    from core.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


_FULL_ENGINES: dict[tuple[str, str | None], engine.Engine] = {}


def full_engine(path, layer: str | None = None) -> engine.Engine:
    """The engine of a checkpoint file at a layer (None: the last conv) on its whole test set, built once
    per test session and shared: an engine is read-only once built (its memos only grow), as the app's
    shared cache relies on too. Tests that need a fresh engine build their own."""
    key = (str(path), layer)
    if key not in _FULL_ENGINES:
        _FULL_ENGINES[key] = engine.from_checkpoint(checkpoints.load(path), layer=layer, device="cpu")
    return _FULL_ENGINES[key]


_TRAINING_ENGINES: dict[tuple[str, str], engine.Engine] = {}


def training_engine(ckpt, eng: engine.Engine) -> engine.Engine:
    """`oracle.training_engine` (the last 10,000 training images at eng's layer), built once per session."""
    from core import oracle

    key = (ckpt.digest, eng.layer)
    if key not in _TRAINING_ENGINES:
        _TRAINING_ENGINES[key] = oracle.training_engine(ckpt, eng)
    return _TRAINING_ENGINES[key]


@pytest.fixture(scope="session")
def app_engines():
    """The app's shared engine cache given this session's full engines of the bundled .pt models, under
    the keys the pages use, as the warm-up would do: a page's first run then finds them ready, and the
    tests and the pages share one set of curves. (Engines are read-only, so sharing changes no number.)"""
    from ui import catalogue, engines

    cache = engines.engine_cache()
    for name, ckpt in catalogue.bundled_checkpoints().items():
        path = ROOT / "checkpoints" / f"{name}.pt"
        if path.exists() and catalogue.conv_layers(ckpt):
            cache.get(engines.make_key(ckpt, ckpt.dataset, None, "cpu"), lambda: full_engine(path))
    return cache


@pytest.fixture(scope="session", params=sorted(BUNDLED))
def bundled(request):
    """(checkpoint, engine on the full 10,000-image test set) for each bundled model."""
    return checkpoints.load(BUNDLED[request.param]), full_engine(BUNDLED[request.param])


# -- tiers: `./run check` runs every test not marked slow (pytest.ini); `./run test` runs them all ----
# A test is slow when it needs a full 10,000-image engine of a bundled model or a Streamlit run of a
# page (these fixtures), drives a real browser (these modules), or is marked `@pytest.mark.slow`
# itself (a long check: over about 4 s on two cores; `--durations` shows them).
SLOW_FIXTURES = {"bundled", "app", "app_engines", "vgg_engine", "bundled_programs", "student", "pair_engine"}
SLOW_MODULES = {"test_browser.py", "test_app.py", "test_replicas.py", "test_compress_page.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


SUBSET = 2000  # images: where the full test set adds nothing but time (a check image by image, not a count)


def subset_engine(ckpt, layer: str | None = None, n: int = SUBSET) -> engine.Engine:
    """The engine of a checkpoint on the first n images of its test set (its own preparation and task)."""
    split = ckpt.split()
    return engine.from_checkpoint(ckpt, layer, device="cpu", split=dataclasses.replace(split, x=split.x[:n], y=split.y[:n]))


def assert_equals_naive(eng: engine.Engine, criterion: str = "mean") -> None:
    """The engine against the naive procedure (copy the model, zero the weights, evaluate): over the whole
    test set at K = 0 and K = P/2 in both modes (K = 0 prunes nothing, so one naive pass serves both), and
    image by image on the first 2,000 images at K = 1, P - 1 and P, in the naive pass's own batches.
    Each full-set naive pass costs a pass of the whole model over every image; this is one per model and
    mode, and the edges of the range, where a fast path's special cases live, are still checked exactly."""
    from core.naive import naive_correct, prune_copy
    from core.tasks import predictions

    p = eng.channels
    base = naive_correct(eng, 0, "zero", criterion)
    n = min(SUBSET, eng.total)
    for mode in engine.MODES:
        assert eng.correct(0, mode, criterion) == base, (mode, 0)
        assert eng.correct(p // 2, mode, criterion) == naive_correct(eng, p // 2, mode, criterion), (mode, p // 2)
        for k in (1, p - 1, p):
            pruned = prune_copy(eng.model, eng.layer, eng.ranking(criterion)[:k].tolist(), mode, eng.bn_name)
            with torch.no_grad():
                want = torch.cat([predictions(pruned(eng.x[i:i + eng.batch_size].to(eng.device)), eng.task).cpu()
                                  for i in range(0, n, eng.batch_size)])[:n]
            assert torch.equal(eng.predictions(k, mode, criterion)[:n], want), (mode, k)


def write_idx(path: Path, array) -> None:
    """An IDX file (the MNIST format): zero bytes, the unsigned-byte type, the dimensions, the values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype("uint8").tobytes())


@pytest.fixture(scope="session")
def fmnist_subset(tmp_path_factory) -> Path:
    """A --data-root holding the first 2,000 Fashion-MNIST test images and labels, in the real files'
    format, cut from the real files: the CLI then runs as a user runs it, at a fifth of the cost."""
    from core import data

    root = tmp_path_factory.mktemp("fmnist_subset")
    for path in data.locate("fashion_mnist", train=False):
        name = path.name.removesuffix(".gz")
        write_idx(root / name, data.read_idx(path)[:SUBSET])
    return root


# Hostile files are read in a child process: its address space is limited, its time and memory measured.
CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from core import checkpoints, data, inputs
torch.set_num_threads(1)
def read(path):
    raw = open(path, "rb").read()
    if sys.argv[2] == "zip":
        return data.load_image_folder(data.unpack_zip(raw, os.path.basename(path)), (1, 28, 28), inputs.Preparation((0.5,), (0.5,)))
    return checkpoints.from_bytes(raw, os.path.basename(path))
read(sys.argv[3])  # warm up on a good file: imports, first allocations
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (3 << 30), resource.RLIM_INFINITY))  # never the machine's memory
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
base = peak()
for path in sys.argv[4:]:
    start, message = time.perf_counter(), "ACCEPTED"
    try:
        read(path)
    except (checkpoints.CheckpointError, data.DataUnavailable) as exc:
        message = str(exc)
    except BaseException as exc:
        message = "CRASH " + type(exc).__name__ + ": " + str(exc)[:200]
    print(json.dumps([os.path.basename(path), time.perf_counter() - start, peak() - base, message]), flush=True)
"""


def refused_in_child(tmp_path, kind: str, files: dict[str, bytes], good: bytes) -> dict[str, tuple[float, int, str]]:
    """Each file read in one child process with an address-space limit: name -> (seconds, MB grown, message)."""
    folder = tmp_path / f"in_{kind}"
    folder.mkdir()
    for name, raw in {"good": good, **files}.items():
        (folder / name).write_bytes(raw)
    env = {**os.environ, "PRUNE_EXPLORER_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), kind, str(folder / "good"),
                          *[str(folder / n) for n in files]], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return {name: (seconds, grown, message) for name, seconds, grown, message in map(json.loads, res.stdout.split("\n")[:-1])}


def shown(markdown: str) -> str:
    """What a reader sees of a markdown body the app escaped (`ui.words.plain`): escapes and the
    invisible breaks that keep bare addresses unlinked removed."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown).replace("\u200b", "")
