r"""DMTG hot-path operators: the public API, pure-PyTorch references, Triton custom ops.

The trainer calls only the functions in ``__all__``. Each one dispatches on
:func:`get_backend` to either

* ``"reference"`` -- plain PyTorch (differentiated by autograd, traceable by torch.compile), or
* ``"triton"``    -- the kernels in ``fastdmtg.kernels``, reached two ways:
  under torch.compile, through ``torch.library`` custom ops in the ``fastdmtg`` namespace (one
  forward op and one backward op per function, each with a fake/meta implementation, wired
  together with ``register_autograd``) so torch.compile(fullgraph=True) traces them; in eager
  mode, through equivalent ``torch.autograd.Function`` classes, because a custom-op call costs
  ~60 us of Python dispatch. Both call the same kernel wrappers and neither syncs with the host,
  so CUDA-graph capture works either way.

Math (DMTG, one-shot differentiable multi-task grouping)
--------------------------------------------------------
N tasks, K encoder branches, one head per (task, branch). Grouping logits S (N, K).

Gumbel-softmax mask (one sample per training step, shared by the whole batch)::

    U ~ Uniform(0, 1)^(N x K),  g = -log(-log U)
    Z = softmax_k((S + g) / tau)                     # (N, K), rows sum to 1
    dL/dS = Z * (dZ - sum_k(dZ * Z)) / tau             # softmax Jacobian-vector product
    hard=True: forward one_hot(argmax_k Z), backward the soft gradient (straight-through).

``tau`` is never differentiated (it is a schedule, not a parameter). U is clamped to
[U_MIN, U_MAX] = [1e-20, 1 - 2**-24] before the double log so that g is always finite.

Uniforms: both backends draw U with Philox-4x32-10 keyed by the int64 seed tensor, counter =
linear element index ``i * K + k``, exactly as Triton's ``tl.rand(seed, offsets)`` does; the
reference re-implements that Philox in int64 tensor arithmetic (:func:`_philox_uniform`), so it
never calls ``seed.item()`` (no host sync, CUDA-graph capturable) and both backends produce the
same noise for the same seed (bit-identical uniforms; the masks agree to float rounding).

Grouped losses (the per-head losses L[i, k] and their DMTG-weighted sum)::

    total = sum_{i,k} z[i,k] * L[i,k]            d total / d z[i,k] = L[i,k]
    grouped_ce   L[i,k] = mean_b CE(logits[k,i,b,:], target[b,i])
                 dlogits[k,i,b,:] = g z[i,k] (softmax - onehot(target)) / B
    grouped_bce  L[i,k] = mean_b softplus(x) - x t,   x = logits[k,i,b]
                 dlogits = g z[i,k] (sigmoid(x) - t) / B
    masked_l1    L[k] = sum |pred[k] - target| * mask / (B*C*H*W)   (mean over ALL elements)
                 dpred[k] = g z[k] sign(pred[k] - target) mask / (B*C*H*W)
    ce_ignore    L[k] = sum_{valid px} CE / n_valid, valid = target != ignore_index;
                 L[k] = 0 when n_valid == 0 (torch's mean reduction would return NaN)
                 dlogits[k] = g z[k] valid (softmax - onehot) / max(n_valid, 1)

L is returned detached and in float32; total is a 0-d float32 tensor; gradients come back in
the dtype of the input they belong to. All accumulation is in float32.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gumbel_softmax_mask",
    "gumbel_softmax_from_uniform",
    "gumbel_uniforms",
    "grouped_ce_loss",
    "grouped_bce_loss",
    "masked_l1_loss",
    "ce_ignore_loss",
    "set_backend",
    "get_backend",
    "triton_available",
]

# Uniform clamp shared by both backends: tl.rand can return exactly 0.0, and float32 rounding
# can in principle give 1.0, which would make g = -log(-log U) infinite.
U_MIN = 1e-20
U_MAX = 1.0 - 2.0 ** -24  # largest float32 below 1

_VALID_BACKENDS = ("auto", "triton", "reference")
_backend: str = os.environ.get("FASTDMTG_KERNELS", "auto").strip().lower() or "auto"
if _backend not in _VALID_BACKENDS:
    raise ValueError(f"FASTDMTG_KERNELS={_backend!r}; expected one of {_VALID_BACKENDS}")


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------
_UNRESOLVED = object()
_kernels_err = _UNRESOLVED  # resolved on first use (a plain global: dynamo traces it cleanly)


def _kernels_import_error() -> Optional[str]:
    """None when fastdmtg.kernels (and so triton) imports, else the reason. Resolved once."""
    global _kernels_err
    if _kernels_err is _UNRESOLVED:
        try:
            import fastdmtg.kernels  # noqa: F401

            _kernels_err = None
        except Exception as exc:  # ImportError, or triton failing to find a backend
            _kernels_err = f"{type(exc).__name__}: {exc}"
    return _kernels_err


def triton_available() -> bool:
    return _kernels_import_error() is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(name: str) -> None:
    """Select ``"auto"`` (default; also env ``FASTDMTG_KERNELS``), ``"triton"`` or ``"reference"``."""
    global _backend
    name = name.strip().lower()
    if name not in _VALID_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {_VALID_BACKENDS}")
    _backend = name


def get_backend(device=None) -> str:
    """Resolve the backend for tensors on ``device``.

    ``auto``: ``triton`` when triton imports and the device is CUDA, else ``reference`` (the
    import is attempted once). ``triton`` forced on a CPU device needs ``TRITON_INTERPRET=1``
    set before triton was first imported (that is how the tests run the kernels on CPU).
    """
    dev_type = torch.device(device).type if device is not None else "cuda"
    if _backend == "reference":
        return "reference"
    if _backend == "auto":
        return "triton" if dev_type == "cuda" and triton_available() else "reference"
    # forced "triton"
    err = _kernels_import_error()
    if err is not None:
        raise RuntimeError(f"fastdmtg backend 'triton' requested but kernels unavailable: {err}")
    if dev_type != "cuda" and not _interpreting():
        raise RuntimeError(
            "fastdmtg backend 'triton' on a non-CUDA device needs TRITON_INTERPRET=1 "
            "(set before triton is first imported)"
        )
    return "triton"


def _kernels():
    import fastdmtg.kernels as k

    return k


# ----------------------------------------------------------------------------------------------
# Philox-4x32-10 in int64 tensor arithmetic (bit-identical to triton.language.rand)
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


def _philox_uniform(seed: Tensor, n: int, k: int, device=None) -> Tensor:
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
    # a Python scalar (not torch.tensor(..., device=cuda)): no host->device copy, so the
    # reference stays CUDA-graph capturable; the product is computed in float32 like tl.rand's
    u = x.to(torch.float32) * _UINT_TO_FLOAT
    return u.reshape(n, k)


# ----------------------------------------------------------------------------------------------
# Reference implementations (pure PyTorch; autograd gives the backward)
# ----------------------------------------------------------------------------------------------
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


def gumbel_uniforms(seed: Tensor, n: int, k: int, device=None) -> Tensor:
    """The exact U (n, k) float32 that the Triton mask kernel draws for ``seed``.

    Uses the tiny Triton kernel (same ``tl.rand`` offsets) when the triton backend applies to
    ``device``, else the bit-identical PyTorch Philox.
    """
    device = seed.device if device is None else torch.device(device)
    if get_backend(device) == "triton":
        return _kernels().gumbel_uniform(seed.to(device).reshape(()), n, k)
    return _philox_uniform(seed, n, k, device)


def _ref_gumbel_mask(logits: Tensor, tau, seed: Tensor, hard: bool) -> Tensor:
    n, k = logits.shape
    return gumbel_softmax_from_uniform(logits, _philox_uniform(seed, n, k, logits.device), tau, hard)


def _ref_grouped_ce(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    K, N, B, C = logits.shape
    logp = torch.log_softmax(logits.float(), dim=-1)  # (K, N, B, C)
    idx = target.long().t().reshape(1, N, B, 1).expand(K, N, B, 1)
    nll = -logp.gather(-1, idx).squeeze(-1)  # (K, N, B)
    L = nll.mean(dim=-1).t()  # (N, K)
    total = (z.float() * L).sum()
    return total, L.detach()


def _ref_grouped_bce(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    K, N, B = logits.shape
    t = target.float().t().unsqueeze(0).expand(K, N, B)  # (K, N, B)
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    L = bce.mean(dim=-1).t()  # (N, K)
    total = (z.float() * L).sum()
    return total, L.detach()


def _ref_masked_l1(pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor):
    K = pred.shape[0]
    diff = (pred.float() - target.float().unsqueeze(0)).abs()  # (K, B, C, H, W)
    if mask is not None:
        diff = diff * mask.float().unsqueeze(0)
    L = diff.reshape(K, -1).sum(dim=1) / target.numel()  # (K,) mean over ALL elements
    total = (z.float() * L).sum()
    return total, L.detach()


def _ref_ce_ignore(logits: Tensor, target: Tensor, z: Tensor, ignore_index: int):
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


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (Triton backend)
# ----------------------------------------------------------------------------------------------
_NS = "fastdmtg"


def _f32_scalar(device) -> Tensor:
    return torch.empty((), dtype=torch.float32, device=device)


# -- Gumbel mask ------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::gumbel_mask", mutates_args=())
def _gumbel_mask_op(
    logits: Tensor, tau_t: Optional[Tensor], tau: float, seed: Tensor, hard: bool
) -> tuple[Tensor, Tensor]:
    """Returns (mask, soft): mask is Z (or its one-hot when hard); soft is Z, saved for bwd."""
    return _kernels().gumbel_mask_fwd(logits, tau_t, tau, seed, hard)


@_gumbel_mask_op.register_fake
def _(logits, tau_t, tau, seed, hard):
    return (
        torch.empty(logits.shape, dtype=torch.float32, device=logits.device),
        torch.empty(logits.shape, dtype=torch.float32, device=logits.device),
    )


@torch.library.custom_op(f"{_NS}::gumbel_mask_bwd", mutates_args=())
def _gumbel_mask_bwd_op(
    grad: Tensor, soft: Tensor, tau_t: Optional[Tensor], tau: float, out_dtype: torch.dtype
) -> Tensor:
    return _kernels().gumbel_mask_bwd(grad, soft, tau_t, tau, out_dtype)


@_gumbel_mask_bwd_op.register_fake
def _(grad, soft, tau_t, tau, out_dtype):
    return torch.empty(soft.shape, dtype=out_dtype, device=soft.device)


def _gumbel_setup(ctx, inputs, output):
    logits, tau_t, tau, seed, hard = inputs
    _, soft = output
    ctx.save_for_backward(soft, tau_t)
    ctx.tau = tau
    ctx.logits_dtype = logits.dtype
    ctx.mark_non_differentiable(soft)


def _gumbel_backward(ctx, grad_mask, grad_soft):
    soft, tau_t = ctx.saved_tensors
    dlogits = _gumbel_mask_bwd_op(grad_mask, soft, tau_t, ctx.tau, ctx.logits_dtype)
    return dlogits, None, None, None, None


_gumbel_mask_op.register_autograd(_gumbel_backward, setup_context=_gumbel_setup)


# -- grouped cross-entropy -------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::grouped_ce", mutates_args=())
def _grouped_ce_op(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().grouped_ce_fwd(logits, target, z)


@_grouped_ce_op.register_fake
def _(logits, target, z):
    N, K = z.shape
    return _f32_scalar(logits.device), logits.new_empty((N, K), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::grouped_ce_bwd", mutates_args=())
def _grouped_ce_bwd_op(
    grad_total: Tensor, logits: Tensor, target: Tensor, z: Tensor, L: Tensor
) -> tuple[Tensor, Tensor]:
    return _kernels().grouped_ce_bwd(grad_total, logits, target, z, L)


@_grouped_ce_bwd_op.register_fake
def _(grad_total, logits, target, z, L):
    return torch.empty_like(logits), torch.empty_like(z)


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], output[1])
    ctx.mark_non_differentiable(output[1])


def _grouped_ce_backward(ctx, g_total, g_L):
    logits, target, z, L = ctx.saved_tensors
    dlogits, dz = _grouped_ce_bwd_op(_zero_grad_if_none(g_total, z), logits, target, z, L)
    return dlogits, None, dz


_grouped_ce_op.register_autograd(_grouped_ce_backward, setup_context=_loss_setup)


# -- grouped BCE-with-logits -----------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::grouped_bce", mutates_args=())
def _grouped_bce_op(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().grouped_bce_fwd(logits, target, z)


@_grouped_bce_op.register_fake
def _(logits, target, z):
    N, K = z.shape
    return _f32_scalar(logits.device), logits.new_empty((N, K), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::grouped_bce_bwd", mutates_args=())
def _grouped_bce_bwd_op(
    grad_total: Tensor, logits: Tensor, target: Tensor, z: Tensor, L: Tensor
) -> tuple[Tensor, Tensor]:
    return _kernels().grouped_bce_bwd(grad_total, logits, target, z, L)


@_grouped_bce_bwd_op.register_fake
def _(grad_total, logits, target, z, L):
    return torch.empty_like(logits), torch.empty_like(z)


def _grouped_bce_backward(ctx, g_total, g_L):
    logits, target, z, L = ctx.saved_tensors
    dlogits, dz = _grouped_bce_bwd_op(_zero_grad_if_none(g_total, z), logits, target, z, L)
    return dlogits, None, dz


_grouped_bce_op.register_autograd(_grouped_bce_backward, setup_context=_loss_setup)


# -- masked L1 (dense regression) -------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::masked_l1", mutates_args=())
def _masked_l1_op(
    pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor
) -> tuple[Tensor, Tensor]:
    return _kernels().masked_l1_fwd(pred, target, mask, z)


@_masked_l1_op.register_fake
def _(pred, target, mask, z):
    return _f32_scalar(pred.device), pred.new_empty((pred.shape[0],), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::masked_l1_bwd", mutates_args=())
def _masked_l1_bwd_op(
    grad_total: Tensor, pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor, L: Tensor
) -> tuple[Tensor, Tensor]:
    return _kernels().masked_l1_bwd(grad_total, pred, target, mask, z, L)


@_masked_l1_bwd_op.register_fake
def _(grad_total, pred, target, mask, z, L):
    return torch.empty_like(pred), torch.empty_like(z)


def _masked_l1_setup(ctx, inputs, output):
    pred, target, mask, z = inputs
    ctx.save_for_backward(pred, target, mask, z, output[1])
    ctx.mark_non_differentiable(output[1])


def _masked_l1_backward(ctx, g_total, g_L):
    pred, target, mask, z, L = ctx.saved_tensors
    dpred, dz = _masked_l1_bwd_op(_zero_grad_if_none(g_total, z), pred, target, mask, z, L)
    return dpred, None, None, dz


_masked_l1_op.register_autograd(_masked_l1_backward, setup_context=_masked_l1_setup)


# -- cross-entropy with ignore_index (dense segmentation) -------------------------------------
@torch.library.custom_op(f"{_NS}::ce_ignore", mutates_args=())
def _ce_ignore_op(
    logits: Tensor, target: Tensor, z: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (total, L (K,), n_valid as a 0-d float32) -- n_valid is saved for backward."""
    return _kernels().ce_ignore_fwd(logits, target, z, ignore_index)


