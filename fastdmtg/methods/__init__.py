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

    def observe_step(self, trainer, batch: dict) -> None:
        """Called after every optimizer step (e.g. TAG records inter-task affinities here)."""

    def extra_results(self) -> dict:
        """Method-specific entries for results.json (e.g. an affinity matrix)."""
        return {}


# name -> "module:Class"; a method file registers itself here (one file per method)
METHODS: dict[str, str] = {
    "dmtg": "fastdmtg.methods.dmtg:DMTG",
    "naive-mtl": "fastdmtg.methods.naive:NaiveMTL",
    "fixed": "fastdmtg.methods.fixed:FixedGroups",
    "tag-affinity": "fastdmtg.methods.tag:TagAffinity",
    "networks": "fastdmtg.methods.networks:NetworkGroups",
}


def register_method(name: str, target: str) -> None:
    METHODS[name] = target


def method_class(name: str):
    import importlib
    if name not in METHODS:
        raise ValueError(f"grouping.method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def build_method(cfg, num_tasks: int, task_names: list[str] | None = None) -> GroupingMethod:
    """Every method class is built as ``cls.from_config(cfg, num_tasks, task_names)``."""
    return method_class(cfg.grouping.method).from_config(cfg, num_tasks, task_names)
