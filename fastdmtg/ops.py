r"""DMTG hot-path operators: the public API the trainer, task sets and methods call.

Every op lives in one file of ``fastdmtg.kernels`` (``kernels/<op>.py`` in the repository): its
Triton kernels, launchers, PyTorch reference, and its registration as ``torch.library`` custom ops
(fake + autograd) with the eager fast path generated from the same description. This module only
re-exports them: adding an op = its file in ``kernels/`` + its registration here (the import line
and its name in ``__all__``; tests/test_file_counts.py adds a throwaway one that way).

Each op takes ``backend`` = ``"auto" | "triton" | "reference"`` (the config value ``train.kernels``;
None means auto), resolved per call against the input's device by :func:`resolve_backend`: auto is
Triton on CUDA when triton is installed, the PyTorch reference otherwise. There is no process-wide
switch; the environment variable ``FASTDMTG_KERNELS`` replaces ``auto`` (tests and debugging).

Math (N tasks, K branches, grouping logits S (N, K); all in the op files' docstrings)::

    gumbel_softmax_mask  Z = softmax_k((S + g) / tau), g = -log(-log U), U = Philox(seed)  (N, K)
    grouped_ce_loss      L[i,k] = mean_b CE(logits[k,i,b,:], target[b,i]);   total = sum z*L
    grouped_bce_loss     L[i,k] = mean_b softplus(x) - x t
    masked_l1_loss       L[k] = sum |pred[k] - target| * mask / (B*C*H*W)
    ce_ignore_loss       L[k] = sum_valid CE / n_valid  (0 if n_valid == 0)
    bn_relu_maxpool      max_pool2d(relu(batch_norm(x)), 3, 2)  (the CelebA stem, training statistics)

Losses return (total 0-d fp32, L detached fp32); gradients come back in the inputs' dtypes; all
accumulation is in fp32.
"""
from __future__ import annotations

from fastdmtg.kernels._common import TRITON_IMPORT_ERROR, resolve_backend, triton_available
from fastdmtg.kernels.bn_relu_maxpool import bn_relu_maxpool
from fastdmtg.kernels.ce_ignore import ce_ignore_loss
from fastdmtg.kernels.grouped_bce import grouped_bce_loss
from fastdmtg.kernels.grouped_ce import grouped_ce_loss
from fastdmtg.kernels.gumbel_mask import (U_MAX, U_MIN, gumbel_softmax_from_uniform, gumbel_softmax_mask,
                                          gumbel_uniforms)
from fastdmtg.kernels.masked_l1 import masked_l1_loss

__all__ = [
    "gumbel_softmax_mask",
    "gumbel_softmax_from_uniform",
    "gumbel_uniforms",
    "grouped_ce_loss",
    "grouped_bce_loss",
    "masked_l1_loss",
    "ce_ignore_loss",
    "bn_relu_maxpool",
    "resolve_backend",
    "triton_available",
    "TRITON_IMPORT_ERROR",
    "U_MIN",
    "U_MAX",
]