@_ce_ignore_op.register_fake
def _(logits, target, z, ignore_index):
    dev = logits.device
    return _f32_scalar(dev), logits.new_empty((logits.shape[0],), dtype=torch.float32), _f32_scalar(dev)


@torch.library.custom_op(f"{_NS}::ce_ignore_bwd", mutates_args=())
def _ce_ignore_bwd_op(
    grad_total: Tensor, logits: Tensor, target: Tensor, z: Tensor, L: Tensor, count: Tensor,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    return _kernels().ce_ignore_bwd(grad_total, logits, target, z, L, count, ignore_index)


@_ce_ignore_bwd_op.register_fake
def _(grad_total, logits, target, z, L, count, ignore_index):
    return torch.empty_like(logits), torch.empty_like(z)


def _ce_ignore_setup(ctx, inputs, output):
    logits, target, z, ignore_index = inputs
    ctx.save_for_backward(logits, target, z, output[1], output[2])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1], output[2])


def _ce_ignore_backward(ctx, g_total, g_L, g_count):
    logits, target, z, L, count = ctx.saved_tensors
    dlogits, dz = _ce_ignore_bwd_op(
        _zero_grad_if_none(g_total, z), logits, target, z, L, count, ctx.ignore_index
    )
    return dlogits, None, dz, None


