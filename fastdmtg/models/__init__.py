"""Model registry: each backbone registers a builder returning its parts; the containers in
``multibranch`` turn the parts into the K-branch training network or the pruned grouped model.

A builder is ``fn(model_cfg, task_specs, image_size) -> Parts``. Add a backbone by writing one
file with such a function and registering it here (``register_backbone``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .multibranch import BranchedNet, GroupedNet, HeadSet, LinearHeads, ModuleHeads, MultiBranchNet, grad_scale


@dataclass
class Parts:
    shared: nn.Module
    branch: nn.Module
    heads: HeadSet
    branch_grad_scale: float = 1.0
    head_grad_scale: float = 1.0


_BACKBONES: dict[str, Callable] = {}


def register_backbone(name: str, fn: Callable) -> None:
    _BACKBONES[name] = fn


GENERIC_KINDS = ("binary", "multiclass", "regression")     # your own tasks (fastdmtg/tasks/generic.py)


def _resnet_celeba(cfg, task_specs, image_size) -> Parts:
    from . import resnet_celeba
    if task_specs and all(t.kind in GENERIC_KINDS for t in task_specs):
        # per-task heads of each task's own size (binary 2, multiclass C, regression 1)
        from .task_heads import task_heads
        shared, branch, _ = resnet_celeba.build(cfg.width, image_size, len(task_specs), cfg.num_classes, cfg.shared)
        return Parts(shared, branch, task_heads(task_specs, resnet_celeba.feature_dim(cfg.width, image_size)))
    for t in task_specs:
        if t.kind != "class":
            raise ValueError(f"resnet_celeba has classification heads only; task {t.name!r} is {t.kind!r}")
    shared, branch, heads = resnet_celeba.build(cfg.width, image_size, len(task_specs), cfg.num_classes, cfg.shared)
    return Parts(shared, branch, heads)


register_backbone("resnet_celeba", _resnet_celeba)


def _lazy(module: str, fn: str) -> Callable:
    def build(cfg, task_specs, image_size):
        import importlib
        return getattr(importlib.import_module(f"fastdmtg.models.{module}"), fn)(cfg, task_specs, image_size)
    return build


# Taskonomy backbones live in their own files (fastdmtg/models/xception.py, vit.py) and are loaded
# on first use, so importing fastdmtg does not pay for them.
register_backbone("xception", _lazy("xception", "build_parts"))
register_backbone("vit_base", _lazy("vit", "build_parts"))


def build_parts(cfg, task_specs, image_size: int) -> Parts:
    if cfg.arch not in _BACKBONES:
        raise ValueError(f"model.arch: unknown backbone {cfg.arch!r}; known: {', '.join(sorted(_BACKBONES))}")
    parts = _BACKBONES[cfg.arch](cfg, task_specs, image_size)
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


__all__ = ["Parts", "register_backbone", "build_parts", "build_multibranch", "build_grouped",
           "BranchedNet", "MultiBranchNet", "GroupedNet", "HeadSet", "LinearHeads", "ModuleHeads", "grad_scale"]
