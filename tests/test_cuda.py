"""The engine on CUDA equals the naive procedure on CUDA (skipped where there is no CUDA device)."""
import pytest
import torch

from conftest import BUNDLED, ROOT
from core import checkpoints, engine
from core.naive import naive_correct

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MODELS = {**BUNDLED, "pair_cnn": ROOT / "checkpoints" / "fmnist_pair_cnn.pt",
          "siamese": ROOT / "checkpoints" / "fmnist_siamese.pt"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_engine_equals_naive_and_cpu(name):
    ckpt = checkpoints.load(MODELS[name])
    eng = engine.from_checkpoint(ckpt, device="auto")
    assert eng.device.type == "cuda"
    cpu = engine.from_checkpoint(ckpt, device="cpu")
    p = eng.channels
    for mode in engine.MODES:
        curve = eng.curve(mode)
        for k in (0, 1, p // 2, p - 1, p):
            naive = naive_correct(eng, k, mode)
            assert curve[k] == eng.correct(k, mode) == naive, (name, mode, k)
            # CUDA and CPU arithmetic differ in the last bits; the counts may differ by a near-tie or two
            assert abs(naive - cpu.correct(k, mode)) <= 3, (name, mode, k)
