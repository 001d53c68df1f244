"""Shared helpers of the per-op tests (tests/test_op_*.py): Triton kernels vs the PyTorch reference.

They run on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported when no NVIDIA driver is present) and unchanged on a CUDA machine. The interpreter costs
a few ms per program instance, so the per-op files pin small block sizes and use shapes that straddle
the block boundaries.

Tolerances (kernel vs reference, both accumulate in fp32):
  fp32 inputs: L / total rtol 1e-5 atol 1e-6; gradients rtol 1e-5 atol 1e-6 * max|grad|
  bf16 inputs: the same fp32 math on the same bf16 values, but gradients are rounded to bf16:
               losses rtol 1e-5, gradients atol = 1e-2 * max|grad| (bf16 has an 8-bit mantissa)
"""
from __future__ import annotations

import os

import pytest
import torch

from fastdmtg import ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
HAS_TRITON = ops.triton_available()
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or INTERPRET)
_reason = (f"triton unavailable: {ops.TRITON_IMPORT_ERROR}" if not HAS_TRITON
           else "no CUDA device and TRITON_INTERPRET != 1 (set it before triton is imported)")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=_reason)
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def pinned(config: dict, **small):
    """A fixture body: set an op's CONFIG to small tiles for the test, restore it afterwards."""
    saved = dict(config)
    config.update(small)
    yield
    config.clear()
    config.update(saved)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    # drawn on CPU with an explicit generator (same values on any device), then moved
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(device=DEVICE, dtype=dtype)


def run(backend: str, fn, inputs: dict, diff: list, grad_out: torch.Tensor):
    """``fn(**inputs, backend=backend)``; backprop ``grad_out`` into total.

    Returns (total, L, {name: grad}) with fresh leaf copies of the differentiable inputs.
    """
    args = {k: (v.detach().clone().requires_grad_(True) if k in diff else v) for k, v in inputs.items()}
    total, L = fn(**args, backend=backend)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert L.dtype == torch.float32 and not L.requires_grad
    total.backward(grad_out)
    return total.detach(), L, {k: args[k].grad for k in diff}


def close(a, b, dtype, what, grad=False):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), f"{what}: non-finite kernel output"
    if grad and dtype == torch.bfloat16:
        atol = 1e-2 * max(b.abs().max().item(), 1e-12)
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")
    elif grad:
        atol = 1e-6 * max(b.abs().max().item(), 1e-12)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def compare(fn, inputs, diff, dtype, grad_seed=0):
    """Both backends on the same inputs and the SAME upstream gradient (not 1.0, so scaling bugs show)."""
    g = (0.5 + torch.rand((), generator=gen(grad_seed))).to(DEVICE)
    t_ref, L_ref, g_ref = run("reference", fn, inputs, diff, g)
    t_tri, L_tri, g_tri = run("triton", fn, inputs, diff, g)
    close(t_tri, t_ref, dtype, "total")
    close(L_tri, L_ref, dtype, "L")
    for k in diff:
        assert g_tri[k].dtype == inputs[k].dtype, f"grad {k} dtype {g_tri[k].dtype}"
        close(g_tri[k], g_ref[k], dtype, f"grad {k}", grad=True)
    return L_tri, g_tri
