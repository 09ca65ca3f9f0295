"""The longest wait per control, in a real browser, once the warm-up is done (the lecture's 2 s).

A benchmark, not a test: it starts the app on a free port with the engine store of
PRUNE_EXPLORER_CACHE (by default the usual one, so that a second run reads everything back), opens
the Prune page in Debian's chromium at 1280x720, and waits until the sidebar's status line says
"Ready". Then, as a lecturer clicks through a lecture: every bundled model, and on the default model
every rule and both modes, then every page. Each change is timed from the click until Streamlit says
the page has finished running (its elements are greyed until then). It prints every wait, the longest
per control and whether it is within --limit seconds (exit status 1 where one is not).

    .venv/bin/python scripts/bench_controls.py                 # 2 idle cores: see docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from serve_replicas import free_port, start_replica  # noqa: E402

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CHROMIUM = "/usr/bin/chromium"


def settle(page, timeout: float = 600_000) -> None:
    page.wait_for_timeout(150)  # the click's rerun has started
    page.wait_for_selector(IDLE, timeout=timeout)


def timed(page, action) -> float:
    start = time.perf_counter()
    action()
    settle(page)
    return time.perf_counter() - start


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the sidebar's selectbox labelled `label`, as a mouse does."""
    combo = page.locator("[data-testid='stSidebar']").get_by_role("combobox", name=label)
    combo.click()
    if combo.get_attribute("aria-expanded") != "true":  # focused but closed (just after another choice)
        combo.press("ArrowDown")
    page.get_by_role("option").filter(has_text=option).first.click()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=2.0, help="seconds a control may grey the page")
    parser.add_argument("--ready-timeout", type=float, default=3600, help="seconds to wait for the warm-up")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from core import criteria
    from ui import catalogue

    models = [m for m, c in catalogue.bundled_checkpoints().items() if catalogue.conv_layers(c)]
    port = free_port()
    from core.data import cache_dir

    proc = start_replica(port, str(cache_dir()), Path(os.devnull))  # the usual engine store, its warm-up on
    url = f"http://127.0.0.1:{port}"
    waits: list[tuple[str, str, float]] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            start = time.perf_counter()
            page.goto(url)
            page.get_by_text("Ready:").first.wait_for(timeout=args.ready_timeout * 1000)
            print(f"warm-up ready {time.perf_counter() - start:.0f} s after the first visit", flush=True)
            settle(page)
            order = [m for m in models if m != catalogue.DEFAULT_MODEL] + [catalogue.DEFAULT_MODEL]
            for model in order:  # every model, ending on the default one (where the rules and modes are clicked)
                waits.append(("model", model, timed(page, lambda: choose(page, "Checkpoint", model))))
            for name, rule in list(criteria.CRITERIA.items())[1:] + list(criteria.CRITERIA.items())[:1]:
                waits.append(("rule", name, timed(page, lambda: choose(page, "Rank channels by", rule.label))))
            for mode in ("remove", "zero"):
                waits.append(("mode", mode, timed(page, lambda: page.locator("[data-testid='stSidebar']").get_by_text(
                    mode, exact=True).click())))
            from ui import sidebar

            for target in sidebar.PAGES[1:] + sidebar.PAGES[:1]:
                waits.append(("page", target.title, timed(page, lambda: page.locator("[data-testid='stSidebar']")
                                                          .get_by_role("link", name=target.title).click())))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{os.cpu_count()} CPU cores; each wait: from the click until the page finished running")
    for control, value, seconds in waits:
        print(f"  {control:6s} {value:28s} {seconds:6.2f} s")
    worst = {}
    for control, value, seconds in waits:
        if seconds > worst.get(control, ("", 0.0))[1]:
            worst[control] = (value, seconds)
    print("longest wait per control: " + "; ".join(f"{c} {s:.2f} s ({v})" for c, (v, s) in worst.items())
          + f"; target {args.limit:g} s: {'met' if all(s <= args.limit for _, s in worst.values()) else 'MISSED'}")
    return 0 if all(s <= args.limit for _, s in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
