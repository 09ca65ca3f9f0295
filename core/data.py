"""Data set registry: where each data set is found offline, how it is read and normalised.

Each data set is looked for, in order: a `--data-root` the user named (torchvision's layout, or the
files directly in it), a Debian package where one exists (`dataset-fashion-mnist` puts
Fashion-MNIST in /usr/share/datasets/fashion-mnist), then torchvision's download into the app's
cache directory, which works only with internet. Pair data sets are built deterministically from
their base data set, and image folders are read with torchvision's ImageFolder.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import inputs
from .inputs import Preparation
from .untrusted import env_int, printable

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PAIR_SEED = 0


class DataUnavailable(RuntimeError):
    """A data set could not be found or read; the message says how to get it. `public` is the message
    without the server's own paths, for a visitor of the app; str() adds them, for the CLI."""

    def __init__(self, message: str, server_detail: str = ""):
        super().__init__(message + (f" ({server_detail})" if server_detail else ""))
        self.public, self.server_detail = message, server_detail


def cache_dir() -> Path:
    """The only place the product writes on its own (downloads, unpacked uploads)."""
    return Path(os.environ.get("PRUNE_EXPLORER_CACHE", Path.home() / ".cache" / "pruning-explorer"))


@dataclass(frozen=True)
class DataSpec:
    name: str
    title: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]
    how_to_get: str


@dataclass(frozen=True)
class DataSplit:
    """A whole split as tensors: `x` the model's inputs (N, C, H, W), prepared by `prep`; `y` int64 labels.
    Read-only."""

    spec: DataSpec
    train: bool
    x: torch.Tensor
    y: torch.Tensor
    source: str  # where the files were found, shown to the user
    prep: Preparation = inputs.NONE  # how the pixels were prepared (see core/inputs.py)

    def __len__(self) -> int:
        return len(self.y)


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_TORCHVISION = "or run once with internet so torchvision can download it"

DATASETS: dict[str, DataSpec] = {s.name: s for s in (
    DataSpec("fashion_mnist", "Fashion-MNIST", FASHION_CLASSES, (0.2860,), (0.3530,), (1, 28, 28),
             "install Debian's package (`sudo apt-get install dataset-fashion-mnist`), or pass --data-root DIR "
             "holding the four IDX files (torchvision's layout DIR/FashionMNIST/raw/ works), " + _TORCHVISION),
    DataSpec("mnist", "MNIST", tuple(str(d) for d in range(10)), (0.1307,), (0.3081,), (1, 28, 28),
             "pass --data-root DIR holding the four MNIST IDX files (torchvision's layout DIR/MNIST/raw/ works), "
             + _TORCHVISION),
    DataSpec("cifar10", "CIFAR-10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"),
             (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32),
             "pass --data-root DIR holding cifar-10-batches-py/ (the python version), " + _TORCHVISION),
    DataSpec("fashion_mnist_pairs", "Fashion-MNIST pairs (same class or not)", ("different", "same"),
             (0.2860,), (0.3530,), (2, 28, 28), "it is built from Fashion-MNIST: "),
    DataSpec("mnist_pairs", "MNIST digit pairs (same digit or not)", ("different", "same"),
             (0.1307,), (0.3081,), (2, 28, 28), "it is built from MNIST: "),
)}


# ---------------------------------------------------------------------------------------------
# File formats

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataUnavailable(f"{path.name} could not be read: {type(exc).__name__}.", server_detail=str(path)) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataUnavailable(f"{path.name} is not an unsigned-byte IDX file.", server_detail=str(path))
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise DataUnavailable(f"{path.name} is truncated: expected {count} values, found {len(raw) - offset}.",
                              server_detail=str(path))
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles: allow numpy arrays and nothing else, so no code runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR-10 batch")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataUnavailable(f"{path} is not a readable CIFAR-10 python batch: {exc}") from None
    return images, labels


# ---------------------------------------------------------------------------------------------
# Finding files

_IDX_STEMS = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _torchvision_download(name: str) -> Path:
    """Download with torchvision into the cache; returns the folder holding the files."""
    import torchvision.datasets as tvd

    root = cache_dir() / "data"
    print(f"{DATASETS[name].title} not found locally; downloading it with torchvision into {root} ...", flush=True)
    if name == "cifar10":
        tvd.CIFAR10(root, train=False, download=True)
        tvd.CIFAR10(root, train=True, download=True)
        return root / "cifar-10-batches-py"
    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST}[name]
    cls(root, train=False, download=True)
    cls(root, train=True, download=True)
    return root / cls.__name__ / "raw"


