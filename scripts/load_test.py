"""Load under a class: N browser sessions move the Prune page's slider while one more uploads hostile files.

A benchmark, not a test: it starts the app (`streamlit run app.py`) on a free port, opens N headless
chromium pages (Debian's chromium, driven by playwright, as in tests/test_browser.py) on the bundled
models, and in each presses the slider's keys (End, Home, PageUp/PageDown, arrows) at random,
timing each release until the server's sentence "Test accuracy at K = ...: ..." shows that K, and
checking the accuracy it states against the engine computed here. Meanwhile one more page uploads
every hostile checkpoint of tests/test_robustness.py on the Load page and times each refusal. It
reports the slider's median and 95th-percentile response, the refusals' times, the server's peak
memory (VmHWM) and whether every answer was exact; exit status 1 on any wrong answer.

    .venv/bin/python scripts/load_test.py --sessions 4 --rounds 15
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CHROMIUM = "/usr/bin/chromium"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
SLIDER = {"role": "slider", "name": "Channels pruned (K)"}
MODELS = {"fmnist_vgg": "fmnist_vgg.pt", "fmnist_resnet": "fmnist_resnet.pt"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, cache: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PRUNE_EXPLORER_CACHE": cache})
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("streamlit did not start")


def memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def settle(page, timeout=300_000):
    await page.wait_for_selector("[data-testid='stApp']", timeout=timeout)
    await page.wait_for_timeout(300)
    await page.wait_for_selector(IDLE, timeout=timeout)


async def stated(page, k: int, timeout=120_000) -> str:
    """Wait until the server states K's accuracy; returns the sentence."""
    handle = await page.wait_for_function(
        "k => { const e = [...document.querySelectorAll('[data-testid=stCaptionContainer]')]"
        ".find(e => e.innerText.startsWith(`Test accuracy at K = ${k}:`)); return e ? e.innerText : null; }",
        arg=k, timeout=timeout)
    return await handle.json_value()


async def slider_session(browser, url: str, model: str, rounds: int, truth: dict, seed: int, out: dict,
                         delay: float = 0.0):
    await asyncio.sleep(delay)  # students open the page over some seconds, not in the same millisecond
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    await page.goto(f"{url}/?model={model}", timeout=300_000)
    await settle(page)
    slider = page.get_by_role(**SLIDER)
    await slider.wait_for(timeout=300_000)
    rng = random.Random(seed)
    for _ in range(rounds):
        before = int(await slider.input_value())
        last = len(truth[model]) - 1  # every key moves K: none is lost at either end
        keys = ["PageUp", "ArrowRight", "End"] if before == 0 else ["PageDown", "ArrowLeft", "Home"] \
            if before == last else ["End", "Home", "PageUp", "PageDown", "ArrowRight", "ArrowLeft"]
        await slider.focus()
        start = time.perf_counter()
        await slider.press(rng.choice(keys))
        k = int(await slider.input_value())
        if k == before:
            continue
        text = await stated(page, k)
        out["times"].append(time.perf_counter() - start)
        shown = re.search(r"([0-9.]+)%", text.split(":", 1)[1]).group(1)
        if f"{truth[model][k] * 100:.2f}" != shown:
            out["wrong"].append((model, k, shown, truth[model][k]))
        await page.wait_for_timeout(rng.randint(100, 600))  # a student thinking
    await context.close()


async def hostile_session(browser, url: str, files: dict, out: dict):
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{url}/load")
    await settle(page)
    folder = Path(tempfile.mkdtemp())
    for name, (raw, reason) in files.items():
        path = folder / name
        path.write_bytes(raw)
        start = time.perf_counter()
        await page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(str(path))
        try:
            await page.wait_for_function(
                "r => [...document.querySelectorAll('[data-testid=stAlertContentError]')]"
                ".some(e => e.innerText.includes(r))", arg=reason, timeout=120_000)
            out["refusals"].append((name, time.perf_counter() - start))
        except Exception:  # noqa: BLE001 - reported, not fatal
            out["missed"].append(name)
        await page.wait_for_selector(IDLE, timeout=120_000)
    await context.close()


async def run(args, url: str, truth: dict, files: dict) -> dict:
    from playwright.async_api import async_playwright

    out = {"times": [], "wrong": [], "refusals": [], "missed": []}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        sessions = [slider_session(browser, url, list(MODELS)[i % len(MODELS)], args.rounds, truth, i, out,
                                   i * args.stagger) for i in range(args.sessions)]
        await asyncio.gather(*sessions, hostile_session(browser, url, files, out))
        await browser.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15, help="slider moves per session")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between two sessions' first visits")
    args = parser.parse_args()

    from core import checkpoints, engine
    from test_robustness import hostile_checkpoints

    truth = {}
    for model, file in MODELS.items():  # the exact accuracies, computed here
        eng = engine.from_checkpoint(checkpoints.load(ROOT / "checkpoints" / file), device="cpu")
        truth[model] = [c / eng.total for c in eng.curve("zero")]
    files = {n: v for n, v in hostile_checkpoints().items()
             if n in ("bomb_arch.pt", "bomb_key.pt", "bomb_dataset.pt", "width.pt", "expand.pt", "storage.pt",
                      "deflated.pt", "complex.pt", "accuracy_text.pt", "pairs.pt", "in_channels.pt")}
    port = free_port()
    server = start_server(port, tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        out = asyncio.run(run(args, f"http://127.0.0.1:{port}", truth, files))
        wall = time.perf_counter() - start
        peak = memory_mb(server.pid, "VmHWM")
        alive = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).read() == b"ok"
    finally:
        server.terminate()
        server.wait(timeout=30)
    times = sorted(out["times"])
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))] if times else float("nan")
    print(f"{args.sessions} slider sessions x {args.rounds} moves + 1 session uploading {len(files)} hostile files, "
          f"{wall:.0f} s, {os.cpu_count()} CPU cores")
    print(f"slider: {len(times)} answers, median {statistics.median(times) if times else float('nan'):.2f} s, "
          f"95th percentile {p95:.2f} s, max {max(times, default=float('nan')):.2f} s; "
          f"exact: {not out['wrong']} {out['wrong'][:3] if out['wrong'] else ''}")
    refusals = ", ".join(f"{n} {s:.1f} s" for n, s in out["refusals"])
    print(f"hostile uploads refused: {len(out['refusals'])}/{len(files)} ({refusals}); missed: {out['missed']}")
    print(f"server peak memory (VmHWM): {peak:,.0f} MB; health endpoint answering at the end: {alive}")
    return 1 if out["wrong"] or out["missed"] or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
