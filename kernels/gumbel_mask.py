r"""Gumbel-softmax grouping mask: Triton kernels, launchers, PyTorch reference, registration.

N tasks, K branches, grouping logits S (N, K); one sample per training step, shared by the batch::

    U[i,k] = tl.rand(seed, i*K + k)              Philox-4x32-10, seed loaded from a device tensor
    g      = -log(-log(clamp(U, U_MIN, U_MAX)))  (inner log via a series near U=1, see below)
    Z      = softmax_k((S + g) / tau)            (N, K) float32
    mask   = Z, or one_hot(argmax_k Z) when hard (straight-through: the soft gradient)
    dS     = Z * (dmask - sum_k(dmask * Z)) / tau            (tau is not differentiated)

Forward is ONE launch (noise, softmax, optional one-hot, and Z saved for backward); backward is ONE
launch (the softmax JVP from the saved Z, nothing recomputed, so a seed incremented between forward
and backward cannot change the gradient).

Why the seed is a tensor: the trainer does ``seed.add_(1)`` on device every step and replays a CUDA
graph; a Python int would be frozen into the captured launch and every replay would draw the same
noise. Likewise ``tau`` may be a 0-d device tensor (annealing under graphs/compile; a Python float is
baked in).

Same noise on both backends: the reference re-implements Triton's Philox in int64 tensor arithmetic
(``_philox_uniform``: 32x32→64-bit products split into 16-bit limbs so nothing overflows), so it needs
no ``seed.item()`` (no host sync, graph-capturable) and draws bit-identical uniforms.

One program owns BLOCK_N whole rows (K <= 16 fits in one BLOCK_K), so the row softmax needs no
cross-program communication. N is at most a few hundred: the grid is a handful of programs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import cdiv, check, jit, npow2, resolve_backend, tl
from ._fused import FusedOp, OpSpec

# Uniform clamp shared by both backends: tl.rand can return exactly 0.0, and float32 rounding can in
# principle give 1.0, which would make g = -log(-log U) infinite.
U_MIN = 1e-20
U_MAX = 1.0 - 2.0 ** -24  # largest float32 below 1


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@jit
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


@jit
def _uniform_kernel(seed_ptr, u_ptr, numel, BLOCK: tl.constexpr):
    # u: (N*K,) float32; offsets are the linear element index, identical to the mask kernel's.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, offs)
    tl.store(u_ptr + offs, u, mask=offs < numel)


@jit
def _fwd_kernel(
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


@jit
def _bwd_kernel(
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


# ----------------------------------------------------------------------------------------------
# Launchers (their annotations are the custom ops' schemas)
# ----------------------------------------------------------------------------------------------
def _blocks(N: int, K: int) -> tuple[int, int]:
    block_k = npow2(K)
    # ~1024 elements per program on GPU; N is a few hundred so this is 1-2 programs.
    block_n = max(1, min(npow2(N), 1024 // block_k))
    return block_n, block_k


def triton_uniform(seed: Tensor, n: int, k: int) -> Tensor:
    """The uniforms (n, k) float32 the mask kernel draws for this seed (for tests)."""
    u = torch.empty((n, k), dtype=torch.float32, device=seed.device)
    numel = n * k
    if numel == 0:
        return u
    BLOCK = min(npow2(numel), 4096)
    _uniform_kernel[(cdiv(numel, BLOCK),)](seed, u, numel, BLOCK=BLOCK)
    return u


def _forward(logits: Tensor, tau_t: Optional[Tensor], tau: float, seed: Tensor, hard: bool
             ) -> tuple[Tensor, Tensor]:
    """(mask, soft): mask is Z (or its one-hot when hard); soft is Z, saved for backward."""
    logits = logits.contiguous()
    N, K = logits.shape
    mask = torch.empty((N, K), dtype=torch.float32, device=logits.device)
    soft = torch.empty((N, K), dtype=torch.float32, device=logits.device)
    if N == 0 or K == 0:
        return mask, soft
    block_n, block_k = _blocks(N, K)
    _fwd_kernel[(cdiv(N, block_n),)](
        logits, seed, tau_t if tau_t is not None else seed, float(tau), mask, soft, N, K,
        TAU_FROM_PTR=tau_t is not None, HARD=bool(hard), U_LO=U_MIN, U_HI=U_MAX,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return mask, soft


def _forward_fake(logits, tau_t, tau, seed, hard):
    return (torch.empty(logits.shape, dtype=torch.float32, device=logits.device),
            torch.empty(logits.shape, dtype=torch.float32, device=logits.device))


def _backward(grad: Tensor, soft: Tensor, tau_t: Optional[Tensor], tau: float, out_dtype: torch.dtype) -> Tensor:
    grad = grad.contiguous()
    N, K = soft.shape
    ds = torch.empty((N, K), dtype=out_dtype, device=soft.device)
    if N == 0 or K == 0:
        return ds
    block_n, block_k = _blocks(N, K)
    _bwd_kernel[(cdiv(N, block_n),)](
        grad, soft, tau_t if tau_t is not None else soft, float(tau), ds, N, K,
        TAU_FROM_PTR=tau_t is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return ds


def _backward_fake(grad, soft, tau_t, tau, out_dtype):
    return torch.empty(soft.shape, dtype=out_dtype, device=soft.device)


OP = FusedOp(OpSpec(
    "gumbel_mask", _forward, _forward_fake, _backward, _backward_fake,
    # backward(grad, soft, tau_t, tau, logits dtype) -> dlogits
    save=lambda inputs, outputs: (outputs[1], inputs[1], inputs[2], inputs[0].dtype),
    grad_inputs=(0,),
))


# ----------------------------------------------------------------------------------------------
# PyTorch reference: Philox-4x32-10 in int64 tensor arithmetic (bit-identical to tl.rand)
# ----------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_UINT_TO_FLOAT = 4.6566127342e-10  # tl.rand's int32 -> [0, 1) scale


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and uint32 values ``b``.

    ``b`` is int64 holding values in [0, 2**32); the product is split into 16-bit limbs so no
    intermediate exceeds 2**35 and int64 never overflows.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_lo = b_lo * a_lo
    mid1 = b_lo * a_hi
    mid2 = b_hi * a_lo
    t = lo_lo + ((mid1 & 0xFFFF) << 16) + ((mid2 & 0xFFFF) << 16)
    lo = t & _M32
    hi = (b_hi * a_hi + (mid1 >> 16) + (mid2 >> 16) + (t >> 32)) & _M32
    return hi, lo


def philox_uniform(seed: Tensor, n: int, k: int, device=None) -> Tensor:
    """U (n, k) float32 = tl.rand(seed, arange(n*k)) without a host sync (seed stays a tensor)."""
    device = seed.device if device is None else torch.device(device)
    seed = seed.to(device=device, dtype=torch.int64).reshape(())
    k0 = seed & _M32  # key = (seed_lo, seed_hi) as in triton.language.random.philox
    k1 = (seed >> 32) & _M32
    c0 = torch.arange(n * k, device=device, dtype=torch.int64)  # counter = element offset
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    # a Python scalar (not torch.tensor(..., device=cuda)): no host->device copy, so the reference
    # stays CUDA-graph capturable; the product is computed in float32 like tl.rand's
    u = x.to(torch.float32) * _UINT_TO_FLOAT
    return u.reshape(n, k)


def _as_tau(tau, like: Tensor):
    return tau.to(device=like.device, dtype=torch.float32) if isinstance(tau, Tensor) else float(tau)


def gumbel_softmax_from_uniform(logits: Tensor, uniform: Tensor, tau, hard: bool = False) -> Tensor:
    """Reference Z given explicit uniforms U (N, K): softmax((S - log(-log U)) / tau)."""
    u = uniform.to(torch.float32).clamp(U_MIN, U_MAX)
    g = -torch.log(-torch.log(u))  # (N, K) Gumbel(0, 1)
    y = torch.softmax((logits.to(torch.float32) + g) / _as_tau(tau, logits), dim=-1)
    if hard:
        one_hot = F.one_hot(y.argmax(dim=-1), y.shape[-1]).to(y.dtype)
        y = one_hot - y.detach() + y  # straight-through: value one-hot, gradient soft
    return y


def reference(logits: Tensor, tau, seed: Tensor, hard: bool = False) -> Tensor:
    n, k = logits.shape
    return gumbel_softmax_from_uniform(logits, philox_uniform(seed, n, k, logits.device), tau, hard)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def gumbel_uniforms(seed: Tensor, n: int, k: int, device=None, backend: Optional[str] = None) -> Tensor:
    """The exact U (n, k) float32 that the Triton mask kernel draws for ``seed``: from the tiny
    Triton kernel when the triton backend applies to ``device``, else the bit-identical PyTorch Philox."""
    device = seed.device if device is None else torch.device(device)
    if resolve_backend(backend, device) == "triton":
        return triton_uniform(seed.to(device).reshape(()), n, k)
    return philox_uniform(seed, n, k, device)


def gumbel_softmax_mask(logits: Tensor, tau, seed: Tensor, hard: bool = False,
                        backend: Optional[str] = None) -> Tensor:
    """Z (N, K) float32: one Gumbel-softmax sample of the grouping logits (see the module doc).

    ``seed`` is a 0-d int64 tensor on ``logits.device``; the noise is a pure function of its *value
    at run time* (the kernel loads it), so ``seed.add_(1)`` before each CUDA-graph replay draws fresh
    noise. Pass ``tau`` as a 0-d tensor if it is annealed under torch.compile / CUDA graphs.
    ``backend``: auto | triton | reference (``fastdmtg.ops.resolve_backend``).
    """
    check(logits.dim() == 2, f"logits must be (N, K), got {tuple(logits.shape)}")
    check(seed.numel() == 1, "seed must be a 0-d int64 tensor")
    if resolve_backend(backend, logits.device) == "reference":
        return reference(logits, tau, seed, hard)
    tau_t, tau_f = (tau.reshape(()), 1.0) if isinstance(tau, Tensor) else (None, float(tau))
    return OP(logits, tau_t, tau_f, seed.reshape(()), bool(hard))[0]
