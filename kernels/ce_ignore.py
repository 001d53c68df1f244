r"""Cross-entropy with ignore_index over all K heads of a segmentation task (Taskonomy).

    logits (K, B, C, H, W), target (B, H, W) int, z (K,)
    L[k]    = sum_{valid px} [lse - x_target] / n_valid,  valid = target != ignore_index
              (0, with zero gradients, when n_valid == 0: torch's mean reduction would be NaN)
    total   = sum_k z[k] L[k]
    dlogits = g z[k] valid (softmax - onehot) / max(n_valid, 1),   dz = g L

Design (H100, 2026-11-23; docs/kernels.md has the measurements): classes are an unrolled loop (C is
a constexpr) over 1-D pixel vectors, so the per-pixel softmax is thread-local (no cross-warp
reductions, C = 18 not padded to 32). Grid (K, pixel chunks, B): a program owns ONE head of a chunk
of one image and loops over pixel blocks, adding per-pixel losses into a register vector, reduced
once at the end (no barrier inside the loop, so the loads of ``fwd_unroll`` blocks are in flight
together). ``HW`` is a constexpr, so class offsets c*HW are load immediates (64 instead of 125
registers; the price is one compile per image size). The backward keeps a block's C class values in
a Triton tuple (one load per element) and prefetches the next block before this block's stores.
Forward = main kernel + ``_partials.finalize`` (n_valid too); backward = 1 launch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import cdiv, check, f32_scalar, jit, npow2, resolve_backend, tl
from ._fused import FusedOp, OpSpec
from ._partials import finalize

# Winners of the H100 sweeps (benchmarks/results/h100_2026-11-23_kernels.md): forward 512 px /
# 8 warps, 2048 px per program, unroll 2 (153 us at K=5, B=32; 256-px blocks 168-174 us); backward
# 512 / 8 / 2048 (fwd+bwd 425 us; 256 / 4 / 1024 426 us, the others 433-445 us).
CONFIG = {
    "fwd_block_hw": 512,  # pixels per block (classes are an unrolled loop)
    "fwd_warps": 8,
    "fwd_px": 2048,  # pixels per program (loop over fwd_px / fwd_block_hw blocks)
    "fwd_unroll": 2,  # blocks whose loads are issued together
    "bwd_block_hw": 512,  # the same for the backward; the next block is prefetched
    "bwd_warps": 8,
    "bwd_px": 2048,
}

# The settings benchmarks/kernels.py --sweep times and tests/test_kernels_gpu.py checks against the
# reference on the GPU (so whichever wins has been through the correctness tests). Registers per
# thread at C = 18, HW = 65536, bf16 (ptxas sm_90a, triton 3.6): forward 512/8 unroll 2: 64,
# 256/8 unroll 4: 40; backward 512/8: 80, 256/8: 63, 128/4: 56.
SWEEP = {
    ("fwd_block_hw", "fwd_warps", "fwd_px", "fwd_unroll"): [
        (512, 8, 2048, 2), (512, 8, 4096, 2), (512, 8, 1024, 2), (256, 8, 2048, 4), (256, 8, 1024, 2),
    ],
    ("bwd_block_hw", "bwd_warps", "bwd_px"): [
        (512, 8, 2048), (512, 8, 4096), (256, 8, 2048), (256, 4, 1024), (128, 4, 1024),
    ],
}


@jit
def _fwd_kernel(
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


@jit
def _load_classes(ptr, mask, HW: tl.constexpr, C: tl.constexpr):
    """The C class values of a pixel vector (class c at ptr + c*HW) as a tuple, input dtype."""
    xs = ()
    for c in tl.static_range(C):
        xs = xs + (tl.load(ptr + c * HW, mask=mask, other=0.0),)
    return xs


@jit
def _bwd_kernel(
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


def _blocks(HW: int, which: str):
    """(BLOCK_HW, NBLK, NCH): pixel block, blocks per program, programs per image and head."""
    block_hw = min(CONFIG[f"{which}_block_hw"], max(npow2(HW), 16))
    nblk = max(1, min(CONFIG[f"{which}_px"] // block_hw, cdiv(HW, block_hw)))
    return block_hw, nblk, cdiv(HW, block_hw * nblk)


def _forward(logits: Tensor, target: Tensor, z: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(total, L (K,), n_valid as a 0-d float32 -- saved for backward)."""
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, B, C, H, W = logits.shape
    HW = H * W
    block_hw, nblk, NCH = _blocks(HW, "fwd")
    P = NCH * B
    part = torch.empty((K, P), dtype=torch.float32, device=logits.device)
    cnt = torch.empty((P,), dtype=torch.float32, device=logits.device)
    _fwd_kernel[(K, NCH, B)](
        logits, target, part, cnt, B, NCH, P, int(ignore_index),
        HW=HW, C=C, BLOCK_HW=block_hw, NBLK=nblk, UNROLL=min(CONFIG["fwd_unroll"], nblk),
        num_warps=CONFIG["fwd_warps"],
    )
    total, L, n_valid = finalize(part, z, 1.0, counts=cnt)
    return total, L, n_valid


