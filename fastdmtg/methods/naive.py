"""Naive MTL: one encoder, all N tasks on it (K = 1); every head loss weighted 1.
Trained with the same trainer; its results file is the reference of NormGain."""
from __future__ import annotations

import torch

from . import GroupingMethod


class NaiveMTL(GroupingMethod):
    name = "naive-mtl"
    order = 1
    augmentable = True               # constant 0/1 weights: trains with train.aggregator

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks, 1)
        self.register_buffer("_ones", torch.ones(num_tasks, 1))

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "NaiveMTL":
        return cls(num_tasks)

    def weights(self) -> torch.Tensor:
        return self._ones                                                    # (N, 1)

    def assignment(self) -> torch.Tensor:
        return torch.zeros(self.num_tasks, dtype=torch.long, device=self._ones.device)


METHOD = NaiveMTL
