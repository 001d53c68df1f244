"""Binary attribute tasks (CelebA, the synthetic planted-group set): one 2-way softmax head per
attribute, cross-entropy loss, classification error.

Error convention (paper/reference): per-task error in percent, 100·(1 − accuracy); Total Error is
the sum over tasks, 100·Σ_i (1 − acc_i).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Meter, TaskSet, TaskSpec


class AttributeTaskSet(TaskSet):
    unified_error = True

    def __init__(self, names: list[str], num_classes: int = 2):
        self.specs = [TaskSpec(n, "class", num_classes) for n in names]

    def head_losses(self, outputs: torch.Tensor, batch: dict, z: torch.Tensor, active=None, kernels: str = "auto"):
        from .. import ops
        # outputs (K, N, B, C); labels (B, N); z (N, K). Head pruning keeps this layout (zeros for
        # skipped branches, z = 0 at dropped heads), so ``active`` is not needed here.
        return ops.grouped_ce_loss(outputs, batch["labels"], z, backend=kernels)

    def meter(self) -> "AttributeMeter":
        return AttributeMeter(self.names)


class AttributeMeter(Meter):
    def __init__(self, names: list[str]):
        self.names = names
        self.loss_sum = torch.zeros(len(names), dtype=torch.float64)
        self.correct = torch.zeros(len(names), dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, outputs: torch.Tensor, batch: dict) -> None:
        logits = outputs.float()                                    # (N, B, C)
        labels = batch["labels"].t().long()                         # (N, B)
        n, b, c = logits.shape
        ce = F.cross_entropy(logits.reshape(n * b, c), labels.reshape(-1), reduction="none").view(n, b)
        self.loss_sum += ce.sum(1).double().cpu()
        self.correct += (logits.argmax(-1) == labels).sum(1).double().cpu()
        self.count += b

    def compute(self) -> dict:
        if self.count == 0:
            raise ValueError("no samples were evaluated")
        loss = (self.loss_sum / self.count).tolist()
        acc = (self.correct / self.count).tolist()
        return {
            "loss": dict(zip(self.names, loss)),
            "error": {n: 100.0 * (1.0 - a) for n, a in zip(self.names, acc)},
            "metrics": {n: {"accuracy": a} for n, a in zip(self.names, acc)},
            "count": self.count,
        }
