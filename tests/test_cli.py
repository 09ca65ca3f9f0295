"""The CLI as a user runs it: real files; a real child process for the sweep, the rest in this process
(`conftest.cli`: the same parser, commands and error handling, without importing torch again)."""
import csv
import subprocess
import sys

import pytest

from conftest import BUNDLED, ROOT, cli, full_engine
from core import checkpoints


def run(*args):
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_writes_exact_counts(tmp_path):
    """A real child process, on the whole test set (each bundled model's own exactness: test_engine.py)."""
    ckpt, eng = checkpoints.load(BUNDLED["vgg"]), full_engine(BUNDLED["vgg"])
    out = tmp_path / "curve.csv"
    res = run("sweep", str(BUNDLED["vgg"]), "--ks", "0,256,512", "--mode", "remove",
              "--device", "cpu", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = read(out)
    assert [int(r["k"]) for r in rows] == [0, 256, 512]
    assert int(rows[0]["correct"]) == ckpt.meta["test_correct"]
    for r in rows:
        assert int(r["correct"]) == eng.correct(int(r["k"]), "remove")
        assert int(r["total"]) == 10_000 and r["accuracy"] == f"{int(r['correct']) / 10_000:.4f}"
    assert "capturing activations" in res.stderr  # the progress bar


@pytest.mark.slow
def test_rank_writes_every_channel_in_ascending_order(tmp_path, fmnist_subset):
    out = tmp_path / "rank.csv"
    res = cli("rank", str(BUNDLED["vgg"]), "--criterion", "mean_abs", "--out", str(out), "--data-root", fmnist_subset)
    assert res.returncode == 0, res.stderr
    rows = read(out)
    assert [int(r["rank"]) for r in rows] == list(range(512))
    assert sorted(int(r["channel"]) for r in rows) == list(range(512))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)


@pytest.mark.slow
def test_range_spec_and_errors(tmp_path, fmnist_subset):
    out = tmp_path / "c.csv"
    res = cli("sweep", str(BUNDLED["vgg"]), "--ks", "0:513:32", "--out", str(out), "--data-root", fmnist_subset)
    assert res.returncode == 0, res.stderr
    assert [int(r["k"]) for r in read(out)] == list(range(0, 513, 32))

    bad = cli("sweep", str(BUNDLED["vgg"]), "--ks", "600", "--out", str(out))
    assert bad.returncode == 2 and "between 0 and 512" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("rank", str(tmp_path / "nope.pt"), "--out", str(out))
    assert missing.returncode == 2 and "No such checkpoint file" in missing.stderr
