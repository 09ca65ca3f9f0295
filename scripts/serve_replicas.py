"""Several Streamlit processes behind nginx, sharing one engine store: the deployment for a big class.

One Streamlit process answers one session's run at a time per core it can use, so a class larger than
one process serves is spread over several, each on its own port, behind a reverse proxy:
- sticky sessions: a Streamlit session lives in the process that holds its websocket, and its uploads
  (HTTP requests beside the websocket) must reach that same process. Open-source nginx has no
  `sticky` directive; the proxy gives each new browser a random route in a cookie (`pe_replica`) and
  hashes it to a replica (`hash ... consistent`), so every request of that browser goes to the same one;
- one engine store (`PRUNE_EXPLORER_CACHE`, core/store.py) for every replica: what one replica learns
  of a bundled model (its pass, curves, oracle orders, sensitivity maps) the others read back in well
  under a second instead of computing it again. Writes are atomic, so replicas never see half a file;
- websockets through the proxy (`Upgrade`), no buffering, and the uploads' size limit of the app.

    .venv/bin/python scripts/serve_replicas.py --replicas 2 --port 8500        # then open http://HOST:8500
    .venv/bin/python scripts/serve_replicas.py --replicas 2 --print-config     # the nginx config, to install

`--print-config` writes the configuration for a system nginx (Debian: `apt-get install nginx-light`,
then put it in /etc/nginx/conf.d/ without the top-level lines and start the replicas as services).
Run without it, this script starts the replicas (the first one alone until its warm-up is done, so that
the others read everything from the shared store) and an nginx of its own, in the foreground.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COOKIE = "pe_replica"
UPLOAD_MB = 100  # .streamlit/config.toml's server.maxUploadSize


def http_conf(listen: str, backends: list[str]) -> str:
    """The `http { ... }` part: what a system nginx needs in /etc/nginx/conf.d/."""
    servers = "\n".join(f"        server {b};" for b in backends)
    return f"""    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    # A browser without the cookie gets a random route (this request's id); with it, its own route again.
    map $cookie_{COOKIE} $pe_route {{ "" $request_id; default $cookie_{COOKIE}; }}
    upstream pruning_explorer {{
        hash $pe_route consistent;  # sticky: one browser, one replica (its websocket and its uploads)
{servers}
    }}
    server {{
        listen {listen};
        client_max_body_size {UPLOAD_MB}m;
        location / {{
            proxy_pass http://pruning_explorer;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;        # Streamlit's websocket
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 1d;                          # a lecture's websocket stays open for hours
            proxy_buffering off;
            add_header Set-Cookie "{COOKIE}=$pe_route; Path=/; HttpOnly; SameSite=Lax" always;
        }}
    }}
