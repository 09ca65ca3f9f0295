"""Load under a class: N sessions move the Prune page's slider while one more uploads hostile files.

A benchmark, not a test. It starts the app (`streamlit run app.py`) on a free port. Each session is
one browser tab as the server sees it: it speaks Streamlit's websocket protocol (`/_stcore/stream`,
Streamlit's own protobuf messages), without drawing anything, so thirty of them fit beside the
server on a small machine where thirty chromium tabs do not.
- A slider session opens the Prune page on a bundled model, then releases the slider at a random K,
  sending the trigger the live slider sends on release (`setTriggerValue("k", K)` in
  assets/live_slider.js, the component's "events" widget), and times the server's answer: until
  the caption "Test accuracy at K = ...: ..." for that K has arrived and the run has finished. It
  checks the stated accuracy against the engine computed here, thinks for a while, and moves again.
  Like a student waiting for the answer, it sends one release at a time.
- The hostile session opens the Prune page on the ResNet-style model, then uploads each hostile
  checkpoint and image zip of tests/test_robustness.py, and the files that froze or filled the
  server before (tests/test_hostile_programs.py's `worst_files`), on the Load page as the browser does (a file-URL request,
  an HTTP PUT, then the uploader's widget state). It times each refusal until its sentence arrives,
  and checks that its Prune page still states the accuracy of the model it had.
An exception element or the app's error sentence (ui/guard.py) sent to any session, a session that
fails or waits more than ten minutes for a run, counts as a failure. The clients run in this
process, on the same machine as the server: on a small machine their own CPU is part of the
measured time. It reports the slider's median and
95th-percentile response, the refusals' times, the server's peak memory (VmHWM) and whether every
answer was exact; exit status 1 on a wrong answer, a missed refusal or an exception.

    .venv/bin/python scripts/load_test.py --sessions 30 --rounds 20
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import websockets
from streamlit.components.v2.bidi_component.main import _make_trigger_id  # the browser's id for a trigger
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from serve_replicas import COOKIE, Deployment, free_port, start_replica  # noqa: E402  (after the paths)

# The servers' environment, as it is before main() imports the tests' helpers: tests/conftest.py turns
# the engine store and the warm-up off and makes errors propagate, for the test process only.
SERVER_ENV = dict(os.environ)
MODELS = {"fmnist_vgg": "fmnist_vgg.pt", "fmnist_resnet": "fmnist_resnet.pt"}
GUARD = "Something went wrong on this page"  # ui/guard.py's sentence for an unexpected error
RUN_LIMIT = 600  # seconds a session waits for one run before it counts as failed
STATED = re.compile(r"Test accuracy at K = (\d+): \*\*([0-9.]+)%\*\*")
HOSTILE = ("bomb_arch.pt", "bomb_key.pt", "bomb_dataset.pt", "width.pt", "expand.pt", "storage.pt", "deflated.pt",
           "complex.pt", "accuracy_text.pt", "pairs.pt", "in_channels.pt")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


IDLE_LIMIT = 1200  # seconds the lecturer waits at most for the warm-up


def wait_until_idle(pid: int, limit: float = IDLE_LIMIT, window: float = 5, below: float = 0.1) -> float:
    """Seconds until the server used less than `below` of one core over `window` seconds: its
    background warm-up of the bundled models is done."""
    start = time.perf_counter()
    used = cpu_seconds(pid)
    while time.perf_counter() - start < limit:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - used < below * window:
            break
        used = now
    return time.perf_counter() - start


def memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Tab:
    """One browser tab as the server sees it: rerun requests with widget states go out, the page's
    elements come back, one run at a time."""

    def __init__(self, url: str):
        self.url = url
        self.route = uuid.uuid4().hex  # behind the replicas' proxy: this tab's sticky route (scripts/serve_replicas.py)
        self.ws = None
        self.session_id = ""
        self.pages: dict[str, str] = {}  # URL path -> page script hash ("" is the Prune page)
        self.widgets: dict[str, str] = {}  # element kind or label -> widget id
        self.exceptions: list[str] = []

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url.replace("http", "ws", 1) + "/_stcore/stream",
                                           subprotocols=["streamlit"], max_size=None, open_timeout=300,
                                           ping_interval=None,  # a browser sends no pings
                                           additional_headers={"Cookie": f"{COOKIE}={self.route}"})

    async def close(self) -> None:
        await self.ws.close()

    async def run(self, page: str = "", query: str = "", states: list | None = None) -> list[str]:
        """Ask for a run of `page` with these widget states; returns the text of its captions,
        markdown and alerts once the run has finished."""
        msg = BackMsg()
        msg.rerun_script.query_string = query
        if page in self.pages:
            msg.rerun_script.page_script_hash = self.pages[page]
        else:
            msg.rerun_script.page_name = page
        for state in states or []:
            msg.rerun_script.widget_states.widgets.append(state)
        await self.ws.send(msg.SerializeToString())
        return await asyncio.wait_for(self._texts_until_finished(), RUN_LIMIT)

    async def _texts_until_finished(self) -> list[str]:
        texts = []
        while True:
            fwd = await self.receive()
            kind = fwd.WhichOneof("type")
            if kind == "delta" and fwd.delta.WhichOneof("type") == "new_element":
                texts.extend(self.element(fwd.delta.new_element))
            elif kind == "script_finished" and fwd.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                return texts

    async def receive(self) -> ForwardMsg:
        fwd = ForwardMsg()
        fwd.ParseFromString(await self.ws.recv())
        kind = fwd.WhichOneof("type")
        if kind == "new_session" and fwd.new_session.HasField("initialize"):
            self.session_id = fwd.new_session.initialize.session_id
        elif kind == "navigation":
            self.pages = {p.url_pathname: p.page_script_hash for p in fwd.navigation.app_pages}
        elif kind == "ref_hash":  # only for messages a client says it has cached, and this one says none
            raise RuntimeError("the server referred to a cached message")
        return fwd

    def element(self, element) -> list[str]:
        kind = element.WhichOneof("type")
        if kind == "bidi_component":
            self.widgets["live_slider"] = element.bidi_component.id
        elif kind == "file_uploader":
            self.widgets[element.file_uploader.label] = element.file_uploader.id
        elif kind == "markdown":
            return [element.markdown.body]
        elif kind == "alert":
            if element.alert.body.startswith(GUARD):
                self.exceptions.append(element.alert.body[:300])
            return [element.alert.body]
        elif kind == "exception":
            self.exceptions.append(f"{element.exception.type}: {element.exception.message}"[:300])
        return []

    async def release(self, k: int, query: str) -> list[str]:
        """What the live slider sends when its thumb is let go at K: a trigger, on the component's
        widget for its events."""
        state = _widget(_make_trigger_id(self.widgets["live_slider"], "events"))
        state.json_trigger_value = json.dumps([{"event": "k", "value": k}])
        return await self.run("", query, [state])

    async def upload(self, name: str, raw: bytes, label: str = "Checkpoint file") -> list[str]:
        """The browser's upload: ask for a file URL, PUT the bytes there, then rerun the Load page with
        the uploader's widget state naming the file."""
        request = BackMsg()
        request.file_urls_request.request_id = uuid.uuid4().hex
        request.file_urls_request.file_names.append(name)
        request.file_urls_request.session_id = self.session_id
        await self.ws.send(request.SerializeToString())
        while (fwd := await self.receive()).WhichOneof("type") != "file_urls_response":
            pass
        urls = fwd.file_urls_response.file_urls[0]
        await asyncio.to_thread(_put, self.url + "/" + urls.upload_url.lstrip("/"), name, raw, self.route)
        state = _widget(self.widgets[label])
        info = state.file_uploader_state_value.uploaded_file_info.add()
        info.file_id, info.name, info.size = urls.file_id, name, len(raw)
        return await self.run("load", "", [state])


