"""Architecture registry: every model the product ships is a builder registered under a name.

Callers (checkpoint loader, CLI, sidebar) only know names, as in timm's `create_model`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    task: str  # "multiclass" (argmax) or "binary" (one logit, threshold 0)
    dataset: str  # the data set a plain state dict of this architecture is evaluated on
    summary: str
    variants: tuple[dict, ...] = ({},)  # constructor arguments tried when recognising a plain state dict
    provenance: str = ""  # which published or reported system it reproduces, if any


REGISTRY: dict[str, ArchSpec] = {}


def register(name: str, input_shape: tuple[int, ...], task: str, dataset: str, summary: str,
             variants: tuple[dict, ...] = ({},), provenance: str = ""):
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        REGISTRY[name] = ArchSpec(name, builder, input_shape, task, dataset, summary, variants, provenance)
        return builder

    return wrap


def build(arch: str, **kwargs) -> nn.Module:
    if arch not in REGISTRY:
        raise KeyError(f"Unknown architecture '{arch}'. Registered: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[arch].builder(**kwargs)


def _meta_model(arch: str, kwargs: dict) -> nn.Module:
    """The model built on PyTorch's meta device: shapes only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return REGISTRY[arch].builder(**kwargs)


_SHAPES: dict[tuple, dict[str, tuple[int, ...]]] = {}
_SHAPES_LOCK = threading.Lock()