"""


def nginx_conf(listen: str, backends: list[str], workdir: Path | None = None) -> str:
    """A whole configuration; with `workdir`, one that an unprivileged nginx runs from that folder."""
    if workdir is None:
        return "events {}\nhttp {\n" + http_conf(listen, backends) + "}\n"
    temp = "\n".join(f"    {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                              "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""  # as root, workers keep this folder's rights
    return (f"{user}worker_processes 1;\npid {workdir / 'nginx.pid'};\nerror_log {workdir / 'error.log'} warn;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n{temp}\n"
            + http_conf(listen, backends) + "}\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, limit: float = 180) -> bool:
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return True
        except OSError:
            time.sleep(0.3)
    return False


def start_replica(port: int, cache: str, log: Path, warm: bool = True, env: dict | None = None) -> subprocess.Popen:
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "PRUNE_EXPLORER_CACHE": cache,
           "PRUNE_EXPLORER_WARM": "1" if warm else "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    if not healthy(f"http://127.0.0.1:{port}"):
        proc.kill()
        raise RuntimeError(f"the replica on port {port} did not start; see {log}")
    return proc


async def _visit(url: str) -> None:
    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async with websockets.connect(url.replace("http", "ws", 1) + "/_stcore/stream", subprotocols=["streamlit"],
                                  max_size=None, open_timeout=300, ping_interval=None) as ws:
        msg = BackMsg()
        msg.rerun_script.query_string = ""
        await ws.send(msg.SerializeToString())
        while True:
            fwd = ForwardMsg()
            fwd.ParseFromString(await ws.recv())
            if fwd.WhichOneof("type") == "script_finished":
                return


def visit(url: str) -> None:
    """One run of the Prune page on this replica, as a first visitor's: it starts the replica's
    warm-up (Streamlit runs no code of the app before a session asks)."""
    import asyncio

    asyncio.run(asyncio.wait_for(_visit(url), 900))


def wait_for_warm_up(log: Path, limit: float = 3600) -> float:
    """Seconds until the replica writing `log` says its warm-up is done ("warm-up N/N: ready")."""
    start = time.time()
    while time.time() - start < limit:
        if log.exists() and ": ready" in log.read_text(errors="replace"):
            return time.time() - start
        time.sleep(1)
    raise RuntimeError(f"no warm-up ready after {limit:.0f} s; see {log}")


def start_nginx(listen_port: int, backends: list[str], workdir: Path) -> subprocess.Popen:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / kind).mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(f"127.0.0.1:{listen_port}", backends, workdir))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=(workdir / "nginx.out").open("ab"))
    if not healthy(f"http://127.0.0.1:{listen_port}", 30):
        proc.kill()
        raise RuntimeError(f"nginx did not start: {(workdir / 'error.log').read_text()[-500:] if (workdir / 'error.log').exists() else ''}")
    return proc


class Deployment:
    """Replicas and their proxy, started together and stopped together (a context manager).

    `logs[i]` is replica i's log (the warm-up's steps, "read back from the engine store" lines);
    `ready(proc, port, log)`, where given, is called after each replica starts, before the next one;
    `env`: the replicas' environment (default: this process's)."""

    def __init__(self, replicas: int = 2, port: int | None = None, cache: str | None = None, warm: bool = True,
                 workdir: Path | None = None, ready=None, env: dict | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pe-replicas-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache = cache or str(self.workdir / "cache")
        self.port = port or free_port()
        self.ports = [free_port() for _ in range(replicas)]
        self.logs = [self.workdir / f"replica{i}.log" for i in range(replicas)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.warm, self.ready, self.env = warm, ready, env
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Deployment:
        try:
            for port, log in zip(self.ports, self.logs):
                self.procs.append(start_replica(port, self.cache, log, self.warm, self.env))
                if self.ready:  # e.g. its warm-up, before the next replica starts and reads what it stored
                    self.ready(self.procs[-1], port, log)
            self.procs.append(start_nginx(self.port, [f"127.0.0.1:{p}" for p in self.ports], self.workdir))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8500, help="where nginx listens (127.0.0.1)")
    parser.add_argument("--cache", default=None, help="the shared PRUNE_EXPLORER_CACHE (default: the usual one)")
    parser.add_argument("--print-config", action="store_true", help="print the nginx configuration and exit")
    args = parser.parse_args()
    if args.print_config:
        print(nginx_conf("80", [f"127.0.0.1:{8501 + i}" for i in range(args.replicas)]), end="")
        return 0
    sys.path.insert(0, str(ROOT))
    from core.data import cache_dir

    def warmed(proc, port: int, log: Path) -> None:  # in turn: the first fills the shared store, the others read it
        print(f"replica on port {port}: warming up (its log: {log}) ...", flush=True)
        visit(f"http://127.0.0.1:{port}")
        print(f"replica on port {port}: ready in {wait_for_warm_up(log):.0f} s", flush=True)

    with Deployment(args.replicas, args.port, args.cache or str(cache_dir()), ready=warmed) as dep:
        print(f"{args.replicas} replicas on ports {', '.join(map(str, dep.ports))} behind nginx at {dep.url}; "
              f"shared engine store {dep.cache}; logs in {dep.workdir}. Ctrl-C stops them.")
        try:
            while all(p.poll() is None for p in dep.procs):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
