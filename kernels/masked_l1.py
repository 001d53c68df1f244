r"""Masked L1 over all K heads of a dense regression task (Taskonomy depth / normal / keypoints / edges).

    pred (K, B, C, H, W), target (B, C, H, W), mask (B, 1|C, H, W) bool/uint8/float or None, z (K,)
    L[k]   = sum |pred[k] - target| * mask / (B*C*H*W)       (divided by ALL elements, not the mask
                                                             count, as the DMTG reference code does)
    total  = sum_k z[k] L[k]
    dpred  = g z[k] sign(pred[k] - target) mask / (B*C*H*W),  dz = g L     (|x|' = 0 at 0)

A float mask is a weight; a (B, C, H, W) mask is accepted too; ``None`` is the same as all ones.
Forward: 2-D grid (pixel blocks, B*C) so b and c come from the program id instead of a per-element
division; the target (and mask) is read once for all K heads; the K loop is ``static_range`` with a
single store after it so the K loads can be in flight together; then ``_partials.finalize``.
Backward: 1 launch writing dpred directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import cdiv, check, f32_scalar, int_view, jit, npow2, resolve_backend, tl
from ._fused import FusedOp, OpSpec
from ._partials import finalize

# pixels per program and warps: flat between 2048 and 4096 px / 4 warps on the H100
# (107 us fwd+bwd at K=5, B=32; benchmarks/results/h100_2026-11-23_kernels.md)
CONFIG = {"block": 4096, "warps": 4}


@jit(do_not_specialize=["KSTRIDE"])
def _fwd_kernel(
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


@jit(do_not_specialize=["KSTRIDE"])
def _bwd_kernel(
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
        mask = int_view(mask.contiguous())
        mc = mask.shape[1]
        mc_stride = HW if mc == C and C > 1 else 0  # (B, 1, H, W) broadcasts over C
        mb_stride = mc * HW
    else:
        mc_stride = mb_stride = 0
    block = min(CONFIG["block"], max(npow2(HW), 16))
    HB = cdiv(HW, block)
    return pred, target, mask, (K, B, C, HW, HB, block, mc_stride, mb_stride)


def _forward(pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    pred, target, mask, (K, B, C, HW, HB, block, mcs, mbs) = _l1_prep(pred, target, mask)
    P = HB * B * C
    part = torch.empty((K, P), dtype=torch.float32, device=pred.device)
    _fwd_kernel[(HB, B * C)](
        pred, target, mask if mask is not None else target, part, C, HW, B * C * HW, HB, P,
        mcs, mbs, K=K, BLOCK_K=npow2(K), HAS_MASK=mask is not None, BLOCK=block,
        num_warps=CONFIG["warps"],
    )
    total, L, _ = finalize(part, z.contiguous(), 1.0 / (B * C * HW))
    return total, L


def _backward(grad_total: Tensor, pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor, L: Tensor
              ) -> tuple[Tensor, Tensor]:
    pred, target, mask, (K, B, C, HW, HB, block, mcs, mbs) = _l1_prep(pred, target, mask)
    z = z.contiguous()
    dp = torch.empty_like(pred)
    dz = torch.empty_like(z)
    _bwd_kernel[(HB, B * C)](
        grad_total.contiguous(), pred, target, mask if mask is not None else target, z, L.contiguous(),
        dp, dz, C, HW, B * C * HW, mcs, mbs, 1.0 / (B * C * HW),
        K=K, BLOCK_K=npow2(K), HAS_MASK=mask is not None, BLOCK=block,
        num_warps=CONFIG["warps"],
    )
    return dp, dz


def _forward_fake(pred, target, mask, z):
    return f32_scalar(pred.device), pred.new_empty((pred.shape[0],), dtype=torch.float32)


def _backward_fake(grad_total, pred, target, mask, z, L):
    return torch.empty_like(pred), torch.empty_like(z)


OP = FusedOp(OpSpec("masked_l1", _forward, _forward_fake, _backward, _backward_fake,
                    save=lambda inputs, outputs: (*inputs, outputs[1]), grad_inputs=(0, 3)))


def reference(pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    K = pred.shape[0]
    diff = (pred.float() - target.float().unsqueeze(0)).abs()  # (K, B, C, H, W)
    if mask is not None:
        diff = diff * mask.float().unsqueeze(0)
    L = diff.reshape(K, -1).sum(dim=1) / target.numel()  # (K,) mean over ALL elements
    total = (z.float() * L).sum()
    return total, L.detach()


def masked_l1_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """pred (K, B, C, H, W), target (B, C, H, W), mask (B, 1|C, H, W) or None, z (K,) -> (total, L (K,))."""
    check(pred.dim() == 5, f"pred must be (K, B, C, H, W), got {tuple(pred.shape)}")
    K, B, C, H, W = pred.shape
    check(tuple(target.shape) == (B, C, H, W), f"target must be {(B, C, H, W)}, got {tuple(target.shape)}")
    if mask is not None:
        check(mask.dim() == 4 and tuple(mask.shape) in ((B, 1, H, W), (B, C, H, W)),
              f"mask must be (B, 1, H, W) or (B, C, H, W), got {tuple(mask.shape)}")
    check(tuple(z.shape) == (K,), f"z must be (K,)=({K},), got {tuple(z.shape)}")
    if resolve_backend(backend, pred.device) == "reference":
        return reference(pred, target, mask, z)
    return OP(pred, target, mask, z)
