import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, engine  # noqa: E402

BUNDLED = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt"}

torch.set_num_threads(2)


@pytest.fixture(scope="session", params=sorted(BUNDLED))
def bundled(request):
    """(checkpoint, engine on the full 10,000-image test set) for each bundled model."""
    ckpt = checkpoints.load(BUNDLED[request.param])
    return ckpt, engine.from_checkpoint(ckpt, device="cpu")
