r"""Triton kernels for the DMTG Gumbel-softmax grouping mask.

Forward (ONE launch)::

    U[i,k] = tl.rand(seed, i*K + k)            Philox-4x32-10, seed loaded from a device tensor
    g      = -log(-log(clamp(U, U_MIN, U_MAX)))  (inner log via a series near U=1, see below)
    soft   = softmax_k((S + g) / tau)            (N, K) float32
    mask   = soft, or one_hot(argmax_k soft) when hard

Backward (ONE launch), Jacobian-vector product of the softmax (tau is not differentiated)::

    dS = soft * (dMask - sum_k(dMask * soft)) / tau

(for hard=True the straight-through estimator uses the same soft gradient).

Why the seed is a tensor: the trainer does ``seed.add_(1)`` on device every step and replays a
CUDA graph; a Python int would be frozen into the captured launch and every replay would draw
the same noise. Likewise ``tau`` may be a device tensor (annealing under graphs/compile).

One program owns BLOCK_N whole rows (K <= 16 fits in one BLOCK_K), so the row softmax needs no
cross-program communication. N is at most a few hundred, so the grid is a handful of programs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Must match fastdmtg.ops.U_MIN / U_MAX (the reference clamps identically).
U_MIN = 1e-20
U_MAX = 1.0 - 2.0 ** -24


@triton.jit
def _neg_log_uniform(u):
    """-log(u) for u in (0, 1), accurate to fp32 rounding also as u -> 1.

    On GPU tl.log may be a fast approximation with ~1e-7 *absolute* error; for u within a few
    ulps of 1 the true value is ~6e-8, so -log(u) could come out 0 or negative and g = -log(E)
    would be inf/NaN (a ~1e-6-per-element event: every few thousand training steps). For
    u > 1/2 we instead use -log(1 - v) with v = 1 - u (exact by Sterbenz) through the series
    log(1 + x) = 2 atanh(s), s = x / (2 + x), |s| <= 1/3; nine odd terms reach 3e-10 relative.
    """
    x = u - 1.0  # = -v, exact for u >= 1/2
    s = x / (2.0 + x)
    s2 = s * s
    poly = 1.0 / 17.0
    poly = 1.0 / 15.0 + s2 * poly
    poly = 1.0 / 13.0 + s2 * poly
    poly = 1.0 / 11.0 + s2 * poly
    poly = 1.0 / 9.0 + s2 * poly
    poly = 1.0 / 7.0 + s2 * poly
    poly = 1.0 / 5.0 + s2 * poly
    poly = 1.0 / 3.0 + s2 * poly
    poly = 1.0 + s2 * poly
    near_one = -2.0 * s * poly
    return tl.where(u > 0.5, near_one, -tl.log(u))


@triton.jit
def _gumbel_uniform_kernel(seed_ptr, u_ptr, numel, BLOCK: tl.constexpr):
    # u: (N*K,) float32; offsets are the linear element index, identical to the mask kernel's.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, offs)
    tl.store(u_ptr + offs, u, mask=offs < numel)


@triton.jit
def _gumbel_mask_fwd_kernel(
    s_ptr,  # (N, K) logits, fp32 or bf16
    seed_ptr,  # () int64
    tau_ptr,  # () float tensor, read only when TAU_FROM_PTR
    tau_val,  # float, used when not TAU_FROM_PTR
    mask_ptr,  # (N, K) float32 out: soft or one-hot
    soft_ptr,  # (N, K) float32 out: soft (saved for backward)
    N,
    K,
    TAU_FROM_PTR: tl.constexpr,
    HARD: tl.constexpr,
    U_LO: tl.constexpr,
    U_HI: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    col_ok = cols < K
    m = (rows[:, None] < N) & col_ok[None, :]  # (BLOCK_N, BLOCK_K)
    offs = rows[:, None] * K + cols[None, :]  # linear index = Philox counter
    s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    if TAU_FROM_PTR:
        tau = tl.load(tau_ptr).to(tl.float32)
    else:
        tau = tau_val
    u = tl.rand(seed, offs)
    u = tl.minimum(tl.maximum(u, U_LO), U_HI)
    g = -tl.log(_neg_log_uniform(u))  # E = -log U ~ Exp(1) is in (6e-8, 46]: tl.log is safe
    y = (s + g) / tau
    # padded columns get -inf so they take no softmax mass; padded rows stay finite (never stored)
    y = tl.where(col_ok[None, :], y, float("-inf"))
    y = y - tl.max(y, axis=1)[:, None]
    e = tl.exp(y)
    soft = e / tl.sum(e, axis=1)[:, None]
    tl.store(soft_ptr + offs, soft, mask=m)
    if HARD:
        idx = tl.argmax(soft, axis=1)  # first maximum, like torch.argmax
        hard = tl.where(cols[None, :] == idx[:, None], 1.0, 0.0)
        tl.store(mask_ptr + offs, hard, mask=m)
    else:
        tl.store(mask_ptr + offs, soft, mask=m)


@triton.jit
def _gumbel_mask_bwd_kernel(
    g_ptr,  # (N, K) upstream gradient of the mask
    soft_ptr,  # (N, K) float32 saved soft sample
    tau_ptr,
    tau_val,
    ds_ptr,  # (N, K) out, logits dtype
    N,
    K,
    TAU_FROM_PTR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    m = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    if TAU_FROM_PTR:
        tau = tl.load(tau_ptr).to(tl.float32)
    else:
        tau = tau_val
    dz = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(soft_ptr + offs, mask=m, other=0.0)
    dot = tl.sum(dz * z, axis=1)  # (BLOCK_N,)
    ds = z * (dz - dot[:, None]) / tau
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=m)


def _blocks(N: int, K: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    # ~1024 elements per program on GPU; N is a few hundred so this is 1-2 programs.
    block_n = max(1, min(triton.next_power_of_2(N), 1024 // block_k))
    return block_n, block_k


def gumbel_uniform(seed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The uniforms (n, k) float32 the mask kernel draws for this seed (for tests)."""
    u = torch.empty((n, k), dtype=torch.float32, device=seed.device)
    numel = n * k
    if numel == 0:
        return u
    BLOCK = min(triton.next_power_of_2(numel), 4096)
    _gumbel_uniform_kernel[(triton.cdiv(numel, BLOCK),)](seed, u, numel, BLOCK=BLOCK)
    return u