def _widget(widget_id: str):
    state = BackMsg().rerun_script.widget_states.widgets.add()
    state.id = widget_id
    return state


def _put(url: str, name: str, raw: bytes, route: str) -> None:
    """A multipart PUT with the XSRF token the server set on the health endpoint, as the browser sends it
    (both with the tab's route: behind the proxy they reach the replica that holds its session)."""
    base = url.split("/_stcore/")[0]
    sticky = f"{COOKIE}={route}"
    cookie = urllib.request.urlopen(urllib.request.Request(base + "/_stcore/health", headers={"Cookie": sticky})) \
        .headers.get("Set-Cookie", "")
    token = re.search(r"_streamlit_xsrf=([^;]+)", cookie)
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"UploadedFile\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Cookie": sticky}
    if token:
        headers.update({"X-Xsrftoken": token.group(1), "Cookie": f"{sticky}; _streamlit_xsrf={token.group(1)}"})
    urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT", headers=headers), timeout=600)


def stated(texts: list[str]) -> tuple[int, str] | None:
    """The K and the percentage the Prune page states, from its caption."""
    for text in texts:
        if found := STATED.search(text):
            return int(found.group(1)), found.group(2)
    return None


async def slider_session(url: str, model: str, args, truth: dict, seed: int, out: dict) -> None:
    await asyncio.sleep(seed * args.stagger)  # students open the page over some seconds
    rng = random.Random(seed)
    tab = Tab(url)
    await tab.open()
    query = f"model={model}"
    start = time.perf_counter()
    await tab.run("", query)
    out["first"].append(time.perf_counter() - start)
    last = len(truth[model]) - 1
    for _ in range(args.rounds):
        await asyncio.sleep(rng.uniform(*args.think))  # a student looking at the grid and the curve
        k = rng.randint(0, last)
        start = time.perf_counter()
        answer = stated(await tab.release(k, query))
        out["times"].append(time.perf_counter() - start)
        out["at"].append(start - out["class_start"])
        if answer is None or answer[0] != k or answer[1] != f"{truth[model][k] * 100:.2f}":
            out["wrong"].append((model, k, answer, truth[model][k]))
    out["exceptions"].extend(tab.exceptions)
    await tab.close()


