"""Grouping methods: how the K·N head losses are weighted during training and which head each
task keeps at the end. One file per method; the trainer only talks to this interface.

A method owns the grouping state (e.g. DMTG's logits S) and answers:
* ``weights(step)``  -> (N, K) weights of the head losses for this training step;
* ``assignment()``   -> (N,) long, the branch each task uses for evaluation and pruning;
* ``probabilities()``-> (N, K) assignment probabilities to log (or None);
* ``on_epoch_start(epoch)`` (schedules), ``state_dict`` / ``load_state_dict`` (resume).
"""
from __future__ import annotations

import torch
from torch import nn


class GroupingMethod(nn.Module):
    name = "base"

    def __init__(self, num_tasks: int, num_branches: int):
        super().__init__()
        self.num_tasks, self.num_branches = num_tasks, num_branches

    def weights(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def assignment(self) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self) -> torch.Tensor | None:
        return None

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def log_scalars(self) -> dict[str, float]:
        return {}


def build_method(cfg, num_tasks: int) -> GroupingMethod:
    m = cfg.grouping.method
    if m == "dmtg":
        from .dmtg import DMTG
        return DMTG(num_tasks, cfg.model.branches, cfg.grouping, seed=cfg.train.seed)
    if m == "naive-mtl":
        from .naive import NaiveMTL
        return NaiveMTL(num_tasks)
    raise ValueError(f"grouping.method: unknown method {m!r}")
