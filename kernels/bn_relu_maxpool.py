r"""BatchNorm (training statistics) + ReLU + MaxPool(3, stride 2, no padding) as one op: the CelebA stem.

    x (B, C, H, W), contiguous or channels_last, fp32 or bf16; weight, bias (C,)
    mean_c = mean(x[:, c]),  var_c = mean((x[:, c] - mean_c)^2)       over B*H*W (biased, fp32)
    y      = (x - mean) * (invstd * weight) + bias,   invstd = 1 / sqrt(var + eps)
    out    = max_{3x3 window, stride 2} relu(y)      (B, C, Ho, Wo), Ho = (H - 3) // 2 + 1, x's layout

Backward, with g = d out and n = B*H*W::

    dy     = relu'(y) * (g routed to each window's arg-max)            (never materialised)
    dbias  = sum dy,  dweight = sum dy * xhat,  xhat = (x - mean) * invstd
    dx     = weight * invstd * (dy - dbias / n - xhat * dweight / n)

Why (H100 profile of the CelebA-9 K=3 step, benchmarks/results/h100_2026-11-23_profile_celeba9_k3.md):
the max-pool backward was ~20 % of the step and BN/ReLU passes over the 64×64 stem activations most of
the rest. The unfused step saves x, the ReLU output and an int64 index tensor, and writes and re-reads
dy at full size. Here only x is saved (the conv's output, which BN's backward needs anyway); the
arg-max is recomputed from x in the backward, so there is no index tensor and no full-size dy:

    forward   stats (read x) + pool (read x, write out = x/4 bytes)                    3 launches
    backward  reduce (read x, g; per-channel sums) + dx (read x, g; write dx)          3 launches

Arg-max ties are broken as PyTorch's max_pool2d does: the first maximum in row-major window order
wins (``val > max or isnan(val)``), compared on y rounded to x's dtype (what PyTorch's pool sees), so
a tie in the reference is a tie here and routes to the same pixel. The ReLU gate is folded in: a
window whose maximum is <= 0 passes no gradient (relu' = 0 at the selected pixel).

Backward tiling: the input is cut into 2×2 cells; cell (i, j) holds pixels (2i + a, 2j + b). A pixel
of a cell receives gradient only from the windows (i, j), (i−1, j), (i, j−1), (i−1, j−1) (window
(i', j') covers rows 2i'..2i'+2, cols 2j'..2j'+2):

    (0,0) <- W(i,j)[0] + W(i-1,j)[6] + W(i,j-1)[2] + W(i-1,j-1)[8]     ([k] = arg-max index k)
    (0,1) <- W(i,j)[1] + W(i-1,j)[7]          (1,0) <- W(i,j)[3] + W(i,j-1)[5]          (1,1) <- W(i,j)[4]

A program owns a strip of BLOCK_CW cell columns × BLOCK_C channels and walks ``bwd_rows`` cell rows
down the strip, carrying the row above's two windows, so each window's arg-max is computed twice per
backward pass (its own and its left neighbour's strip), not four times. Per-channel sums are written
as one partial per program and summed in a fixed order (no atomics: bit-reproducible).

The reference (``reference``) is exactly the unfused module sequence F.batch_norm → F.relu →
F.max_pool2d, which is also what runs in evaluation mode.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import cdiv, check, jit, npow2, resolve_backend, tl
from ._fused import FusedOp, OpSpec

# Tile settings; tests pin them small so tile edges are exercised at test sizes. Not yet timed on a
# GPU (benchmarks/gpu_check.sh runs the step table with the fused stem on and off).
CONFIG = {
    "block_c": 64,      # channels per tile (the contiguous axis in channels_last)
    "stats_px": 32,     # forward statistics: pixels per tile row ...
    "stats_blocks": 32,  # ... and tiles per program (1024 pixels per program)
    "pool_ow": 16,      # forward pool: output columns per tile
    "bwd_cw": 16,       # backward: cell columns per strip
    "bwd_rows": 8,      # backward: cell rows per program
    "warps": 4,
}


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@jit
def _stats_kernel(x_ptr, part_ptr, HW, C, sb, sc, sp, NPB,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NBLK: tl.constexpr):
    # grid (NPB, B, NCB): program (pb, b, cb) sums NBLK*BLOCK_P pixels of image b, channel block cb.
    # Shifted sums (x - x[0, c, 0, 0]): no cancellation in var = E[d^2] - E[d]^2 when |mean| >> std.
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    shift = tl.load(x_ptr + c * sc, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for j in range(NBLK):
        p = (pb * NBLK + j) * BLOCK_P + tl.arange(0, BLOCK_P)
        m = (p < HW)[:, None] & cm[None, :]
        v = tl.load(x_ptr + b * sb + p[:, None].to(tl.int64) * sp + c[None, :] * sc, mask=m, other=0.0)
        d = tl.where(m, v.to(tl.float32) - shift[None, :], 0.0)
        s1 += d
        s2 += d * d
    row = (b * NPB + pb) * 2 * C
    tl.store(part_ptr + row + c, tl.sum(s1, axis=0), mask=cm)
    tl.store(part_ptr + row + C + c, tl.sum(s2, axis=0), mask=cm)


@jit
def _stats_finalize_kernel(part_ptr, x_ptr, mean_ptr, var_ptr, P, C, sc, inv_n,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    a1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        m = (rows < P)[:, None] & cm[None, :]
        base = part_ptr + rows[:, None].to(tl.int64) * 2 * C + c[None, :]
        a1 += tl.load(base, mask=m, other=0.0)
        a2 += tl.load(base + C, mask=m, other=0.0)
    e1 = tl.sum(a1, axis=0) * inv_n
    e2 = tl.sum(a2, axis=0) * inv_n
    shift = tl.load(x_ptr + c * sc, mask=cm, other=0.0).to(tl.float32)
    tl.store(mean_ptr + c, shift + e1, mask=cm)
    tl.store(var_ptr + c, tl.maximum(e2 - e1 * e1, 0.0), mask=cm)


@jit
def _channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, c, cm, eps):
    """Per-channel (mean, invstd, invstd * weight, bias), fp32 vectors (BLOCK_C,)."""
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cm, other=1.0) + eps)
    scale = invstd * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    return mean, invstd, scale, bias


@jit
def _pool_fwd_kernel(x_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, out_ptr, C, Wo, eps,
                     sb, sc, sh, sw, ob, oc, oh_s, ow_s, NCB,
                     BLOCK_OW: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(Wo, BLOCK_OW), Ho, B*NCB): one row of output windows × BLOCK_C channels
    oh = tl.program_id(1)
    b = (tl.program_id(2) // NCB).to(tl.int64)
    c = (tl.program_id(2) % NCB) * BLOCK_C + tl.arange(0, BLOCK_C)
    ow = tl.program_id(0) * BLOCK_OW + tl.arange(0, BLOCK_OW)
    cm = c < C
    m = (ow < Wo)[:, None] & cm[None, :]
    mean, invstd, scale, bias = _channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, c, cm, eps)
    base = x_ptr + b * sb + c[None, :] * sc + (2 * oh) * sh + (2 * ow)[:, None] * sw
    best = tl.full([BLOCK_OW, BLOCK_C], float("-inf"), tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            v = tl.load(base + kh * sh + kw * sw, mask=m, other=0.0).to(tl.float32)
            best = tl.maximum(best, (v - mean[None, :]) * scale[None, :] + bias[None, :])
    out = tl.maximum(best, 0.0)  # relu(max) = max(relu)
    dst = out_ptr + b * ob + c[None, :] * oc + oh * oh_s + ow[:, None] * ow_s
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=m)


@jit
def _window_pair(x_ptr, g_ptr, xb, gb, oh, cw, cm2, mean2, scale2, bias2, Ho, Wo, sh, sw, gh, gw,
                 ROUND: tl.constexpr):
    """Arg-max index (0..8, row-major; -1 for windows outside the output) of the windows (oh, cw[:])
    ('cur') and (oh, cw[:] - 1) ('left'), and the gradient each passes on (0 when its maximum is
    <= 0: the ReLU gate). The two windows share a column: 15 loads for 18 elements."""
    ok_c = (oh >= 0) & (oh < Ho) & (cw < Wo)                                # (BLOCK_CW,)
    ok_l = (oh >= 0) & (oh < Ho) & (cw >= 1) & (cw - 1 < Wo)
    m_c = ok_c[:, None] & cm2                                               # (BLOCK_CW, BLOCK_C)
    m_l = ok_l[:, None] & cm2
    row = x_ptr + xb + (2 * tl.maximum(oh, 0)) * sh + (2 * cw - 2)[:, None] * sw
    best_c = tl.full(m_c.shape, float("-inf"), tl.float32)
    best_l = tl.full(m_c.shape, float("-inf"), tl.float32)
    idx_c = tl.zeros(m_c.shape, dtype=tl.int32)
    idx_l = tl.zeros(m_c.shape, dtype=tl.int32)
    for kh in tl.static_range(3):
        for j in tl.static_range(5):                                        # columns 2cw - 2 + j
            if j < 2:
                m = m_l
            elif j == 2:
                m = m_l | m_c
            else:
                m = m_c
            v = tl.load(row + j * sw, mask=m, other=0.0).to(tl.float32)
            y = (v - mean2) * scale2 + bias2
            if ROUND:
                y = y.to(x_ptr.dtype.element_ty).to(tl.float32)             # what PyTorch's pool compares
            if j <= 2:                                                      # first maximum wins; NaN wins
                upd = (y > best_l) | (y != y)
                best_l = tl.where(upd, y, best_l)
                idx_l = tl.where(upd, kh * 3 + j, idx_l)
            if j >= 2:
                upd = (y > best_c) | (y != y)
                best_c = tl.where(upd, y, best_c)
                idx_c = tl.where(upd, kh * 3 + j - 2, idx_c)
        row += sh
    g = g_ptr + gb + tl.maximum(oh, 0) * gh + cw[:, None] * gw
    g_c = tl.load(g, mask=m_c, other=0.0).to(tl.float32)
    g_l = tl.load(g - gw, mask=m_l, other=0.0).to(tl.float32)
    g_c = tl.where(m_c & (best_c > 0), g_c, 0.0)
    g_l = tl.where(m_l & (best_l > 0), g_l, 0.0)
    return tl.where(m_c, idx_c, -1), g_c, tl.where(m_l, idx_l, -1), g_l


@jit
def _bwd_kernel(x_ptr, g_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, part_ptr, sdy_ptr, sdyx_ptr, dx_ptr,
                C, H, W, Ho, Wo, eps, inv_n, sb, sc, sh, sw, gbs, gc, gh, gw, NCB, NCWB, NCH,
                ROWS: tl.constexpr, BLOCK_CW: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_DX: tl.constexpr,
                ROUND: tl.constexpr):
    # grid (NCWB, NCH, B*NCB). Pass 1 (WRITE_DX False): per-channel partial sums of dy and dy*xhat.
    # Pass 2 (WRITE_DX True): dx from the finished sums. Both recompute dy the same way.
    cwb = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (tl.program_id(2) // NCB).to(tl.int64)
    c = (tl.program_id(2) % NCB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    cm2 = cm[None, :]
    cw = cwb * BLOCK_CW + tl.arange(0, BLOCK_CW)
    mean, invstd, scale, bias = _channel_params(mean_ptr, var_ptr, w_ptr, b_ptr, c, cm, eps)
    mean2, invstd2, scale2, bias2 = mean[None, :], invstd[None, :], scale[None, :], bias[None, :]
    xb = b * sb + c[None, :] * sc                                               # (1, BLOCK_C)
    gb = b * gbs + c[None, :] * gc
    if WRITE_DX:
        mdy = (tl.load(sdy_ptr + c, mask=cm, other=0.0) * inv_n)[None, :]      # mean of dy
        mdyx = (tl.load(sdyx_ptr + c, mask=cm, other=0.0) * inv_n)[None, :]    # mean of dy * xhat
    ch0 = chunk * ROWS
    up_i, up_g, ul_i, ul_g = _window_pair(x_ptr, g_ptr, xb, gb, ch0 - 1, cw, cm2, mean2, scale2, bias2,
                                          Ho, Wo, sh, sw, gh, gw, ROUND)
    acc_dy = tl.zeros([BLOCK_CW, BLOCK_C], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_CW, BLOCK_C], dtype=tl.float32)
    s0 = 2 * cw
    for r in range(ROWS):
        ch = ch0 + r
        cur_i, cur_g, lf_i, lf_g = _window_pair(x_ptr, g_ptr, xb, gb, ch, cw, cm2, mean2, scale2, bias2,
                                                Ho, Wo, sh, sw, gh, gw, ROUND)
        # each pixel of the cell: the windows that hold it and its index in each (module doc)
        d00 = (tl.where(cur_i == 0, cur_g, 0.0) + tl.where(up_i == 6, up_g, 0.0)
               + tl.where(lf_i == 2, lf_g, 0.0) + tl.where(ul_i == 8, ul_g, 0.0))
        d01 = tl.where(cur_i == 1, cur_g, 0.0) + tl.where(up_i == 7, up_g, 0.0)
        d10 = tl.where(cur_i == 3, cur_g, 0.0) + tl.where(lf_i == 5, lf_g, 0.0)
        d11 = tl.where(cur_i == 4, cur_g, 0.0)
        ds = (d00, d01, d10, d11)
        for a in tl.static_range(2):
            for bb in tl.static_range(2):
                d = ds[2 * a + bb]
                off = xb + (2 * ch + a) * sh + (s0 + bb)[:, None] * sw
                m = ((2 * ch + a < H) & (s0 + bb < W))[:, None] & cm2
                xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean2) * invstd2
                if WRITE_DX:
                    dx = scale2 * (d - mdy - xhat * mdyx)
                    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
                else:
                    acc_dy += tl.where(m, d, 0.0)
                    acc_dyx += tl.where(m, d * xhat, 0.0)
        up_i, up_g, ul_i, ul_g = cur_i, cur_g, lf_i, lf_g
    if not WRITE_DX:
        row = ((b * NCH + chunk) * NCWB + cwb) * 2 * C
        tl.store(part_ptr + row + c, tl.sum(acc_dy, axis=0), mask=cm)
        tl.store(part_ptr + row + C + c, tl.sum(acc_dyx, axis=0), mask=cm)


@jit
def _sum_rows_kernel(part_ptr, lo_ptr, hi_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum_p part[p, :] in a fixed order (part (P, 2C) fp32): columns [0, C) to lo, [C, 2C) to hi."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    a_lo = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    a_hi = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        m = (rows < P)[:, None] & cm[None, :]
        base = part_ptr + rows[:, None].to(tl.int64) * 2 * C + c[None, :]
        a_lo += tl.load(base, mask=m, other=0.0)
        a_hi += tl.load(base + C, mask=m, other=0.0)
    tl.store(lo_ptr + c, tl.sum(a_lo, axis=0), mask=cm)
    tl.store(hi_ptr + c, tl.sum(a_hi, axis=0), mask=cm)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _dense(x: Tensor) -> Tensor:
    """x itself when contiguous or channels_last (either way H*W pixels sit at one stride), else a copy."""
    return x if x.is_contiguous() or _channels_last(x) else x.contiguous()


def _out_shape(x: Tensor) -> tuple:
    B, C, H, W = x.shape
    return B, C, (H - 3) // 2 + 1, (W - 3) // 2 + 1


def _empty_out(x: Tensor) -> Tensor:
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(_out_shape(x), dtype=x.dtype, device=x.device, memory_format=fmt)


def _block_c(C: int) -> int:
    return min(npow2(C), CONFIG["block_c"])


def _forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean (C,) fp32, biased var (C,) fp32)."""
    x = _dense(x)
    B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    dev = x.device
    bc = _block_c(C)
    ncb = cdiv(C, bc)
    # statistics: shifted partial sums per (image, pixel chunk), then a fixed-order sum
    bp = max(1, min(CONFIG["stats_px"], npow2(H * W)))
    nblk = max(1, min(CONFIG["stats_blocks"], cdiv(H * W, bp)))
    npb = cdiv(H * W, bp * nblk)
    part = torch.empty((B * npb, 2 * C), dtype=torch.float32, device=dev)
    _stats_kernel[(npb, B, ncb)](x, part, H * W, C, sb, sc, sw, npb, BLOCK_P=bp, BLOCK_C=bc, NBLK=nblk,
                                 num_warps=CONFIG["warps"])
    mean = torch.empty((C,), dtype=torch.float32, device=dev)
    var = torch.empty((C,), dtype=torch.float32, device=dev)
    P = B * npb
    _stats_finalize_kernel[(ncb,)](part, x, mean, var, P, C, sc, 1.0 / (B * H * W),
                                   BLOCK_P=min(npow2(P), max(1, 4096 // bc)), BLOCK_C=bc, num_warps=4)
    out = _empty_out(x)
    _, _, Ho, Wo = out.shape
    bow = min(npow2(Wo), CONFIG["pool_ow"])
    ob, oc, ohs, ows = out.stride()
    _pool_fwd_kernel[(cdiv(Wo, bow), Ho, B * ncb)](
        x, mean, var, weight, bias, out, C, Wo, float(eps), sb, sc, sh, sw, ob, oc, ohs, ows, ncb,
        BLOCK_OW=bow, BLOCK_C=bc, num_warps=CONFIG["warps"])
    return out, mean, var


def _forward_fake(x, weight, bias, eps):
    x = _dense(x)
    C = x.shape[1]
    return _empty_out(x), x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


def _backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias)."""
    x = _dense(x)
    B, C, H, W = x.shape
    Ho, Wo = _out_shape(x)[2:]
    sb, sc, sh, sw = x.stride()
    gbs, gc, gh, gw = grad_out.stride()
    dev = x.device
    bc = _block_c(C)
    ncb = cdiv(C, bc)
    h2, w2 = cdiv(H, 2), cdiv(W, 2)
    bcw = min(npow2(w2), CONFIG["bwd_cw"])
    rows = max(1, min(CONFIG["bwd_rows"], h2))
    ncwb, nch = cdiv(w2, bcw), cdiv(h2, rows)
    P = B * nch * ncwb
    part = torch.empty((P, 2 * C), dtype=torch.float32, device=dev)
    dbias = torch.empty((C,), dtype=torch.float32, device=dev)      # sum dy
    dweight = torch.empty((C,), dtype=torch.float32, device=dev)    # sum dy * xhat
    dx = torch.empty_like(x)
    grid = (ncwb, nch, B * ncb)
    args = (x, grad_out, mean, var, weight, bias, part, dbias, dweight, dx, C, H, W, Ho, Wo, float(eps), 1.0 / (B * H * W),
            sb, sc, sh, sw, gbs, gc, gh, gw, ncb, ncwb, nch)
    rnd = x.dtype != torch.float32
    _bwd_kernel[grid](*args, ROWS=rows, BLOCK_CW=bcw, BLOCK_C=bc, WRITE_DX=False, ROUND=rnd, num_warps=CONFIG["warps"])
    _sum_rows_kernel[(ncb,)](part, dbias, dweight, P, C, BLOCK_P=min(npow2(P), max(1, 4096 // bc)), BLOCK_C=bc,
                             num_warps=4)
    _bwd_kernel[grid](*args, ROWS=rows, BLOCK_CW=bcw, BLOCK_C=bc, WRITE_DX=True, ROUND=rnd, num_warps=CONFIG["warps"])
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype)


def _backward_fake(grad_out, x, weight, bias, mean, var, eps):
    return torch.empty_like(_dense(x)), torch.empty_like(weight), torch.empty_like(bias)


OP = FusedOp(OpSpec(
    "bn_relu_maxpool", _forward, _forward_fake, _backward, _backward_fake,
    # backward(g, x, weight, bias, mean, var, eps)
    save=lambda inputs, outputs: (inputs[0], inputs[1], inputs[2], outputs[1], outputs[2], inputs[3]),
    grad_inputs=(0, 1, 2),
))


# ----------------------------------------------------------------------------------------------
# Reference and public API
# ----------------------------------------------------------------------------------------------
def reference(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
              weight: Optional[Tensor], bias: Optional[Tensor], training: bool = True,
              momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.max_pool2d(F.relu(y), kernel_size=3, stride=2)


def bn_relu_maxpool(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], training: bool = True,
                    momentum: float = 0.1, eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """max_pool2d(relu(batch_norm(x, ...)), kernel_size=3, stride=2), arguments as F.batch_norm's.

    The fused kernels run in training mode with affine parameters; they update the running
    statistics as F.batch_norm does (unbiased variance, ``momentum``). Evaluation mode (and the
    reference backend) runs the unfused PyTorch sequence.
    """
    check(x.dim() == 4, f"x must be (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    check(H >= 3 and W >= 3, f"max-pool 3x3 needs H, W >= 3, got {H}x{W}")
    fused = training and weight is not None and bias is not None and x.dtype in (torch.float32, torch.bfloat16)
    if not fused or resolve_backend(backend, x.device) == "reference":
        return reference(x, running_mean, running_var, weight, bias, training, momentum, eps)
    n = B * H * W
    check(n > 1, f"expected more than 1 value per channel when training, got input of size {tuple(x.shape)}")
    out, mean, var = OP(x, weight, bias, float(eps))
    if running_mean is not None and running_var is not None:
        with torch.no_grad():  # as F.batch_norm: the unbiased variance goes into the running estimate
            running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * n / (n - 1))
    return out
