"""masked_l1 (fastdmtg/kernels/masked_l1.py): kernel vs reference.

BLOCK = 1024 pixels (pinned below): H*W = 2145 spans three blocks, the last partial.
"""
import pytest
import torch

from fastdmtg import ops
from fastdmtg.kernels import masked_l1
from op_testing import BACKENDS, DEVICE, compare, gen, needs_triton, pinned, randn, run


@pytest.fixture(autouse=True)
def _small_blocks():
    yield from pinned(masked_l1.CONFIG, block=1024, warps=4)


DENSE_SHAPES = [  # (K, B, C, H, W)
    (1, 1, 1, 1, 1),
    (3, 2, 3, 17, 19),
    (5, 3, 1, 33, 65),  # H*W = 2145: three 1024-pixel blocks, the last partial
    (16, 2, 3, 7, 9),
]


def _mask(kind, B, C, H, W, seed):
    if kind is None:
        return None
    ch = C if kind == "per_channel" else 1
    m = torch.rand(B, ch, H, W, generator=gen(seed)) > 0.3
    if kind == "uint8":
        m = m.to(torch.uint8)
    elif kind == "float":
        m = torch.rand(B, ch, H, W, generator=gen(seed))  # soft weights
    return m.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("K,B,C,H,W", DENSE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_masked_l1(K, B, C, H, W, dtype, mask_kind):
    seed = K * 100 + B * 10 + H
    pred = randn(K, B, C, H, W, seed=seed, dtype=dtype)
    target = randn(B, C, H, W, seed=seed + 1, dtype=dtype)
    mask = _mask(mask_kind, B, C, H, W, seed + 2)
    z = torch.softmax(randn(K, seed=seed + 3), 0)
    compare(ops.masked_l1_loss, dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"], dtype)


@needs_triton
@pytest.mark.parametrize("mask_kind", ["uint8", "float", "per_channel"])
def test_mask_kinds(mask_kind):
    K, B, C, H, W = 3, 2, 3, 9, 11
    pred = randn(K, B, C, H, W, seed=1)
    target = randn(B, C, H, W, seed=2)
    pred[0, :, :, :2] = target[:, :, :2]  # exact ties: |x|' = 0 at 0 on both backends
    mask = _mask(mask_kind, B, C, H, W, 3)
    z = torch.rand(K, generator=gen(4)).to(DEVICE)
    compare(ops.masked_l1_loss, dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_equals_all_ones(backend):
    K, B, C, H, W = 3, 2, 3, 9, 11
    pred = randn(K, B, C, H, W, seed=11)
    target = randn(B, C, H, W, seed=12)
    z = torch.rand(K, generator=gen(13)).to(DEVICE)
    g = torch.tensor(0.7, device=DEVICE)
    out = {}
    for name, mask in [("none", None), ("ones", torch.ones(B, 1, H, W, dtype=torch.bool, device=DEVICE))]:
        out[name] = run(backend, ops.masked_l1_loss, dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"], g)
    torch.testing.assert_close(out["none"][0], out["ones"][0], rtol=0, atol=0)
    torch.testing.assert_close(out["none"][1], out["ones"][1], rtol=0, atol=0)
    for k in ("pred", "z"):
        torch.testing.assert_close(out["none"][2][k], out["ones"][2][k], rtol=0, atol=0)


def test_shape_validation():
    with pytest.raises(ValueError, match="z must be"):
        ops.masked_l1_loss(torch.zeros(2, 1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, torch.zeros(3))
    with pytest.raises(ValueError, match="mask must be"):
        ops.masked_l1_loss(torch.zeros(2, 1, 1, 3, 3), torch.zeros(1, 1, 3, 3), torch.ones(1, 3, 3), torch.zeros(2))