def _candidate_folders(name: str, data_root: Path | None) -> list[Path]:
    sub = {"fashion_mnist": "FashionMNIST/raw", "mnist": "MNIST/raw", "cifar10": "cifar-10-batches-py"}[name]
    folders = [data_root / sub, data_root] if data_root is not None else []
    if name == "fashion_mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    folders.append(cache_dir() / "data" / sub)
    return folders


def _files_in(name: str, folder: Path, train: bool) -> list[Path] | None:
    if name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        files = [folder / n for n in names]
        return files if all(f.is_file() for f in files) else None
    found = [_find_idx(folder, stem) for stem in _IDX_STEMS[train]]
    return found if all(found) else None


def locate(name: str, train: bool, data_root: str | Path | None = None,
           allow_download: bool = True) -> list[Path]:
    """The files of a split, or DataUnavailable naming every place looked in and how to get them."""
    root = Path(data_root) if data_root is not None else None
    if root is not None and not root.is_dir():
        raise DataUnavailable(f"--data-root {root} is not a directory.")
    tried = _candidate_folders(name, root)
    for folder in tried:
        files = _files_in(name, folder, train)
        if files:
            return files
    reason = ""
    if allow_download:
        try:
            files = _files_in(name, _torchvision_download(name), train)
            if files:
                return files
        except Exception as exc:  # no network, disk full, ...: fall through to the message
            reason = f" The download failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}."
    spec = DATASETS[name]
    raise DataUnavailable(f"{spec.title} was not found.{reason} To get it, {spec.how_to_get}.",
                          server_detail=f"looked in: {', '.join(map(str, tried))}")


# ---------------------------------------------------------------------------------------------
# Loading

def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images as float pixels in [0, 1], (N, C, H, W)."""
    x = torch.from_numpy(np.array(images)).float().div_(255.0)  # a copy: IDX arrays are read-only
    return x.unsqueeze(1) if x.dim() == 3 else x


def _prepared(x: torch.Tensor, prep: Preparation) -> torch.Tensor:
    """`(x - mean) / std` per channel, in place (an exact no-op where the preparation does not normalise)."""
    if not prep.normalised:
        return x
    mean, std = prep.stats(x.shape[1])
    return x.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))


def _load_images(name: str, train: bool, data_root: str | None, prep: Preparation) -> DataSplit:
    spec = DATASETS[name]
    files = locate(name, train, data_root)
    if name == "cifar10":
        parts = [read_cifar_batch(f) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    else:
        images, labels = read_idx(files[0]), read_idx(files[1]).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataUnavailable(f"{files[0]} and {files[1]} do not match: {images.shape} vs {labels.shape}.")
    return DataSplit(spec, train, _prepared(_pixels(images), prep), torch.from_numpy(labels), str(files[0].parent),
                     prep)


def make_pairs(labels: torch.Tensor, seed: int = PAIR_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair per image: itself and, with probability 1/2, an image of the same class, else of another.

    Deterministic for a seed. Returns (first index, second index, label 1 = same class).
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    same = torch.rand(n, generator=gen) < 0.5
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
    classes = sorted(by_class)
    partner = torch.empty(n, dtype=torch.long)
    picks = torch.rand(n, generator=gen)
    other_class = torch.randint(1, len(classes), (n,), generator=gen)
    for i in range(n):
        c = int(labels[i])
        target = c if same[i] else classes[(classes.index(c) + int(other_class[i])) % len(classes)]
        pool = by_class[target]
        partner[i] = pool[int(picks[i] * len(pool))]
    return torch.arange(n), partner, same.long()


def _load_pairs(name: str, train: bool, data_root: str | None, prep: Preparation) -> DataSplit:
    # Preparing is elementwise, so stacking prepared images gives the same numbers as preparing the
    # stack; with one mean and std for both channels the base set's own cached split serves.
    shared = len(prep.mean) == 1
    base = load(name.removesuffix("_pairs"), train, data_root, prep if shared else inputs.NONE)
    first, second, same = make_pairs(base.y, seed=PAIR_SEED + (1 if train else 0))
    x = torch.cat([base.x[first], base.x[second]], dim=1)  # (N, 2, 28, 28): the two images as channels
    return DataSplit(DATASETS[name], train, x if shared else _prepared(x, prep), same, base.source, prep)


@lru_cache(maxsize=8)
def load(name: str = "fashion_mnist", train: bool = False, data_root: str | None = None,
         prep: Preparation | None = None) -> DataSplit:
    """The whole split as the model's inputs: pixels in [0, 1] prepared by `prep` (None: the data set's
    usual mean and std). Cached: callers must not write into them."""
    if name not in DATASETS:
        raise DataUnavailable(f"Unknown data set '{name}'. Known: {', '.join(sorted(DATASETS))}.")
    spec = DATASETS[name]
    prep = prep if prep is not None else inputs.usual(spec, spec.input_shape[0])
    if not prep.fits(spec.input_shape[0]):
        raise DataUnavailable(f"The input preparation gives {len(prep.mean)} means, but '{name}' has "
                              f"{spec.input_shape[0]}-channel images.")
    loader: Callable = _load_pairs if name.endswith("_pairs") else _load_images
    return loader(name, train, data_root, prep)


# ---------------------------------------------------------------------------------------------
# One's own images: a folder, or an uploaded zip of one, bounded before anything is decoded

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def image_limits() -> dict[str, int]:
    """The bounds on one's own images (environment variables, see README)."""
    return {"files": env_int("PRUNE_EXPLORER_MAX_IMAGES", 10_000),
            "bytes": env_int("PRUNE_EXPLORER_MAX_ZIP_MB", 200) * 2**20,
            "pixels": env_int("PRUNE_EXPLORER_MAX_IMAGE_PIXELS", 4096 * 4096),
            "total_pixels": env_int("PRUNE_EXPLORER_MAX_TOTAL_PIXELS", 200_000_000),
            "unpacked": env_int("PRUNE_EXPLORER_MAX_UNPACKED", 8),
            "resized_bytes": env_int("PRUNE_EXPLORER_MAX_FOLDER_MB", 1024) * 2**20}


