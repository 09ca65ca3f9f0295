"""The engine store (core/store.py): a pass made once is read back, exact, by another process; a bad
file is never trusted; the disk budget holds, least recently used first."""
import dataclasses
import os
import pickle

import pytest
import torch

from conftest import BUNDLED, ROOT, cli
from core import capture, checkpoints, engine, store
from core.naive import naive_correct


def _subset(ckpt, n=1000):
    split = ckpt.split()
    return dataclasses.replace(split, x=split.x[:n], y=split.y[:n])


def _no_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pass was made although the store holds it")

    monkeypatch.setattr(capture, "capture", refuse)
    monkeypatch.setattr(capture, "capture_hooked", refuse)


@pytest.mark.parametrize("name,layer", [("vgg", None), ("resnet", "res3.0.0")])  # read-out; split with boundaries
def test_an_engine_read_back_counts_what_the_fresh_one_counts(tmp_path, monkeypatch, name, layer):
    ckpt = checkpoints.load(BUNDLED[name])
    split = _subset(ckpt)
    kept = store.Store(tmp_path, 2**30)
    fresh = engine.from_checkpoint(ckpt, layer=layer, device="cpu", split=split, store=kept)
    assert not fresh.restored and kept.nbytes() > 0
    fresh.correct(fresh.channels // 2, "remove")
    engine.keep_memos(fresh)
    _no_pass(monkeypatch)
    again = engine.from_checkpoint(ckpt, layer=layer, device="cpu", split=split, store=kept)
    assert again.restored and again.path == fresh.path and again.layer == fresh.layer
    assert torch.equal(again.stats.mean_map, fresh.stats.mean_map)
    assert torch.equal(again.ranking("mean"), fresh.ranking("mean"))
    assert again.known(fresh.channels // 2, "remove") == fresh.correct(fresh.channels // 2, "remove")  # the memo
    for mode in engine.MODES:  # counts not made before come from the restored pass, and equal the naive procedure
        for k in (1, fresh.channels - 3):
            assert again.correct(k, mode) == fresh.correct(k, mode) == naive_correct(again, k, mode), (mode, k)


def test_another_data_set_content_or_layer_is_another_entry(tmp_path):
    ckpt = checkpoints.load(BUNDLED["vgg"])
    kept = store.Store(tmp_path, 2**30)
    engine.from_checkpoint(ckpt, device="cpu", split=_subset(ckpt, 500), store=kept)
    other = engine.from_checkpoint(ckpt, device="cpu", split=_subset(ckpt, 600), store=kept)
    assert not other.restored and other.total == 600
    assert not engine.from_checkpoint(ckpt, layer="features.4.0", device="cpu", split=_subset(ckpt, 500),
                                      store=kept).restored


def test_a_corrupt_or_hostile_entry_is_made_again_and_never_run(tmp_path):
    ckpt = checkpoints.load(BUNDLED["vgg"])
    split = _subset(ckpt, 500)
    kept = store.Store(tmp_path, 2**30)
    first = engine.from_checkpoint(ckpt, device="cpu", split=split, store=kept)
    path = next(tmp_path.glob("*.pt"))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for bad in (b"not a pickle", path.read_bytes()[:1000], pickle.dumps(Payload())):
        path.write_bytes(bad)
        again = engine.from_checkpoint(ckpt, device="cpu", split=split, store=kept)
        assert not again.restored and again.correct(100) == first.correct(100)
        assert not marker.exists()
        assert engine.from_checkpoint(ckpt, device="cpu", split=split, store=kept).restored  # written afresh


def test_the_disk_budget_holds_least_recently_used_first(tmp_path):
    blob = {"t": torch.zeros(256 * 1024 // 4)}  # about 256 KB each
    kept = store.Store(tmp_path, 4 * 300 * 1024)
    for key in "abcd":
        assert kept.save(key, blob)
        os.utime(kept.path(key), (1000 + ord(key),) * 2)  # a clear order of use
    assert kept.load("a") is not None  # used now: the newest
    assert kept.save("e", blob)
    assert [k for k in "abcde" if kept.path(k).exists()] == ["a", "c", "d", "e"]
    assert kept.nbytes() <= kept.budget
    assert not kept.save("huge", {"t": torch.zeros(kept.budget // 4)})  # over a quarter of the budget: not kept
    assert not kept.path("huge").exists() and not list(tmp_path.glob("*.tmp"))


def test_a_second_cli_sweep_reads_the_pass_and_the_counts_back(tmp_path, fmnist_subset, monkeypatch):
    monkeypatch.setenv("PRUNE_EXPLORER_DISK_CACHE_GB", "1")
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path / "cache"))
    args = ("sweep", str(BUNDLED["vgg"]), "--ks", "0,100,480", "--data-root", fmnist_subset, "--device", "cpu")
    first = cli(*args, "--out", str(tmp_path / "a.csv"))
    assert first.returncode == 0 and "read back from the cache" not in first.stderr, first.stderr
    second = cli(*args, "--out", str(tmp_path / "b.csv"))
    assert second.returncode == 0 and "the pass read back from the cache" in second.stderr, second.stderr
    assert "capturing activations" not in second.stderr
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    bypass = cli(*args, "--out", str(tmp_path / "c.csv"), "--no-cache")
    assert bypass.returncode == 0 and "read back" not in bypass.stderr and "capturing activations" in bypass.stderr


def test_the_app_reads_a_bundled_models_engine_back_and_never_keeps_an_upload(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from ui import catalogue, engines, keys

    monkeypatch.setenv("PRUNE_EXPLORER_DISK_CACHE_GB", "1")
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(tmp_path))
    vgg = catalogue.bundled_checkpoints()["fmnist_vgg"]
    assert engines.disk_store(vgg, None) is not None
    assert engines.disk_store(vgg, {"digest": "own images"}) is None  # one's own images: an upload
    tuned = dataclasses.replace(vgg, digest="0" * 64)  # a fine-tuned copy, an upload: not a bundled file
    assert engines.disk_store(tuned, None) is None
    cache = engines.engine_cache()
    others = dict(cache._engines)  # this worker's engines of other tests, put back at the end
    cache._engines.clear()
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
        at.query_params.update({"model": "fmnist_pair_cnn"})
        at.run()
        assert not at.exception, at.exception
        assert any(p.suffix == ".pt" for p in (tmp_path / "engines").iterdir())
        cache._engines.clear()  # an eviction, or another server process: the memory copy is gone
        with monkeypatch.context() as m:
            _no_pass(m)
            again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
            again.query_params.update({"model": "fmnist_pair_cnn"})
            again.run()
        assert not again.exception, again.exception
        assert again.session_state[keys.MODEL] == "fmnist_pair_cnn"
        assert any(key[0] == catalogue.bundled_checkpoints()["fmnist_pair_cnn"].digest and eng.restored
                   for key, eng in cache._engines.items())
    finally:
        cache._engines.clear()
        cache._engines.update(others)


@pytest.mark.slow
def test_oracle_orders_and_the_coarse_oracle_are_read_back_not_searched_again(tmp_path, monkeypatch):
    from core import oracle

    ckpt = checkpoints.load(BUNDLED["vgg"])
    split = _subset(ckpt, 500)
    kept = store.Store(tmp_path, 2**30)
    fresh = engine.from_checkpoint(ckpt, device="cpu", split=split, store=kept)
    made = {kind: oracle.chosen(fresh, kind, "zero") for kind in ("single", "greedy", "sampled")}
    assert made["greedy"] == oracle.greedy(fresh, "zero") and made["single"] == oracle.single(fresh, "zero")
    again = engine.from_checkpoint(ckpt, device="cpu", split=split, store=kept)
    def searched(*args, **kwargs):
        raise AssertionError("an oracle was searched again")
    for name in ("single", "greedy", "sampled_single"):
        monkeypatch.setattr(oracle, name, searched)
    assert {kind: oracle.chosen(again, kind, "zero") for kind in made} == made
    with pytest.raises(AssertionError):  # another mode is another entry: searched
        oracle.chosen(again, "single", "remove")
    store.Store(tmp_path, 2**30).path(again.stored_as[1] + ("oracle", "greedy", "zero", "test")).write_bytes(b"junk")
    monkeypatch.undo()
    assert oracle.chosen(again, "greedy", "zero") == made["greedy"]  # a bad entry is searched again, equal


@pytest.mark.slow
def test_a_sensitivity_map_is_counted_once_and_read_back(tmp_path, fmnist_subset, monkeypatch):
    from core import sensitivity

    ckpt = checkpoints.load(BUNDLED["vgg"])
    kept = store.Store(tmp_path, 2**30)
    fractions = (0.0, 0.5, 1.0)
    rows, read = sensitivity.kept_map(ckpt, "l1_norm", "remove", fractions, "cpu", kept, str(fmnist_subset))
    assert not read and len(rows) == 3 * len(sensitivity.conv_layer_names(ckpt.build_model()))
    monkeypatch.setattr(sensitivity, "sensitivity", lambda *a, **kw: pytest.fail("the map was counted again"))
    assert sensitivity.kept_map(ckpt, "l1_norm", "remove", fractions, "cpu", kept, str(fmnist_subset)) == (rows, True)
    key = sensitivity.store_key(ckpt, "l1_norm", "remove", fractions, "cpu", str(fmnist_subset))
    assert sensitivity.read_back(kept, sensitivity.store_key(ckpt, "mean", "remove", fractions, "cpu",
                                                             str(fmnist_subset))) is None  # another rule
    kept.save(key, {"rows": [{"layer": "x"}]})  # a file that holds no rows: dropped, counted again
    assert sensitivity.read_back(kept, key) is None and not kept.path(key).exists()
