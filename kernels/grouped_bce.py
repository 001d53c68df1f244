r"""Grouped BCE-with-logits over all K·N binary heads in one pass.

    logits (K, N, B), target (B, N) in {0, 1} (any dtype), z (N, K)
    L[i,k]  = mean_b [softplus(x) - x t],  x = logits[k,i,b], t = target[b,i]    (N, K) fp32, detached
    total   = sum_{i,k} z[i,k] L[i,k]
    dlogits = g z[i,k] (sigmoid(x) - t) / B,   dz = g L

Same structure as ``grouped_ce`` (target read once for the K heads, two-stage atomics-free forward,
one-launch backward). softplus is computed stably as max(x, 0) + log(1 + exp(-|x|)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import cdiv, check, int_view, jit, npow2, resolve_backend, tl
from ._fused import grouped_loss_op
from ._partials import finalize

CONFIG = {"block_b": 256, "warps": 4}


@jit
def _fwd_kernel(x_ptr, t_ptr, part_ptr, N, B, PB, K: tl.constexpr, BLOCK_B: tl.constexpr):
    pb = tl.program_id(0)
    i = tl.program_id(1)
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = b < B
    t = tl.load(t_ptr + b * N + i, mask=bm, other=0).to(tl.float32)  # (BLOCK_B,)
    for k in tl.static_range(K):
        base = (k * N + i).to(tl.int64) * B
        x = tl.load(x_ptr + base + b, mask=bm, other=0.0).to(tl.float32)
        loss = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + tl.exp(-tl.abs(x)))
        loss = tl.where(bm, loss, 0.0)
        tl.store(part_ptr + (i * K + k) * PB + pb, tl.sum(loss, axis=0))


@jit
def _bwd_kernel(
    g_ptr, x_ptr, t_ptr, z_ptr, L_ptr, dx_ptr, dz_ptr, N, B, inv_b,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pb = tl.program_id(0)
    i = tl.program_id(1)
    g = tl.load(g_ptr).to(tl.float32)
    if pb == 0:
        kk = tl.arange(0, BLOCK_K)
        Lk = tl.load(L_ptr + i * K + kk, mask=kk < K, other=0.0)
        tl.store(dz_ptr + i * K + kk, (Lk * g).to(dz_ptr.dtype.element_ty), mask=kk < K)
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = b < B
    t = tl.load(t_ptr + b * N + i, mask=bm, other=0).to(tl.float32)
    for k in tl.static_range(K):
        base = (k * N + i).to(tl.int64) * B
        scale = tl.load(z_ptr + i * K + k).to(tl.float32) * g * inv_b
        x = tl.load(x_ptr + base + b, mask=bm, other=0.0).to(tl.float32)
        dx = (1.0 / (1.0 + tl.exp(-x)) - t) * scale
        tl.store(dx_ptr + base + b, dx.to(dx_ptr.dtype.element_ty), mask=bm)


def _blocks(B: int):
    block_b = min(npow2(B), CONFIG["block_b"])
    return block_b, cdiv(B, block_b)


def _forward(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    logits, target, z = logits.contiguous(), int_view(target.contiguous()), z.contiguous()
    K, N, B = logits.shape
    block_b, PB = _blocks(B)
    part = torch.empty((N * K, PB), dtype=torch.float32, device=logits.device)
    _fwd_kernel[(PB, N)](logits, target, part, N, B, PB, K=K, BLOCK_B=block_b, num_warps=CONFIG["warps"])
    total, L, _ = finalize(part, z, 1.0 / B)
    return total, L.view(N, K)


def _backward(grad_total: Tensor, logits: Tensor, target: Tensor, z: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    logits, target, z = logits.contiguous(), int_view(target.contiguous()), z.contiguous()
    K, N, B = logits.shape
    block_b, PB = _blocks(B)
    dx = torch.empty_like(logits)
    dz = torch.empty_like(z)
    _bwd_kernel[(PB, N)](
        grad_total.contiguous(), logits, target, z, L.contiguous(), dx, dz, N, B, 1.0 / B,
        K=K, BLOCK_B=block_b, BLOCK_K=npow2(K), num_warps=CONFIG["warps"],
    )
    return dx, dz


OP = grouped_loss_op("grouped_bce", _forward, _backward)


def reference(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    K, N, B = logits.shape
    t = target.float().t().unsqueeze(0).expand(K, N, B)  # (K, N, B)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    L = bce.mean(dim=-1).t()  # (N, K)
    total = (z.float() * L).sum()
    return total, L.detach()


def grouped_bce_loss(logits: Tensor, target: Tensor, z: Tensor, backend: Optional[str] = None
                     ) -> tuple[Tensor, Tensor]:
    """logits (K, N, B), target (B, N) in {0, 1}, z (N, K) -> (total, L (N, K))."""
    check(logits.dim() == 3, f"logits must be (K, N, B), got {tuple(logits.shape)}")
    K, N, B = logits.shape
    check(tuple(target.shape) == (B, N), f"target must be (B, N)=({B}, {N}), got {tuple(target.shape)}")
    check(tuple(z.shape) == (N, K), f"z must be (N, K)=({N}, {K}), got {tuple(z.shape)}")
    if resolve_backend(backend, logits.device) == "reference":
        return reference(logits, target, z)
    return OP(logits, target, z)