def _forward_fake(logits, target, z, ignore_index):
    dev = logits.device
    return f32_scalar(dev), logits.new_empty((logits.shape[0],), dtype=torch.float32), f32_scalar(dev)


def _backward(grad_total: Tensor, logits: Tensor, target: Tensor, z: Tensor, L: Tensor, count: Tensor,
              ignore_index: int) -> tuple[Tensor, Tensor]:
    logits, target, z = logits.contiguous(), target.contiguous(), z.contiguous()
    K, B, C, H, W = logits.shape
    HW = H * W
    block_hw, nblk, NCH = _blocks(HW, "bwd")
    dx = torch.empty_like(logits)
    dz = torch.empty_like(z)
    _bwd_kernel[(K, NCH, B)](
        grad_total.contiguous(), logits, target, z, L.contiguous(), count, dx, dz, B, int(ignore_index),
        K=K, BLOCK_K=npow2(K), HW=HW, C=C, BLOCK_HW=block_hw, NBLK=nblk,
        num_warps=CONFIG["bwd_warps"],
    )
    return dx, dz


def _backward_fake(grad_total, logits, target, z, L, count, ignore_index):
    return torch.empty_like(logits), torch.empty_like(z)


OP = FusedOp(OpSpec(
    "ce_ignore", _forward, _forward_fake, _backward, _backward_fake,
    # backward(g, logits, target, z, L, n_valid, ignore_index)
    save=lambda inputs, outputs: (inputs[0], inputs[1], inputs[2], outputs[1], outputs[2], inputs[3]),
    grad_inputs=(0, 2),
))


def reference(logits: Tensor, target: Tensor, z: Tensor, ignore_index: int = 0) -> tuple[Tensor, Tensor]:
    K, B, C, H, W = logits.shape
    t = target.long()
    valid = t != ignore_index
    count = valid.sum().clamp(min=1).float()  # all ignored -> L = 0 (not torch's NaN)
    Ls = []
    for k in range(K):  # K <= 16; keeps peak memory at one (B, C, H, W) float copy
        ce = F.cross_entropy(logits[k].float(), t, ignore_index=ignore_index, reduction="sum")
        Ls.append(ce / count)
    L = torch.stack(Ls)  # (K,)
    total = (z.float() * L).sum()
    return total, L.detach()


def ce_ignore_loss(logits: Tensor, target: Tensor, z: Tensor, ignore_index: int = 0,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """logits (K, B, C, H, W), target (B, H, W) int, z (K,) -> (total, L (K,)); see the module doc."""
    check(logits.dim() == 5, f"logits must be (K, B, C, H, W), got {tuple(logits.shape)}")
    K, B, C, H, W = logits.shape
    check(tuple(target.shape) == (B, H, W), f"target must be {(B, H, W)}, got {tuple(target.shape)}")
    check(tuple(z.shape) == (K,), f"z must be (K,)=({K},), got {tuple(z.shape)}")
    if resolve_backend(backend, logits.device) == "reference":
        return reference(logits, target, z, ignore_index)
    total, L, _ = OP(logits, target, z, int(ignore_index))
    return total, L
