"""CLI: `python -m core {train,rank,sweep} ...` (see README)."""
from __future__ import annotations

import argparse
import shlex
import sys


def cmd_train(args) -> int:
    import torch

    from . import checkpoints, data
    from .train import TrainConfig, train

    torch.set_num_threads(args.threads) if args.threads else None
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, seed=args.seed, lr=args.lr,
                      batch_size=args.batch_size, device=args.device)
    model, correct, seconds = train(cfg, data_root=args.data_root)
    spec = data.DATASETS[cfg.dataset]
    total = len(data.load(cfg.dataset, train=False, data_root=args.data_root))
    meta = {
        "dataset": cfg.dataset,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "class_names": list(spec.class_names),
        "test_accuracy": correct / total,
        "test_correct": correct,
        "test_total": total,
        "train_command": "python -m core " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "train_config": vars(cfg),
        "train_seconds": round(seconds, 1),
        "torch_version": str(torch.__version__),
    }
    checkpoints.save(args.out, args.arch, {}, model, meta)
    print(f"saved {args.out}: test accuracy {correct}/{total} = {correct / total:.4f} in {seconds:.0f} s")
    return 0


class _Bar:
    """A tqdm progress bar fed by the engine's `progress(done, total, label)` callbacks."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int, label: str) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.desc != label:
            self.close()
            self.bar = tqdm(total=total, desc=label, unit="step")
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def parse_ks(spec: str, channels: int) -> list[int]:
    """`start:stop:step` (a Python range), a comma list, or one number; each K in 0..channels."""
    try:
        parts = [int(p) for p in spec.split(":")] if ":" in spec else None
        if parts is not None and len(parts) > 3:
            raise ValueError
        ks = list(range(*parts)) if parts else [int(p) for p in spec.split(",") if p.strip()]
    except (ValueError, TypeError):
        raise ValueError(f"--ks '{spec}' is neither start:stop:step nor a comma list of integers.") from None
    bad = [k for k in ks if not 0 <= k <= channels]
    if bad:
        raise ValueError(f"--ks: K must be between 0 and {channels} (the layer's channels); got {bad[0]}.")
    if not ks:
        raise ValueError(f"--ks '{spec}' selects no K.")
    return ks


def _engine(args):
    from . import checkpoints, engine

    ckpt = checkpoints.load(args.checkpoint)
    bar = _Bar()
    eng = engine.from_checkpoint(ckpt, layer=args.layer, device=args.device, data_root=args.data_root,
                                 progress=bar)
    print(f"{args.checkpoint}: {ckpt.arch}, layer {eng.layer} ({eng.channels} channels), "
          f"{eng.total} test images, device {eng.device}, path: {eng.path}", file=sys.stderr)
    return ckpt, eng, bar


def _write_csv(path: str, header: list[str], rows: list[list]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def cmd_rank(args) -> int:
    _, eng, _ = _engine(args)
    order, scores = eng.ranking(args.criterion), eng.scores(args.criterion)
    _write_csv(args.out, ["rank", "channel", "score"],
               [[r, int(c), f"{float(scores[c]):.8g}"] for r, c in enumerate(order)])
    print(f"wrote {args.out}: {len(order)} channels ranked by {args.criterion}, ascending (rank 0 is pruned first)")
    return 0


def cmd_sweep(args) -> int:
    _, eng, bar = _engine(args)
    ks = parse_ks(args.ks, eng.channels) if args.ks else list(range(eng.channels + 1))
    rows = eng.sweep(ks, args.mode, args.criterion, progress=bar)
    _write_csv(args.out, ["k", "correct", "total", "accuracy"],
               [[k, c, eng.total, f"{c / eng.total:.4f}"] for k, c in rows])
    for k, c in rows[:: max(1, len(rows) // 8)] + ([rows[-1]] if len(rows) > 1 else []):
        print(f"K={k:4d}  accuracy {c / eng.total:.4f}")
    print(f"wrote {args.out}: {len(rows)} rows (mode {args.mode}, criterion {args.criterion})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Pruning explorer engine.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a registered architecture (the bundled checkpoints' recipe)")
    t.add_argument("arch")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--data-root", default=None)
    t.set_defaults(func=cmd_train)

    from .criteria import CRITERIA
    from .engine import MODES

    def common(sp):
        sp.add_argument("checkpoint")
        sp.add_argument("--layer", default=None, help="conv layer name (default: the last conv)")
        sp.add_argument("--criterion", default="mean", choices=list(CRITERIA))
        sp.add_argument("--out", required=True, help="CSV file to write")
        sp.add_argument("--data-root", default=None, help="folder holding the data set's files")
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    r = sub.add_parser("rank", help="rank the layer's channels (rank 0 = pruned first) to CSV")
    common(r)
    r.set_defaults(func=cmd_rank)

    s = sub.add_parser("sweep", help="test accuracy for each K pruned channels, to CSV")
    common(s)
    s.add_argument("--mode", default="zero", choices=list(MODES),
                   help="zero: conv weights and bias zeroed; remove: the channel outputs 0 (BatchNorm zeroed too)")
    s.add_argument("--ks", default=None, help="start:stop:step (Python range) or a comma list; default every K")
    s.set_defaults(func=cmd_sweep)
    for sp in (t, r, s):
        sp.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .data import DataUnavailable

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DataUnavailable, ValueError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
