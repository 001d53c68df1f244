r"""Grouped cross-entropy over all K·N classification heads (CelebA attributes) in one pass.

    logits (K, N, B, C), target (B, N) int, z (N, K)
    L[i,k]  = mean_b [lse(logits[k,i,b,:]) - logits[k,i,b,target[b,i]]]      (N, K) fp32, detached
    total   = sum_{i,k} z[i,k] L[i,k]                                          0-d fp32
    dlogits = g z[i,k] (softmax - onehot(target)) / B,   dz = g L              (g = d total)

Forward = 2 launches: program (pb, i) owns task i and a block of batch rows, loads the target once
and loops over the K heads, writing one fp32 partial per head; ``_partials.finalize`` sums them in a
fixed order (no atomics: bit-reproducible). Backward = 1 launch that re-reads the logits, writes
dlogits directly and has one program per task write dz. Gradients come back in the logits' dtype;
all math is fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import cdiv, check, jit, npow2, resolve_backend, tl
from ._fused import grouped_loss_op
from ._partials import finalize

# batch rows per program and warps (H100 sweep, 2026-11-23: latency-bound at CelebA sizes)
CONFIG = {"block_b": 256, "warps": 4}


@jit
def _fwd_kernel(
    x_ptr, t_ptr, part_ptr, N, B, C, PB,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid (PB, N): program (pb, i) owns task i, batch rows [pb*BLOCK_B, (pb+1)*BLOCK_B), all K heads
    pb = tl.program_id(0)
    i = tl.program_id(1)
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    bm = b < B
    cm = c < C
    t = tl.load(t_ptr + b * N + i, mask=bm, other=0).to(tl.int32)  # target[b, i], read once
    hit = c[None, :] == t[:, None]  # (BLOCK_B, BLOCK_C) one-hot
    m2 = bm[:, None] & cm[None, :]
    tile = b[:, None] * C + c[None, :]
    for k in tl.static_range(K):
        base = (k * N + i).to(tl.int64) * B * C
        x = tl.load(x_ptr + base + tile, mask=m2, other=0.0).to(tl.float32)
        x = tl.where(cm[None, :], x, float("-inf"))
        mx = tl.max(x, axis=1)  # (BLOCK_B,)
        lse = mx + tl.log(tl.sum(tl.exp(x - mx[:, None]), axis=1))
        xt = tl.sum(tl.where(hit, x, 0.0), axis=1)
        loss = tl.where(bm, lse - xt, 0.0)
        tl.store(part_ptr + (i * K + k) * PB + pb, tl.sum(loss, axis=0))


@jit
def _bwd_kernel(
    g_ptr, x_ptr, t_ptr, z_ptr, L_ptr, dx_ptr, dz_ptr, N, B, C, inv_b,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pb = tl.program_id(0)
    i = tl.program_id(1)
    g = tl.load(g_ptr).to(tl.float32)
    if pb == 0:  # dz[i, :] = L[i, :] * g, once per task
        kk = tl.arange(0, BLOCK_K)
        Lk = tl.load(L_ptr + i * K + kk, mask=kk < K, other=0.0)
        tl.store(dz_ptr + i * K + kk, (Lk * g).to(dz_ptr.dtype.element_ty), mask=kk < K)
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.arange(0, BLOCK_C)
    bm = b < B
    cm = c < C
    t = tl.load(t_ptr + b * N + i, mask=bm, other=0).to(tl.int32)
    hit = c[None, :] == t[:, None]
    m2 = bm[:, None] & cm[None, :]
    tile = b[:, None] * C + c[None, :]
    for k in tl.static_range(K):
        base = (k * N + i).to(tl.int64) * B * C
        scale = tl.load(z_ptr + i * K + k).to(tl.float32) * g * inv_b
        x = tl.load(x_ptr + base + tile, mask=m2, other=0.0).to(tl.float32)
        x = tl.where(cm[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        dx = (p - tl.where(hit, 1.0, 0.0)) * scale
        tl.store(dx_ptr + base + tile, dx.to(dx_ptr.dtype.element_ty), mask=m2)


def _blocks(B: int, C: int):
    block_b = min(npow2(B), CONFIG["block_b"])
    return block_b, cdiv(B, block_b), npow2(C)


def _forward(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, N, B, C = logits.shape
    block_b, PB, block_c = _blocks(B, C)
    part = torch.empty((N * K, PB), dtype=torch.float32, device=logits.device)
    _fwd_kernel[(PB, N)](
        logits, target, part, N, B, C, PB, K=K, BLOCK_B=block_b, BLOCK_C=block_c, num_warps=CONFIG["warps"],
    )
    total, L, _ = finalize(part, z, 1.0 / B)
    return total, L.view(N, K)


def _backward(grad_total: Tensor, logits: Tensor, target: Tensor, z: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, N, B, C = logits.shape
    block_b, PB, block_c = _blocks(B, C)
    dx = torch.empty_like(logits)
    dz = torch.empty_like(z)
    _bwd_kernel[(PB, N)](
        grad_total.contiguous(), logits, target, z, L.contiguous(), dx, dz, N, B, C, 1.0 / B,
        K=K, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=npow2(K), num_warps=CONFIG["warps"],
    )
    return dx, dz


OP = grouped_loss_op("grouped_ce", _forward, _backward)


def reference(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    K, N, B, C = logits.shape
    logp = torch.log_softmax(logits.float(), dim=-1)  # (K, N, B, C)
    idx = target.long().t().reshape(1, N, B, 1).expand(K, N, B, 1)
    nll = -logp.gather(-1, idx).squeeze(-1)  # (K, N, B)
    L = nll.mean(dim=-1).t()  # (N, K)
    total = (z.float() * L).sum()
    return total, L.detach()


def grouped_ce_loss(logits: Tensor, target: Tensor, z: Tensor, backend: Optional[str] = None
                    ) -> tuple[Tensor, Tensor]:
    """logits (K, N, B, C), target (B, N) int, z (N, K) -> (total 0-d fp32, L (N, K) fp32 detached)."""
    check(logits.dim() == 4, f"logits must be (K, N, B, C), got {tuple(logits.shape)}")
    K, N, B, C = logits.shape
    check(tuple(target.shape) == (B, N), f"target must be (B, N)=({B}, {N}), got {tuple(target.shape)}")
    check(tuple(z.shape) == (N, K), f"z must be (N, K)=({N}, {K}), got {tuple(z.shape)}")
    if resolve_backend(backend, logits.device) == "reference":
        return reference(logits, target, z)
    return OP(logits, target, z)
