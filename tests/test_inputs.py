"""How a model's inputs are prepared is part of the model: stated, chosen, or assumed and said so.

The reference is a student's own test: a small CNN trained here on Fashion-MNIST pixels in [0, 1]
(no normalisation, as most course notebooks do), evaluated on the raw IDX test images divided by
255, without anything of this product in between.
"""
import io
import json

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from conftest import BUNDLED, ROOT
from core import checkpoints, data, engine, inputs, program
from core.__main__ import main


class StudentCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def raw_pixels(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The IDX files as a notebook reads them: uint8 / 255, nothing else."""
    images, labels = data.locate("fashion_mnist", train)
    x = torch.from_numpy(np.array(data.read_idx(images))).float().unsqueeze(1) / 255
    return x, torch.from_numpy(data.read_idx(labels).astype(np.int64))


@pytest.fixture(scope="module")
def student():
    """(model, its own test count) after 2 seeded epochs on 6,000 training images: about 84%."""
    torch.manual_seed(0)
    x, y = raw_pixels(train=True)
    x, y = x[:6000], y[:6000]
    model = StudentCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in torch.randperm(len(y), generator=gen).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    tx, ty = raw_pixels(train=False)
    with torch.no_grad():
        own = int((model(tx).argmax(1) == ty).sum())
    assert own > 7000, own  # a real model, well above chance
    return model, own


def exported(model, meta: dict | None) -> bytes:
    buf = io.BytesIO()
    ep = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, buf, extra_files={"meta.json": json.dumps(meta)} if meta is not None else None)
    return buf.getvalue()


def test_a_stated_preparation_gives_the_students_own_accuracy(student):
    model, own = student
    ckpt = checkpoints.from_bytes(exported(model, {"input": {"scale": "0-1", "normalize": None}}), name="mine")
    assert ckpt.prep == inputs.NONE and ckpt.prep.source == inputs.FROM_FILE
    assert ckpt.prep.describe() == "pixels scaled to [0, 1], not normalised"
    eng = engine.from_checkpoint(ckpt, device="cpu")
    assert eng.correct(0) == own  # the very count of the student's own test


def test_an_unstated_preparation_is_assumed_said_and_a_better_one_offered(student):
    model, own = student
    ckpt = checkpoints.from_bytes(exported(model, None), name="mine")
    assert ckpt.prep.source == inputs.ASSUMED and ckpt.prep.mean == (0.2860,)  # Fashion-MNIST's usual
    assumed = engine.from_checkpoint(ckpt, device="cpu").correct(0)
    assert assumed < own - 1000  # the silent normalisation: about 70% against 84% here
    hint = inputs.better_preparation(ckpt)
    assert hint is not None and hint.better == inputs.NONE and hint.sample == 500
    assert hint.better_accuracy - hint.current_accuracy >= 0.10
    assert "On a sample of the first 500 test images" in hint.sentence and "not normalised" in hint.sentence
    chosen = ckpt.with_prep(hint.better)
    assert chosen.digest != ckpt.digest and chosen.file_digest == ckpt.digest  # its own cache entries
    assert ckpt.prep.source == inputs.ASSUMED  # the shared checkpoint is unchanged
    assert engine.from_checkpoint(chosen, device="cpu").correct(0) == own
    assert chosen.saved_meta()["input"] == {"scale": "0-1", "normalize": None}  # downloads carry the choice


def test_a_bundled_checkpoint_states_its_preparation_and_gets_no_hint():
    ckpt = checkpoints.load(BUNDLED["vgg"])
    assert ckpt.prep.source == inputs.FROM_FILE and ckpt.prep == inputs.Preparation((0.2860,), (0.3530,))
    for path in sorted((ROOT / "checkpoints").iterdir()):
        assert checkpoints.load(path).prep.source == inputs.FROM_FILE, path.name
    assert inputs.better_preparation(ckpt) is None


def test_the_cli_takes_normalize_and_info_says_what_is_assumed(student, tmp_path, capsys):
    model, own = student
    path = tmp_path / "mine.pt2"
    path.write_bytes(exported(model, None))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "inputs: pixels scaled to [0, 1], then normalised with mean 0.286 and std 0.353 (assumed" in out
    assert "Pass --normalize none to use it." in out
    csv = tmp_path / "k0.csv"
    assert main(["sweep", str(path), "--normalize", "none", "--ks", "0", "--out", str(csv)]) == 0
    assert csv.read_text().splitlines()[1].split(",")[:3] == ["0", str(own), "10000"]
    assert main(["sweep", str(path), "--normalize", "0.5/0.5", "--ks", "0", "--out", str(csv)]) == 2
    assert "is none, dataset, or MEAN,STD" in capsys.readouterr().err


def test_export_writes_the_preparation_and_a_chosen_one_travels(tmp_path, capsys):
    out = tmp_path / "vgg.pt2"
    assert main(["export", str(BUNDLED["vgg"]), "--out", str(out)]) == 0
    meta = json.loads(program.extra_files(out.read_bytes())["meta.json"])
    assert meta["input"] == {"scale": "0-1", "mean": [0.286], "std": [0.353]} and "normalization" not in meta
    assert main(["export", str(BUNDLED["vgg"]), "--normalize", "none", "--out", str(out)]) == 0
    again = checkpoints.load(out)
    assert again.prep == inputs.NONE and again.prep.source == inputs.FROM_FILE


@pytest.mark.parametrize("raw,words", [
    ({"scale": "0-255", "mean": [0.5], "std": [0.5]}, "reads images as pixels in [0, 1]"),
    ({"scale": "0-1", "mean": ["a"], "std": [0.5]}, "'meta.input.mean' is not a list of 1 to 64 numbers"),
    ({"scale": "0-1", "mean": [0.5], "std": [0.0]}, "its std positive numbers"),
    ({"scale": "0-1", "mean": [0.1, 0.2, 0.3], "std": [0.2, 0.2, 0.2]}, "gives 3 means, but the model takes 1"),
    ("normalised", "is not a dict like"),
])
def test_a_malformed_preparation_is_refused_in_one_sentence(raw, words):
    model = StudentCNN().eval()
    with pytest.raises(checkpoints.CheckpointError, match=words.replace("[", r"\[").replace("]", r"\]")) as err:
        checkpoints.from_bytes(exported(model, {"input": raw}), name="bad")
    assert "\n" not in str(err.value)


def test_the_load_page_says_offers_and_applies_the_better_preparation(student):
    model, own = student
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/1_load.py").run()
    at.file_uploader(key="upload").set_value(("mine.pt2", exported(model, None), "application/octet-stream")).run()
    assert not at.exception and not at.error
    assert at.session_state["model"] == "upload: mine.pt2"
    text = " ".join(m.value for m in at.markdown)
    assert "**Inputs:** pixels scaled to [0, 1], then normalised with mean 0.286 and std 0.353 (assumed" in text
    (warning,) = [w for w in at.warning if "On a sample of the first 500 test images" in w.value]
    before = next(m.value for m in at.metric if m.label == "Baseline test accuracy")
    at.button(key="prep_use_hint").click().run()
    assert not at.exception
    after = next(m.value for m in at.metric if m.label == "Baseline test accuracy")
    assert after == f"{own / 10000:.2%}" and before != after
    text = " ".join(m.value for m in at.markdown)
    assert "**Inputs:** pixels scaled to [0, 1], not normalised (chosen by you)" in text
    assert at.query_params["inputs"] == "none"  # a copied link keeps the choice
    assert not [w for w in at.warning if "On a sample" in w.value]
