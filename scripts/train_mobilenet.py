"""Train the bundled MobileNet-style model and ship it only as a torch.export program.

    python scripts/train_mobilenet.py --out checkpoints/fmnist_mobilenet.pt2 [--epochs 4] [--seed 0]

The architecture below is deliberately NOT in the product's registry (core/models.py) and the
product never imports this script: the app and the CLI know this model only through its `.pt2`
file, exactly as they would know a student's own CNN. It has what registered models lack:
depthwise-separable blocks (grouped 3x3 convs then 1x1 convs), Hardswish, residual adds, and a
branch concatenated along the channels.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import data, program  # noqa: E402
from core.train import recipe  # noqa: E402


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv, BN, Hardswish, then 1x1 pointwise conv, BN, Hardswish; a residual add
    when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False)
        self.dw_bn = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(c_out)
        self.act = nn.Hardswish()
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.act(self.pw_bn(self.pw(self.act(self.dw_bn(self.dw(x))))))
        return x + y if self.residual else y


class MobileNetish(nn.Module):
    """28x28 grey images -> 10 classes; the last conv `head` has 256 channels at 4x4."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(
            DepthwiseSeparable(16, 32, stride=2),    # 28 -> 14
            DepthwiseSeparable(32, 64, stride=2),    # 14 -> 7
            DepthwiseSeparable(64, 64),
            DepthwiseSeparable(64, 128, stride=2),   # 7 -> 4
            DepthwiseSeparable(128, 128),
        )
        # Two branches concatenated: a 1x1 and a 3x3 view of the same features (Inception-like).
        self.branch1 = nn.Sequential(nn.Conv2d(128, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.branch3 = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Conv2d(128, 256, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(256)
        self.act = nn.Hardswish()
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.cat([self.branch1(x), self.branch3(x)], dim=1)
        x = self.act(self.head_bn(self.head(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    train, test = data.load("fashion_mnist", train=True), data.load("fashion_mnist", train=False)
    model, correct, seconds = recipe(MobileNetish(), train, test, "multiclass", args.epochs, args.batch_size, args.lr,
                                     weight_decay=5e-4, seed=args.seed, bar=False)
    spec = data.DATASETS["fashion_mnist"]
    meta = {
        "dataset": "fashion_mnist", "architecture": "MobileNetish",
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "class_names": list(spec.class_names),
        "test_accuracy": correct / len(test), "test_correct": correct, "test_total": len(test),
        "train_command": "python scripts/train_mobilenet.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "train_seconds": round(seconds, 1), "torch_version": str(torch.__version__),
    }
    program.save(model, (1, 28, 28), args.out, meta)
    print(f"saved {args.out}: test accuracy {correct}/{len(test)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
