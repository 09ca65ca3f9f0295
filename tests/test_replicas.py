"""The deployment for a big class (scripts/serve_replicas.py): two Streamlit processes behind Debian's
nginx, sticky by cookie, sharing one engine store. A real browser through the proxy."""
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED, ROOT, full_engine
from test_browser import CHROMIUM, SLIDER, settle

sys.path.insert(0, str(ROOT / "scripts"))
import serve_replicas  # noqa: E402

pytestmark = pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
                                or not Path(CHROMIUM).exists(),
                                reason="needs Debian's nginx and chromium (./run test installs them)")


def test_the_printed_config_is_one_nginx_accepts(tmp_path):
    import subprocess

    conf = tmp_path / "nginx.conf"
    conf.write_text(serve_replicas.nginx_conf("127.0.0.1:8599", ["127.0.0.1:8501", "127.0.0.1:8502"], tmp_path))
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / kind).mkdir()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    checked = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_two_replicas_behind_nginx_share_the_engine_store_and_keep_each_browser_on_one(tmp_path, monkeypatch):
    """A browser through the proxy gets its replica's cookie and stays there (its websocket and its upload
    reach the same process); the first replica to show a bundled model makes its pass and stores it; the
    other replica reads it back from the shared store, and both state the exact accuracy."""
    from playwright.sync_api import sync_playwright

    truth = full_engine(BUNDLED["vgg"])
    monkeypatch.setenv("PRUNE_EXPLORER_DISK_CACHE_GB", "1")  # the tests turn the store off; the replicas need it
    with serve_replicas.Deployment(2, cache=str(tmp_path / "cache"), warm=False, workdir=tmp_path / "run") as dep, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        served, routes = {}, set()
        for attempt in range(12):  # each new browser gets a random route: soon one lands on each replica
            context = browser.new_context(viewport={"width": 1280, "height": 720})
            page = context.new_page()
            page.goto(dep.url + "/?k=300")
            settle(page)
            page.get_by_role(**SLIDER).wait_for(timeout=240_000)
            text = page.locator("[data-testid='stCaptionContainer']", has_text="Test accuracy at K =").first.inner_text()
            assert f"Test accuracy at K = 300: {truth.correct(300) / 1e4:.2%}" in text, text
            cookie = next(c["value"] for c in context.cookies() if c["name"] == serve_replicas.COOKIE)
            routes.add(cookie)
            page.reload()  # the same browser again: the same route, the same replica
            settle(page)
            assert next(c["value"] for c in context.cookies() if c["name"] == serve_replicas.COOKIE) == cookie
            logs = [log.read_text(errors="replace") for log in dep.logs]
            served = {i for i, text in enumerate(logs) if "fmnist_vgg, layer features.6.0" in text}
            if len(served) == 2:
                break
            context.close()
        assert served == {0, 1}, f"every browser went to the same replica ({len(routes)} routes)"
        made = [len(re.findall(r"fmnist_vgg, layer features.6.0: one pass", text)) for text in logs]
        read = [len(re.findall(r"fmnist_vgg, layer features.6.0: read back from the engine store", text))
                for text in logs]
        assert sorted(made) == [0, 1] and sorted(read) == [0, 1], (made, read)  # made once, read by the other

        upload = context.new_page()  # an upload through the proxy reaches the session's own replica
        upload.goto(dep.url + "/load")
        settle(upload)
        upload.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(str(BUNDLED["vgg"]))
        settle(upload)
        upload.wait_for_timeout(1000)
        settle(upload)
        assert not upload.locator("[data-testid='stAlertContentError']").count()
        chosen = upload.evaluate("() => [...document.querySelectorAll('[data-testid=stSidebar] [data-testid=stSelectbox] "
                                 "*')].map(e => e.value || e.textContent).join(' | ')")
        assert "upload: fmnist_vgg.pt" in chosen, chosen  # the session's own model, on its own replica
        browser.close()
