"""Models: each backbone (``fastdmtg.registry.BACKBONES``, one file each, declared by a
``models.backbone.Backbone``) builds its parts; the containers in ``multibranch`` turn the parts into
the K-branch training network or the pruned grouped model.

A builder is ``fn(model_cfg, task_specs, image_size) -> Parts``. Add a backbone by writing one file
in this package with such a function and its ``BACKBONE`` declaration (found by listing the package).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..tasks.generic import TYPES
from .multibranch import BranchedNet, GroupedNet, HeadSet, LinearHeads, ModuleHeads, MultiBranchNet, grad_scale


@dataclass
class Parts:
    shared: nn.Module
    branch: nn.Module
    heads: HeadSet
    branch_grad_scale: float = 1.0
    head_grad_scale: float = 1.0


GENERIC_KINDS = TYPES          # the kinds of your own tasks: one list, fastdmtg/tasks/generic.py's


def build_parts(cfg, task_specs, image_size: int) -> Parts:
    from ..registry import BACKBONES
    parts = BACKBONES.load(cfg.arch).build_parts(cfg, task_specs, image_size)
    if cfg.grad_scale == "none":
        parts.branch_grad_scale = parts.head_grad_scale = 1.0
    return parts


def build_multibranch(cfg, task_specs, image_size: int) -> MultiBranchNet:
    p = build_parts(cfg, task_specs, image_size)
    return MultiBranchNet(p.shared, p.branch, p.heads, cfg.branches, p.branch_grad_scale, p.head_grad_scale)


def build_grouped(cfg, task_specs, image_size: int, groups: list[list[int]]) -> GroupedNet:
    """An (untrained) grouped model of the given partition, e.g. to load saved pruned weights into."""
    import copy
    p = build_parts(cfg, task_specs, image_size)
    return GroupedNet(p.shared, [copy.deepcopy(p.branch) for _ in groups],
                      [p.heads.select(g) for g in groups], groups, len(task_specs))


__all__ = ["Parts", "GENERIC_KINDS", "build_parts", "build_multibranch", "build_grouped",
           "BranchedNet", "MultiBranchNet", "GroupedNet", "HeadSet", "LinearHeads", "ModuleHeads", "grad_scale"]
