"""Fixed groups: train a given partition of the tasks (G groups → G branches), each task's loss on
its own branch only (weight 1), nothing learned about the grouping. The second stage of every
two-shot method (STL, random groups, TAG, HOA, BMTN) and of the DMTG two-shot ablation."""
from __future__ import annotations

import torch

from . import GroupingMethod


def parse_groups(text: str, task_names: list[str]) -> list[list[int]]:
    """"0,1|2" or "a,b|c" → [[0, 1], [2]]; every task exactly once."""
    groups = []
    for part in text.split("|"):
        g = []
        for tok in (t.strip() for t in part.split(",")):
            if not tok:
                continue
            if tok.isdigit():
                i = int(tok)
                if not 0 <= i < len(task_names):
                    raise ValueError(f"grouping.groups: task index {i} out of range 0..{len(task_names) - 1}")
            elif tok in task_names:
                i = task_names.index(tok)
            else:
                raise ValueError(f"grouping.groups: unknown task {tok!r}; tasks: {', '.join(task_names)}")
            g.append(i)
        if not g:
            raise ValueError(f"grouping.groups: empty group in {text!r}")
        groups.append(g)
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(len(task_names))):
        raise ValueError(f"grouping.groups: {text!r} must name every task exactly once "
                         f"({len(task_names)} tasks: {', '.join(task_names)})")
    return groups


def format_groups(groups: list[list[int]]) -> str:
    return "|".join(",".join(str(i) for i in g) for g in groups)


class FixedGroups(GroupingMethod):
    name = "fixed"

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
        return cls(parse_groups(cfg.grouping.groups, names), num_tasks)

    def weights(self, step: int) -> torch.Tensor:
        return self._onehot

    def assignment(self) -> torch.Tensor:
        return self._assign
