"""Fused DMTG operators, one file per op (installed as ``fastdmtg.kernels``).

Each op file holds its Triton kernel(s), their launchers, the PyTorch reference and the op's
registration (``torch.library`` custom ops with fake + autograd, and the eager fast path), generated
from one description by ``_fused.FusedOp``:

    gumbel_mask.py      Gumbel-softmax grouping mask (shared Philox noise on both backends)
    grouped_ce.py       cross-entropy of all K·N classification heads (CelebA)
    grouped_bce.py      BCE-with-logits of all K·N binary heads
    masked_l1.py        masked L1 of all K heads of a dense regression task (Taskonomy)
    ce_ignore.py        cross-entropy with ignore_index of all K heads of a segmentation task
    bn_relu_maxpool.py  BatchNorm (training) + ReLU + MaxPool(3, 2): the CelebA ResNet stem

Shared: ``_common`` (the guarded triton import and backend resolution), ``_fused`` (the op
description → custom op + autograd.Function generator), ``_partials`` (the deterministic two-stage
reduction the losses end with). triton is optional: without it everything imports and the
references run. The public API is ``fastdmtg.ops``: an op is registered there (its import line and
its name in ``__all__``); importing ``fastdmtg.ops`` imports every op file.
"""
