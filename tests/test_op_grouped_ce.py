"""grouped_ce and grouped_bce (fastdmtg/kernels/grouped_ce.py, grouped_bce.py): kernel vs reference.

BLOCK_B = min(next_pow2(B), 256): B = 7, 33, 300 (two batch blocks).
"""
import pytest
import torch

from fastdmtg import ops
from op_testing import DEVICE, compare, gen, needs_triton, randn

ATTR_SHAPES = [  # (K, N, B, C)
    (1, 1, 7, 2),
    (2, 9, 33, 2),
    (3, 40, 7, 3),
    (5, 9, 300, 2),  # B > BLOCK_B = 256: two batch blocks per task
    (16, 3, 33, 8),
    (2, 300, 7, 2),
]


@needs_triton
@pytest.mark.parametrize("K,N,B,C", ATTR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ce(K, N, B, C, dtype):
    if N == 300 and dtype == torch.bfloat16:
        pytest.skip("one N=300 case is enough for the interpreter budget")
    seed = K * 1000 + N * 10 + B
    logits = randn(K, N, B, C, seed=seed, dtype=dtype, scale=2.0)
    target = torch.randint(0, C, (B, N), generator=gen(seed + 1)).to(DEVICE)
    z = torch.softmax(randn(N, K, seed=seed + 2), dim=1)
    compare(ops.grouped_ce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], dtype)


@needs_triton
@pytest.mark.parametrize("tdtype", [torch.int32, torch.uint8])
def test_grouped_ce_target_dtypes(tdtype):
    K, N, B, C = 2, 9, 33, 4
    logits = randn(K, N, B, C, seed=5)
    target = torch.randint(0, C, (B, N), generator=gen(6)).to(device=DEVICE, dtype=tdtype)
    z = torch.rand(N, K, generator=gen(7)).to(DEVICE)
    compare(ops.grouped_ce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], torch.float32)


@needs_triton
def test_grouped_ce_non_contiguous_inputs():
    K, N, B, C = 3, 9, 7, 2
    base = randn(N, K, B, C, seed=51)
    logits = base.transpose(0, 1)  # (K, N, B, C), non-contiguous
    target = torch.randint(0, C, (N, B), generator=gen(52)).to(DEVICE).t()  # (B, N) view
    z = torch.rand(K, N, generator=gen(53)).to(DEVICE).t()
    assert not logits.is_contiguous() and not target.is_contiguous()
    compare(ops.grouped_ce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], torch.float32)


@needs_triton
@pytest.mark.parametrize("K,N,B", [(K, N, B) for K, N, B, _ in ATTR_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_bce(K, N, B, dtype):
    if N == 300 and dtype == torch.bfloat16:
        pytest.skip("one N=300 case is enough for the interpreter budget")
    seed = K * 1000 + N * 10 + B + 5
    logits = randn(K, N, B, seed=seed, dtype=dtype, scale=3.0)
    target = torch.randint(0, 2, (B, N), generator=gen(seed + 1)).to(DEVICE)
    z = torch.softmax(randn(N, K, seed=seed + 2), dim=1)
    compare(ops.grouped_bce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], dtype)


@needs_triton
@pytest.mark.parametrize("tdtype", [torch.bool, torch.float32])
def test_grouped_bce_target_dtypes(tdtype):
    K, N, B = 3, 9, 7
    logits = randn(K, N, B, seed=8, scale=20.0)  # large |x|: exercises the stable softplus
    target = torch.randint(0, 2, (B, N), generator=gen(9)).to(device=DEVICE, dtype=tdtype)
    z = torch.rand(N, K, generator=gen(10)).to(DEVICE)
    compare(ops.grouped_bce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], torch.float32)


def test_shape_validation():
    with pytest.raises(ValueError, match="z must be"):
        ops.grouped_ce_loss(torch.zeros(2, 3, 4, 2), torch.zeros(4, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="target must be"):
        ops.grouped_bce_loss(torch.zeros(2, 3, 4), torch.zeros(3, 4), torch.zeros(3, 2))
