"""Loaders on files written in the real formats, checkpoint round trips, safe loading."""
import gzip
import io

import numpy as np
import pytest
import torch

from core import checkpoints, data, models


def write_idx(path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def tiny_fashion(tmp_path):
    """A tiny Fashion-MNIST in torchvision's layout ROOT/FashionMNIST/raw (uncompressed)."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28))
    labels = np.arange(7) % 10
    for prefix in ("t10k", "train"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz=False)
    return tmp_path, images, labels


def test_data_root_in_torchvision_layout_is_read_and_normalised(tiny_fashion):
    root, images, labels = tiny_fashion
    split = data.load("fashion_mnist", train=False, data_root=str(root))
    assert split.x.shape == (7, 1, 28, 28) and split.y.tolist() == labels.tolist()
    expected = (torch.from_numpy(images).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(split.x[:, 0], expected)
    assert split.spec.class_names[9] == "Ankle boot"


def test_gzipped_idx_and_truncated_idx(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr, gz=True)
    assert (data.read_idx(tmp_path / "a.gz") == arr).all()
    write_idx(tmp_path / "b", arr, gz=False)
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-5])
    with pytest.raises(data.DataUnavailable, match="truncated"):
        data.read_idx(tmp_path / "c")


def test_debian_package_files_are_found():
    split = data.load("fashion_mnist", train=False)
    assert len(split) == 10_000 and split.y.bincount().tolist() == [1000] * 10


def test_missing_data_set_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nothing")
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path / "cache"))

    def no_network():
        raise OSError("no route to host")

    monkeypatch.setattr(data, "_torchvision_download", lambda name: no_network())
    with pytest.raises(data.DataUnavailable) as err:
        data.locate("fashion_mnist", train=False, data_root=tmp_path)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
    assert "no route to host" in message


def test_checkpoint_round_trip(tmp_path):
    model = models.build("small_vgg").eval()
    path = tmp_path / "m.pt"
    checkpoints.save(path, "small_vgg", {}, model, {"dataset": "fashion_mnist", "test_accuracy": 0.5})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"arch", "arch_kwargs", "state_dict", "meta"}
    ckpt = checkpoints.load(path)
    assert ckpt.arch == "small_vgg" and ckpt.meta["test_accuracy"] == 0.5 and len(ckpt.digest) == 64
    rebuilt = ckpt.build_model()
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_plain_state_dict_is_recognised(tmp_path):
    model = models.build("small_resnet")
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    assert checkpoints.load(path).arch == "small_resnet"


def test_bundled_checkpoints_load_safely_with_metadata():
    from conftest import BUNDLED

    for path in BUNDLED.values():
        raw = torch.load(path, weights_only=True)
        meta = raw["meta"]
        assert meta["dataset"] == "fashion_mnist" and meta["class_names"][0] == "T-shirt/top"
        assert meta["normalization"] == {"mean": [0.2860], "std": [0.3530]}
        assert meta["train_command"].startswith("python -m core train")
        assert path.stat().st_size < 25 * 2**20


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused_with_advice():
    buf = io.BytesIO()
    torch.save({"model": Evil()}, buf)
    with pytest.raises(checkpoints.CheckpointError, match=r"state_dict\(\)"):
        checkpoints.from_bytes(buf.getvalue())


def test_random_bytes_and_wrong_shapes_are_refused():
    with pytest.raises(checkpoints.CheckpointError, match="Not a PyTorch checkpoint"):
        checkpoints.from_bytes(b"\xff\xd8\xff\xe0 not a checkpoint")
    whole = _saved(models.build("small_vgg").state_dict())
    with pytest.raises(checkpoints.CheckpointError, match="Not a readable PyTorch checkpoint"):
        checkpoints.from_bytes(whole[: len(whole) // 2])
    sd = models.build("small_vgg").state_dict()
    sd["classifier.weight"] = torch.zeros(3, 3)
    with pytest.raises(checkpoints.CheckpointError, match=r"'classifier.weight' has shape \[3, 3\] in the file, "
                                                          r"but 'small_vgg' expects \[10, 512\]"):
        checkpoints.from_bytes(_saved(sd))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
