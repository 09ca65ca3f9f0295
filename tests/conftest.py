import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, engine  # noqa: E402

BUNDLED = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt"}

torch.set_num_threads(2)
# A page's unexpected error reaches the test (AppTest's `exception`, the browser's error box) instead of
# ui/guard.py's sentence; the test of that sentence unsets it.
os.environ["PRUNE_EXPLORER_PROPAGATE_ERRORS"] = "1"
# No background warm-up of the bundled models in the tests' servers and AppTest runs: a test that
# times a page must not share the CPU with it (the warm-up's own test runs it directly).
os.environ.setdefault("PRUNE_EXPLORER_WARM", "0")


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
SLOW_MODULES = {"test_browser.py", "test_app.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
