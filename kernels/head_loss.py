r"""Triton kernels for the DMTG grouped head losses (all K branches' heads in one pass).

Every op computes per-head losses L and the DMTG-weighted total = sum_h z[h] * L[h]:

    grouped_ce   logits (K, N, B, C), target (B, N)      L[i,k] = mean_b [lse(x) - x_t]
    grouped_bce  logits (K, N, B),    target (B, N)      L[i,k] = mean_b [softplus(x) - x t]
    masked_l1    pred (K, B, C, H, W), target (B, C, H, W), mask (B, 1|C, H, W) or None
                                                         L[k] = sum |p - t| m / (B C H W)
    ce_ignore    logits (K, B, C, H, W), target (B, H, W) L[k] = sum_valid [lse - x_t] / n_valid
                                                         (0 when n_valid == 0)

Design (why it looks like this):

* Each program loads its slice of the target (and mask) ONCE and loops over the K heads, so the
  target/mask bytes are read once instead of K times, and no per-element loss tensor exists:
  each program reduces its tile to one fp32 partial per head. Exception: ce_ignore gives each
  head its own programs (adjacent in the grid, so the target's re-reads hit L2) and loops over
  pixel blocks instead, reducing once per program -- see the comment on its kernel.
* Forward = 2 launches: the main kernel writes partials (H, P) (H heads, P programs per head),
  then ``_finalize_kernel`` (one program) sums them in a fixed order -> L, total (and n_valid
  for ce_ignore). Two-stage, atomics-free, hence bit-reproducible run to run.
* Backward = 1 launch: the same tiling re-reads the logits/pred (unavoidable: the gradient
  depends on them elementwise) and writes d(logits) directly, scaled by g * z[h] / denom with
  g = d total (a device scalar -- no host sync); one designated program also writes
  dz[h] = L[h] * g. Gradients are stored in the input's dtype; all math is fp32.

Byte floor per call (each input read once, each output written once):
  forward  = K*M*es(x) + M_t*es(t) [+ M_m*es(m)]
  backward = forward + K*M*es(dx)
which is what ``benchmarks/kernels.py`` compares against.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Tunables (benchmarks/kernels.py --sweep overrides them before timing). Defaults are the
# winners of the H100 sweeps (benchmarks/results/h100_2026-11-23_kernels.md):
# masked_l1 is flat between 2048 and 4096 px / 4 warps (107 us fwd+bwd at K=5, B=32).
# ce_ignore (second sweep, same day): forward 512 px / 8 warps, 2048 px per program, unroll 2
# (153 us at K=5, B=32; 256-px blocks 168-174 us); backward 512 / 8 / 2048 (fwd+bwd 425 us,
# 256 / 4 / 1024 426 us, the others 433-445 us).
CONFIG = {
    "l1_block": 4096,  # pixels per program (masked_l1)
    "l1_warps": 4,
    "seg_block_hw": 512,  # ce_ignore forward: pixels per block (classes are an unrolled loop)
    "seg_warps": 8,
    "seg_px": 2048,  # ce_ignore forward: pixels per program (loop over seg_px / seg_block_hw blocks)
    "seg_unroll": 2,  # ce_ignore forward: blocks whose loads are issued together
    "seg_bwd_block_hw": 512,  # ce_ignore backward: the same, the next block is prefetched
    "seg_bwd_warps": 8,
    "seg_bwd_px": 2048,
    "attr_block_b": 256,  # batch rows per program (grouped_ce / grouped_bce)
    "attr_warps": 4,
}

# The ce_ignore settings benchmarks/kernels.py --sweep times and tests/test_kernels_gpu.py checks
# against the reference on the GPU (so whichever wins has been through the correctness tests).
# Registers per thread at C = 18, HW = 65536, bf16 (ptxas sm_90a, triton 3.6): forward
# 512/8 unroll 2: 64, 256/8 unroll 4: 40; backward 512/8: 80, 256/8: 63, 128/4: 56.
SEG_CANDIDATES = {
    ("seg_block_hw", "seg_warps", "seg_px", "seg_unroll"): [
        (512, 8, 2048, 2), (512, 8, 4096, 2), (512, 8, 1024, 2), (256, 8, 2048, 4), (256, 8, 1024, 2),
    ],
    ("seg_bwd_block_hw", "seg_bwd_warps", "seg_bwd_px"): [
        (512, 8, 2048), (512, 8, 4096), (256, 8, 2048), (256, 4, 1024), (128, 4, 1024),
    ],
}


def _npow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# ----------------------------------------------------------------------------------------------
# Stage 2: partials (H, P) -> L (H,), total (), [n_valid]
# ----------------------------------------------------------------------------------------------
@triton.jit
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


def _finalize(partials: torch.Tensor, z: torch.Tensor, inv_denom: float, counts=None):
    """partials (H, P) fp32, z with H elements -> (total (), L (H,), n_valid () or None)."""
    H, P = partials.shape
    dev = partials.device
    L = torch.empty((H,), dtype=torch.float32, device=dev)
    total = torch.empty((), dtype=torch.float32, device=dev)
    cnt_out = torch.empty((), dtype=torch.float32, device=dev) if counts is not None else None
    block_p = min(_npow2(P), 1024)
    block_h = min(_npow2(H), max(1, 4096 // block_p))
    _finalize_kernel[(1,)](
        partials, counts if counts is not None else partials, z, L, total,
        cnt_out if cnt_out is not None else total, H, P, float(inv_denom),
        HAS_COUNT=counts is not None, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=4,
    )
    return total, L, cnt_out


# ----------------------------------------------------------------------------------------------
# grouped cross-entropy: logits (K, N, B, C), target (B, N), z (N, K)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_ce_fwd_kernel(
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


@triton.jit
def _grouped_ce_bwd_kernel(
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


def _attr_blocks(B: int, C: int = 1):
    block_b = min(_npow2(B), CONFIG["attr_block_b"])
    return block_b, triton.cdiv(B, block_b), _npow2(C)


def grouped_ce_fwd(logits: torch.Tensor, target: torch.Tensor, z: torch.Tensor):
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, N, B, C = logits.shape
    block_b, PB, block_c = _attr_blocks(B, C)
    part = torch.empty((N * K, PB), dtype=torch.float32, device=logits.device)
    _grouped_ce_fwd_kernel[(PB, N)](
        logits, target, part, N, B, C, PB, K=K, BLOCK_B=block_b, BLOCK_C=block_c,
        num_warps=CONFIG["attr_warps"],
    )
    total, L, _ = _finalize(part, z, 1.0 / B)
    return total, L.view(N, K)


def grouped_ce_bwd(g, logits, target, z, L):
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, N, B, C = logits.shape
    block_b, PB, block_c = _attr_blocks(B, C)
    dx = torch.empty_like(logits)
    dz = torch.empty_like(z)
    _grouped_ce_bwd_kernel[(PB, N)](
        g.contiguous(), logits, target, z, L.contiguous(), dx, dz, N, B, C, 1.0 / B,
        K=K, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=_npow2(K), num_warps=CONFIG["attr_warps"],
    )
    return dx, dz


# ----------------------------------------------------------------------------------------------
# grouped BCE-with-logits: logits (K, N, B), target (B, N) in {0, 1}, z (N, K)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_bce_fwd_kernel(
    x_ptr, t_ptr, part_ptr, N, B, PB, K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pb = tl.program_id(0)
    i = tl.program_id(1)
    b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = b < B
    t = tl.load(t_ptr + b * N + i, mask=bm, other=0).to(tl.float32)  # (BLOCK_B,)
    for k in tl.static_range(K):
        base = (k * N + i).to(tl.int64) * B
        x = tl.load(x_ptr + base + b, mask=bm, other=0.0).to(tl.float32)
        # softplus(x) - x t, stable: max(x, 0) - x t + log(1 + exp(-|x|))
        loss = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + tl.exp(-tl.abs(x)))
        loss = tl.where(bm, loss, 0.0)
        tl.store(part_ptr + (i * K + k) * PB + pb, tl.sum(loss, axis=0))


@triton.jit
def _grouped_bce_bwd_kernel(
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


def _int_view(t: torch.Tensor) -> torch.Tensor:
    # Triton has no bool pointer loads we want to rely on; a uint8 view is free.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def grouped_bce_fwd(logits, target, z):
    logits, target, z = logits.contiguous(), _int_view(target.contiguous()), z.contiguous()
    K, N, B = logits.shape
    block_b, PB, _ = _attr_blocks(B)
    part = torch.empty((N * K, PB), dtype=torch.float32, device=logits.device)
    _grouped_bce_fwd_kernel[(PB, N)](
        logits, target, part, N, B, PB, K=K, BLOCK_B=block_b, num_warps=CONFIG["attr_warps"],
    )
    total, L, _ = _finalize(part, z, 1.0 / B)
    return total, L.view(N, K)


def grouped_bce_bwd(g, logits, target, z, L):
    logits, target, z = logits.contiguous(), _int_view(target.contiguous()), z.contiguous()
    K, N, B = logits.shape
    block_b, PB, _ = _attr_blocks(B)
    dx = torch.empty_like(logits)
    dz = torch.empty_like(z)
    _grouped_bce_bwd_kernel[(PB, N)](
        g.contiguous(), logits, target, z, L.contiguous(), dx, dz, N, B, 1.0 / B,
        K=K, BLOCK_B=block_b, BLOCK_K=_npow2(K), num_warps=CONFIG["attr_warps"],
    )
    return dx, dz


# ----------------------------------------------------------------------------------------------
# masked L1: pred (K, B, C, H, W), target (B, C, H, W), mask (B, 1|C, H, W) or None, z (K,)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["KSTRIDE"])
def _masked_l1_fwd_kernel(
    p_ptr, t_ptr, m_ptr, part_ptr, C, HW, KSTRIDE, HB, P, MC_STRIDE, MB_STRIDE,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (HB, B*C): program (hb, bc) owns pixels [hb*BLOCK, ...) of image-channel bc.
    # 2-D grid so b, c come from the program id, not from a per-element integer division.
    hb = tl.program_id(0)
    bc = tl.program_id(1).to(tl.int64)
    hw = hb * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    hm = hw < HW
    row = bc * HW
    kstride = KSTRIDE.to(tl.int64)  # k * B*C*H*W can pass 2**31 for large K*B
    t = tl.load(t_ptr + row + hw, mask=hm, other=0.0).to(tl.float32)  # read once for all K
    if HAS_MASK:
        b = bc // C
        c = bc % C
        mk = tl.load(m_ptr + b * MB_STRIDE + c * MC_STRIDE + hw, mask=hm, other=0).to(tl.float32)
    kk = tl.arange(0, BLOCK_K)
    sums = tl.zeros([BLOCK_K], dtype=tl.float32)
    # static_range + one store after the loop: no store inside the loop, so the K loads can be
    # issued back to back (more bytes in flight per program).
    for k in tl.static_range(K):
        p = tl.load(p_ptr + k * kstride + row + hw, mask=hm, other=0.0).to(tl.float32)
        d = tl.abs(p - t)
        if HAS_MASK:
            d = d * mk
        sums = tl.where(kk == k, tl.sum(d, axis=0), sums)
    pid = bc * HB + hb
    tl.store(part_ptr + kk * P + pid, sums, mask=kk < K)


@triton.jit(do_not_specialize=["KSTRIDE"])
def _masked_l1_bwd_kernel(
    g_ptr, p_ptr, t_ptr, m_ptr, z_ptr, L_ptr, dp_ptr, dz_ptr, C, HW, KSTRIDE, MC_STRIDE, MB_STRIDE,
    inv_numel,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    hb = tl.program_id(0)
    bc = tl.program_id(1).to(tl.int64)
    g = tl.load(g_ptr).to(tl.float32)
    if (hb == 0) & (bc == 0):  # dz[k] = L[k] * g, written once
        kk = tl.arange(0, BLOCK_K)
        Lk = tl.load(L_ptr + kk, mask=kk < K, other=0.0)
        tl.store(dz_ptr + kk, (Lk * g).to(dz_ptr.dtype.element_ty), mask=kk < K)
    hw = hb * BLOCK + tl.arange(0, BLOCK)
    hm = hw < HW
    row = bc * HW
    kstride = KSTRIDE.to(tl.int64)
    t = tl.load(t_ptr + row + hw, mask=hm, other=0.0).to(tl.float32)
    if HAS_MASK:
        b = bc // C
        c = bc % C
        mk = tl.load(m_ptr + b * MB_STRIDE + c * MC_STRIDE + hw, mask=hm, other=0).to(tl.float32)
    for k in tl.static_range(K):
        scale = tl.load(z_ptr + k).to(tl.float32) * g * inv_numel
        p = tl.load(p_ptr + k * kstride + row + hw, mask=hm, other=0.0).to(tl.float32)
        d = p - t
        s = tl.where(d > 0, scale, tl.where(d < 0, -scale, 0.0))  # d|x|/dx = sign(x), 0 at 0
        if HAS_MASK:
            s = s * mk
        tl.store(dp_ptr + k * kstride + row + hw, s.to(dp_ptr.dtype.element_ty), mask=hm)


def _l1_prep(pred, target, mask):
    pred, target = pred.contiguous(), target.contiguous()
    K, B, C, H, W = pred.shape
    HW = H * W
    if mask is not None:
        mask = _int_view(mask.contiguous())
        mc = mask.shape[1]
        mc_stride = HW if mc == C and C > 1 else 0  # (B, 1, H, W) broadcasts over C
        mb_stride = mc * HW
    else:
        mc_stride = mb_stride = 0
    block = min(CONFIG["l1_block"], max(_npow2(HW), 16))
    HB = triton.cdiv(HW, block)
    return pred, target, mask, (K, B, C, HW, HB, block, mc_stride, mb_stride)


def masked_l1_fwd(pred, target, mask: Optional[torch.Tensor], z):
    pred, target, mask, (K, B, C, HW, HB, block, mcs, mbs) = _l1_prep(pred, target, mask)
    P = HB * B * C
    part = torch.empty((K, P), dtype=torch.float32, device=pred.device)
    _masked_l1_fwd_kernel[(HB, B * C)](
        pred, target, mask if mask is not None else target, part, C, HW, B * C * HW, HB, P,
        mcs, mbs, K=K, BLOCK_K=_npow2(K), HAS_MASK=mask is not None, BLOCK=block,
        num_warps=CONFIG["l1_warps"],
    )
    total, L, _ = _finalize(part, z.contiguous(), 1.0 / (B * C * HW))
    return total, L


def masked_l1_bwd(g, pred, target, mask, z, L):
    pred, target, mask, (K, B, C, HW, HB, block, mcs, mbs) = _l1_prep(pred, target, mask)
    z = z.contiguous()
    dp = torch.empty_like(pred)
    dz = torch.empty_like(z)
    _masked_l1_bwd_kernel[(HB, B * C)](
        g.contiguous(), pred, target, mask if mask is not None else target, z, L.contiguous(),
        dp, dz, C, HW, B * C * HW, mcs, mbs, 1.0 / (B * C * HW),
        K=K, BLOCK_K=_npow2(K), HAS_MASK=mask is not None, BLOCK=block,
        num_warps=CONFIG["l1_warps"],
    )
    return dp, dz


# ----------------------------------------------------------------------------------------------
# CE with ignore_index: logits (K, B, C, H, W), target (B, H, W), z (K,)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ce_ignore_fwd_kernel(
    x_ptr, t_ptr, part_ptr, cnt_ptr, B, NCH, P, ignore_index,
    HW: tl.constexpr, C: tl.constexpr, BLOCK_HW: tl.constexpr, NBLK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    # grid (K, NCH, B): program (k, ch, b) owns head k of image b, pixels
    # [ch*NBLK*BLOCK_HW, (ch+1)*NBLK*BLOCK_HW) in NBLK blocks. Every tensor is a 1-D pixel
    # vector and the class axis is an unrolled loop (C constexpr), so the per-pixel softmax is
    # thread-local (no cross-warp reductions, C = 18 not padded to 32). Pass 1 takes the max
    # over classes, pass 2 sum(exp) and the target logit; pass 2's loads are merged with pass
    # 1's by the compiler (one DRAM read, one exp per element).
    # Why this shape (H100, 2026-11-23, docs/kernels.md): per-pixel losses accumulate in a
    # register vector over the block loop and are reduced ONCE per program, so the loop has no
    # barrier and the loads of UNROLL blocks are issued back to back; HW is a constexpr so the
    # class offsets c*HW are immediates of the load instruction instead of 18 live 64-bit
    # addresses (125 -> 32-64 registers: 4-8 programs per SM instead of 2; the price is one
    # compile per image size). The K heads of a pixel block are adjacent programs, so the
    # target's re-reads (one per head) hit L2.
    k = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    xrow = x_ptr + ((k * B + b) * C) * HW  # class c of head k, image b at xrow + c*HW
    trow = t_ptr + b * HW
    acc = tl.zeros([BLOCK_HW], dtype=tl.float32)
    cacc = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for j in tl.range(0, NBLK, loop_unroll_factor=UNROLL):
        hw = (ch * NBLK + j) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hm = hw < HW
        t = tl.load(trow + hw, mask=hm, other=0).to(tl.int32)
        valid = hm & (t != ignore_index)
        mx = tl.full([BLOCK_HW], float("-inf"), tl.float32)
        for c in tl.static_range(C):
            mx = tl.maximum(mx, tl.load(xrow + c * HW + hw, mask=hm, other=0.0).to(tl.float32))
        se = tl.zeros([BLOCK_HW], dtype=tl.float32)
        xt = tl.zeros([BLOCK_HW], dtype=tl.float32)
        for c in tl.static_range(C):
            x = tl.load(xrow + c * HW + hw, mask=hm, other=0.0).to(tl.float32)
            se += tl.exp(x - mx)
            xt = tl.where(t == c, x, xt)
        acc += tl.where(valid, mx + tl.log(se) - xt, 0.0)
        cacc += valid.to(tl.float32)
    pid = b * NCH + ch
    tl.store(part_ptr + k * P + pid, tl.sum(acc, axis=0))
    if k == 0:  # n_valid does not depend on the head
        tl.store(cnt_ptr + pid, tl.sum(cacc, axis=0))


@triton.jit
def _load_classes(ptr, mask, HW: tl.constexpr, C: tl.constexpr):
    """The C class values of a pixel vector (class c at ptr + c*HW) as a tuple, input dtype."""
    xs = ()
    for c in tl.static_range(C):
        xs = xs + (tl.load(ptr + c * HW, mask=mask, other=0.0),)
    return xs


@triton.jit
def _ce_ignore_bwd_kernel(
    g_ptr, x_ptr, t_ptr, z_ptr, L_ptr, cnt_ptr, dx_ptr, dz_ptr, B, ignore_index,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HW: tl.constexpr, C: tl.constexpr,
    BLOCK_HW: tl.constexpr, NBLK: tl.constexpr,
):
    # Same grid and tiling as the forward. The C values of a block are held in a tuple, so the
    # softmax (max, sum exp, then exp(x - lse) - onehot) needs one load per element: without
    # the tuple the third pass re-loaded every value after a store (the compiler cannot prove
    # dx and x do not alias), one dependent L1 round trip per class. The next block's values are
    # loaded (prefetched) before this block's stores, so loads stay in flight while storing.
    k = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = tl.load(g_ptr).to(tl.float32)
    if (k == 0) & (ch == 0) & (b == 0):
        kk = tl.arange(0, BLOCK_K)
        Lk = tl.load(L_ptr + kk, mask=kk < K, other=0.0)
        tl.store(dz_ptr + kk, (Lk * g).to(dz_ptr.dtype.element_ty), mask=kk < K)
    inv_cnt = 1.0 / tl.maximum(tl.load(cnt_ptr), 1.0)
    sc = tl.load(z_ptr + k).to(tl.float32) * g * inv_cnt
    off = ((k * B + b) * C) * HW
    xrow = x_ptr + off
    drow = dx_ptr + off
    trow = t_ptr + b * HW
    hw = ch * NBLK * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hm = hw < HW
    xs = _load_classes(xrow + hw, hm, HW, C)
    t = tl.load(trow + hw, mask=hm, other=0).to(tl.int32)
    for j in range(NBLK):
        hw_n = hw + BLOCK_HW
        m_n = (hw_n < HW) & (j + 1 < NBLK)
        xs_n = _load_classes(xrow + hw_n, m_n, HW, C)  # prefetch block j + 1
        t_n = tl.load(trow + hw_n, mask=m_n, other=0).to(tl.int32)
        # ignored pixels get scale 0 -> their gradient is exactly 0
        scale = tl.where(hm & (t != ignore_index), sc, 0.0)
        mx = tl.full([BLOCK_HW], float("-inf"), tl.float32)
        for c in tl.static_range(C):
            mx = tl.maximum(mx, xs[c].to(tl.float32))
        se = tl.zeros([BLOCK_HW], dtype=tl.float32)
        for c in tl.static_range(C):
            se += tl.exp(xs[c].to(tl.float32) - mx)
        lse = mx + tl.log(se)
        for c in tl.static_range(C):
            dx = (tl.exp(xs[c].to(tl.float32) - lse) - tl.where(t == c, 1.0, 0.0)) * scale
            tl.store(drow + c * HW + hw, dx.to(dx_ptr.dtype.element_ty), mask=hm)
        xs = xs_n
        t = t_n
        hw = hw_n
        hm = hw < HW


def _seg_blocks(HW: int, block_key: str, px_key: str):
    """(BLOCK_HW, NBLK, NCH): pixel block, blocks per program, programs per image and head."""
    block_hw = min(CONFIG[block_key], max(_npow2(HW), 16))
    nblk = max(1, min(CONFIG[px_key] // block_hw, triton.cdiv(HW, block_hw)))
    return block_hw, nblk, triton.cdiv(HW, block_hw * nblk)


def ce_ignore_fwd(logits, target, z, ignore_index: int):
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, B, C, H, W = logits.shape
    HW = H * W
    block_hw, nblk, NCH = _seg_blocks(HW, "seg_block_hw", "seg_px")
    P = NCH * B
    part = torch.empty((K, P), dtype=torch.float32, device=logits.device)
    cnt = torch.empty((P,), dtype=torch.float32, device=logits.device)
    _ce_ignore_fwd_kernel[(K, NCH, B)](
        logits, target, part, cnt, B, NCH, P, int(ignore_index),
        HW=HW, C=C, BLOCK_HW=block_hw, NBLK=nblk, UNROLL=min(CONFIG["seg_unroll"], nblk),
        num_warps=CONFIG["seg_warps"],
    )
    total, L, n_valid = _finalize(part, z, 1.0, counts=cnt)
    return total, L, n_valid


def ce_ignore_bwd(g, logits, target, z, L, count, ignore_index: int):
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, B, C, H, W = logits.shape
    HW = H * W
    block_hw, nblk, NCH = _seg_blocks(HW, "seg_bwd_block_hw", "seg_bwd_px")
    dx = torch.empty_like(logits)
    dz = torch.empty_like(z)
    _ce_ignore_bwd_kernel[(K, NCH, B)](
        g.contiguous(), logits, target, z, L.contiguous(), count, dx, dz, B, int(ignore_index),
        K=K, BLOCK_K=_npow2(K), HW=HW, C=C, BLOCK_HW=block_hw, NBLK=nblk,
        num_warps=CONFIG["seg_bwd_warps"],
    )
    return dx, dz