def shapes(arch: str, kwargs: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every state-dict tensor's shape, without allocating the model (remembered for the last few)."""
    key = (arch, tuple(sorted((kwargs or {}).items())))
    found = _SHAPES.get(key)
    if found is None:
        found = {k: tuple(v.shape) for k, v in _meta_model(arch, kwargs or {}).state_dict().items()}
        with _SHAPES_LOCK:
            while len(_SHAPES) >= 64:
                _SHAPES.pop(next(iter(_SHAPES)))
            _SHAPES[key] = found
    return dict(found)


def size(arch: str, kwargs: dict) -> tuple[int, tuple[int, ...]]:
    """(number of parameters and buffers, output shape for a batch of 2) of the model these arguments
    describe, from a meta-device build and forward pass: nothing is allocated, so a checkpoint's
    `arch_kwargs` are sized before the model is built. Raises TypeError, ValueError or RuntimeError
    when the arguments do not make a model that takes the architecture's input."""
    model = _meta_model(arch, kwargs)
    count = sum(t.numel() for t in model.state_dict().values())
    with torch.no_grad():
        out = model.eval()(torch.empty((2, *REGISTRY[arch].input_shape), device="meta"))
    return count, tuple(out.shape)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> weight tensor of every Linear and Conv2d, in module order (biases are not pruned)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def conv_bn_relu(c_in: int, c_out: int, bias: bool = True, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=bias), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class SmallVGG(nn.Module):
    """Plain VGG-style CNN for 28x28 grey images: nothing bypasses the last conv (512 ch at 3x3)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 512):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),   # 28 -> 14
            conv_bn_relu(32, 64), nn.MaxPool2d(2),            # 14 -> 7
            conv_bn_relu(64, 128), nn.MaxPool2d(2),           # 7 -> 3
            conv_bn_relu(128, width),                         # the last conv
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallResNet(nn.Module):
    """ResNet9-style CNN for 28x28 grey images: a shortcut goes around the block holding the last conv.

    Laid out like the CIFAR-10 "ResNet9" of the first pruning report (prep, layers, res block added to its input),
    shrunk to train on two CPU cores.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 512, bottleneck: int = 128):
        super().__init__()
        self.prep = nn.Sequential(conv_bn_relu(in_channels, 32), nn.MaxPool2d(2))    # 28 -> 14
        self.layer1 = nn.Sequential(conv_bn_relu(32, 64), nn.MaxPool2d(2))          # 14 -> 7
        self.layer2 = nn.Sequential(conv_bn_relu(64, 128), nn.MaxPool2d(2))         # 7 -> 3
        self.layer3 = conv_bn_relu(128, width)
        self.res3 = nn.Sequential(conv_bn_relu(width, bottleneck), conv_bn_relu(bottleneck, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = x + self.res3(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


register("small_vgg", (1, 28, 28), "multiclass", "fashion_mnist",
         "VGG-style: 4 conv+BN+ReLU, last conv 512 ch at 3x3, global average pool, linear")(SmallVGG)
register("small_resnet", (1, 28, 28), "multiclass", "fashion_mnist",
         "ResNet9-style: 3 conv stages, conv to 512 ch, residual block (512->128->512) "
         "with a shortcut around it, global average pool, linear")(SmallResNet)


# ---------------------------------------------------------------------------------------------
# The systems of the pruning reports this product reproduces, laid out so that their state dicts load.

@register("resnet9", (3, 32, 32), "multiclass", "cifar10",
          "ResNet9 for CIFAR-10: prep, layer1+res1, layer2, layer3+res3, last conv 512 at 4x4",
          variants=({"conv_bias": False}, {"conv_bias": True}),
          provenance="the CIFAR-10 ResNet9 of the first pruning report this product reproduces")
class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, conv_bias: bool = False):
        super().__init__()
        self.prep = conv_bn_relu(3, 64, conv_bias)
        self.layer1 = conv_bn_relu(64, 128, conv_bias, pool=True)
        self.res1 = nn.Sequential(conv_bn_relu(128, 128, conv_bias), conv_bn_relu(128, 128, conv_bias))
        self.layer2 = conv_bn_relu(128, 256, conv_bias, pool=True)
        self.layer3 = conv_bn_relu(256, 512, conv_bias, pool=True)
        self.res3 = nn.Sequential(conv_bn_relu(512, 512, conv_bias), conv_bn_relu(512, 512, conv_bias))
        self.classifier = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        x = self.layer1(self.prep(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        x = x + self.res3(x)
        return self.classifier(x)


_VGG13 = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register("vgg13_bn", (3, 32, 32), "multiclass", "cifar10",
          "VGG13 with BatchNorm for CIFAR-10, torchvision naming, last conv 512 at 2x2",
          variants=({"classifier": "linear"}, {"classifier": "mlp"}),
          provenance="the CIFAR-10 VGG13 of the first pruning report this product reproduces")
class VGG13BN(nn.Module):
    def __init__(self, num_classes: int = 10, classifier: str = "linear"):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG13:  # torchvision's make_layers: indices match its state dicts
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        if classifier == "mlp":
            self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Dropout(),
                                            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(), nn.Linear(512, num_classes))
        else:
            self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# The second pruning report's Keras network, layer for layer, named as Keras names them (so `--layer conv2d_12`
# is the report's layer). Keras' Conv2D(activation='relu') applies ReLU before the BatchNorm.
_KERAS_BLOCKS = ((64, 64, "bn", "pool", 0.05), (128, 128, "bn", "pool", 0.1),
                 (256, "bn", 256, "bn", 256, "bn", "pool", 0.15), (512, "bn", 512, "bn", 512, "bn", "pool", 0.2),
                 (512, "bn", 512, "bn", 512, "bn", "pool", 0.25))


def _keras_vgg_layers(num_classes: int):
    from collections import OrderedDict

    names = OrderedDict()
    counts = {"conv2d": 0, "batch_normalization": 0, "max_pooling2d": 0, "dropout": 0, "dense": 0}

    def name(kind):
        n = kind if counts[kind] == 0 else f"{kind}_{counts[kind]}"
        counts[kind] += 1
        return n

    c_in = 3
    for block in _KERAS_BLOCKS:
        for item in block:
            if item == "bn":
                names[name("batch_normalization")] = nn.BatchNorm2d(c_in, eps=1e-3, momentum=0.01)
            elif item == "pool":
                names[name("max_pooling2d")] = nn.MaxPool2d(2)
            elif isinstance(item, float):
                names[name("dropout")] = nn.Dropout(item)
            else:
                conv = name("conv2d")
                names[conv] = nn.Conv2d(c_in, item, 3, padding=1)
                names[conv + "_relu"] = nn.ReLU()
                c_in = item
    names["flatten"] = nn.Flatten()
    names[name("dropout")] = nn.Dropout(0.3)
    for width, drop in ((4096, 0.5), (1024, 0.4), (512, None)):
        dense = name("dense")
        names[dense] = nn.Linear(c_in, width)
        names[dense + "_relu"] = nn.ReLU()
        if drop:
            names[name("dropout")] = nn.Dropout(drop)
        c_in = width
    names[name("dense")] = nn.Linear(c_in, num_classes)
    return names


@register("keras_vgg", (3, 32, 32), "multiclass", "cifar10",
          "Keras VGG ported: 13 conv (ReLU then BN), dropout, Dense 4096-1024-512-10; "
          "last conv conv2d_12 (512 at 2x2)",
          provenance="the Keras network of the second pruning report, layer for layer")
class KerasVGG(nn.Sequential):
    def __init__(self, num_classes: int = 10):
        super().__init__(_keras_vgg_layers(num_classes))


@register("pair_cnn", (2, 28, 28), "binary", "fashion_mnist_pairs",
          "pair CNN: two images stacked as 2 channels, LeakyReLU, last conv 64 at 5x5, one logit",
          provenance="the pair network of the third pruning report")
class PairCNN(nn.Module):
    def __init__(self):
        super().__init__()
        act = nn.LeakyReLU
        self.features = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), act(), nn.Conv2d(8, 16, 3, padding=1), act(),
            nn.MaxPool2d(2), nn.Dropout(0.1),
            nn.Conv2d(16, 32, 3, padding=1), act(), nn.MaxPool2d(2), nn.Dropout(0.1),
            nn.Conv2d(32, 64, 3, padding=0), act(), nn.Dropout(0.1),
            nn.Conv2d(64, 64, 3, padding=1), act(), nn.Dropout(0.1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(1600, 64), act(), nn.Linear(64, 32), act(),
                                        nn.Linear(32, 1))

    def forward(self, x):
        return self.classifier(self.features(x))


@register("siamese", (2, 28, 28), "binary", "fashion_mnist_pairs",
          "Siamese net: one shared extractor (32-64-128, BN, ReLU, global pool) run on both "
          "images, projection, classifier on [|a-b|, a*b], one logit",
          provenance="the Siamese network of the fourth pruning report")
class SiameseCompareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.projection = nn.Linear(128, 128)
        self.classifier = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1))

    def embed(self, x):
        return self.projection(torch.flatten(self.feature_extractor(x), 1))

    def forward(self, x):
        # The pair arrives as two channels; each image goes through the same extractor.
        a, b = self.embed(x[:, 0:1]), self.embed(x[:, 1:2])
        return self.classifier(torch.cat([torch.abs(a - b), a * b], dim=1))


@register("lenet300", (1, 28, 28), "multiclass", "fashion_mnist",
          "LeNet-300-100: fully connected 784-300-100-10, no conv layer",
          provenance="Han et al. 2015, Learning both Weights and Connections")
class LeNet300(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))
