"""Seeded training recipe for the bundled checkpoints (runs on CPU; CUDA if asked)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data, models
from .engine import count_correct


@dataclass
class TrainConfig:
    arch: str
    dataset: str = ""  # default: the architecture's own data set
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    l1: float = 0.0  # L1 penalty on the weights (Han et al.'s regulariser for pruning without retraining)


def train(cfg: TrainConfig, data_root: str | None = None):
    torch.manual_seed(cfg.seed)
    spec = models.REGISTRY[cfg.arch]
    cfg.dataset = cfg.dataset or spec.dataset
    train_split = data.load(cfg.dataset, train=True, data_root=data_root)
    test_split = data.load(cfg.dataset, train=False, data_root=data_root)
    model = models.build(cfg.arch).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(train_split) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_split), generator=gen)
        flips = torch.rand(len(train_split), generator=gen) < 0.5
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = train_split.x[idx]
            # Horizontal flips: clothes are left-right symmetric, a free augmentation.
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x).to(cfg.device)
            loss = task_loss(model(x), train_split.y[idx].to(cfg.device), spec.task)
            if cfg.l1:
                loss = loss + cfg.l1 * sum(w.abs().sum() for w in models.prunable_weights(model).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        correct = count_correct(model, test_split.x, test_split.y, spec.task, device=cfg.device)
        print(f"epoch {epoch + 1}: test accuracy {correct / len(test_split):.4f}", flush=True)
    return model.cpu().eval(), correct, time.time() - start


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str = "multiclass") -> torch.Tensor:
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.float())
    return F.cross_entropy(logits, labels)
