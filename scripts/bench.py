"""Benchmark: the engine against the naive procedure and against one plain test-set pass.

    python scripts/bench.py [--device cpu|cuda|all] [--naive-ks 3] [--models vgg,resnet]
    python scripts/bench.py --layers [--device ...] [--models vgg,resnet,mobilenet] [--sensitivity]

Every number is measured in this run, on this machine. Every accuracy the engine gives is
checked against the naive procedure (copy the model, zero the weights, evaluate everything) at
the timed K, and the slider's answers against the curve; any mismatch fails the run (exit 1).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, data, engine  # noqa: E402
from core.naive import naive_correct  # noqa: E402
from core.split import conv_layer_names  # noqa: E402
from core.tasks import count_correct  # noqa: E402

MODELS = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt",
          "mobilenet": ROOT / "checkpoints" / "fmnist_mobilenet.pt2"}
TARGETS = {"curve / floor": ("<=", 2.0), "naive / curve": (">=", 200.0), "slider median ms": ("<", 20.0),
           "cache / boundary": ("<=", 1.1), "sample s": ("<", 1.0), "(sample+exact) / suffix": ("<=", 1.2),
           "known K ms": ("<", 20.0), "coarse / suffix": ("<=", 17.0), "sensitivity / floor": ("<=", 25.0)}


def clock(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_model(name: str, device: torch.device, naive_ks: int, failures: list[str]) -> dict:
    ckpt = checkpoints.load(MODELS[name])
    split = data.load(ckpt.dataset)
    model = ckpt.build_model().to(device)
    x, y = split.x, split.y
    count_correct(model, x[:1000], y[:1000], device=device)  # warm-up: kernels, allocator
    _, floor = clock(lambda: count_correct(model, x, y, device=device), device)

    eng, cold = clock(lambda: engine.Engine(ckpt.build_model(), x, y, device=device), device)
    p = eng.channels
    row = {"model": name, "device": str(device), "images": len(y), "channels": p, "path": eng.path,
           "floor s": floor, "cold s": cold}
    rng = random.Random(0)
    for mode in engine.MODES:
        counts, curve_s = clock(lambda: [c for _, c in eng.sweep(range(p + 1), mode)], device)
        ks = sorted(rng.sample(range(1, p), naive_ks - 1)) + [p]
        naive_times = []
        for k in ks:
            naive, t = clock(lambda: naive_correct(eng, k, mode), device)
            naive_times.append(t)
            if naive != counts[k]:
                failures.append(f"{name} {mode} K={k}: engine {counts[k]} != naive {naive}")
        slider = []
        for k in [rng.randrange(p + 1) for _ in range(50)]:
            answer, t = clock(lambda: eng.correct(k, mode), device)
            slider.append(t)
            if answer != counts[k]:
                failures.append(f"{name} {mode} slider K={k}: {answer} != curve {counts[k]}")
        naive_curve = statistics.mean(naive_times) * (p + 1)
        row[mode] = {"curve s": curve_s, "naive per K s": statistics.mean(naive_times), "naive curve s": naive_curve,
                     "curve / floor": (cold + curve_s) / floor, "naive / curve": naive_curve / (cold + curve_s),
                     "slider median ms": 1000 * statistics.median(slider),
                     "slider p95 ms": 1000 * sorted(slider)[int(0.95 * len(slider)) - 1],
                     "checked K": ks}
    row["cache MB"] = eng.cache_bytes() / 2**20
    row["boundary MB"] = eng.boundary_bytes / 2**20
    row["cache / boundary"] = eng.cache_bytes() / eng.boundary_bytes
    return row


def bench_layers(name: str, device: torch.device, failures: list[str], with_sensitivity: bool) -> None:
    """Every conv layer of one model: the slider's answers at a middle layer, memory, coarse curve."""
    from core import sensitivity

    if name == "resnet9":  # CIFAR-shaped (3x32x32, 10,000 images), random weights: timings, not accuracies
        from core import models

        torch.manual_seed(0)
        model, x = models.build("resnet9").eval(), torch.randn(10000, 3, 32, 32)
        with torch.no_grad():
            y = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, 10000, 1000)])
        y[::3] = (y[::3] + 1) % 10
        ckpt = checkpoints.Checkpoint("resnet9", {}, model.state_dict())
    else:
        ckpt = checkpoints.load(MODELS[name])
        split = data.load(ckpt.dataset)
        x, y = split.x, split.y
        model = ckpt.build_model()
    count_correct(model.to(device), x[:1000], y[:1000], device=device)
    _, floor = clock(lambda: count_correct(model, x, y, device=device), device)
    rng = random.Random(1)
    print(f"\n{name} on {device}: every conv layer ({len(y):,} images; floor {floor:.2f} s; budget "
          f"{engine.default_boundary_budget() / 2**30:.1f} GB per engine)")
    print(f"  {'layer':>14s} {'P':>4s} {'path':5s} {'cold s':>7s} {'sample s':>9s} {'exact s':>8s} {'suffix s':>9s} "
          f"{'(s+e)/suf':>9s} {'known ms':>9s} {'coarse s':>9s} {'coarse/suf':>10s} {'held MB':>8s} {'recomp':>6s}")
    for layer in conv_layer_names(model):
        eng, cold = clock(lambda: engine.Engine(ckpt.build_model(), x, y, layer=layer, device=device), device)
        p, mode = eng.channels, "remove"
        k = rng.randrange(1, p)
        sample, t_sample = clock(lambda: eng.sample_answer(k, mode), device)
        exact, t_exact = clock(lambda: eng.correct(k, mode), device)
        _, t_suffix = clock(lambda: eng.correct_for_mask(eng.mask_for(k + 1), mode), device)  # the suffix alone
        lookups = []
        for _ in range(50):
            _, t = clock(lambda: eng.correct(k, mode), device)
            lookups.append(t)
        coarse, t_coarse = clock(lambda: [eng.correct(c, mode) for c in eng.coarse_ks()], device)
        naive = naive_correct(eng, k, mode)
        if naive != exact:
            failures.append(f"{name} {layer} K={k}: engine {exact} != naive {naive}")
        fast = eng.fast
        ratio = (t_sample + t_exact) / t_suffix
        print(f"  {layer:>14s} {p:4d} {'fast' if fast else 'split':5s} {cold:7.2f} {t_sample:9.3f} {t_exact:8.3f} "
              f"{t_suffix:9.3f} {ratio:9.2f} {1000 * statistics.median(lookups):9.3f} {t_coarse:9.2f} "
              f"{t_coarse / t_suffix:10.1f} {eng.cache_bytes() / 2**20:8.1f} {eng.recomputed_batches:6d}")
        if not fast:
            dev = str(device.type)
            print(f"  {'':>14s} sample: {verdict('sample s', t_sample, dev)}; exact after it: "
                  f"{verdict('(sample+exact) / suffix', ratio, dev)}; known K: "
                  f"{verdict('known K ms', 1000 * statistics.median(lookups), dev)}; coarse: "
                  f"{verdict('coarse / suffix', t_coarse / t_suffix, dev)}; naive checked at K={k}")
        del eng
    if with_sensitivity:
        rows, t_map = clock(lambda: list(sensitivity.sensitivity(ckpt.build_model(), x, y, ckpt.spec.task,
                                                                 device=str(device))), device)
        print(f"  sensitivity map ({len(rows)} cells): {t_map:.1f} s = {t_map / floor:.1f} plain evaluations  "
              f"{verdict('sensitivity / floor', t_map / floor, device.type)}")


