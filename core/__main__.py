"""CLI: `python -m core {info,export,rank,sweep,finetune,slim,oracle,sensitivity,compress,tradeoff,magnitude,train} ...`
(see docs/cli.md)."""
from __future__ import annotations

import argparse
import shlex
import sys


def cmd_train(args) -> int:
    import torch

    from . import checkpoints, data, inputs
    from .train import TrainConfig, train

    torch.set_num_threads(args.threads) if args.threads else None
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, seed=args.seed, lr=args.lr,
                      batch_size=args.batch_size, device=args.device, weight_decay=args.weight_decay, l1=args.l1)
    model, correct, seconds = train(cfg, data_root=args.data_root)
    spec = data.DATASETS[cfg.dataset]  # train() filled in the architecture's data set
    total = len(data.load(cfg.dataset, train=False, data_root=args.data_root))
    meta = {
        "dataset": cfg.dataset,
        "input": inputs.usual(spec, spec.input_shape[0]).to_meta(),  # what train() fed the model
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
    if len(spec) > 100_000:
        raise ValueError("--ks is too long.")
    try:
        parts = [int(p) for p in spec.split(":")] if ":" in spec else None
        if parts is not None and len(parts) > 3:
            raise ValueError
        if parts:  # range-checked before the list is built: 0:100000000 must not allocate
            span = range(*parts)
            ends = [span[0], span[-1]] if span else []
            if any(not 0 <= k <= channels for k in ends):
                raise IndexError(next(k for k in ends if not 0 <= k <= channels))
        ks = list(range(*parts)) if parts else [int(p) for p in spec.split(",") if p.strip()]
    except IndexError as exc:
        raise ValueError(f"--ks: K must be between 0 and {channels} (the layer's channels); got {exc.args[0]}.") from None
    except (ValueError, TypeError):
        raise ValueError(f"--ks '{spec[:40]}' is neither start:stop:step nor a comma list of integers.") from None
    bad = [k for k in ks if not 0 <= k <= channels]
    if bad:
        raise ValueError(f"--ks: K must be between 0 and {channels} (the layer's channels); got {bad[0]}.")
    if not ks:
        raise ValueError(f"--ks '{spec}' selects no K.")
    return ks


def _checkpoint(args):
    """The checkpoint named on the command line, on `--dataset` if given, its inputs prepared as
    `--normalize` says (else as the file states, else as assumed, and then it says so)."""
    from . import checkpoints, inputs

    ckpt = checkpoints.load(args.checkpoint, dataset=args.dataset)
    if args.dataset:
        ckpt.meta["dataset"] = args.dataset  # this process's own copy: evaluate on another data set
    if getattr(args, "normalize", None):
        from . import data

        ckpt = ckpt.with_prep(inputs.parse(args.normalize, data.DATASETS.get(ckpt.dataset), ckpt.spec.input_shape[0]))
    return ckpt


_ENGINES: list = []  # the engines this command built


def _engine(args):
    from . import engine

    ckpt = _checkpoint(args)
    if not ckpt.dataset and not args.image_folder:
        raise ValueError(f"No registered data set fits this program (input {'x'.join(map(str, ckpt.spec.input_shape))}"
                         f", task {ckpt.spec.task}): pass --image-folder DIR with your own test images.")
    from . import trial

    if args.image_folder:  # one's own images, prepared as the model's inputs are
        from . import data

        split = data.load_image_folder(args.image_folder, ckpt.spec.input_shape, ckpt.prep)
    else:
        split = ckpt.split(train=False, data_root=args.data_root)
    trial.check_on(ckpt, split)  # memory on the meta device, then a few real images: refused in words
    bar = _Bar()
    from . import store

    kept = None if getattr(args, "no_cache", False) else store.default()
    eng = engine.from_checkpoint(ckpt, layer=args.layer, device=args.device, data_root=args.data_root,
                                 progress=bar, split=split, store=kept)
    _ENGINES.append(eng)  # main() keeps what they learn in the store when the command succeeds
    print(f"{args.checkpoint}: {ckpt.arch}, layer {eng.layer} ({eng.channels} channels), "
          f"{eng.total} test images, device {eng.device}, path: {eng.path}; inputs: {ckpt.prep.describe()} "
          f"({ckpt.prep.source})"
          + (f"; the pass read back from the cache in {kept.root} (--no-cache makes it again)" if eng.restored
             else "")
          + (f"; {eng.recomputed_batches} batches over the memory budget are recomputed per evaluation"
             if eng.recomputed_batches else ""), file=sys.stderr)
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
    if args.criterion in ("mean", "mean_abs"):
        print(RERANK_NOTE)
    if args.rerank_check:
        again = eng.reranked_order(args.rerank_check, criterion=args.criterion)
        same = again == order[:args.rerank_check].tolist()
        print(f"re-ranked after each of the first {args.rerank_check} prunes ({args.rerank_check} more passes over "
              f"the test set): {'the same order' if same else 'a DIFFERENT order: ' + str(again)}")
        return 0 if same else 1
    return 0


RERANK_NOTE = ("note: re-ranking after every prune gives this same order: the ranking is the pruned "
               "layer's own activation, and a channel's activation does not depend on the other channels of the "
               "same layer. Check it with --rerank-check N.")


def cmd_info(args) -> int:
    from . import data, inputs, trial
    from .split import conv_layers
    from .untrusted import printable

    ckpt = _checkpoint(args)
    spec = ckpt.spec
    dataset = data.DATASETS.get(ckpt.dataset)
    print(f"{args.checkpoint}")
    print(f"  architecture: {ckpt.arch}" + (f" {ckpt.arch_kwargs}" if ckpt.arch_kwargs else "") + f" - {spec.summary}"
          + (f" (after {spec.provenance})" if spec.provenance else ""))
    renamed = ckpt.meta.get("renamed_tensors")
    if renamed:
        first = next(iter(renamed.items()))
        print(f"  the tensor names differ from '{ckpt.arch}' but match it in order and shape: renamed "
              f"{len(renamed)} tensors by position (e.g. {printable(first[0])} -> {printable(first[1])})")
    print(f"  data set: {ckpt.dataset}" + (f" ({dataset.title})" if dataset else "") + f"; task: {spec.task}; "
          f"input {'x'.join(map(str, spec.input_shape))}")
    if ckpt.program is not None:
        fits = ckpt.meta.get("fitting_datasets") or []
        print(f"  a torch.export program: {ckpt.spec.input_shape} in, {ckpt.program.signature.outputs} outputs; "
              f"registered data sets that fit: {', '.join(fits) or 'none (use --image-folder)'}")
    print(f"  inputs: {ckpt.prep.describe()} ({ckpt.prep.source})")
    if ckpt.prep.source == inputs.ASSUMED and ckpt.dataset:
        try:
            hint = inputs.better_preparation(ckpt)
        except data.DataUnavailable:  # info needs no data set; the check is then left out
            hint = None
        if hint is not None:
            print(f"  note: {hint.sentence} Pass --normalize {hint.better.token()} to use it.")
    if "test_accuracy" in ckpt.meta:
        print(f"  recorded test accuracy: {ckpt.meta['test_accuracy']:.2%}")
    if "train_command" in ckpt.meta:
        print(f"  trained by: {printable(ckpt.meta['train_command'], 300)}")
    print(f"  parameters: {sum(v.numel() for v in ckpt.build_model().parameters()):,}")
    trial.check_memory(ckpt.build_model(), spec.input_shape, batch=1)  # before the one real sample below
    layers = conv_layers(ckpt.build_model(), spec.input_shape)
    if not layers:
        print("  conv layers: none (channel pruning does not apply; see `magnitude`)")
    else:
        print("  conv layers (name: in->out channels, kernel, output C x H x W); the last is the default:")
        for info in layers:
            print(f"    {info.describe()}")
    return 0


def cmd_export(args) -> int:
    from . import checkpoints, program

    ckpt = _checkpoint(args)
    meta = ckpt.saved_meta(exported_from=ckpt.name or str(args.checkpoint), architecture=ckpt.arch)
    program.save(ckpt.build_model(), ckpt.spec.input_shape, args.out, meta)
    again = checkpoints.load(args.out)  # read back the safe way, as any upload would be
    print(f"wrote {args.out}: {ckpt.arch} as a torch.export program with a dynamic batch dimension "
          f"({again.spec.summary}); data set {again.dataset}; inputs: {again.prep.describe()}")
    return 0


def cmd_sensitivity(args) -> int:
    from . import sensitivity

    ckpt = _checkpoint(args)
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--fractions '{args.fractions}' is not a comma list of numbers.") from None
    from . import store

    kept = None if args.no_cache else store.default()
    rows, read = sensitivity.kept_map(ckpt, args.criterion, args.mode, fractions, args.device, kept, args.data_root,
                                      _Bar())
    if read:
        print(f"the map read back from the cache in {kept.root} (--no-cache counts it again)", file=sys.stderr)
    tied = sensitivity.ties(ckpt.build_model())
    _write_csv(args.out, ["layer", "channels", "fraction", "k", "correct", "total", "accuracy"],
               [[r.layer, r.channels, f"{r.fraction:g}", r.k, r.correct, r.total, f"{r.accuracy:.4f}"] for r in rows])
    for layer in dict.fromkeys(r.layer for r in rows):
        accs = " ".join(f"{r.accuracy:.3f}" for r in rows if r.layer == layer)
        print(f"{layer:>20s}  {accs}" + (f"  (tied by {tied[layer]})" if layer in tied else ""))
    print(f"wrote {args.out}: {len(rows)} rows (mode {args.mode}, criterion {args.criterion})")
    return 0


def cmd_oracle(args) -> int:
    from . import oracle

    ckpt, eng, bar = _engine(args)
    found = oracle.chosen(eng, args.kind, args.mode, args.pick_on, ckpt, args.data_root, bar)
    counts = found.correct_after
    _write_csv(args.out, ["rank", "channel", "correct_after"], [[r, c, n] for r, (c, n) in
                                                                enumerate(zip(found.order, counts))])
    what = {"single": "each channel pruned alone", "greedy": "the first rank+1 channels pruned",
            "sampled": f"each channel pruned alone, among the first {eng.sample_size:,} images only"}[args.kind]
    where = ("the test set: an upper bound, not a usable rule" if args.pick_on == "test"
             else f"the last {oracle.training_size(ckpt, args.data_root):,} training images, scored on the test set")
    print(f"wrote {args.out}: {args.kind} oracle order of {eng.channels} channels (mode {args.mode}), picked on "
          f"{where}; correct_after = right test answers with {what}")
    return 0


def cmd_finetune(args) -> int:
    import time

    from . import checkpoints, program
    from .tasks import count_correct
    from .finetune import FinetuneConfig, finetune

    ckpt, eng, bar = _engine(args)
    cfg = FinetuneConfig(k=args.k, layer=eng.layer, criterion=args.criterion, mode=args.mode, steps=args.steps,
                         lr=args.lr, seed=args.seed)
    eng.mask_for(cfg.k, cfg.criterion)  # K in range, or one sentence
    before = eng.correct(cfg.k, cfg.mode, cfg.criterion)
    train = ckpt.split(train=True, data_root=args.data_root)
    start = time.perf_counter()
    model, losses = finetune(eng, cfg, train.x, train.y,
                             progress=lambda done, total, loss: bar(done, total, f"fine-tuning (loss {loss:.3f})"))
    seconds = time.perf_counter() - start
    after = count_correct(model, eng.x, eng.y, eng.task)
    meta = ckpt.saved_meta(test_accuracy=after / eng.total, test_correct=after, test_total=eng.total,
                finetuned={**cfg.describe(), "pruned_channels": eng.ranking(cfg.criterion)[:cfg.k].tolist(),
                           "accuracy_before": before / eng.total, "seconds": round(seconds, 1),
                           "from": ckpt.name})
    if ckpt.program is not None:
        program.save(model, ckpt.spec.input_shape, args.out, meta)
    else:
        checkpoints.save(args.out, ckpt.arch, ckpt.arch_kwargs, model, meta)
    print(f"{eng.layer}, K={cfg.k} {cfg.mode}: accuracy {before / eng.total:.4f} after pruning -> "
          f"{after / eng.total:.4f} after {len(losses)} fine-tuning steps ({seconds:.0f} s); wrote {args.out}")
    return 0


def cmd_slim(args) -> int:
    from . import checkpoints, program, slim
    from .tasks import count_correct

    ckpt, eng, _ = _engine(args)
    result = slim.slim(eng, args.k, args.mode, args.criterion)
    correct = count_correct(result.model, eng.x, eng.y, eng.task)
    masked = eng.correct(args.k, args.mode, args.criterion)
    shape = ckpt.spec.input_shape
    before, after = slim.measure_together([eng.model, result.model], shape, repeats=args.repeats)
    print(f"{eng.layer}, K={args.k} {args.mode}: shrank {', '.join(result.shrunk) or 'nothing'}"
          + (f"; zero mode's batch-norm constant folded into the read-out bias" if result.folded else ""))
    if result.tied:
        print(f"note: {', '.join(result.tied)} share these channels (a residual add or a concatenation), so removing "
              f"them for real also removes them there: the slim model is a different model, {correct}/{eng.total} "
              f"right against {masked} for the masked one.")
    else:
        print(f"right answers: slim {correct}/{eng.total}, masked {masked}/{eng.total} "
              f"({'equal' if correct == masked else 'DIFFERENT'})")
    for label, m in (("original", before), ("slim", after)):
        lat = ", ".join(f"batch {b} {m.latency_text(dev_b)} ms" for dev_b in m.latency_ms for b in dev_b[1:])
        print(f"  {label:8s} parameters {m.parameters:,}  MACs {m.macs:,}  file {m.file_bytes / 1e6:.2f} MB  "
              f"CPU latency, median (middle half) of {m.runs} runs in turns with the other model: {lat}")
    meta = ckpt.saved_meta(test_correct=correct, test_total=eng.total, test_accuracy=correct / eng.total,
                slimmed={"from": ckpt.name, "layer": eng.layer, "k": args.k, "mode": args.mode,
                         "criterion": args.criterion, "shrunk": result.shrunk, "exact": result.exact})
    if str(args.out).endswith(".pt2"):
        program.save(result.model, shape, args.out, meta)
    else:  # a state dict with the new widths in arch_kwargs, where the architecture is registered
        kwargs = slim.widths(ckpt.arch, ckpt.arch_kwargs, result.model) if ckpt.program is None else None
        if kwargs is None:
            print(f"error: {ckpt.name}'s architecture has no argument for this layer's width, so the slim model "
                  "can only be written as a .pt2 program: use --out FILE.pt2.", file=sys.stderr)
            return 2
        checkpoints.save(args.out, ckpt.arch, kwargs, result.model, meta)
        print(f"arch_kwargs: {kwargs}")
    print(f"wrote {args.out}")
    return 0 if result.exact is False or correct == masked else 1


def cmd_sweep(args) -> int:
    _, eng, bar = _engine(args)
    ks = parse_ks(args.ks, eng.channels) if args.ks else list(range(eng.channels + 1))
    rows = eng.sweep(ks, args.mode, args.criterion, progress=bar)
    _write_csv(args.out, ["k", "correct", "total", "accuracy"],
               [[k, c, eng.total, f"{c / eng.total:.4f}"] for k, c in rows])
    for k, c in rows[:: max(1, len(rows) // 8)] + ([rows[-1]] if len(rows) > 1 else []):
        print(f"K={k:4d}  accuracy {c / eng.total:.4f}")
    print(f"wrote {args.out}: {len(rows)} rows (mode {args.mode}, criterion {args.criterion})")
    if args.criterion in ("mean", "mean_abs"):
        print(RERANK_NOTE)
    return 0


def _network(args):
    """The checkpoint, its network (statistics kept in the store unless --no-cache) and the store."""
    from . import store, tradeoff

    ckpt = _checkpoint(args)
    kept = None if args.no_cache else store.default()
    net = tradeoff.network_for(ckpt, args.device, kept, args.data_root, progress=_Bar())
    print(f"{args.checkpoint}: {ckpt.arch}, {net.base_macs:,} MACs, {net.base_params:,} parameters; units: "
          + "; ".join(f"{u.name} ({u.channels})" for u in net.units)
          + "".join(f"; left out: {x.layer} ({x.reason})" for x in net.left_out), file=sys.stderr)
    return ckpt, net, kept


def _settings(args):
    from . import tradeoff

    cap = None if str(args.max_ratio).lower() in ("off", "none", "1", "1.0") else float(args.max_ratio)
    if cap is not None and not 0 < cap < 1:
        raise ValueError(f"--max-ratio {args.max_ratio}: a per-layer cap between 0 and 1 (0.9), or off")
    return tradeoff.Settings(args.criterion, args.mode, args.normaliser, cap,
                             "params" if getattr(args, "target_params", None) is not None else "macs")


def _sensitivity_rows(args, ckpt, kept):
    from . import sensitivity

    rows, _ = sensitivity.kept_map(ckpt, args.criterion, args.mode, device=args.device, store=kept,
                                   data_root=args.data_root, progress=_Bar())
    return rows


def _parse_ratios(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        layer, _, value = part.rpartition("=")
        try:
            out[layer] = float(value)
        except ValueError:
            raise ValueError(f"--ratios '{part}' is not LAYER=FRACTION (features.0.0=0.5)") from None
    return out


def cmd_compress(args) -> int:
    import json
    import time

    from . import compress, compressed, program, slim, tradeoff

    ckpt, net, kept = _network(args)
    s = _settings(args)
    target = args.target_params if args.target_params is not None else args.target_macs
    if args.strategy == "manual":
        if not args.ratios:
            raise ValueError("--strategy manual needs --ratios LAYER=FRACTION,...")
    elif target is None:
        raise ValueError(f"--strategy {args.strategy} needs --target-macs F or --target-params F (0.5 keeps half)")
    rows = _sensitivity_rows(args, ckpt, kept) if args.strategy == "sensitivity" else None
    plan = compress.plan_for(net, args.strategy, target, s.of, s.criterion, s.mode, s.normaliser, s.cap,
                             _parse_ratios(args.ratios or ""), rows)
    counted = compressed.count(net, plan)
    pt = tradeoff.Point(args.strategy, float(target or 0), list(plan.pruned), plan.layers, counted.correct,
                        counted.total, net.macs(list(plan.pruned)), net.params(list(plan.pruned)), counted.how,
                        list(plan.notes), plan.wiped(net))
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{args.strategy}: pruned per unit "
          + ", ".join(f"{u.name} {k}/{u.channels}" for u, k in zip(net.units, plan.pruned))
          + f"; right {counted.correct}/{counted.total} ({counted.accuracy:.4f}), counted on {counted.how}"
          + (f", {counted.recounted} close calls counted again" if counted.recounted else ""))
    model = None
    if not plan.wiped(net):
        model = compressed.slim_model(net, plan)
        m = slim.measure(model, net.input_shape, repeats=args.repeats, devices=(net.device.type,))
        if (m.macs, m.parameters) != (pt.macs, pt.params):
            raise RuntimeError(f"the slim model counts {m.macs:,} MACs and {m.parameters:,} parameters, the plan's "
                               f"arithmetic {pt.macs:,} and {pt.params:,}")
        pt.latency_b1_ms, pt.latency_b256_ms = m.latency_ms[(net.device.type, 1)], m.latency_ms[(net.device.type, 256)]
        why = compressed.removal_exact(net, plan)
        if why:
            own = compressed.count_model(model, net)
            print(f"note: {why}: the slim model gets {own}/{len(net.y)} right")
    if args.finetune_steps:
        train = ckpt.split(train=True, data_root=args.data_root)
        bar, began = _Bar(), time.perf_counter()
        recipe = compressed.FinetuneRecipe(steps=args.finetune_steps, seed=args.seed)
        model, _ = compressed.finetune(net, plan, train.x, train.y, recipe,
                                       progress=lambda d, t, loss: bar(d, t, "fine-tuning"))
        pt.correct_finetuned = compressed.count_model(model, net)
        print(f"fine-tuned {args.finetune_steps} steps in {time.perf_counter() - began:.0f} s: right "
              f"{pt.correct_finetuned}/{pt.total} ({pt.accuracy_finetuned:.4f})")
    _write_csv(args.out, tradeoff.ROW_COLUMNS, [tradeoff.row(net, pt)])
    with open(args.plan_out, "w") as f:
        json.dump(plan.to_json(), f, indent=1)
    print(f"wrote {args.out} and {args.plan_out}: {pt.macs / net.base_macs:.1%} of the MACs, "
          f"{pt.params / net.base_params:.1%} of the parameters kept")
    if args.save:
        if model is None:
            raise ValueError("this plan wipes out a layer, so there is no slim model to save")
        meta = ckpt.saved_meta(test_correct=pt.correct_finetuned if pt.correct_finetuned is not None else pt.correct,
                               test_total=pt.total, compressed={"from": ckpt.name, **plan.to_json(),
                                                                "strategy": args.strategy, "target": target,
                                                                "finetune_steps": args.finetune_steps})
        program.save(model, net.input_shape, args.save, meta)
        print(f"wrote {args.save}" + ("" if not compressed.removal_exact(net, plan) else
                                      " (zero mode: the fine-tuned masked model, at full size)"))
    return 0


def cmd_tradeoff(args) -> int:
    from . import tradeoff

    ckpt, net, kept = _network(args)
    s = _settings(args)
    lines = [v for v in args.strategies.split(",") if v.strip()]
    bad = [v for v in lines if v not in tradeoff.LINES]
    if bad:
        raise ValueError(f"--strategies: unknown '{bad[0]}'; lines: {', '.join(tradeoff.LINES)}")
    targets = [float(v) for v in args.targets.split(",") if v.strip()]
    if not targets or any(not 0 < t <= 1 for t in targets):
        raise ValueError("--targets: shares of the MACs to keep, between 0 and 1 (0.9,0.5,0.25)")
    rows = _sensitivity_rows(args, ckpt, kept) if "sensitivity" in lines else None
    points = list(tradeoff.chart(net, s, rows, lines, targets, args.seeds, progress=_Bar()))
    if args.latency:
        points = [tradeoff.measured(net, p, s) for p in points]
    if args.finetune_steps:
        from . import compressed

        train = ckpt.split(train=True, data_root=args.data_root)
        recipe = compressed.FinetuneRecipe(steps=args.finetune_steps, seed=args.seed)
        points = [tradeoff.finetuned(net, p, s, train.x, train.y, recipe)[0] if not p.wiped else p for p in points]
    _write_csv(args.out, tradeoff.ROW_COLUMNS, [tradeoff.row(net, p) for p in points])
    for p in points:
        print(f"{p.line:16s} {p.target:4.0%}  MACs kept {p.macs / net.base_macs:6.1%}  accuracy {p.accuracy:.4f}"
              + (f" -> {p.accuracy_finetuned:.4f} fine-tuned" if p.correct_finetuned is not None else "")
              + (f"  wiped out: {', '.join(p.wiped)}" if p.wiped else ""))
    print(f"wrote {args.out}: {len(points)} points")
    return 0


def cmd_magnitude(args) -> int:
    from . import checkpoints, magnitude
    from .engine import pick_device
    from .tasks import count_correct

    ckpt = _checkpoint(args)
    schedule = [float(v) for v in args.schedule.split(",") if v.strip()]
    if not schedule or any(not 0 <= v < 1 for v in schedule):
        raise ValueError(f"--schedule '{args.schedule}': give sparsities in [0, 1), e.g. 0.5,0.8,0.9")
    test = ckpt.split(train=False, data_root=args.data_root)
    train = ckpt.split(train=True, data_root=args.data_root) if args.retrain_epochs else None
    model = ckpt.build_model()
    base = count_correct(model, test.x, test.y, ckpt.spec.task) / len(test)
    print(f"{args.checkpoint}: {ckpt.arch}, {magnitude.sparsity_of(model).overall_nonzero:,} weights, "
          f"test accuracy {base:.4f}; {'per-layer' if args.per_layer else 'global'} thresholds", file=sys.stderr)
    bar = _Bar()
    final, _, steps = magnitude.iterative_prune(
        model, schedule, args.retrain_epochs, (train.x, train.y) if train else None, (test.x, test.y),
        per_layer=args.per_layer, lr=args.lr, device=pick_device(args.device),
        task=ckpt.spec.task, progress=bar)
    layers = list(steps[0].sparsity_after.total)
    _write_csv(args.out, ["step", "sparsity", "accuracy_before", "accuracy_after", "nonzero", "compression"]
               + [f"nonzero_{n}" for n in layers],
               [[r.step, r.sparsity, f"{r.accuracy_before:.4f}", f"{r.accuracy_after:.4f}",
                 r.sparsity_after.overall_nonzero, f"{r.sparsity_after.compression:.2f}"]
                + [r.sparsity_after.nonzero[n] for n in layers] for r in steps])
    for r in steps:
        print(f"step {r.step}: sparsity {r.sparsity:.1%}  accuracy {r.accuracy_before:.4f} -> {r.accuracy_after:.4f}"
              f"  nonzero {r.sparsity_after.overall_nonzero:,}  compression {r.sparsity_after.compression:.1f}x")
    print(f"wrote {args.out} (baseline accuracy {base:.4f})")
    if args.save_checkpoint:
        meta = ckpt.saved_meta(magnitude_pruned={"schedule": schedule, "retrain_epochs": args.retrain_epochs,
                                                 "per_layer": args.per_layer},
                               test_accuracy=steps[-1].accuracy_after)
        if ckpt.program is not None:  # a program stays a program
            from . import program

            program.save(final, ckpt.spec.input_shape, args.save_checkpoint, meta)
        else:
            checkpoints.save(args.save_checkpoint, ckpt.arch, ckpt.arch_kwargs, final, meta)
        print(f"saved the pruned model to {args.save_checkpoint}")
    return 0


COMPRESS_FINETUNE_STEPS = 2000  # the recipe that meets the README's targets (docs/compress.md)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Pruning explorer engine.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a registered architecture (the bundled checkpoints' recipe)")
    t.add_argument("arch")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW's decoupled weight decay")
    t.add_argument("--l1", type=float, default=0.0, help="L1 penalty on the weights (makes magnitude pruning gentle)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--data-root", default=None)
    t.set_defaults(func=cmd_train)

    from .criteria import CRITERIA
    from .data import DATASETS
    from .engine import MODES

    i = sub.add_parser("info", help="architecture, data set and conv layers of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                   help="for a .pt2 program: the data set it is meant for (checked to fit)")
    i.set_defaults(func=cmd_info)
    normalize_help = ("how the model's inputs are prepared, where the file does not say (or to override it): "
                      "none (pixels in [0, 1]), dataset (the data set's usual mean and std), or MEAN,STD "
                      "('/' between channels)")

    e = sub.add_parser("export", help="write any loadable model as a torch.export program (.pt2)")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True, help="the .pt2 file to write")
    e.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="for a .pt2 input: its data set")
    e.set_defaults(func=cmd_export)

    def common(sp):
        sp.add_argument("checkpoint")
        sp.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                        help="evaluate on this data set instead of the checkpoint's own")
        sp.add_argument("--layer", default=None, help="conv layer name (default: the last conv)")
        sp.add_argument("--criterion", default="mean", choices=list(CRITERIA))
        sp.add_argument("--out", required=True, help="CSV file to write")
        sp.add_argument("--data-root", default=None, help="folder holding the data set's files")
        sp.add_argument("--image-folder", default=None, metavar="DIR",
                        help="evaluate on your own images: one sub-folder per class (ImageFolder layout)")
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--no-cache", action="store_true",
                        help="neither read nor write the engine cache (PRUNE_EXPLORER_CACHE/engines)")
        sp.add_argument("--normalize", default=None, metavar="none|dataset|MEAN,STD", help=normalize_help)

    r = sub.add_parser("rank", help="rank the layer's channels (rank 0 = pruned first) to CSV")
    common(r)
    r.add_argument("--rerank-check", type=int, default=0, metavar="N",
                   help="also re-rank after each of the first N prunes (a pass over the test set each) and compare")
    r.set_defaults(func=cmd_rank)

    s = sub.add_parser("sweep", help="test accuracy for each K pruned channels, to CSV")
    common(s)
    s.add_argument("--mode", default="zero", choices=list(MODES),
                   help="zero: conv weights and bias zeroed; remove: the channel outputs 0 (BatchNorm zeroed too)")
    s.add_argument("--ks", default=None, help="start:stop:step (Python range) or a comma list; default every K")
    s.set_defaults(func=cmd_sweep)
    f = sub.add_parser("finetune", help="prune K channels, fine-tune with them held at zero, save the model")
    common(f)
    f.add_argument("--k", type=int, required=True)
    f.add_argument("--mode", default="remove", choices=list(MODES))
    f.add_argument("--steps", type=int, default=300, help="training steps of 128 images (default: the README's recipe)")
    f.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_finetune)
    sl = sub.add_parser("slim", help="remove K channels for real (Torch-Pruning), measure, write a .pt2 program "
                                             "(or, --out FILE.pt, a state dict with the new widths)")
    common(sl)
    sl.add_argument("--k", type=int, required=True)
    sl.add_argument("--mode", default="remove", choices=list(MODES))
    sl.add_argument("--repeats", type=int, default=20, help="timed runs at least per latency, after warm-up "
                    "(more while the runs spread by over a fifth of their median)")
    sl.set_defaults(func=cmd_slim)
    o = sub.add_parser("oracle", help="the best one-at-a-time order (an upper bound: it looks at the labels), to CSV")
    common(o)
    o.add_argument("--mode", default="zero", choices=list(MODES))
    o.add_argument("--kind", default="greedy", choices=["single", "greedy", "sampled"],
                   help="sampled: the coarse oracle where the read-out is not linear (each channel alone, counted "
                        "on the first 1,000 images)")
    o.add_argument("--pick-on", default="test", choices=["test", "train"],
                   help="choose the order on the test set (an upper bound) or on the last training images "
                        "(a sixth of them, at most 10,000), then scored on the test set")
    o.set_defaults(func=cmd_oracle)
    se = sub.add_parser("sensitivity", help="each conv layer pruned alone by each fraction of its channels, to CSV")
    se.add_argument("checkpoint")
    se.add_argument("--dataset", default=None, choices=sorted(DATASETS))
    se.add_argument("--criterion", default="mean", choices=list(CRITERIA))
    se.add_argument("--mode", default="zero", choices=list(MODES))
    se.add_argument("--fractions", default=",".join(f"{i / 10:g}" for i in range(11)),
                    help="fractions of each layer's channels to prune (default 0,0.1,...,1)")
    se.add_argument("--out", required=True)
    se.add_argument("--data-root", default=None)
    se.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    se.add_argument("--no-cache", action="store_true",
                    help="neither read nor write the map in the engine cache (PRUNE_EXPLORER_CACHE/engines)")
    se.set_defaults(func=cmd_sensitivity)
    def compressing(sp):
        sp.add_argument("checkpoint")
        sp.add_argument("--dataset", default=None, choices=sorted(DATASETS))
        sp.add_argument("--criterion", default="l1_norm", help="the ranking criterion (any of rank's, or random:SEED)")
        sp.add_argument("--mode", default="remove", choices=list(MODES))
        sp.add_argument("--normaliser", default="none", choices=["none", "mean", "max", "lamp"],
                        help="global: how each layer's scores are normalised before one ranking")
        sp.add_argument("--max-ratio", default="0.9", help="the most of a layer's channels a plan may prune (off: no cap)")
        sp.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps of 128 images (0: none)")
        sp.add_argument("--seed", type=int, default=0, help="fine-tuning's seed")
        sp.add_argument("--out", required=True, help="CSV file to write")
        sp.add_argument("--data-root", default=None)
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--no-cache", action="store_true", help="neither read nor write the engine cache")
        sp.add_argument("--normalize", default=None, metavar="none|dataset|MEAN,STD", help=normalize_help)
        sp.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    c = sub.add_parser("compress", help="prune every layer at once to a target (a plan), count it exactly, "
                                        "remove it for real, fine-tune, measure: one CSV row and plan.json")
    compressing(c)
    c.add_argument("--strategy", required=True, choices=["uniform", "global", "sensitivity", "manual"])
    goal = c.add_mutually_exclusive_group()
    goal.add_argument("--target-macs", type=float, default=None, help="the share of the MACs to keep (0.5)")
    goal.add_argument("--target-params", type=float, default=None, help="the share of the parameters to keep")
    goal.add_argument("--ratios", default=None, help="manual: LAYER=FRACTION,... pruned per layer")
    c.add_argument("--plan-out", required=True, help="plan.json: mode, criterion, each layer's pruned channels")
    c.add_argument("--save", default=None, help="write the slim model (fine-tuned where it was) as a .pt2 program")
    c.add_argument("--repeats", type=int, default=20, help="timed runs at least per latency")
    c.set_defaults(func=cmd_compress, finetune_default=COMPRESS_FINETUNE_STEPS)
    tr = sub.add_parser("tradeoff", help="the Compress page's chart: every strategy at every target, to CSV")
    compressing(tr)
    tr.add_argument("--strategies", default="uniform,global,global-uncapped,sensitivity")
    tr.add_argument("--targets", default="0.9,0.75,0.6,0.5,0.4,0.3,0.25,0.2", help="shares of the MACs to keep")
    tr.add_argument("--seeds", type=int, default=3, help="random orders in the baseline band")
    tr.add_argument("--latency", action="store_true", help="also measure each slim model's latency")
    tr.set_defaults(func=cmd_tradeoff, finetune_default=0)
    m = sub.add_parser("magnitude", help="magnitude pruning with retraining (Han et al. 2015), per step to CSV")
    m.add_argument("checkpoint")
    m.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                   help="for a .pt2 program: the data set to test and retrain on (default: the first that fits)")
    m.add_argument("--schedule", default="0.5,0.75,0.9,0.95", help="sparsities, comma separated, non-decreasing")
    m.add_argument("--retrain-epochs", type=int, default=1, help="epochs of retraining after each step (0: none)")
    m.add_argument("--per-layer", action="store_true", help="the same fraction in each layer, not one global threshold")
    m.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate for retraining (the paper's 0.001)")
    m.add_argument("--out", required=True, help="CSV: one row per step, with nonzero weights per layer")
    m.add_argument("--save-checkpoint", default=None, help="also save the final pruned model here")
    m.add_argument("--data-root", default=None)
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.set_defaults(func=cmd_magnitude)
    for sp in (i, e, se, m):
        sp.add_argument("--normalize", default=None, metavar="none|dataset|MEAN,STD", help=normalize_help)
    for sp in (t, i, e, r, s, f, sl, o, se, m):
        sp.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .data import DataUnavailable
    from .untrusted import printable

    args = parser().parse_args(argv)
    if getattr(args, "finetune_steps", 0) is None:
        args.finetune_steps = args.finetune_default
    _ENGINES.clear()
    try:
        code = args.func(args)
        from .engine import keep_memos

        for eng in _ENGINES:
            keep_memos(eng)
        return code
    except (CheckpointError, DataUnavailable, ValueError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {printable(exc, 2000)}", file=sys.stderr)  # one line, whatever names the file held
        if getattr(exc, "how_to", None):  # e.g. the lines that export a model of one's own as a .pt2
            print(exc.how_to, file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {printable(exc, 300)} (run again with --debug for the "
              "traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
