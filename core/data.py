"""Data set registry: where each data set is found offline, how it is read and normalised.

Fashion-MNIST is looked for, in order: a `--data-root` the user named (torchvision's layout
`ROOT/FashionMNIST/raw/` or the four IDX files directly in ROOT), Debian's package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), then torchvision's download into the
app's cache directory, which works only with internet.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataUnavailable(RuntimeError):
    """A data set could not be found or read; the message says how to get it."""


def cache_dir() -> Path:
    """The only place the product writes on its own (downloads, decompressed data)."""
    return Path(os.environ.get("PRUNE_EXPLORER_CACHE", Path.home() / ".cache" / "pruning-explorer"))


@dataclass(frozen=True)
class DataSpec:
    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class DataSplit:
    """A whole split as tensors: `x` normalised float (N, C, H, W), `y` int64 labels. Read-only."""

    spec: DataSpec
    train: bool
    x: torch.Tensor
    y: torch.Tensor
    source: str  # where the files were found, shown to the user

    def __len__(self) -> int:
        return len(self.y)


FASHION_MNIST = DataSpec(
    name="fashion_mnist",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mean=(0.2860,),
    std=(0.3530,),
    input_shape=(1, 28, 28),
)

DATASETS: dict[str, DataSpec] = {FASHION_MNIST.name: FASHION_MNIST}

_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataUnavailable(f"{path} is not an unsigned-byte IDX file.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise DataUnavailable(f"{path} is truncated: expected {count} values, found {len(raw) - offset}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_folders(data_root: Path | None) -> list[Path]:
    folders = []
    if data_root is not None:
        folders += [data_root / "FashionMNIST" / "raw", data_root]
    folders.append(DEBIAN_FASHION_MNIST)
    folders.append(cache_dir() / "data" / "FashionMNIST" / "raw")
    return folders


def _download_fashion_mnist() -> Path:
    from torchvision.datasets import FashionMNIST

    root = cache_dir() / "data"
    print(f"Fashion-MNIST not found locally; downloading it with torchvision into {root} ...", flush=True)
    FashionMNIST(root, train=False, download=True)
    FashionMNIST(root, train=True, download=True)
    return root / "FashionMNIST" / "raw"


def locate_fashion_mnist(train: bool, data_root: str | Path | None = None,
                         allow_download: bool = True) -> tuple[Path, Path]:
    root = Path(data_root) if data_root is not None else None
    if root is not None and not root.is_dir():
        raise DataUnavailable(f"--data-root {root} is not a directory.")
    images, labels = _IDX_FILES[train]
    tried = _idx_folders(root)
    for folder in tried:
        found = _find_idx(folder, images), _find_idx(folder, labels)
        if all(found):
            return found
    if allow_download:
        try:
            folder = _download_fashion_mnist()
            found = _find_idx(folder, images), _find_idx(folder, labels)
            if all(found):
                return found
        except Exception as exc:  # no network, disk full, ...: fall through to the message
            reason = f" The download failed: {exc}."
        else:
            reason = ""
    else:
        reason = ""
    raise DataUnavailable(
        "Fashion-MNIST was not found (looked in: " + ", ".join(str(f) for f in tried) + ")."
        + reason
        + " Either install Debian's package (`sudo apt-get install dataset-fashion-mnist`), or pass"
        " --data-root DIR holding the four IDX files (torchvision's layout DIR/FashionMNIST/raw/ works),"
        " or run once with internet so torchvision can download it."
    )


@lru_cache(maxsize=4)
def load(name: str = "fashion_mnist", train: bool = False, data_root: str | None = None) -> DataSplit:
    """The whole split as normalised tensors. Cached: callers must not write into them."""
    if name not in DATASETS:
        raise DataUnavailable(f"Unknown data set '{name}'. Known: {', '.join(sorted(DATASETS))}.")
    spec = DATASETS[name]
    images_path, labels_path = locate_fashion_mnist(train, data_root)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataUnavailable(f"{images_path} and {labels_path} do not match: {images.shape} vs {labels.shape}.")
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    x.sub_(spec.mean[0]).div_(spec.std[0])
    y = torch.from_numpy(labels.astype(np.int64))
    return DataSplit(spec=spec, train=train, x=x, y=y, source=str(images_path.parent))