MAX_CLASSES = 1000  # classes of one's own images (ImageNet's count; the pages list classes by name)


def uploads_dir() -> Path:
    return cache_dir() / "uploads"


def _shown(path: Path) -> str:
    """How a folder is named to the user: never the server's path for an upload."""
    try:
        path.resolve().relative_to(uploads_dir().resolve())
        return "the uploaded images"
    except ValueError:
        return str(path)


def check_local(name: str, data_root: str | Path | None = None) -> None:
    """Quickly, without downloading: is the test split of a registered data set here? Raises DataUnavailable."""
    if not isinstance(name, str) or name not in DATASETS:
        raise DataUnavailable(f"Unknown data set '{str(name)[:60]}'. Known: {', '.join(sorted(DATASETS))}.")
    base = name.removesuffix("_pairs")
    try:
        locate(base, False, data_root, allow_download=False)
    except DataUnavailable as exc:
        raise DataUnavailable(exc.public.replace(" or run once with internet so torchvision can download it",
                                                 " or run the command line once with internet"),
                              server_detail=exc.server_detail) from None


def _image_size(source, label: str, limits: dict) -> int:
    """Pixels of one image, read from its header (nothing decoded); refuses what is no image or too large."""
    from PIL import Image, UnidentifiedImageError

    too_large = (f"{label} is larger than the {limits['pixels']:,} pixels per image this server accepts "
                 "(PRUNE_EXPLORER_MAX_IMAGE_PIXELS)")
    try:
        with Image.open(source) as img:
            w, h = img.size
    except Image.DecompressionBombError:
        raise DataUnavailable(too_large + ".") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataUnavailable(f"{label} is not an image this server can read ({type(exc).__name__}).") from None
    if w * h > limits["pixels"]:
        raise DataUnavailable(f"{too_large}: it is {w} x {h}.")
    return w * h


def _check_classes(classes: list[str], shown: str) -> bool:
    """Refuse more class folders than MAX_CLASSES, or a folder named by an index of MAX_CLASSES or more;
    whether the folders are all named by index ("3_dress")."""
    if len(classes) > MAX_CLASSES:
        raise DataUnavailable(f"{shown} holds {len(classes):,} class folders, more than the {MAX_CLASSES:,} "
                              "this product shows.")
    prefixes = [re.match(r"^(\d+)", c) for c in classes]
    indexed = all(prefixes)
    for name, m in zip(classes, prefixes):
        if indexed and int(m.group(1)) >= MAX_CLASSES:
            raise DataUnavailable(f"{shown}: the class folder '{printable(name, 60)}' starts with an index of "
                                  f"{printable(m.group(1), 24)}; indices must be below {MAX_CLASSES:,}.")
    return indexed


