"""Fixed groups: train a given partition of the tasks (G groups → G branches), each task's loss on
its own branch only (weight 1), nothing learned about the grouping. The second stage of every
two-shot method (STL, random groups, TAG, HOA, BMTN) and of the DMTG two-shot ablation."""
from __future__ import annotations

import torch

from ..partition import resolve_partition
from . import GroupingMethod


class FixedGroups(GroupingMethod):
    name = "fixed"
    order = 2
    augmentable = True               # constant 0/1 weights: trains with train.aggregator
    groups_example = "0,1|2"    # given its groups (grouping.groups): K = one branch per group

    def __init__(self, groups: list[list[int]], num_tasks: int):
        super().__init__(num_tasks, len(groups))
        self.groups = groups
        assign = torch.empty(num_tasks, dtype=torch.long)
        for k, g in enumerate(groups):
            assign[g] = k
        self.register_buffer("_assign", assign)
        self.register_buffer("_onehot", torch.nn.functional.one_hot(assign, len(groups)).float())  # (N, K)

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "FixedGroups":
        names = task_names or [str(i) for i in range(num_tasks)]
        return cls(resolve_partition(cfg.grouping.groups, names), num_tasks)

    def weights(self) -> torch.Tensor:
        return self._onehot

    def assignment(self) -> torch.Tensor:
        return self._assign


METHOD = FixedGroups
