"""BMTN (Vandenhende et al., BMVC 2020), first stage: RSA task affinity from single-task networks.

Not a training method (BMTN's networks are trained with ``fixed`` groups): the feature extraction
that feeds ``fastdmtg.grouping_search.bmtn_select``.

Single-task networks: the STL run of a comparison (one branch per task, nothing shared), whose
branch k *is* task k's single-task encoder. Locations: the D points of the encoder, in order, that
the backbone declares (``Backbone.rsa``, a ``models.backbone.RSALocations``; the ResNet variant's
are stem, block, pool: fastdmtg/models/resnet_celeba.py). A backbone without that declaration is
refused.

On a fixed image set (the first M validation images, no shuffling) every task's branch gives, per
location, an RDM (1 − Pearson correlation between the images' flattened features); the affinity
at a location is the Spearman correlation of two tasks' RDM upper triangles.

Split points: our containers have one split (shared trunk → K branches). The backbone declares the
allowed splits as the values of one model field (the ResNet variant: ``model.shared`` = none,
branch at the input, or stem, branch at the residual block) and how many of its locations each puts
in the trunk (one cluster of all tasks there); the other locations are in the branches.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models.backbone import RSALocations


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def rsa_locations(model_cfg) -> RSALocations:
    """The backbone's BMTN declaration (``Backbone.rsa``); a ValueError naming model.arch and the
    backbones that declare one when it has none."""
    from ..registry import BACKBONES
    rsa = BACKBONES.load(model_cfg.arch).rsa
    if rsa is None:
        have = [name for name in BACKBONES if BACKBONES.load(name).rsa is not None]
        raise ValueError(f"model.arch={model_cfg.arch}: BMTN needs a backbone that declares its RSA locations and "
                         f"split points (Backbone.rsa); the backbones that do: {', '.join(have) or 'none'}")
    return rsa


def split_options(model_cfg, specs, image_size: int) -> dict:
    """Encoder parameter counts of each allowed split (heads excluded: the same N heads in all)."""
    import dataclasses

    from ..models import build_parts
    rsa = rsa_locations(model_cfg)
    out = {}
    for name, shared_locs in rsa.splits.items():
        parts = build_parts(dataclasses.replace(model_cfg, **{rsa.split_field: name}), specs, image_size)
        out[name] = {"shared_locations": shared_locs, "shared_params": _count(parts.shared),
                     "branch_params": _count(parts.branch)}
    return out


@torch.no_grad()
def branch_features(rsa: RSALocations, branch, images: torch.Tensor) -> list[np.ndarray]:
    """Features of one unshared encoder at its declared locations, flattened: D arrays (M, features)."""
    return [f.flatten(1).double().cpu().numpy() for f in rsa.features(branch, images)]


def stl_rsa_affinity(run_dir, num_images: int = 256, device: str = "cpu") -> dict:
    """RSA affinity (D, N, N) from a finished STL run (``fixed`` groups 0|1|...|N−1, nothing shared).

    Reads the run's exported per-branch model (grouped_model.*), which has the same layout whatever
    form (batched or not) the run trained in."""
    from .. import load_grouped
    from ..config import Config
    from ..pipelines import build_source
    from ..grouping_search import rdm, rsa_affinity
    model, meta = load_grouped(run_dir, device)
    cfg = Config.from_dict(meta["config"])
    n = len(meta["tasks"])
    try:
        rsa = rsa_locations(cfg.model)
    except ValueError as e:
        raise ValueError(f"{run_dir}: {e}") from None
    if rsa.splits.get(getattr(cfg.model, rsa.split_field)) != 0:
        raise ValueError(f"{run_dir}: BMTN needs an STL run with nothing shared (model.{rsa.split_field}="
                         f"{getattr(cfg.model, rsa.split_field)} shares a trunk)")
    if sorted(meta["groups"]) != [[t] for t in range(n)]:
        raise ValueError(f"{run_dir}: not an STL run (groups {meta['groups']}, expected one task per branch)")
    data = build_source(cfg.data, progress=False)
    m = min(num_images, data.num_samples("val"))
    images = next(iter(data.batches("val", m, shuffle=False, device=device)))["image"]
    rdms = np.empty((len(rsa.locations), n, m, m))
    for branch, (task,) in zip(model.branches, meta["groups"]):
        for d, feats in enumerate(branch_features(rsa, branch, images)):
            rdms[d, task] = rdm(feats)
    return {"locations": list(rsa.locations), "num_images": m, "affinity": rsa_affinity(rdms)}
