"""torchvision's classification models, exported with the README's own lines, load and prune exactly.

Each model is built with `num_classes=10`, given seeded random weights and batch-norm statistics
measured on random images (then its scale and shift perturbed, so that `remove` differs from
`zero`), exported with the lines the README shows (`core.program.EXPORT_LINES`), and read back the
way an upload is. At a middle conv and at the last conv, in both modes, each image's prediction by
the engine equals the naive procedure on the eager torchvision model: copy it, zero the channels'
weights and bias (and in `remove` mode their batch norm), run every image.
"""
import io
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from core import checkpoints, engine, program
from core.naive import prune_copy

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 160


def export_with_readme_lines(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """Run the README's export lines as a user would, with their example resized to `shape`."""
    readme = (ROOT / "README.md").read_text()
    assert program.EXPORT_LINES in readme, "the README must show the export lines the product tests"
    lines = re.sub(r"torch\.zeros\(2, 1, 28, 28\)", f"torch.zeros(2, {', '.join(map(str, shape))})",
                   program.EXPORT_LINES)
    out = io.BytesIO()
    namespace = {"model": model}
    exec(lines.replace('"model.pt2"', "out"), namespace | {"out": out})
    return out.getvalue()


def calibrated(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """Seeded weights; batch-norm statistics of random images, then a perturbed scale and shift."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # the plain average over the calibration batch
        model.train()(torch.randn(48, *shape, generator=gen))
        for m in norms:
            m.momentum = 0.1
            m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=gen))
            m.bias.copy_(0.3 * torch.randn(m.num_features, generator=gen))
    return model.eval()


def assert_exact(model: nn.Module, ckpt, x: torch.Tensor, y: torch.Tensor, layer: str) -> engine.Engine:
    eng = engine.Engine(ckpt.build_model(), x, y, layer=layer, device="cpu", batch_size=80)
    p = eng.channels
    for mode in engine.MODES:
        for k in (1, p // 2, p):
            pruned = prune_copy(model, layer, eng.ranking()[:k].tolist(), mode, eng.bn_name)
            with torch.no_grad():
                naive = pruned(x).argmax(1)
            assert torch.equal(eng.predictions(k, mode), naive), (layer, mode, k)
            assert eng.correct(k, mode) == int((naive == y).sum()), (layer, mode, k)
    return eng


# (builder, what it stands for, a middle conv); 3x32x32 inputs, the smallest every one of them takes.
ZOO = {
    "resnet18": ("a residual net", "layer3.0.conv1"),
    "mobilenet_v2": ("inverted residuals, ReLU6 in place", "features.9.conv.1.0"),
    "mobilenet_v3_small": ("inverted residuals with squeeze-excitation, Hardswish", "features.7.block.0.0"),
    "squeezenet1_1": ("channel concatenation (Fire modules), no batch norm", "features.6.squeeze"),
    "shufflenet_v2_x0_5": ("grouped convs and a channel shuffle", "stage3.3.branch2.5"),
    "convnext_tiny": ("layer norm and GELU", "features.5.4.block.0"),
}


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(IMAGES, 3, 32, 32, generator=gen)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_model_prunes_exactly(name, images):
    shape = (3, 32, 32)
    model = calibrated(getattr(torchvision.models, name)(num_classes=10), shape, seed=1)
    ckpt = checkpoints.from_bytes(export_with_readme_lines(model, shape), name=name)
    with torch.no_grad():
        y = model(images).argmax(1)
    y[::3] = (y[::3] + 1) % 10  # some wrong answers, so that pruning can also fix some
    convs = [n for n, m in ckpt.build_model().named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]  # the user's own paths
    middle, last = ZOO[name][1], convs[-1]
    assert_exact(model, ckpt, images, y, middle)
    eng = assert_exact(model, ckpt, images, y, last)
    if name not in ("squeezenet1_1", "convnext_tiny"):  # both end in something other than a linear read-out
        assert eng.path == engine.PATH_FAST, eng.fast_reason
    for node_words in ("call_module", "call_function", "<built-in", "_default"):  # never fx node names or reprs
        assert node_words not in eng.fast_reason


def test_a_middle_layer_says_why_in_the_users_words(images):
    model = calibrated(torchvision.models.resnet18(num_classes=10), (3, 32, 32), seed=2)
    ckpt = checkpoints.from_bytes(export_with_readme_lines(model, (3, 32, 32)), name="resnet18")
    eng = engine.Engine(ckpt.build_model(), images[:16], torch.zeros(16, dtype=torch.long), layer="layer3.0.conv1",
                        device="cpu")
    assert eng.fast_reason == ("after this layer, the Conv2d `layer3.0.conv2` mixes its channels before the "
                               "classifier's linear layer reads them")


def test_a_model_it_cannot_take_is_refused_naming_the_operator():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10).eval()
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.from_bytes(export_with_readme_lines(vit, (3, 32, 32)), name="vit")
    message = str(err.value)
    assert message.startswith("Refused: the program uses the operator 'aten.")
    assert "in `encoder.layers.encoder_layer_0" in message and "replace it with a standard layer" in message
    assert "\n" not in message


@pytest.mark.slow
def test_resnet18_with_one_input_channel_prunes_exactly_on_fashion_mnist():
    """The issue's own case: resnet18(num_classes=10) with a 1-channel first conv, on the real test set."""
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model = calibrated(model, (1, 28, 28), seed=3)
    ckpt = checkpoints.from_bytes(export_with_readme_lines(model, (1, 28, 28)), name="resnet18_gray")
    assert ckpt.dataset == "fashion_mnist"  # the first registered data set that fits 1x28x28 and 10 outputs
    assert ckpt.prep.source == "stated in the file" and ckpt.prep.mean == (0.2860,)  # the README's meta
    split = ckpt.split()
    x, y = split.x[:IMAGES], split.y[:IMAGES]
    for layer in ("layer2.1.conv1", "layer4.1.conv2"):
        assert_exact(model, ckpt, x, y, layer)


def test_in_place_writes_into_weights_or_through_views_are_refused():
    class WritesItsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 2)
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls.add_(1.0)  # the model changes itself at every call
            return self.fc(self.conv(x).mean((2, 3))) + 0 * self.calls

    class WritesThroughAView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.conv(x)
            part = y[:, :2]
            part.relu_()  # changes y as well, which is read again below
            return self.fc(torch.cat([y.mean((2, 3)), part.mean((2, 3)), part.mean((2, 3))], 1)[:, :8])

    for model, words in ((WritesItsWeight(), "one of its weights or buffers"),
                         (WritesThroughAView(), "through a view of a tensor that is read again")):
        blob = export_with_readme_lines(model.eval(), (1, 8, 8))
        with pytest.raises(checkpoints.CheckpointError, match=words):
            checkpoints.from_bytes(blob, name="writes")
