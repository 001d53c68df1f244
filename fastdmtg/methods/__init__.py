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
  the torchjd aggregators), or None: the plain ``total.backward()`` with every fast path;
* ``epoch_record(first, last)`` / ``extra_results(totals)`` -> its entries of history.json's epoch
  record / of results.json.

What the config, the builder and the trainer need to know about a method before or without reading
its state, it declares on its class: ``config_section`` (its own section of the config, e.g.
``dmtg``: a dataclass validated in ``__post_init__``; ``fastdmtg.config`` gathers them from this
registry), ``auto_branches(cfg, N)`` (K for model.branches=0), ``groups_example`` / ``takes_auxiliary``
(whether it is given grouping.groups / auxiliary tasks), ``prunes_heads(cfg)`` (whether its head mask
may change during training: the builder then lets DDP skip unused parameters, the trainer applies
``HeadsPruned``), ``augmentable`` (constant 0/1 weights: it may train with train.aggregator), ``order``
(its place in the table: the order of the config's sections and of listings). Adding a method = its
file in this package, with ``METHOD = TheClass`` (a training augmentation: ``AUGMENTATION =``); from
another package, an entry point of the group ``fastdmtg.methods`` (``fastdmtg.augmentations``) naming
it (fastdmtg/registry.py; docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import Plugins, subclass_of


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
    from the next step on only ``mask`` (N, K) bool is computed (the trainer applies this mask: it is
    a copy, not the method's live state)."""
    step: int
    events: tuple                  # {"task", "branch", "step", "probability"} per dropped head
    mask: torch.Tensor             # (N, K) bool, the heads computed from the next step on
    rule: str = ""                 # why, after "p=…" in the log line, e.g. "< eps=0.1 for 100 steps"


@dataclass(frozen=True)
class RunTotals:
    """What the trainer knows about the whole run when it asks a method for its results."""
    total_steps: int               # optimizer steps of the run (all epochs, across resumes)
    ddp_checked_decisions: int = 0  # decisions of this process checked for agreement across DDP ranks


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
    #: its own section of the config, (section name, dataclass), or None (as GroupingMethod.config_section)
    config_section: tuple[str, type] | None = None
    #: its place in AUGMENTATIONS (the order of listings and of compare's rows)
    order: int = 10

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The train.aggregator names it is registered as (one class may serve several)."""
        return (cls.name,)

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
    #: its own section of the config: (section name, dataclass validated in ``__post_init__``), e.g.
    #: ("dmtg", DMTGConfig); fastdmtg.config gathers them (config_sections), None: no settings of its own
    config_section: tuple[str, type] | None = None
    #: the method is given its groups (grouping.groups): an example of them for messages; None: it is not
    groups_example: str | None = None
    #: grouping.groups may mark auxiliary tasks ('+', grouping.auxiliary)
    takes_auxiliary: bool = False
    #: the setting that turns head pruning on, for messages (prunes_heads)
    pruning_switch: str = ""
    #: its weights are constant 0/1, so it may train with a training augmentation (train.aggregator)
    augmentable: bool = False
    #: its place in METHODS: the order of the methods' sections in the config and of listings
    order: int = 10

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The grouping.method names it is registered as (one class may serve several)."""
        return (cls.name,)

    @classmethod
    def auto_branches(cls, cfg, num_tasks: int | None) -> int | None:
        """K for model.branches=0 (auto); None while it depends on a number of tasks N not known yet.
        Default: one branch per group for a method given its groups, else one encoder for all tasks."""
        return len(cfg.grouping.groups) if cls.groups_example else 1

    @classmethod
    def branches_reason(cls, cfg, k: int) -> str:
        """Why the method trains ``k`` branches (the message for a contradicting model.branches)."""
        return f"one branch per group of grouping.groups ({k})" if cls.groups_example else "one encoder for all tasks"

    @classmethod
    def prunes_heads(cls, cfg) -> bool:
        """Whether, built from ``cfg``, its head mask (``head_mask``) may change during training
        (``HeadsPruned`` decisions): DDP then looks for unused parameters, the trainer re-applies
        the mask on resume and at the end."""
        return False

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

    def epoch_record(self, first_step: int, last_step: int) -> dict:
        """Entries of history.json's record of the epoch of optimizer steps first_step < s <= last_step,
        from the method's (checkpointed) state."""
        return {}

    def extra_results(self, totals: RunTotals | None = None) -> dict:
        """Method-specific entries for results.json (e.g. an affinity matrix), over the whole run (the
        trainer asks before it reloads best.pt)."""
        return {}


# grouping.method → its GroupingMethod class: every module of this package with ``METHOD = TheClass``
# (fastdmtg/registry.py); methods of other packages: entry points of the group "fastdmtg.methods"
METHODS = Plugins("method", "grouping.method", __name__, "METHOD", accepts=subclass_of(GroupingMethod),
                  names=lambda c: c.names(), order=lambda c: c.order, group="fastdmtg.methods")

# train.aggregator → its StepBackward class: every module with ``AUGMENTATION = TheClass``. Each is
# also a grouping method of its own (one shared network, naive MTL + the augmentation: ``--method
# pcgrad``; augment.AugmentedMTL), and any method with constant 0/1 weights (``augmentable``:
# naive-mtl, fixed, networks) can train with one (train.aggregator)
AUGMENTATIONS = Plugins("training augmentation", "train.aggregator", __name__, "AUGMENTATION",
                        accepts=subclass_of(StepBackward), names=lambda c: c.names(), order=lambda c: c.order,
                        group="fastdmtg.augmentations")


def augmentable() -> list[str]:
    """The methods whose weights are constant 0/1 (the networks an augmentation can train)."""
    return [n for n, cls in METHODS.items() if cls.augmentable]


def augmentation_of(cfg) -> str | None:
    """The training augmentation a config trains with (its method's, or train.aggregator), or None."""
    if cfg.grouping.method in AUGMENTATIONS:
        return cfg.grouping.method
    return None if cfg.train.aggregator == "none" else cfg.train.aggregator


method_class = METHODS.load        # name → its GroupingMethod class
augmentation_class = AUGMENTATIONS.load    # name → its StepBackward class


def config_sections() -> dict[str, type]:
    """The methods' own sections of the config, section name → dataclass, in table order: each
    method (METHODS) and training augmentation (AUGMENTATIONS) class declares its ``config_section``;
    names that share a class share its section. Two classes declaring one section name is an error."""
    out: dict[str, type] = {}
    for table in (METHODS, AUGMENTATIONS):
        for cls in table.declarations():
            if cls.config_section is None:
                continue
            section, dc = cls.config_section
            if out.setdefault(section, dc) is not dc:
                raise ValueError(f"{table.kind} {cls.names()[0]}: config section {section!r} is already "
                                 f"{out[section].__name__}'s")
    return out
