"""A real browser (Debian's chromium, driven by playwright) against the app served on localhost."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BUNDLED, ROOT
from core import checkpoints, engine

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (./run test installs it)")
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + proc.stdout.read().decode(errors="replace")[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def settle(page, timeout=240_000):
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout)
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=timeout)


def metric_value(page, label: str) -> str:
    box = page.locator("[data-testid='stMetric']", has_text=label).first
    return box.locator("[data-testid='stMetricValue']").inner_text().strip()


def test_slider_in_a_real_browser_matches_the_engine(server, browser, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(server)
    settle(page)
    page.wait_for_selector("text=Channels pruned (K)", timeout=240_000)
    eng = engine.from_checkpoint(checkpoints.load(BUNDLED["vgg"]), device="cpu")
    assert metric_value(page, "Test accuracy") == f"{eng.correct(0) / 1e4:.2%}"

    thumb = page.locator("[data-testid='stSlider'] input[type='range']").first
    thumb.focus()
    thumb.press("End")  # K = 512
    for _ in range(32):  # back to K = 480
        thumb.press("ArrowLeft")
    page.wait_for_timeout(1500)
    settle(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stMetricValue]')].some(e => e.innerText.includes('of 512'))")
    assert thumb.input_value() == "480"
    expected = f"{eng.correct(480) / 1e4:.2%}"
    page.wait_for_function(
        f"() => [...document.querySelectorAll('[data-testid=stMetricValue]')].some(e => e.innerText === '{expected}')",
        timeout=30_000)
    assert metric_value(page, "Test accuracy") == expected
    assert metric_value(page, "Channels left") == "32 of 512"
    assert "k=480" in page.url
    page.screenshot(path=str(shots / "prune.png"), full_page=True)

    for path, marker in (("load", "Load a model"), ("feature_maps", "Averaged feature maps"),
                         ("curve", "Accuracy vs channels pruned"), ("magnitude", "Magnitude pruning with retraining")):
        page.goto(f"{server}/{path}")
        settle(page)
        page.wait_for_selector(f"text={marker}", timeout=240_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(shots / f"{path}.png"), full_page=True)
    assert sorted(p.name for p in shots.iterdir()) == ["curve.png", "feature_maps.png", "load.png", "magnitude.png",
                                                       "prune.png"]
    print(f"screenshots in {shots}")
