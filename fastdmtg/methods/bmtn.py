"""BMTN (Vandenhende et al., BMVC 2020), first stage: RSA task affinity from single-task networks.

Not a training method (BMTN's networks are trained with ``fixed`` groups): the feature extraction
that feeds ``fastdmtg.grouping_search.bmtn_select``.

Single-task networks: the STL run of a comparison (one branch per task, nothing shared), whose
branch k *is* task k's single-task encoder. Locations (ResNet variant, the only backbone supported
here): D = 3 points of the encoder, in order

    stem   after conv-BN-ReLU-maxpool          (w × 15 × 15 at 32 px, w × 31 × 31 at 64 px)
    block  after the residual block
    pool   after AvgPool(2), the encoder output the heads read

On a fixed image set (the first M validation images, no shuffling) every task's branch gives, per
location, an RDM (1 − Pearson correlation between the images' flattened features); the affinity
at a location is the Spearman correlation of two tasks' RDM upper triangles.

Split points: our containers have one split (shared trunk → K branches). For the ResNet variant
the allowed splits are ``model.shared`` = none (branch at the input: nothing shared) and stem
(share the stem, branch at the residual block). A split that shares the stem puts the ``stem``
location in the trunk (one cluster of all tasks there); ``block`` and ``pool`` are always in the
branches.
"""
from __future__ import annotations

import numpy as np
import torch

LOCATIONS = ("stem", "block", "pool")
SPLITS = {"none": 0, "stem": 1}          # split name → number of locations inside the shared trunk


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def split_options(model_cfg, specs, image_size: int) -> dict:
    """Encoder parameter counts of each allowed split (heads excluded: the same N heads in all)."""
    import dataclasses

    from ..models import build_parts
    if model_cfg.arch != "resnet_celeba":
        raise ValueError(f"BMTN is implemented for the ResNet variant only (model.arch=resnet_celeba), got "
                         f"{model_cfg.arch!r}: its RSA locations and split points are architecture-specific")
    out = {}
    for name, shared_locs in SPLITS.items():
        parts = build_parts(dataclasses.replace(model_cfg, shared=name), specs, image_size)
        out[name] = {"shared_locations": shared_locs, "shared_params": _count(parts.shared),
                     "branch_params": _count(parts.branch)}
    return out


@torch.no_grad()
def branch_features(branch, images: torch.Tensor) -> list[np.ndarray]:
    """Features of one unshared ResNet-variant encoder (Sequential(Stem, Tail)) at LOCATIONS."""
    stem, tail = branch[0], branch[1]
    f_stem = stem(images)
    f_block = tail[0](f_stem)
    f_pool = tail[1](f_block)
    return [f.flatten(1).double().cpu().numpy() for f in (f_stem, f_block, f_pool)]


def stl_rsa_affinity(run_dir, num_images: int = 256, device: str = "cpu") -> dict:
    """RSA affinity (D, N, N) from a finished STL run (``fixed`` groups 0|1|...|N−1, shared=none).

    Reads the run's exported per-branch model (grouped_model.*), which has the same layout whatever
    form (batched or not) the run trained in."""
    from .. import load_grouped
    from ..config import Config
    from ..pipelines import build_source
    from ..grouping_search import rdm, rsa_affinity
    model, meta = load_grouped(run_dir, device)
    cfg = Config.from_dict(meta["config"])
    n = len(meta["tasks"])
    if cfg.model.arch != "resnet_celeba" or cfg.model.shared != "none":
        raise ValueError(f"{run_dir}: BMTN needs an STL run of the ResNet variant with nothing shared")
    if sorted(meta["groups"]) != [[t] for t in range(n)]:
        raise ValueError(f"{run_dir}: not an STL run (groups {meta['groups']}, expected one task per branch)")
    data = build_source(cfg.data, progress=False)
    m = min(num_images, data.num_samples("val"))
    images = next(iter(data.batches("val", m, shuffle=False, device=device)))["image"]
    rdms = np.empty((len(LOCATIONS), n, m, m))
    for branch, (task,) in zip(model.branches, meta["groups"]):
        for d, feats in enumerate(branch_features(branch, images)):
            rdms[d, task] = rdm(feats)
    return {"locations": list(LOCATIONS), "num_images": m, "affinity": rsa_affinity(rdms)}
