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
* ``on_epoch_start(epoch)`` (schedules), ``state_dict`` / ``load_state_dict`` (resume);
* ``step_backward()`` -> the step's training augmentation (``StepBackward``: UW, GradNorm, PCGrad,
  the torchjd aggregators), or None: the plain ``total.backward()`` with every fast path.
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


class StepBackward(nn.Module):
    """A training augmentation: how one step turns the head losses into gradients when it is not the
    plain ``total.backward()`` — a loss weighting (UW, GradNorm) or a gradient aggregation of the
    per-task gradients on the shared parameters (PCGrad, MGDA, …). The one extension point for them
    (fastdmtg/methods/augment.py has the shared machinery, one file per family).

    It is a submodule of the method (``GroupingMethod.augment``): its parameters (UW's log-variances,
    GradNorm's weights) are optimised by the run's optimizer and its state is checkpointed with the
    method. The step runner calls ``forward(step, batch)`` instead of ``step(batch)`` +
    ``total.backward()`` and runs eagerly (no torch.compile, no CUDA graph: per-head losses and
    per-task gradients are taken outside any graph); every other method keeps its fast path."""
    name = "base"

    def bind(self, model, taskset, z: torch.Tensor) -> None:
        """Called once by the builder: the built model (its shared blocks), the tasks, and the
        method's (N, K) weights (constant 0/1 for the methods an augmentation applies to)."""

    def forward(self, step, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's forward and backward on ``step`` (a step.StepModule): leaves the gradients in
        the parameters' ``.grad``; returns (Σ z·L, L (N, K)) as the plain step does (the logged
        training loss is the unweighted one, whatever the augmentation optimises)."""
        raise NotImplementedError

    def results(self) -> dict:
        """results.json's ``augmentation`` entry: the name and any learned state (UW's σ², GradNorm's w)."""
        return {"name": self.name}


class GroupingMethod(nn.Module):
    name = "base"

    def __init__(self, num_tasks: int, num_branches: int):
        super().__init__()
        self.num_tasks, self.num_branches = num_tasks, num_branches
        self.augment = None               # a StepBackward (train.aggregator, or the method's own)

    def step_backward(self) -> StepBackward | None:
        """The training augmentation of this method's step, or None (plain backward, fast paths)."""
        return self.augment

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
    "cs-affinity": "fastdmtg.methods.cs:GradientCosine",
})

# training augmentations (StepBackward): name -> "module:Class". Each is also a grouping method of its
# own (one shared network, naive MTL + the augmentation: ``--method pcgrad``), and any method with
# constant 0/1 weights (naive-mtl, fixed, networks) can train with one (train.aggregator)
AUGMENTATIONS: dict[str, str] = {
    "uw": "fastdmtg.methods.uw:UncertaintyWeighting",
    "gradnorm": "fastdmtg.methods.gradnorm:GradNorm",
    **{name: "fastdmtg.methods.aggregators:JacobianAggregation"
       for name in ("pcgrad", "mgda", "cagrad", "nash-mtl", "imtl", "aligned-mtl", "upgrad")},
}
METHODS.update({name: "fastdmtg.methods.augment:AugmentedMTL" for name in AUGMENTATIONS})
# the methods whose weights are constant 0/1 (the networks an augmentation can train)
AUGMENTABLE = ("naive-mtl", "fixed", "networks")


def augmentation_of(cfg) -> str | None:
    """The training augmentation a config trains with (its method's, or train.aggregator), or None."""
    if cfg.grouping.method in AUGMENTATIONS:
        return cfg.grouping.method
    return None if cfg.train.aggregator == "none" else cfg.train.aggregator


method_class = METHODS.load        # name → its GroupingMethod class


def build_method(cfg, num_tasks: int, task_names: list[str] | None = None) -> GroupingMethod:
    """Every method class is built as ``cls.from_config(cfg, num_tasks, task_names)``; with
    train.aggregator set, it trains with that augmentation."""
    method = method_class(cfg.grouping.method).from_config(cfg, num_tasks, task_names)
    if cfg.train.aggregator != "none":
        from .augment import build_augmentation
        method.augment = build_augmentation(cfg.train.aggregator, cfg, num_tasks, method.num_branches)
    return method
