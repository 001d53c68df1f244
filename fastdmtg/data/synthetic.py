"""The embedded default dataset: synthetic multi-task images with a *planted* group structure.

Generative model (all draws from one seeded generator, so the data is identical on every machine):

    G groups (≤ 3), T tasks per group, N = G·T binary tasks.
    Per sample: latents a ∈ R^G,  a_g ~ N(0, 1) independent.
    Image x ∈ [0,1]^{3×S×S}:  x[c, h, w] = clip(0.5 + α·a_c·[c < G] + σ·ε[c, h, w]),  ε ~ N(0, 1)
            (group g lives in colour channel g; α = 0.12, σ = 0.15)
    Task (g, j):  y = 1[a_g > θ_j],  θ_j evenly spaced in [-0.6, 0.6];  tasks are listed group by group
            and named g<g>_t<j>.

Why this plants groups that a K-branch model should recover: tasks of one group depend on the same
latent, so a branch that learns that latent serves all of them (positive transfer). The default
synthetic recipe uses a 1-channel ResNet variant: every pixel carries the same colour mixture, so a
1-channel branch can only carry one projection w·a of the latents — a branch serving two groups must
trade them off (negative transfer). The unique optimum with K = G branches is one planted group per
branch, and a naive-MTL model (one branch) can only solve one group.

Stored as uint8 (like a decoded image cache); labels {0, 1}. ``open_synthetic(cfg)`` returns it as
an ``ArrayDataset`` (fields ``image`` (3, S, S) uint8, ``labels`` (G·T,) uint8).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..methods.dmtg import DMTGConfig
from ..tasks.attributes import AttributeTaskSet
from .arrays import ArrayDataset, image_label_fields
from .base import DatasetFormat, Recipe, recipe_fn
from .celeba import celeba_bench, resize_like_reference

if TYPE_CHECKING:
    from ..config import Config

ALPHA, SIGMA = 0.2, 0.1
ENV_PEAK = 1.2


def task_names(groups: int, tasks_per_group: int) -> list[str]:
    return [f"g{g}_t{j}" for g in range(groups) for j in range(tasks_per_group)]


def envelope(size: int) -> torch.Tensor:
    """Smooth bump sin(πh/S)·sin(πw/S) (S×S), peak ENV_PEAK: the latent fades out towards the borders so
    zero-padded convolutions see no edge of the signal (an edge would let one channel read the latents
    through a second, border-only colour projection)."""
    t = torch.sin(torch.pi * (torch.arange(size) + 0.5) / size)
    return ENV_PEAK * t[:, None] * t[None, :]


def planted_groups(groups: int, tasks_per_group: int) -> list[list[int]]:
    return [[g * tasks_per_group + j for j in range(tasks_per_group)] for g in range(groups)]


def generate(n: int, image_size: int, groups: int, tasks_per_group: int, seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images (n, 3, S, S) uint8 and labels (n, G·T) int64."""
    if not 1 <= groups <= 3:
        raise ValueError(f"synthetic data: groups must be 1..3 (one colour channel each), got {groups}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, groups, generator=gen)                                     # (n, G)
    shift = torch.zeros(n, 3)
    shift[:, :groups] = ALPHA * a
    noise = torch.randn(n, 3, image_size, image_size, generator=gen)
    x = (0.5 + shift[:, :, None, None] * envelope(image_size) + SIGMA * noise).clamp_(0, 1)
    images = (x * 255).round_().to(torch.uint8)
    if tasks_per_group == 1:
        thresholds = torch.zeros(1)
    else:
        thresholds = torch.linspace(-0.3, 0.3, tasks_per_group)
    labels = (a[:, :, None] > thresholds[None, None, :]).reshape(n, groups * tasks_per_group).long()
    return images, labels


def make_splits(cfg) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train/val/test splits from disjoint seeds derived from cfg.synthetic_seed."""
    sizes = {"train": cfg.synthetic_train, "val": cfg.synthetic_val, "test": cfg.synthetic_test}
    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        if n < 2:
            raise ValueError(f"data.synthetic_{split}: need at least 2 samples, got {n}")
        out[split] = generate(n, cfg.image_size, cfg.synthetic_groups, cfg.synthetic_tasks_per_group,
                              cfg.synthetic_seed * 1000 + i)
    return out


def open_synthetic(cfg, progress: bool = True) -> ArrayDataset:
    names = task_names(cfg.synthetic_groups, cfg.synthetic_tasks_per_group)
    wanted = cfg.task_names()
    if wanted is not None:
        raise ValueError(f"data.tasks: the synthetic dataset always has its planted tasks {names}; "
                         f"leave data.tasks=all (got {wanted})")
    splits = {s: {"image": x.numpy(), "labels": y.to(torch.uint8).numpy()} for s, (x, y) in make_splits(cfg).items()}
    return ArrayDataset("synthetic", splits, image_label_fields(cfg.image_size, len(names)), AttributeTaskSet(names),
                        cfg.image_size, limits={"train": cfg.limit_train, "val": cfg.limit_eval,
                                                "test": cfg.limit_eval})


def synthetic_taskset(cfg, names: list[str]) -> AttributeTaskSet:
    return AttributeTaskSet(names, cfg.model.num_classes)


def synthetic_known_tasks(cfg) -> list[str]:
    """The planted tasks (data.tasks does not select among them)."""
    return task_names(cfg.synthetic_groups, cfg.synthetic_tasks_per_group)


def synthetic_k3(c) -> Config:
    """Ours — the embedded default: 3 planted groups x 3 tasks, 32x32, 1-channel ResNet variant, K=3
    (~30 s on CPU).

    The 1-channel width is what plants the groups (see fastdmtg/data/synthetic.py): a branch can carry
    one colour projection, so the optimum is one planted group per branch. lr 1e-2 because the tiny
    net trains slowly at the CelebA rate; tau is the CelebA default. Per-rank BatchNorm (model.sync_bn
    false), so it also runs under CPU (gloo) DDP."""
    return c.Config(
        name="synthetic_k3",
        data=c.DataConfig(dataset="synthetic", image_size=32, tasks="all"),
        model=c.ModelConfig(arch="resnet_celeba", branches=3, width=1, sync_bn=False),
        dmtg=DMTGConfig(tau=2.5),
        optim=c.OptimConfig(lr=1e-2, schedule="none"),
        train=c.TrainConfig(epochs=10, batch_size=128, eval_batch_size=500),
    )


def synthetic_naive(c) -> Config:
    """Ours — naive MTL (K = 1) on the embedded planted-group data."""
    cfg = c.naive_twin(synthetic_k3(c), "synthetic_naive")
    cfg.model.branches = 1
    return cfg


def synthetic_recipes(c) -> list[Recipe]:
    return [Recipe("synthetic_k3", recipe_fn(synthetic_k3, c), "ours", naive="synthetic_naive"),
            Recipe("synthetic_naive", recipe_fn(synthetic_naive, c), "ours")]


FORMAT = DatasetFormat("synthetic", open_synthetic, synthetic_taskset,
                       "planted-group synthetic images, generated from data.synthetic_* (no files)",
                       known_tasks=synthetic_known_tasks, resize=resize_like_reference, recipes=synthetic_recipes,
                       bench=lambda t, c: celeba_bench(t, c, lambda cfg: (cfg.data.limit_train or cfg.data.synthetic_train,
                                                                          "synthetic")), order=0)
