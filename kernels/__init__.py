"""Triton kernels behind ``fastdmtg.ops`` (installed as ``fastdmtg.kernels``).

Importing this package imports triton; ``fastdmtg.ops`` imports it lazily and falls back to
the PyTorch reference when that fails. Call the kernels through ``fastdmtg.ops`` (custom ops
with autograd), not directly.
"""
from .gumbel import gumbel_mask_bwd, gumbel_mask_fwd, gumbel_uniform
from .head_loss import (
    CONFIG,
    ce_ignore_bwd,
    ce_ignore_fwd,
    grouped_bce_bwd,
    grouped_bce_fwd,
    grouped_ce_bwd,
    grouped_ce_fwd,
    masked_l1_bwd,
    masked_l1_fwd,
)

__all__ = [
    "CONFIG",
    "gumbel_uniform",
    "gumbel_mask_fwd",
    "gumbel_mask_bwd",
    "grouped_ce_fwd",
    "grouped_ce_bwd",
    "grouped_bce_fwd",
    "grouped_bce_bwd",
    "masked_l1_fwd",
    "masked_l1_bwd",
    "ce_ignore_fwd",
    "ce_ignore_bwd",
]
