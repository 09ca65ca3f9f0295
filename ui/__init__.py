"""The Streamlit side: `state` is the glue to the engine, `figures` draws (no streamlit there)."""
