"""Grouping methods: how the K·N head losses are weighted during training and which head each
task keeps at the end. One file per method; the trainer only talks to this interface.

A method owns the grouping state (e.g. DMTG's logits S) and answers:
* ``weights()``      -> (N, K) weights of the head losses for this training step;
* ``assignment()``   -> (N,) long, the branch each task uses for evaluation and pruning;
* ``probabilities()``-> (N, K) assignment probabilities to log (or None);
* ``head_mask()``    -> (N, K) bool of the heads still computed, or None (all: no head pruning);
* ``observe_step(ctx)`` -> decisions, after every optimizer step (``StepContext``: read-only view of
  the step); the trainer applies them (``HeadsPruned``: the model computes only the remaining
  heads, the step runner re-captures; ``AffinityMeasured``: recorded in the log and TensorBoard). A method changes only its own state, never the model,
  optimizer or trainer;
* ``on_epoch_start(epoch)`` (schedules), ``state_dict`` / ``load_state_dict`` (resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class StepContext:
    """What a method may read after an optimizer step (it must not modify any of it)."""
    global_step: int               # optimizer steps done before this one (the index of the step that ran)
    epoch: int                     # 0-based
    batch: dict | None = None      # the step's batch
    model: Any = None              # models.BranchedNet
    optimizer: Any = None          # torch.optim.Optimizer
    taskset: Any = None


@dataclass(frozen=True)
class AffinityMeasured:
    """Decision (TAG): the lookahead affinity of every task onto every other was measured at optimizer
    step ``step`` (1-based); the method has added it to its running mean (its own, checkpointed state);
    the trainer records it (log line, TensorBoard)."""
    step: int
    affinity: torch.Tensor         # (N, N) float64: Z[i, j] = 1 − L_j(after task i's update) / L_j(before)
    measurements: int              # measurements in the running mean, this one included


@dataclass(frozen=True)
class HeadsPruned:
    """Decision: heads were dropped after optimizer step ``step`` (1-based: optimizer steps done);
    from the next step on only ``mask`` (N, K) bool is computed."""
    step: int
    events: tuple                  # {"task", "branch", "step", "probability"} per dropped head
    mask: torch.Tensor


class GroupingMethod(nn.Module):
    name = "base"

    def __init__(self, num_tasks: int, num_branches: int):
        super().__init__()
        self.num_tasks, self.num_branches = num_tasks, num_branches

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def assignment(self) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self) -> torch.Tensor | None:
        return None

    def head_mask(self) -> torch.Tensor | None:
        return None

    def set_rank(self, rank: int) -> None:
        """The DDP rank of this process (DMTG: dmtg.ddp_noise)."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def log_scalars(self) -> dict[str, float]:
        return {}

    def observe_step(self, ctx: StepContext) -> list:
        """Called after every optimizer step; returns the decisions for the trainer to apply
        (``HeadsPruned``, ``AffinityMeasured``), [] when none."""
        return []

    def extra_results(self) -> dict:
        """Method-specific entries for results.json (e.g. an affinity matrix)."""
        return {}


# name -> "module:Class"; a method file registers itself here (one file per method)
METHODS = Registry("method", "grouping.method", {
    "dmtg": "fastdmtg.methods.dmtg:DMTG",
    "naive-mtl": "fastdmtg.methods.naive:NaiveMTL",
    "fixed": "fastdmtg.methods.fixed:FixedGroups",
    "tag-affinity": "fastdmtg.methods.tag:TagAffinity",
    "networks": "fastdmtg.methods.networks:NetworkGroups",
})
method_class = METHODS.load        # name → its GroupingMethod class


def build_method(cfg, num_tasks: int, task_names: list[str] | None = None) -> GroupingMethod:
    """Every method class is built as ``cls.from_config(cfg, num_tasks, task_names)``."""
    return method_class(cfg.grouping.method).from_config(cfg, num_tasks, task_names)