async def hostile_session(url: str, files: dict, zips: dict, truth: dict, out: dict) -> None:
    from conftest import shown  # how the page shows a sentence (escaped markdown); main() imported conftest

    tab = Tab(url)
    await tab.open()
    own = "fmnist_resnet"
    expected = (0, f"{truth[own][0] * 100:.2f}")
    if stated(await tab.run("", f"model={own}")) != expected:
        out["missed"].append("the uploader's Prune page before the uploads")
    await tab.run("load")
    uploads = [(name, raw, reason, "Checkpoint file") for name, (raw, reason) in files.items()]
    uploads += [(name, raw, reason, "Image folder (.zip)") for name, (raw, reason) in zips.items()]
    for name, raw, reason, label in uploads:
        start = time.perf_counter()
        texts = await tab.upload(name, raw, label)
        if any(reason in shown(text) for text in texts):  # as the page shows it (escaped markdown)
            out["refusals"].append((name, time.perf_counter() - start))
        else:
            out["missed"].append(name)
        if stated(await tab.run("", f"model={own}")) != expected:  # the model it had, unchanged
            out["missed"].append(f"the uploader's Prune page after {name}")
        await tab.run("load")
    out["exceptions"].extend(tab.exceptions)
    await tab.close()


async def lecturer(url: str, pid: int | None) -> float:
    """The lecturer opens the app before the class: the server's first run starts its background
    warm-up of the bundled models; returns the seconds until the server is idle (0 for `--cold`)."""
    if pid is None:
        return 0.0
    start = time.perf_counter()
    tab = Tab(url)
    await tab.open()
    await tab.run("")
    await asyncio.to_thread(wait_until_idle, pid)
    await tab.close()
    return time.perf_counter() - start


