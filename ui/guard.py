"""One place where a page's unexpected error becomes one sentence.

Streamlit (with `client.showErrorDetails = "none"`) would show a generic box; a visitor gets this
sentence instead, with a short reference that the server's log carries beside the traceback, and the
session keeps its model and settings. Streamlit's own control flow (st.stop, st.rerun, switch_page)
raises BaseExceptions that are not Exceptions and passes through untouched, as does an error a
fragment has already shown. With PRUNE_EXPLORER_PROPAGATE_ERRORS=1 (the tests set it) errors are
raised as they are, so that a test sees them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid

import streamlit as st
from streamlit.errors import FragmentHandledException

log = logging.getLogger("prune_explorer")


@contextlib.contextmanager
def page():
    try:
        yield
    except FragmentHandledException:  # a fragment's error, already shown by Streamlit
        raise
    except Exception:  # noqa: BLE001 - the last line of defence; every expected failure has its own sentence
        if os.environ.get("PRUNE_EXPLORER_PROPAGATE_ERRORS") == "1":
            raise
        ref = uuid.uuid4().hex[:8]
        log.exception("page error %s", ref)
        st.error(f"Something went wrong on this page (reference {ref} in the server's log). Your session keeps "
                 "its model and settings: change a setting, open another page, or reload.")