_ce_ignore_op.register_autograd(_ce_ignore_backward, setup_context=_ce_ignore_setup)


# ----------------------------------------------------------------------------------------------
# Eager fast path: the same kernels behind torch.autograd.Function
# ----------------------------------------------------------------------------------------------
# Why two wrappers: a torch.library.custom_op call costs ~60 us of Python dispatch per call in
# eager mode (measured: 70 us vs 12 us for an autograd.Function doing the same), which is more
# than the GPU time of the CelebA-sized losses. Under torch.compile (is_compiling()) the public
# functions call the custom ops, which dynamo/inductor need; in eager they call these classes.
# CUDA-graph capture works with both (neither syncs with the host).
def _zero_grad_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device) if g is None else g


class _GumbelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tau_t, tau, seed, hard):
        mask, soft = _kernels().gumbel_mask_fwd(logits, tau_t, tau, seed, hard)
        ctx.save_for_backward(soft, tau_t)
        ctx.tau, ctx.logits_dtype = tau, logits.dtype
        return mask

    @staticmethod
    def backward(ctx, g):
        soft, tau_t = ctx.saved_tensors
        return _kernels().gumbel_mask_bwd(g, soft, tau_t, ctx.tau, ctx.logits_dtype), None, None, None, None


class _GroupedFn(torch.autograd.Function):
    """grouped_ce / grouped_bce: (logits, target, z) -> (total, L)."""

    @staticmethod
    def forward(ctx, kind, logits, target, z):
        k = _kernels()
        total, L = (k.grouped_ce_fwd if kind == "ce" else k.grouped_bce_fwd)(logits, target, z)
        ctx.save_for_backward(logits, target, z, L)
        ctx.kind = kind
        ctx.mark_non_differentiable(L)
        return total, L

    @staticmethod
    def backward(ctx, g_total, g_L):
        logits, target, z, L = ctx.saved_tensors
        k = _kernels()
        bwd = k.grouped_ce_bwd if ctx.kind == "ce" else k.grouped_bce_bwd
        dx, dz = bwd(_zero_grad_if_none(g_total, z), logits, target, z, L)
        return None, dx, None, dz


