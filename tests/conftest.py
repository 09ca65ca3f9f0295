import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, engine  # noqa: E402

BUNDLED = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt"}

torch.set_num_threads(2)
# A page's unexpected error reaches the test (AppTest's `exception`, the browser's error box) instead of
# ui/guard.py's sentence; the test of that sentence unsets it.
os.environ["PRUNE_EXPLORER_PROPAGATE_ERRORS"] = "1"


@pytest.fixture(scope="session", params=sorted(BUNDLED))
def bundled(request):
    """(checkpoint, engine on the full 10,000-image test set) for each bundled model."""
    ckpt = checkpoints.load(BUNDLED[request.param])
    return ckpt, engine.from_checkpoint(ckpt, device="cpu")
