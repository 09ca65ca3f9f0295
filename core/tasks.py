"""What a model's outputs mean: the prediction rule, the loss and the margin of each task, used by everyone.

Two tasks: `multiclass` (one logit per class; the prediction is the largest) and `binary` (a pair
network's one logit; "same" when it is above 0). The engine, the read-out, the oracle, training
and the plain evaluation all read logits through these functions, so they can never disagree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("multiclass", "binary")


def predictions(logits: torch.Tensor, task: str) -> torch.Tensor:
    """The predicted class of each image: logits (..., n, out), or (n,) for a pair task's one logit."""
    if task == "binary":
        return ((logits[..., 0] if logits.dim() > 1 else logits) > 0).long()
    return logits.argmax(dim=-1)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str = "multiclass") -> torch.Tensor:
    """The training loss, averaged over the batch (cross-entropy; binary cross-entropy for a pair)."""
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.float())
    return F.cross_entropy(logits, labels)


def image_losses(logits: torch.Tensor, labels: torch.Tensor, task: str = "multiclass") -> torch.Tensor:
    """The same loss for each image: logits (..., n, out) and labels (n,) -> (..., n)."""
    batch = logits.shape[:-1]
    if task == "binary":
        target = labels.to(logits.dtype).expand(batch)
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.expand(batch).reshape(-1), reduction="none")
    return flat.view(batch)


def margin(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(...,) how far each prediction is from changing: the top-two gap, or |logit| for a pair (a
    one-output multi-class model can never change its prediction: infinite)."""
    if task == "binary":
        return logits[..., 0].abs()
    if logits.shape[-1] == 1:
        return torch.full(logits.shape[:-1], float("inf"), dtype=logits.dtype, device=logits.device)
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@torch.no_grad()
def count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "multiclass",
                  device: torch.device | str = "cpu", batch_size: int = 1000) -> int:
    """The plain evaluation: the whole split through the whole model."""
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((predictions(logits, task).cpu() == y[i:i + batch_size]).sum())
    return correct