def load_image_folder(path: str | Path, input_shape: tuple[int, ...], prep: Preparation) -> DataSplit:
    """One's own data in torchvision's ImageFolder layout (a folder per class), resized to the model's input
    and prepared as the model's inputs are (`prep`). Bounded before decoding: the number of images, pixels
    per image and in all (see `image_limits`)."""
    from PIL import Image
    from torchvision import datasets, transforms

    path = Path(path)
    shown = _shown(path)
    if not path.is_dir():
        if shown == "the uploaded images":
            raise DataUnavailable("The uploaded images are no longer on the server (it keeps the last "
                                  f"{image_limits()['unpacked']} zips); upload the zip again.")
        raise DataUnavailable("The image folder does not exist.", server_detail=str(path))
    os.utime(path)  # recently used: kept by the uploads' LRU bound
    channels, h, w = input_shape
    tf = transforms.Compose(([transforms.Grayscale(channels)] if channels in (1, 3) else [])
                            + [transforms.Resize((h, w)), transforms.ToTensor()])
    limits = image_limits()
    try:
        ds = datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, OSError) as exc:
        reason = str(exc).replace(str(path), "it") if shown != str(path) else str(exc)
        raise DataUnavailable(f"{shown} is not an image folder (one sub-folder of images per class): "
                              f"{reason[:200]}") from None
    if len(ds) > limits["files"]:
        raise DataUnavailable(f"{shown} holds {len(ds):,} images, more than the {limits['files']:,} this server "
                              "accepts (PRUNE_EXPLORER_MAX_IMAGES).")
    indexed = _check_classes(ds.classes, shown)
    resized = len(ds) * channels * h * w * 4  # float32, at the model's input size: before any is resized
    if resized > limits["resized_bytes"]:
        raise DataUnavailable(f"{shown} would take {resized / 2**20:,.0f} MB once its {len(ds):,} images are "
                              f"resized to the model's {channels}x{h}x{w} input, more than the "
                              f"{limits['resized_bytes'] // 2**20:,} MB this server accepts (PRUNE_EXPLORER_MAX_FOLDER_MB).")
    total = 0
    for file, _ in ds.samples:
        total += _image_size(file, f"'{Path(file).relative_to(path).as_posix()[:120]}' in {shown}", limits)
        if total > limits["total_pixels"]:
            raise DataUnavailable(f"{shown} holds more than {limits['total_pixels']:,} pixels in all "
                                  "(PRUNE_EXPLORER_MAX_TOTAL_PIXELS).")
    xs, ys = [], []
    for i, (file, _) in enumerate(ds.samples):
        try:
            x, y = ds[i]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataUnavailable(f"'{Path(file).relative_to(path).as_posix()[:120]}' in {shown} could not be read "
                                  f"as an image ({type(exc).__name__}).") from None
        xs.append(x)
        ys.append(y)
    if indexed:  # folders named with the class index first ("3_dress") keep it, even if some class is absent
        ys = [int(re.match(r"^(\d+)", ds.classes[y]).group(1)) for y in ys]
    mean, std = prep.stats(channels)
    spec = DataSpec(f"image_folder:{path}", path.name, tuple(ds.classes), mean, std, input_shape,
                    "check the folder")
    return DataSplit(spec, False, _prepared(torch.stack(xs), prep), torch.tensor(ys), str(path), prep)


