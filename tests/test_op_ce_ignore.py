"""ce_ignore (fastdmtg/kernels/ce_ignore.py): kernel vs reference.

BLOCK_HW = 128 pixels, 2 blocks per program (pinned below): H*W = 17*19 = 323 spans three blocks and
two programs per head, the last block partly and the one after it entirely masked.
"""
import pytest
import torch

from fastdmtg import ops
from fastdmtg.kernels import ce_ignore
from op_testing import BACKENDS, DEVICE, compare, gen, needs_triton, pinned, randn, run


@pytest.fixture(autouse=True)
def _small_blocks():
    yield from pinned(ce_ignore.CONFIG, fwd_block_hw=128, fwd_warps=4, fwd_px=256, fwd_unroll=2,
                      bwd_block_hw=128, bwd_warps=4, bwd_px=256)


SEG_SHAPES = [  # (K, B, C, H, W)
    (1, 1, 2, 1, 1),
    (3, 2, 18, 17, 19),  # H*W = 323: three BLOCK_HW = 128 blocks
    (5, 1, 18, 8, 16),
    (16, 1, 5, 3, 5),
]


@needs_triton
@pytest.mark.parametrize("K,B,C,H,W", SEG_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_ignore(K, B, C, H, W, dtype):
    seed = K * 100 + B * 10 + H + C
    logits = randn(K, B, C, H, W, seed=seed, dtype=dtype, scale=2.0)
    target = torch.randint(0, C, (B, H, W), generator=gen(seed + 1)).to(DEVICE)  # ~1/C ignored
    if B * H * W > 1:
        target.view(-1)[1] = 1  # at least one valid pixel
    z = torch.softmax(randn(K, seed=seed + 2), 0)
    compare(ops.ce_ignore_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], dtype)


@needs_triton
def test_custom_index_uint8_target():
    K, B, C, H, W = 2, 2, 6, 5, 7
    logits = randn(K, B, C, H, W, seed=21)
    target = torch.randint(0, C, (B, H, W), generator=gen(22)).to(torch.uint8)
    target[0, :2] = 255
    z = torch.rand(K, generator=gen(23)).to(DEVICE)
    compare(lambda **kw: ops.ce_ignore_loss(**kw, ignore_index=255),
            dict(logits=logits, target=target.to(DEVICE), z=z), ["logits", "z"], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_is_zero(backend):
    """Every pixel ignored: L = 0 and all gradients 0 (torch's mean reduction would be NaN)."""
    K, B, C, H, W = 3, 2, 18, 5, 6
    logits = randn(K, B, C, H, W, seed=31)
    target = torch.zeros(B, H, W, dtype=torch.long, device=DEVICE)
    z = torch.rand(K, generator=gen(32)).to(DEVICE)
    t, L, grads = run(backend, ops.ce_ignore_loss, dict(logits=logits, target=target, z=z), ["logits", "z"],
                      torch.tensor(1.0, device=DEVICE))
    assert t.item() == 0.0
    assert torch.equal(L, torch.zeros(K, device=DEVICE))
    assert torch.equal(grads["logits"], torch.zeros_like(logits))
    assert torch.equal(grads["z"], torch.zeros_like(z))


def test_reference_by_hand_default_ignore_and_a_single_valid_pixel():
    """The reference itself against a hand computation: class 0 is ignored by default, and a batch
    with one valid pixel has L = that pixel's CE (divided by 1)."""
    import math
    logits = torch.tensor([[[[[2.0, 0.0, 1.0]], [[0.5, 1.0, 0.0]], [[0.0, 3.0, -1.0]]]]])   # (K=1, B=1, C=3, H=1, W=3)
    target = torch.tensor([[[0, 2, 0]]])                                                     # one valid pixel (class 2)
    z = torch.tensor([0.5])
    total, L = ce_ignore.reference(logits, target, z)
    col = [0.0, 1.0, 3.0]                                                                    # logits of pixel 1
    want = math.log(sum(math.exp(v) for v in col)) - col[2]
    assert float(L[0]) == pytest.approx(want) and float(total) == pytest.approx(0.5 * want)
    target2 = torch.tensor([[[1, 2, 1]]])                                                    # all valid
    _, L2 = ce_ignore.reference(logits, target2, z)
    cols = [[2.0, 0.5, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, -1.0]]
    want2 = sum(math.log(sum(math.exp(v) for v in c)) - c[t] for c, t in zip(cols, [1, 2, 1])) / 3
    assert float(L2[0]) == pytest.approx(want2)