class _MaskedL1Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, z):
        total, L = _kernels().masked_l1_fwd(pred, target, mask, z)
        ctx.save_for_backward(pred, target, mask, z, L)
        ctx.mark_non_differentiable(L)
        return total, L

    @staticmethod
    def backward(ctx, g_total, g_L):
        pred, target, mask, z, L = ctx.saved_tensors
        dp, dz = _kernels().masked_l1_bwd(_zero_grad_if_none(g_total, z), pred, target, mask, z, L)
        return dp, None, None, dz


class _CeIgnoreFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, z, ignore_index):
        total, L, count = _kernels().ce_ignore_fwd(logits, target, z, ignore_index)
        ctx.save_for_backward(logits, target, z, L, count)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(L)
        return total, L

    @staticmethod
    def backward(ctx, g_total, g_L):
        logits, target, z, L, count = ctx.saved_tensors
        dx, dz = _kernels().ce_ignore_bwd(
            _zero_grad_if_none(g_total, z), logits, target, z, L, count, ctx.ignore_index
        )
        return dx, None, dz, None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def gumbel_softmax_mask(logits: Tensor, tau, seed: Tensor, hard: bool = False) -> Tensor:
    """Z (N, K) float32: one Gumbel-softmax sample of the grouping logits (see module doc).

    ``seed`` is a 0-d int64 tensor on ``logits.device``; the noise is a pure function of its
    *value at run time* (the kernel loads it), so ``seed.add_(1)`` before each CUDA-graph
    replay draws fresh noise. Pass ``tau`` as a 0-d tensor if it is annealed under
    torch.compile / CUDA graphs (a Python float is baked in as a constant).
    """
    _check(logits.dim() == 2, f"logits must be (N, K), got {tuple(logits.shape)}")
    _check(seed.numel() == 1, "seed must be a 0-d int64 tensor")
    if get_backend(logits.device) == "reference":
        return _ref_gumbel_mask(logits, tau, seed, hard)
    tau_t, tau_f = (tau.reshape(()), 1.0) if isinstance(tau, Tensor) else (None, float(tau))
    if _compiling():
        return _gumbel_mask_op(logits, tau_t, tau_f, seed.reshape(()), hard)[0]
    return _GumbelFn.apply(logits, tau_t, tau_f, seed.reshape(()), hard)