def gumbel_mask_fwd(
    logits: torch.Tensor, tau_t: Optional[torch.Tensor], tau: float, seed: torch.Tensor, hard: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    N, K = logits.shape
    mask = torch.empty((N, K), dtype=torch.float32, device=logits.device)
    soft = torch.empty((N, K), dtype=torch.float32, device=logits.device)
    if N == 0 or K == 0:
        return mask, soft
    block_n, block_k = _blocks(N, K)
    _gumbel_mask_fwd_kernel[(triton.cdiv(N, block_n),)](
        logits, seed, tau_t if tau_t is not None else seed, float(tau), mask, soft, N, K,
        TAU_FROM_PTR=tau_t is not None, HARD=bool(hard), U_LO=U_MIN, U_HI=U_MAX,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return mask, soft


def gumbel_mask_bwd(
    grad: torch.Tensor, soft: torch.Tensor, tau_t: Optional[torch.Tensor], tau: float, out_dtype
) -> torch.Tensor:
    grad = grad.contiguous()
    N, K = soft.shape
    ds = torch.empty((N, K), dtype=out_dtype, device=soft.device)
    if N == 0 or K == 0:
        return ds
    block_n, block_k = _blocks(N, K)
    _gumbel_mask_bwd_kernel[(triton.cdiv(N, block_n),)](
        grad, soft, tau_t if tau_t is not None else soft, float(tau), ds, N, K,
        TAU_FROM_PTR=tau_t is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return ds