def _zip_members(zf, label: str, limits: dict) -> tuple[list, str]:
    """The image members to unpack and the folder holding the class folders; every refusal one sentence."""
    import stat
    import zipfile
    from pathlib import PurePosixPath

    infos = zf.infolist()
    if len(infos) > 4 * limits["files"]:
        raise DataUnavailable(f"{label} has {len(infos):,} entries, more than this server accepts.")
    files, names, folders = [], set(), set()
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name or ":" in (parts[0] if parts else ""):
            raise DataUnavailable(f"{label} tries to write outside its folder ({name[:80]}); refused.")
        if any(len(p.encode()) > 200 for p in parts) or len(name) > 1000:
            raise DataUnavailable(f"{label} holds a name longer than 200 characters ({name[:40]}...); refused.")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DataUnavailable(f"{label} holds a symbolic link ({name[:80]}); only images and folders are accepted.")
        if info.flag_bits & 0x1:
            raise DataUnavailable(f"{label} is encrypted; upload an unencrypted zip.")
        if info.is_dir():
            folders.add(PurePosixPath(name).as_posix().rstrip("/"))
            continue
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # macOS and editor leftovers, ignored as ImageFolder ignores them
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue  # ImageFolder reads images only
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise DataUnavailable(f"{label} uses a compression this server does not read; zip it again.")
        if name in names:
            raise DataUnavailable(f"{label} holds '{name[:80]}' twice.")
        names.add(name)
        files.append(info)
    for name in names:  # a file and a folder of the same name cannot both be unpacked
        parents = [p.as_posix() for p in PurePosixPath(name).parents][:-1]
        clash = next((p for p in parents if p in names), None)
        if clash is not None or name in folders:
            raise DataUnavailable(f"{label} holds both a file and a folder named '{(clash or name)[:80]}'.")
    if not files:
        raise DataUnavailable(f"{label} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders.")
    if len(files) > limits["files"]:
        raise DataUnavailable(f"{label} holds {len(files):,} images, more than the {limits['files']:,} this server "
                              "accepts (PRUNE_EXPLORER_MAX_IMAGES).")
    total = sum(i.file_size for i in files)
    if total > limits["bytes"]:
        raise DataUnavailable(f"{label} unpacks to {total / 2**20:,.0f} MB, more than the "
                              f"{limits['bytes'] // 2**20:,} MB this server accepts (PRUNE_EXPLORER_MAX_ZIP_MB).")
    tops = {PurePosixPath(i.filename).parts[0] for i in files}
    root = ""
    if len(tops) == 1 and all(len(PurePosixPath(i.filename).parts) >= 3 for i in files):
        root = tops.pop()  # one folder holding the class folders
    if any(len(PurePosixPath(i.filename).parts) < (3 if root else 2) for i in files):
        raise DataUnavailable(f"{label} has images outside class folders: put each class's images in a folder "
                              "named after the class (e.g. 3_dress/img1.png).")
    _check_classes(sorted({PurePosixPath(i.filename).parts[1 if root else 0] for i in files}), label)  # before unpacking
    return files, root


def _prune_uploads(keep: Path, limit: int) -> None:
    """Keep the `limit` most recently used unpacked zips (and `keep`); remove the others."""
    import shutil
    import time

    try:
        entries = [p for p in uploads_dir().iterdir() if p.is_dir()]
    except OSError:
        return
    stale = [p for p in entries if p.name.startswith(".tmp-") and time.time() - p.stat().st_mtime > 3600]
    done = sorted((p for p in entries if not p.name.startswith(".tmp-") and p != keep),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for p in stale + done[max(limit - 1, 0):]:
        shutil.rmtree(p, ignore_errors=True)


def unpack_zip(data: bytes, name: str) -> Path:
    """An uploaded zip of an image folder, unpacked into the cache (never outside it), after every
    member was checked: names, links, count, sizes, and each image's header (kind and pixels).
    Folders are keyed by the zip's digest; only the most recently used few are kept."""
    import hashlib
    import io
    import shutil
    import tempfile
    import zipfile
    import zlib

    label = f"'{str(name)[:80]}'"
    limits = image_limits()
    target = uploads_dir() / hashlib.sha256(data).hexdigest()[:16]
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        files, root = _zip_members(zf, label, limits)
        if target.is_dir():
            os.utime(target)
            return target / root if root else target
        uploads_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=uploads_dir()))
        try:
            total = 0
            for info in files:
                body = zf.read(info)  # at most its declared size: zipfile stops there and checks the CRC
                total += _image_size(io.BytesIO(body), f"'{info.filename[:120]}' in {label}", limits)
                if total > limits["total_pixels"]:
                    raise DataUnavailable(f"{label} holds more than {limits['total_pixels']:,} pixels in all "
                                          "(PRUNE_EXPLORER_MAX_TOTAL_PIXELS).")
                dest = (tmp / info.filename).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise DataUnavailable(f"{label} tries to write outside its folder ({info.filename[:80]}); refused.")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(body)
            try:
                os.replace(tmp, target)
            except OSError:  # the same zip, unpacked at the same time by another session
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        if isinstance(exc, DataUnavailable):
            raise
        raise DataUnavailable(f"{label} is not a readable zip file.") from None
    except OSError as exc:
        raise DataUnavailable(f"{label} could not be unpacked on the server ({exc.strerror or type(exc).__name__}).") \
            from None
    _prune_uploads(target, limits["unpacked"])
    return target / root if root else target
