"""The pruning engine: models, data, checkpoints, activation capture, sweeps.

Never imports streamlit, so tests and the CLI use it directly.
"""
