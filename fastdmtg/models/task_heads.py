"""Per-task linear heads of any output size (your own tasks, ``fastdmtg/tasks/generic.py``): binary
(2 logits), multiclass (C logits), regression (1 value). One ``TaskHead`` per task in a
``ModuleHeads`` list, so each task's head has exactly its own size; initialised as the CelebA
heads (Xavier-uniform weight, zero bias) and run in fp32 under the precision policy (``keep_fp32``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .multibranch import FP32Output, ModuleHeads, fp32_heads


class TaskHead(FP32Output, nn.Linear):
    """flatten → Linear(in_features, out_features): (B, ...) → (B, out_features)."""

    keep_fp32 = True         # precision policy (fastdmtg.step.set_output_precision)

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        bound = math.sqrt(6.0 / (in_features + out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return fp32_heads(super().forward, x) if self.keep_fp32 else super().forward(x)


def task_heads(task_specs, in_features: int) -> ModuleHeads:
    """One head per task spec, ``spec.out_channels`` outputs each."""
    return ModuleHeads([TaskHead(in_features, t.out_channels) for t in task_specs])