def verdict(metric: str, value: float, device: str = "cpu") -> str:
    if device != "cpu":
        return "(targets are for CPU)"
    op, target = TARGETS[metric]
    ok = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
    if ok:
        return f"ok ({op} {target:g})"
    miss = value / target if op in ("<=", "<") else target / value
    return f"MISSED {op} {target:g} by {miss:.1f}x"


def print_row(row: dict) -> None:
    print(f"\n{row['model']} on {row['device']}: {row['images']:,} test images, {row['channels']} channels, "
          f"path: {row['path']}")
    print(f"  floor (one plain test-set pass): {row['floor s']:.2f} s; cold engine (capture + ranking): "
          f"{row['cold s']:.2f} s")
    print(f"  cache {row['cache MB']:.1f} MB vs tensors crossing the split {row['boundary MB']:.1f} MB: "
          f"{row['cache / boundary']:.2f}  {verdict('cache / boundary', row['cache / boundary'], 'cpu')}")
    print(f"  {'mode':7s} {'curve s':>8s} {'naive/K s':>10s} {'naive curve s':>14s} {'(cold+curve)/floor':>19s} "
          f"{'naive/(cold+curve)':>19s} {'slider med ms':>14s} {'p95 ms':>7s}")
    for mode in engine.MODES:
        r = row[mode]
        print(f"  {mode:7s} {r['curve s']:8.3f} {r['naive per K s']:10.3f} {r['naive curve s']:14.1f} "
              f"{r['curve / floor']:19.2f} {r['naive / curve']:19.0f} {r['slider median ms']:14.2f} "
              f"{r['slider p95 ms']:7.2f}")
        dev = row["device"]
        print(f"          targets: {verdict('curve / floor', r['curve / floor'], dev)}; "
              f"{verdict('naive / curve', r['naive / curve'], dev)}; "
              f"{verdict('slider median ms', r['slider median ms'], dev)}; naive checked at K={r['checked K']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    ap.add_argument("--naive-ks", type=int, default=3, help="naive evaluations per model and mode (timed, checked)")
    ap.add_argument("--models", default=None, help="default vgg,resnet (with --layers: vgg,resnet,mobilenet; "
                                                   "resnet9 = a CIFAR-shaped ResNet9 on random data, for timings)")
    ap.add_argument("--layers", action="store_true", help="every conv layer: sample, exact, known K, coarse curve")
    ap.add_argument("--sensitivity", action="store_true", help="with --layers: also time the sensitivity map")
    args = ap.parse_args()
    args.models = args.models or ("vgg,resnet,mobilenet" if args.layers else "vgg,resnet")
    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            print("no CUDA device here", file=sys.stderr)
            return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA"))
    print("Precision: float32 throughout (no half precision, no reduced cache), so no accuracy can change.")
    failures: list[str] = []
    for device in devices:
        for name in args.models.split(","):
            if args.layers:
                bench_layers(name, device, failures, args.sensitivity)
            else:
                print_row(bench_model(name, device, args.naive_ks, failures))
    if failures:
        print("\nACCURACY MISMATCHES:\n  " + "\n  ".join(failures))
        return 1
    print("\nEvery timed accuracy equals the naive procedure's; every slider answer equals the curve.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
