"""Training augmentations: what UW, GradNorm, PCGrad and the torchjd aggregators share — the
method that is naive MTL plus one of them (``--method pcgrad``), the construction from a name
(``train.aggregator`` on naive-mtl / fixed / networks), the model's shared blocks, and the per-head
differentiable losses.

Where gradient manipulation acts (docs/baselines.md, "Training augmentations"): on the *shared*
parameters, per block — the trunk (``model.shared``: every active head's loss reaches it) and each
branch k (``model.branches[k]``: the losses of the heads on branch k). The task heads keep their own
gradients (∂ Σ z·L / ∂ head). With K = 1 and no trunk (naive MTL) there is one block, the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import AUGMENTATIONS, StepBackward
from .naive import NaiveMTL

# task kinds (tasks.TaskSpec.kind) whose loss is a classification likelihood (UW's factor 1, not ½)
CLASSIFICATION_KINDS = ("class", "segment", "binary", "multiclass")


class AugmentedMTL(NaiveMTL):
    """Naive MTL (one encoder, every head weighted 1) trained with the augmentation of the method's
    name: grouping.method=uw | gradnorm | pcgrad | mgda | cagrad | nash-mtl | imtl | aligned-mtl | upgrad."""

    augmentable = False              # it already trains with one
    order = 100                      # after the methods with their own sections

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(AUGMENTATIONS)

    def __init__(self, num_tasks: int, augment: StepBackward):
        super().__init__(num_tasks)
        self.name = augment.name
        self.augment = augment

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "AugmentedMTL":
        return cls(num_tasks, build_augmentation(cfg.grouping.method, cfg, num_tasks, 1))


def build_augmentation(name: str, cfg, num_tasks: int, num_branches: int) -> StepBackward:
    return AUGMENTATIONS.load(name).from_config(name, cfg, num_tasks, num_branches)


METHOD = AugmentedMTL


@dataclass
class Block:
    """A set of shared parameters and the heads (task, branch) whose losses reach it."""
    name: str                        # "trunk" | "branch k" (1-based k)
    params: list                     # list[nn.Parameter]
    heads: list                      # list[(task, branch)], row order of the block's Jacobian


def active_heads(z: torch.Tensor) -> list[tuple[int, int]]:
    """The (task, branch) pairs with a non-zero weight, task-major; the weights must be 0/1."""
    zc = z.detach().cpu()
    if not bool(((zc == 0) | (zc == 1)).all()):
        raise ValueError("a training augmentation needs constant 0/1 weights (naive-mtl, fixed, networks)")
    n, k = zc.shape
    return [(i, b) for i in range(n) for b in range(k) if zc[i, b] == 1]


def shared_blocks(model, z: torch.Tensor) -> list[Block]:
    """The trunk (if it has parameters) and each branch with at least one active head, of a
    per-branch model (``models.MultiBranchNet``; the builder turns batched branches off)."""
    if not hasattr(model, "branches"):
        raise ValueError("a training augmentation needs per-branch modules (model.batched=off)")
    heads = active_heads(z)
    blocks = []
    trunk = [p for p in model.shared.parameters() if p.requires_grad]
    if trunk:
        blocks.append(Block("trunk", trunk, heads))
    for b, branch in enumerate(model.branches):
        on = [h for h in heads if h[1] == b]
        params = [p for p in branch.parameters() if p.requires_grad]
        if on and params:
            blocks.append(Block(f"branch {b + 1}", params, on))
    return blocks


def head_params(model) -> list:
    return [p for p in model.heads.parameters() if p.requires_grad]


def last_layer(params: list) -> torch.nn.Parameter:
    """GradNorm's W, "the last shared layer of weights": the last weight of at least 2 dimensions
    (a convolution or linear layer; a closing BatchNorm's 1-d scale is skipped) of a block."""
    for p in reversed(params):
        if p.dim() >= 2:
            return p
    return params[-1]


def per_head_losses(step, outputs, batch: dict, heads: list[tuple[int, int]], shape) -> list[torch.Tensor]:
    """The differentiable loss of each head (task i on branch k), one ``step.losses`` call per head with
    the one-hot weight e_{ik} (the tasks' ``head_losses`` return the per-head table detached)."""
    out = []
    for i, b in heads:
        e = torch.zeros(shape, device=batch["image"].device)
        e[i, b] = 1.0
        out.append(step.losses(outputs, batch, e)[0])
    return out


def task_kinds(taskset) -> list[str]:
    return [s.kind for s in taskset.specs]
