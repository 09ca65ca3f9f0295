"""Benchmark: each bundled model's engine made (one pass over the test set) against read back from the
engine store (core/store.py), measured in one run on this machine. Prints both times and their ratio.
With --oracles, also the Curve page's oracle orders where they apply (single and greedy, chosen on the
test images and on the training images, zero mode): found, then read back. Those are the times the
Curve page's help states.

    .venv/bin/python scripts/bench_store.py [--oracles]
"""
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, engine, oracle, store  # noqa: E402


def oracles(ckpt, eng) -> None:
    if oracle.why_not_exact(eng, "zero") is not None:
        print("  oracles: not exact here (the coarse one applies)")
        return
    for pick_on in ("test", "train"):
        start = time.perf_counter()
        found = [oracle.chosen(eng, kind, "zero", pick_on, ckpt) for kind in ("single", "greedy")]
        made_s = time.perf_counter() - start
        start = time.perf_counter()
        again = [oracle.chosen(eng, kind, "zero", pick_on, ckpt) for kind in ("single", "greedy")]
        read_s = time.perf_counter() - start
        assert again == found
        print(f"  oracle orders chosen on the {pick_on} images: found in {made_s:.1f} s, read back in {read_s:.3f} s")


def main() -> None:
    with_oracles = "--oracles" in sys.argv[1:]
    kept = store.Store(Path(tempfile.mkdtemp(prefix="bench-store-")), 8 * 2**30)
    for path in sorted([*(ROOT / "checkpoints").glob("*.pt"), *(ROOT / "checkpoints").glob("*.pt2")]):
        ckpt = checkpoints.load(path)
        try:
            start = time.perf_counter()
            made = engine.from_checkpoint(ckpt, device="cpu", store=kept)
            made_s = time.perf_counter() - start
        except ValueError as exc:  # no conv layer (the LeNet-300-100)
            print(f"{path.name}: skipped ({exc})")
            continue
        start = time.perf_counter()
        again = engine.from_checkpoint(ckpt, device="cpu", store=kept)
        read_s = time.perf_counter() - start
        assert again.restored and again.correct(made.channels // 2) == made.correct(made.channels // 2)
        print(f"{path.name}: made in {made_s:.2f} s, read back in {read_s:.3f} s ({made_s / read_s:.0f}x), "
              f"{made.cache_bytes() / 2**20:.0f} MB in memory")
        if with_oracles:
            oracles(ckpt, made)
    print(f"store: {kept.nbytes() / 2**20:.0f} MB on disk")


if __name__ == "__main__":
    main()
