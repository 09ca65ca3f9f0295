"""Background curve jobs of a middle layer, shared by every session of the server.

At a middle layer each exact count costs a pass of the rest of the network over the test set, so
the 17-point coarse curve and each refinement are counted in a background thread per job; a page
polls their progress. A job pauses while any session waits for an exact count of the same engine
(the lecture's released slider comes first). One job per (engine key, mode, criterion, kind).
"""
from __future__ import annotations

import atexit
import contextlib
import threading
import time
from typing import Callable

import streamlit as st

from core import engine

REFINE_POINTS = 16


class Jobs:
    """The running jobs: each a thread counting exact Ks into its engine (the engine keeps the counts)."""

    def __init__(self):
        self.lock = threading.Lock()  # held while deciding whether to start a job
        self._threads: dict[tuple, threading.Thread] = {}
        self._progress: dict[tuple, list[int]] = {}  # job -> [counted, asked]
        self._busy: dict[int, int] = {}  # id(engine) -> sessions waiting for one of its exact counts
        self._stop = threading.Event()

    def stop(self) -> None:
        """At server exit: each job finishes the count it is in (all within a minute), so none dies inside PyTorch."""
        self._stop.set()
        deadline = time.monotonic() + 60
        for thread in list(self._threads.values()):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    @contextlib.contextmanager
    def foreground(self, eng: engine.Engine):
        """While a session waits for an exact count, background jobs of that engine pause."""
        with self.lock:
            self._busy[id(eng)] = self._busy.get(id(eng), 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self._busy[id(eng)] -= 1

    def running(self, job: tuple) -> bool:
        thread = self._threads.get(job)
        return thread is not None and thread.is_alive()

    def progress(self, job: tuple) -> tuple[int, int] | None:
        """(points counted, points asked) of a job running now, else None."""
        return tuple(self._progress[job]) if self.running(job) else None

    def start(self, eng: engine.Engine, job: tuple, points: int, next_k: Callable[[], int | None], label: str) -> None:
        """Count up to `points` exact Ks in a background thread, each chosen by `next_k()` (None: done).
        Call with `lock` held, after checking `running(job)`."""
        progress = [0, points]
        mode, criterion = job[1], job[2]

        def run() -> None:
            for i in range(points):
                while self._busy.get(id(eng), 0) and not self._stop.is_set():
                    time.sleep(0.05)
                k = None if self._stop.is_set() else next_k()
                if k is None:
                    break
                eng.correct(k, mode, criterion)
                progress[0] = i + 1
            progress[1] = progress[0]

        self._progress[job] = progress
        self._threads[job] = threading.Thread(target=run, daemon=True, name=label)
        self._threads[job].start()


@st.cache_resource(show_spinner=False)
def shared() -> Jobs:
    """The server's one `Jobs`, stopped when the server exits."""
    found = Jobs()
    atexit.register(found.stop)
    return found


def start_coarse_curve(eng: engine.Engine, key: tuple, mode: str, criterion: str) -> None:
    """Compute the 17-point coarse curve of a middle layer in the background, once per engine (`key`:
    its cache key; an evicted engine's id() may be reused), mode and criterion."""
    jobs, job = shared(), (key, mode, criterion, "coarse")
    with jobs.lock:
        missing = [k for k in eng.coarse_ks() if eng.known(k, mode, criterion) is None]
        if missing and not jobs.running(job):
            jobs.start(eng, job, len(missing), lambda: next((k for k in missing if eng.known(k, mode, criterion)
                                                             is None), None), f"coarse curve {mode} {criterion}")


def coarse_progress(eng: engine.Engine, mode: str, criterion: str) -> tuple[int, int]:
    """(coarse points known, coarse points in all)."""
    ks = eng.coarse_ks()
    return sum(eng.known(k, mode, criterion) is not None for k in ks), len(ks)


def start_refinement(eng: engine.Engine, key: tuple, mode: str, criterion: str) -> None:
    """16 more exact points of a middle layer's curve, in the background, each where the curve is least
    known (`Engine.next_refinement`); a second request while one runs is ignored."""
    jobs, job = shared(), (key, mode, criterion, "refine")
    with jobs.lock:
        if not jobs.running(job):
            jobs.start(eng, job, min(REFINE_POINTS, eng.unknown(mode, criterion)),
                       lambda: eng.next_refinement(mode, criterion), f"refine curve {mode} {criterion}")


def refinement_progress(key: tuple, mode: str, criterion: str) -> tuple[int, int] | None:
    """(points counted, points asked) of a refinement running now, else None."""
    return shared().progress((key, mode, criterion, "refine"))
