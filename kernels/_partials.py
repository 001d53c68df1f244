"""Stage 2 of the loss reductions: per-program partial sums (H, P) → L (H,), total, [n_valid].

The loss kernels write one fp32 partial per (head, program) instead of using atomics; this one-program
kernel sums them in a fixed order, so every result is bit-reproducible run to run.
"""
from __future__ import annotations

import torch

from ._common import jit, npow2, tl


@jit
def _finalize_kernel(
    part_ptr,  # (H, P) float32 per-program partial sums
    cnt_ptr,  # (P,) float32 per-program valid counts (HAS_COUNT only)
    z_ptr,  # (H,) head weights (any float dtype)
    L_ptr,  # (H,) float32 out
    total_ptr,  # () float32 out
    cnt_out_ptr,  # () float32 out: n_valid (HAS_COUNT only)
    H,
    P,
    inv_denom,  # 1 / element count (when not HAS_COUNT)
    HAS_COUNT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    ps = tl.arange(0, BLOCK_P)
    if HAS_COUNT:
        cacc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            cacc += tl.load(cnt_ptr + p0 + ps, mask=p0 + ps < P, other=0.0)
        cnt = tl.sum(cacc, axis=0)
        tl.store(cnt_out_ptr, cnt)
        scale = 1.0 / tl.maximum(cnt, 1.0)  # n_valid == 0 -> sums are 0 -> L = 0
    else:
        scale = inv_denom
    tot = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hm = hs < H
        acc = tl.zeros([BLOCK_H, BLOCK_P], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            m = hm[:, None] & ((p0 + ps) < P)[None, :]
            acc += tl.load(part_ptr + hs[:, None] * P + (p0 + ps)[None, :], mask=m, other=0.0)
        Lh = tl.sum(acc, axis=1) * scale  # (BLOCK_H,)
        tl.store(L_ptr + hs, Lh, mask=hm)
        zh = tl.load(z_ptr + hs, mask=hm, other=0.0).to(tl.float32)
        tot += zh * Lh
    tl.store(total_ptr, tl.sum(tot, axis=0))


def finalize(partials: torch.Tensor, z: torch.Tensor, inv_denom: float, counts=None):
    """partials (H, P) fp32, z with H elements -> (total (), L (H,), n_valid () or None)."""
    H, P = partials.shape
    dev = partials.device
    L = torch.empty((H,), dtype=torch.float32, device=dev)
    total = torch.empty((), dtype=torch.float32, device=dev)
    cnt_out = torch.empty((), dtype=torch.float32, device=dev) if counts is not None else None
    block_p = min(npow2(P), 1024)
    block_h = min(npow2(H), max(1, 4096 // block_p))
    _finalize_kernel[(1,)](
        partials, counts if counts is not None else partials, z, L, total,
        cnt_out if cnt_out is not None else total, H, P, float(inv_denom),
        HAS_COUNT=counts is not None, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=4,
    )
    return total, L, cnt_out
