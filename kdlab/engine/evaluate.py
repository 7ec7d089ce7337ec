"""Evaluation: top-1 / top-5 accuracy and mean loss with torchmetrics."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1, top-5 (top-k with k = min(5, classes)) accuracy in % and mean CE loss."""
    was_training = model.training
    model.eval()
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(device)
    # Sums stay on the device: no host synchronisation per batch.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, sample count)
    try:
        for batch in loader:
            images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                logits = model(images)
            logits = logits.float()
            sums[0] += F.cross_entropy(logits, targets, reduction="sum")
            sums[1] += targets.numel()
            top1.update(logits, targets)
            top5.update(logits, targets)
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DDP: each rank saw its shard; torchmetrics' compute() below syncs the accuracies.
        torch.distributed.all_reduce(sums)
    loss_sum, count = sums.tolist()
    return {
        "top1": 100.0 * top1.compute().item(),
        "top5": 100.0 * top5.compute().item(),
        "loss": loss_sum / max(count, 1),
    }
