"""The pruning engine: models, data, checkpoints, activation capture, sweeps.

Never imports streamlit, so tests and the CLI use it directly.
"""

import os as _os

# torch._dynamo (imported by torchvision and torch.export) creates its compile cache on import, by
# default under $TMPDIR; put it in this product's cache directory, the only place it writes on its own.
_os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _os.path.join(
    _os.environ.get("PRUNE_EXPLORER_CACHE", _os.path.join(_os.path.expanduser("~"), ".cache", "pruning-explorer")),
    "torchinductor"))