def grouped_ce_loss(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """logits (K, N, B, C), target (B, N) int, z (N, K) -> (total 0-d fp32, L (N, K) fp32)."""
    _check(logits.dim() == 4, f"logits must be (K, N, B, C), got {tuple(logits.shape)}")
    K, N, B, C = logits.shape
    _check(tuple(target.shape) == (B, N), f"target must be (B, N)=({B}, {N}), got {tuple(target.shape)}")
    _check(tuple(z.shape) == (N, K), f"z must be (N, K)=({N}, {K}), got {tuple(z.shape)}")
    if get_backend(logits.device) == "reference":
        return _ref_grouped_ce(logits, target, z)
    if _compiling():
        return _grouped_ce_op(logits, target, z)
    return _GroupedFn.apply("ce", logits, target, z)


def grouped_bce_loss(logits: Tensor, target: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """logits (K, N, B), target (B, N) in {0, 1}, z (N, K) -> (total, L (N, K))."""
    _check(logits.dim() == 3, f"logits must be (K, N, B), got {tuple(logits.shape)}")
    K, N, B = logits.shape
    _check(tuple(target.shape) == (B, N), f"target must be (B, N)=({B}, {N}), got {tuple(target.shape)}")
    _check(tuple(z.shape) == (N, K), f"z must be (N, K)=({N}, {K}), got {tuple(z.shape)}")
    if get_backend(logits.device) == "reference":
        return _ref_grouped_bce(logits, target, z)
    if _compiling():
        return _grouped_bce_op(logits, target, z)
    return _GroupedFn.apply("bce", logits, target, z)


def masked_l1_loss(
    pred: Tensor, target: Tensor, mask: Optional[Tensor], z: Tensor
) -> tuple[Tensor, Tensor]:
    """pred (K, B, C, H, W), target (B, C, H, W), mask (B, 1, H, W) or None, z (K,).

    L[k] = sum(|pred[k] - target| * mask) / (B*C*H*W) -- divided by the element count, not the
    mask count (as the reference DMTG code does). Returns (sum_k z[k] L[k], L (K,)).
    """
    _check(pred.dim() == 5, f"pred must be (K, B, C, H, W), got {tuple(pred.shape)}")
    K, B, C, H, W = pred.shape
    _check(tuple(target.shape) == (B, C, H, W), f"target must be {(B, C, H, W)}, got {tuple(target.shape)}")
    if mask is not None:
        _check(
            mask.dim() == 4 and tuple(mask.shape) in ((B, 1, H, W), (B, C, H, W)),
            f"mask must be (B, 1, H, W) or (B, C, H, W), got {tuple(mask.shape)}",
        )
    _check(tuple(z.shape) == (K,), f"z must be (K,)=({K},), got {tuple(z.shape)}")
    if get_backend(pred.device) == "reference":
        return _ref_masked_l1(pred, target, mask, z)
    if _compiling():
        return _masked_l1_op(pred, target, mask, z)
    return _MaskedL1Fn.apply(pred, target, mask, z)


def ce_ignore_loss(
    logits: Tensor, target: Tensor, z: Tensor, ignore_index: int = 0
) -> tuple[Tensor, Tensor]:
    """logits (K, B, C, H, W), target (B, H, W) int, z (K,) -> (total, L (K,)).

    L[k] is the mean CE over pixels whose target != ignore_index, and 0 (with zero gradients)
    when every pixel is ignored, where torch's mean reduction would give NaN.
    """
    _check(logits.dim() == 5, f"logits must be (K, B, C, H, W), got {tuple(logits.shape)}")
    K, B, C, H, W = logits.shape
    _check(tuple(target.shape) == (B, H, W), f"target must be {(B, H, W)}, got {tuple(target.shape)}")
    _check(tuple(z.shape) == (K,), f"z must be (K,)=({K},), got {tuple(z.shape)}")
    if get_backend(logits.device) == "reference":
        return _ref_ce_ignore(logits, target, z, ignore_index)
    if _compiling():
        total, L, _ = _ce_ignore_op(logits, target, z, int(ignore_index))
        return total, L
    return _CeIgnoreFn.apply(logits, target, z, int(ignore_index))