async def run(args, url: str, truth: dict, files: dict, zips: dict, pid: int) -> dict:
    out = {"first": [], "times": [], "wrong": [], "refusals": [], "missed": [], "exceptions": []}
    out["warm"] = await lecturer(url, None if args.cold else pid)
    out["class_start"], out["at"] = time.perf_counter(), []
    models = list(MODELS)
    ended = await asyncio.gather(*[slider_session(url, models[i % len(models)], args, truth, i, out)
                                   for i in range(args.sessions)], hostile_session(url, files, zips, truth, out),
                                 return_exceptions=True)
    out["failed"] = [f"{type(e).__name__}: {e}"[:200] for e in ended if isinstance(e, BaseException)]
    out["class"] = time.perf_counter() - out["class_start"]
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def serve_replicated(args, truth, files, zips):
    """The class through nginx to `args.replicas` replicas sharing one engine store. The lecturer opens
    each replica once, in turn, and waits until it is idle (its warm-up done): the first computes, the
    others read what it stored. Returns (run's out, first replica's peak MB, health, report lines)."""
    warm = []

    def ready(proc, port, log):
        start, used = time.perf_counter(), cpu_seconds(proc.pid)
        asyncio.run(lecturer(f"http://127.0.0.1:{port}", proc.pid))
        warm.append((port, time.perf_counter() - start, cpu_seconds(proc.pid) - used))

    with Deployment(args.replicas, cache=tempfile.mkdtemp(prefix="pe-shared-cache-"), ready=ready,
                    env=SERVER_ENV) as dep:
        used = [cpu_seconds(p.pid) for p in dep.procs[:-1]]
        out = asyncio.run(run(args, dep.url, truth, files, zips, None))
        out["warm"] = warm[0][1]
        peak = memory_mb(dep.procs[0].pid, "VmHWM")
        alive = urllib.request.urlopen(dep.url + "/_stcore/health", timeout=5).read() == b"ok"
        lines = []
        for i, (proc, log, (port, took, cpu)) in enumerate(zip(dep.procs, dep.logs, warm)):
            text = log.read_text(errors="replace")
            lines.append(f"replica {i + 1} (port {port}): warm-up {took:.0f} s, {cpu:.0f} CPU s; engines read back "
                         f"from the shared store {text.count('read back from the engine store')}, passes made "
                         f"{text.count('images made')}; CPU s during the class {cpu_seconds(proc.pid) - used[i]:.0f}")
    return out, peak, alive, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20, help="slider releases per session")
    parser.add_argument("--stagger", type=float, default=0.5, help="seconds between two sessions' first visits")
    parser.add_argument("--cold", action="store_true",
                        help="students arrive at once; by default the lecturer opens the app first and the class "
                             "arrives once the server's warm-up of the bundled models is done")
    parser.add_argument("--think", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                        help="seconds a student looks before the next release, drawn uniformly")
    parser.add_argument("--replicas", type=int, default=1,
                        help="serve the class from this many Streamlit processes behind nginx, sharing one engine "
                             "store (scripts/serve_replicas.py); each is warmed in turn, the first alone")
    args = parser.parse_args()

    from core import checkpoints, engine
    from test_hostile_programs import WORST_REASONS, worst_files
    from test_robustness import hostile_checkpoints, hostile_zips

    truth = {}
    for model, file in MODELS.items():  # the exact accuracies, computed here
        eng = engine.from_checkpoint(checkpoints.load(ROOT / "checkpoints" / file), device="cpu")
        truth[model] = [c / eng.total for c in eng.curve("zero")]
    files = {n: v for n, v in hostile_checkpoints().items() if n in HOSTILE}
    assert len(files) == len(HOSTILE), f"not in tests/test_robustness.py: {set(HOSTILE) - set(files)}"
    files.update({n: (raw, WORST_REASONS[n]) for n, raw in worst_files(Path(tempfile.mkdtemp())).items()})
    zips = hostile_zips()
    if args.replicas > 1:
        out, peak, alive, replicas = serve_replicated(args, truth, files, zips)
    else:
        port = free_port()
        server = start_replica(port, tempfile.mkdtemp(), Path(os.devnull), env=SERVER_ENV)
        try:
            out = asyncio.run(run(args, f"http://127.0.0.1:{port}", truth, files, zips, server.pid))
            peak = memory_mb(server.pid, "VmHWM")
            alive = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).read() == b"ok"
        finally:
            server.terminate()
            server.wait(timeout=60)
        replicas = []
    times = out["times"]
    print(f"{args.sessions} slider sessions x {args.rounds} releases (think {args.think[0]:g}-{args.think[1]:g} s, "
          f"arrivals {args.stagger:g} s apart) + 1 session uploading {len(files)} hostile checkpoints and {len(zips)} "
          f"image zips; the class took {out['class']:.0f} s, "
          f"{os.cpu_count()} CPU cores; Streamlit's websocket protocol, no browser")
    print((f"{args.replicas} replicas behind nginx (sticky by cookie), one shared engine store; " if args.replicas > 1
           else "") + ("a cold server: the class arrived at once" if args.cold else
          f"the lecturer opened the app {out['warm']:.0f} s before the class "
          + ("(the server never went idle: a warm-up that does not end, or other work on this machine)"
             if out["warm"] >= IDLE_LIMIT else "(until the server's warm-up was done)")))
    print(f"first page (each session's first run of the Prune page): median {statistics.median(out['first']):.1f} s, "
          f"max {max(out['first']):.1f} s")
    print(f"slider: {len(times)} answers, median {statistics.median(times) if times else float('nan'):.2f} s, "
          f"95th percentile {percentile(times, 0.95):.2f} s, max {max(times, default=float('nan')):.2f} s; "
          f"exact: {not out['wrong']} {out['wrong'][:3] if out['wrong'] else ''}")
    slowest = sorted(zip(times, out["at"]), reverse=True)[:5]
    print("slowest answers: " + ", ".join(f"{t:.1f} s (sent {at:.0f} s into the class)" for t, at in slowest))
    refusals = ", ".join(f"{n} {s:.1f} s" for n, s in out["refusals"])
    print(f"hostile uploads refused: {len(out['refusals'])}/{len(files) + len(zips)} ({refusals}); "
          f"missed: {out['missed']}")
    print(f"exceptions or error sentences shown to a session: {len(out['exceptions'])} {out['exceptions'][:3]}; "
          f"sessions failed: {len(out['failed'])} {out['failed'][:3]}")
    print(f"server peak memory (VmHWM): {peak:,.0f} MB; health endpoint answering at the end: {alive}")
    for line in replicas:
        print(line)
    return 1 if out["wrong"] or out["missed"] or out["exceptions"] or out["failed"] or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
