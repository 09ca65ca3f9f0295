"""One place where a page's unexpected error becomes one sentence.

Streamlit (with `client.showErrorDetails = "none"`) would show a generic box; a visitor gets this
sentence instead, with a short reference that the server's log carries beside the traceback, and the
session keeps its model and settings. Streamlit's own control flow (st.stop, st.rerun, switch_page)
raises BaseExceptions that are not Exceptions and passes through untouched.
"""
from __future__ import annotations

import contextlib
import logging
import uuid

import streamlit as st

log = logging.getLogger("prune_explorer")


@contextlib.contextmanager
def page():
    try:
        yield
    except Exception:  # noqa: BLE001 - the last line of defence; every expected failure has its own sentence
        ref = uuid.uuid4().hex[:8]
        log.exception("page error %s", ref)
        st.error(f"Something went wrong on this page (reference {ref} in the server's log). Your session keeps "
                 "its model and settings: change a setting, open another page, or reload.")
