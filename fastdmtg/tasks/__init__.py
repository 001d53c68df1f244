"""Tasks: what each head predicts, how its K·N head losses are computed during training, and how
the selected (one head per task) predictions are scored.

A ``TaskSet`` bundles the N tasks of a dataset:
* ``head_losses(outputs, batch, z, active=None, kernels="auto") -> (total, L)``: training loss of all
  K·N heads (``kernels``: the fused ops' backend, train.kernels). ``outputs`` is
  the ``MultiBranchNet`` output (stacked (K, N, B, C) or a list of N tensors (K, B, ...)), ``z`` the
  (N, K) grouping weights; ``L`` (N, K) holds the batch-mean loss of every head (detached) and
  ``total = Σ_{i,k} z[i,k]·L[i,k]`` is differentiable. Implemented with the fused ops of
  ``fastdmtg.ops`` (Triton on CUDA, PyTorch reference elsewhere).
* ``meter()``: accumulates per-task loss and metrics over an evaluation pass of one-head-per-task
  predictions ((N, B, C) or a list of N (B, ...)).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str               # class (CelebA attribute) | depth | normal | segment | keypoints | edges
    out_channels: int


class Meter:
    def update(self, outputs, batch) -> None:
        raise NotImplementedError

    def compute(self) -> dict:
        """{"loss": {task: mean loss}, "error": {task: error} or None, "metrics": {task: {...}}}"""
        raise NotImplementedError


class TaskSet:
    specs: list[TaskSpec]
    #: True when every task has a comparable error (classification error): NormGain_E applies
    unified_error: bool = False

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.specs]

    @property
    def num_tasks(self) -> int:
        return len(self.specs)

    def head_losses(self, outputs, batch, z, active=None, kernels: str = "auto"):
        raise NotImplementedError

    def meter(self) -> Meter:
        raise NotImplementedError
