"""Benchmark: whole-network compression of the bundled VGG-style and ResNet-style models.

    python scripts/bench_compress.py [--models vgg,resnet] [--steps 2000] [--out docs/bench_compress_2cores.txt] [--readme]

Measured in one run, on the CPU with 2 threads, on the 10,000 test images:
- a plain evaluation (the whole model over every test image) at the faster of batches of 1,000 and
  250 images, the median of three runs before the chart and three after;
- the chart: 4 lines (uniform, global, global-uncapped, sensitivity) x 8 targets (90% ... 20% of the
  MACs, 25% included) plus the random band (3 seeds x 8 targets), every point exact, in plain evaluations' time
  (target: at most 40); the one pass of statistics and the sensitivity map are timed apart;
- at 50% and 25% of the MACs, each line's accuracy before and after fine-tuning (steps, seconds),
  its slim model's MACs, parameters and batch-256 latency beside the original's.
Checks (exit 1 on failure): every point's count equals the naive procedure at 50% and 25%; the
VGG-style model at 50% of its MACs is within 1.0 point of its unpruned accuracy after fine-tuning (best
line, within 3 minutes), at 25% within 3 points; the chart costs at most 40 plain evaluations.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core import checkpoints, compressed, sensitivity, slim, tradeoff  # noqa: E402
from core.tasks import count_correct  # noqa: E402

MODELS = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt"}


def timed(fn):
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,resnet")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    ap.add_argument("--readme", action="store_true", help="also put the report into README.md's compress section")
    ap.add_argument("--readme-from", default=None, metavar="REPORT",
                    help="only put an earlier run's report (its --out file) into README.md, measuring nothing")
    args = ap.parse_args()
    if args.readme_from:
        into_readme(Path(args.readme_from).read_text())
        return 0
    torch.set_num_threads(2)
    lines_out: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines_out.append(text)

    failures: list[str] = []
    settings = tradeoff.Settings()
    say(f"settings: criterion {settings.criterion}, mode {settings.mode}, normaliser {settings.normaliser}, "
        f"cap {settings.cap:.0%}; fine-tuning {args.steps} steps of 128 images (Adam 1e-3, cosine, flips)")
    for name in args.models.split(","):
        ckpt = checkpoints.load(MODELS[name])
        test, train = ckpt.split(train=False), ckpt.split(train=True)
        model = ckpt.build_model().eval()
        # the plain evaluation at its best batch size (the engine's 1,000, or the 250 the plans are counted in),
        # timed before and after the chart, so that a slower or faster spell of a shared machine counts for both
        batch = min((1000, 250), key=lambda b: timed(lambda: count_correct(model, test.x, test.y, batch_size=b))[1])
        plains = [timed(lambda: count_correct(model, test.x, test.y, batch_size=batch))[1] for _ in range(3)]
        base = count_correct(model, test.x, test.y)
        net, stats_s = timed(lambda: tradeoff.network_for(ckpt, "cpu"))
        rows, map_s = timed(lambda: list(sensitivity.sensitivity(model, test.x, test.y, criterion=settings.criterion,
                                                                 mode=settings.mode, device="cpu")))
        points, chart_s = timed(lambda: list(tradeoff.chart(net, settings, rows)))
        plains += [timed(lambda: count_correct(model, test.x, test.y, batch_size=batch))[1] for _ in range(3)]
        plain = statistics.median(plains)
        say(f"\n{name}: {base / len(test.y):.2%} unpruned, {net.base_macs:,} MACs, {net.base_params:,} parameters; "
            f"units: {', '.join(f'{u.name} ({u.channels})' for u in net.units)}")
        say(f"  plain evaluation {plain:.2f} s (median of 6, batches of {batch}); the chart ({len(points)} exact points) {chart_s:.1f} s = "
            f"{chart_s / plain:.1f} plain evaluations (target <= 40); the statistics pass {stats_s:.1f} s "
            f"({stats_s / plain:.1f}), the sensitivity map {map_s:.1f} s ({map_s / plain:.1f}), each made once "
            f"and kept")
        if name == "vgg" and chart_s / plain > 40:
            failures.append(f"{name}: the chart took {chart_s / plain:.1f} plain evaluations")
        wiped = [p for p in points if p.wiped]
        if wiped:
            say("  wiped out: " + "; ".join(f"{p.line} at {p.target:.0%}: {', '.join(p.wiped)}" for p in wiped))
        original = slim.measure(model, net.input_shape, repeats=10)
        say(f"  original: batch-256 latency {original.latency_ms[('cpu', 256)]:.1f} ms")
        say("  line             target  MACs kept  params kept  b256 ms  accuracy  fine-tuned  steps  seconds")
        for target in (0.5, 0.25):
            best = None
            for line in tradeoff.LINES:
                pt = next(p for p in points if p.line == line and p.target == target)
                plan = tradeoff.as_plan(net, pt, settings)
                naive = count_correct(compressed.masked(net, plan), test.x, test.y)
                if naive != pt.correct:
                    failures.append(f"{name} {line} {target}: {pt.correct} != naive {naive}")
                if pt.wiped:
                    say(f"  {line:16s} {target:5.0%}  {pt.macs / net.base_macs:8.1%}  {pt.params / net.base_params:10.1%}"
                        f"        -  {pt.accuracy:7.2%}  (a layer wiped out: not removable, not fine-tuned)")
                    continue
                pt = tradeoff.measured(net, pt, settings, repeats=10)
                pt, _ = tradeoff.finetuned(net, pt, settings, train.x, train.y,
                                           compressed.FinetuneRecipe(steps=args.steps))
                say(f"  {line:16s} {target:5.0%}  {pt.macs / net.base_macs:8.1%}  {pt.params / net.base_params:10.1%}"
                    f"  {pt.latency_b256_ms:7.1f}  {pt.accuracy:7.2%}  {pt.accuracy_finetuned:9.2%}  {pt.finetune_steps:5d}"
                    f"  {pt.finetune_seconds:7.0f}")
                if best is None or pt.correct_finetuned > best.correct_finetuned:
                    best = pt
            gap = 100 * (base - best.correct_finetuned) / len(test.y)
            say(f"  best at {target:.0%}: {best.line}, {best.accuracy_finetuned:.2%} after fine-tuning "
                f"({gap:+.2f} points below the unpruned model) in {best.finetune_seconds:.0f} s")
            limit = 1.0 if target == 0.5 else 3.0
            if name == "vgg" and (gap > limit or best.finetune_seconds > 180):
                failures.append(f"{name} at {target:.0%}: {gap:.2f} points below after {best.finetune_seconds:.0f} s")
    say("\n" + ("FAILED: " + "; ".join(failures) if failures else "all checks passed"))
    if args.out:
        Path(args.out).write_text("\n".join(lines_out) + "\n")
    if args.readme:
        into_readme("\n".join(lines_out) + "\n")
    return 1 if failures else 0


BEGIN, END = "<!-- bench_compress: begin -->", "<!-- bench_compress: end -->"


def into_readme(report: str) -> None:
    """Replace what stands between README.md's two markers with the report, as a code block."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n```\n{report.strip()}\n```\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
