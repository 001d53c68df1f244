"""bn_relu_maxpool (fastdmtg/kernels/bn_relu_maxpool.py): the fused CelebA stem vs the unfused PyTorch
sequence F.batch_norm → F.relu → F.max_pool2d(3, 2) (forward, backward, running statistics), ties, and
the CelebA model with model.fused_stem on vs off.

Tiles pinned small: 4 channels per tile (C = 5, 6 span two channel blocks), backward strips of 4 cell
columns × 2 cell rows (so strip edges, the carried row above, and partial strips are exercised), the
statistics in 8-pixel tiles, 2 per program. Odd H, W: every pixel is in some window; even H, W: the
last row/column is in none (its dy is 0, but dx is not: BN couples it to the batch statistics).
"""
import copy

import pytest
import torch

from fastdmtg import ops
from fastdmtg.kernels import bn_relu_maxpool as op
from op_testing import DEVICE, gen, needs_triton, pinned, randn


@pytest.fixture(autouse=True)
def _small_tiles():
    yield from pinned(op.CONFIG, block_c=4, stats_px=8, stats_blocks=2, pool_ow=4, bwd_cw=4, bwd_rows=2)


def _run(backend, x, w, b, g, momentum=0.1):
    C = x.shape[1]
    xx, ww, bb = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    rm = torch.linspace(-0.5, 0.5, C, device=DEVICE)
    rv = torch.linspace(0.5, 2.0, C, device=DEVICE)
    out = ops.bn_relu_maxpool(xx, rm, rv, ww, bb, True, momentum, 1e-5, backend=backend)
    out.backward(g)
    return out.detach(), xx.grad, ww.grad, bb.grad, rm, rv


def _check(x, w, b, dtype, exact_routing=False):
    g = None
    res = {}
    for backend in ("reference", "triton"):
        if g is None:
            shape = ops.bn_relu_maxpool(x, None, None, w, b, backend="reference").shape
            g = torch.randn(shape, generator=gen(7)).to(device=DEVICE, dtype=dtype)
        res[backend] = _run(backend, x, w, b, g)
    out, dx, dw, db, rm, rv = res["triton"]
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    assert dx.stride() == x.stride()
    for name, a, r in zip(("out", "dx", "dweight", "dbias", "running_mean", "running_var"), res["triton"],
                          res["reference"]):
        a, r = a.float(), r.float()
        scale = max(r.abs().max().item(), 1e-12)
        if dtype == torch.bfloat16 and name in ("out", "dx"):
            tol = 1e-2 * scale          # bf16 storage; dy stays fp32 here but is rounded to bf16 there
        elif dtype == torch.bfloat16 and name in ("dweight", "dbias"):
            tol = 2e-2 * scale          # sums of (bf16-rounded in the reference) dy
        else:
            tol = 1e-5 * scale
        torch.testing.assert_close(a, r, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")
    return res


CASES = [  # (B, C, H, W), channels_last, dtype
    ((1, 5, 9, 11), False, torch.float32),     # odd: every pixel in a window; two channel blocks
    ((2, 5, 10, 8), True, torch.float32),      # even: last row/column in no window
    ((1, 3, 3, 3), True, torch.float32),       # one window
    ((2, 6, 7, 7), True, torch.bfloat16),
    ((1, 4, 12, 9), False, torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("shape,channels_last,dtype", CASES)
def test_matches_unfused_pytorch(shape, channels_last, dtype):
    B, C, H, W = shape
    x = (randn(*shape, seed=sum(shape), scale=2.0) + 1.0).to(dtype)          # |mean| ~ std: shifted sums
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, generator=gen(1)).to(DEVICE) + 0.5
    w[0] = -w[0]                                                              # a negative scale flips order
    b = randn(C, seed=2, scale=0.3)
    b[1] = -2.5                                                               # windows with max <= 0: no gradient
    _check(x, w, b, dtype)


@needs_triton
def test_ties_go_to_the_first_maximum_like_pytorch():
    """Integer-valued input: most windows hold several equal maxima. PyTorch routes the gradient to
    the first in row-major window order; so must the fused op (any other pixel shows up in dx at the
    size of the gradient, far above the 1e-5 tolerance)."""
    x = torch.randint(0, 3, (2, 3, 9, 7), generator=gen(3)).float().to(DEVICE)
    _check(x, torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE), torch.float32)


@needs_triton
def test_bf16_ties_made_by_rounding():
    """Distinct bf16 inputs whose normalised values round to the same bf16 number: PyTorch's pool sees a
    tie (first maximum wins), so the fused op must compare the rounded values, not the fp32 ones."""
    base = torch.full((1, 2, 7, 7), 1.0)
    base += 0.0078125 * torch.randint(0, 3, base.shape, generator=gen(4))    # 1, 1 + 1 ulp, 1 + 2 ulp
    x = base.to(torch.bfloat16).to(DEVICE).contiguous(memory_format=torch.channels_last)
    x[0, :, 0, 0] = 5.0                                                       # std ~ 0.6: y ~ 2 ± 0.1
    w = torch.full((2,), 0.01, device=DEVICE)                                 # Δy ~ 1e-4 << half a bf16 ulp at 2
    b = torch.full((2,), 2.0, device=DEVICE)
    res = _check(x, w, b, torch.bfloat16)
    # the routing is exact: dbias (the sum of the routed gradient) agrees to fp32 rounding
    torch.testing.assert_close(res["triton"][3], res["reference"][3].float(), rtol=1e-5, atol=1e-5)


def test_eval_mode_and_reference_backend_are_the_unfused_sequence():
    x = randn(2, 3, 8, 8, seed=5)
    w, b = torch.rand(3, generator=gen(6)).to(DEVICE), randn(3, seed=7)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, False)), 3, 2)
    for backend in ("auto", "reference", "triton") if op.resolve_backend("auto", DEVICE) == "triton" or \
            ops.triton_available() else ("auto", "reference"):
        got = ops.bn_relu_maxpool(x, rm, rv, w, b, training=False, backend=backend)
        assert torch.equal(got, ref), backend
    with pytest.raises(ValueError, match="H, W >= 3"):
        ops.bn_relu_maxpool(torch.zeros(1, 1, 2, 5), None, None, None, None)


# ----------------------------------------------------------------------------------------------
# the CelebA ResNet variant with model.fused_stem on == off
# ----------------------------------------------------------------------------------------------
def _tiny_model(batched: bool):
    from fastdmtg.data import task_specs as _task_specs
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.models import build_multibranch
    from fastdmtg.models.batched import BatchedMultiBranchNet
    cfg = apply_overrides(get_recipe("celeba9_k3"), ["model.width=3", "model.branches=2"])
    torch.manual_seed(0)
    m = build_multibranch(cfg.model, _task_specs(cfg), 9).to(DEVICE)    # 9×9: stem 4×4
    return BatchedMultiBranchNet(m) if batched else m


@needs_triton
@pytest.mark.parametrize("batched,channels_last", [(False, False), (True, True)])
def test_celeba_model_fused_stem_equals_unfused(batched, channels_last):
    from fastdmtg.models.resnet_celeba import set_fused_stem
    op.CONFIG.update(bwd_cw=16, bwd_rows=8, pool_ow=16)          # one program per image: the interpreter is slow
    off = _tiny_model(batched)
    on = copy.deepcopy(off)
    assert set_fused_stem(on, "triton") == (1 if batched else 2)
    if channels_last:
        off, on = (m.to(memory_format=torch.channels_last) for m in (off, on))
    assert list(on.state_dict()) == list(off.state_dict())                  # checkpoints unaffected
    x = torch.rand(2, 3, 9, 9, generator=gen(8)).to(DEVICE)
    outs = []
    for m in (off, on):
        m.train()
        o = m(x)
        (o.float() * torch.linspace(-1, 1, o.numel(), device=DEVICE).view_as(o)).sum().backward()
        outs.append(o.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    _assert_same_grads_and_buffers(off, on)
    on.eval(), off.eval()
    torch.testing.assert_close(on(x), off(x), rtol=1e-5, atol=1e-5)          # eval: the unfused modules


def test_fused_stem_switch():
    """model.fused_stem: auto stays off (until a GPU measurement decides); on needs the CelebA stem."""
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.builder import FUSED_STEM_AUTO, prepare_model, resolve
    assert FUSED_STEM_AUTO is False
    cfg = get_recipe("celeba9_k3")
    assert resolve(cfg, torch.device("cuda"), 1).fused_stem is False
    on = apply_overrides(cfg, ["model.fused_stem=on", "train.kernels=reference"])
    resolved = resolve(on, torch.device("cpu"), 1)
    assert resolved.fused_stem is True
    model, ran = prepare_model(_tiny_model(False), on, resolved)
    assert ran.fused_stem is True
    assert all(s.fused and s.kernels == "reference" for s in model.modules() if type(s).__name__ == "Stem")
    with pytest.raises(ValueError, match="model.fused_stem=on"):
        prepare_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), on, resolved)
    with pytest.raises(ValueError, match="model.fused_stem"):
        apply_overrides(cfg, ["model.fused_stem=yes"])


@needs_triton
def test_fused_stem_under_torch_compile():
    """The production path: the batched CelebA model with the fused stem traced by torch.compile in one
    graph (custom op + running-statistics updates), equal to the eager unfused model. aot_eager: dynamo +
    AOT autograd (the custom op's fake and autograd registration) without inductor's CPU codegen time."""
    from torch._dynamo.utils import counters

    from fastdmtg.models.resnet_celeba import set_fused_stem
    op.CONFIG.update(bwd_cw=16, bwd_rows=8, pool_ow=16)
    torch._dynamo.reset()
    counters.clear()
    off = _tiny_model(True)
    on = copy.deepcopy(off)
    set_fused_stem(on, "triton")
    x = torch.rand(2, 3, 9, 9, generator=gen(9)).to(DEVICE)
    outs = []
    for m in (off, torch.compile(on, backend="aot_eager")):
        o = m(x)
        o.square().sum().backward()
        outs.append(o.detach())
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    _assert_same_grads_and_buffers(off, on)


def _assert_same_grads_and_buffers(off, on):
    """The fused-stem model ``on`` left the same parameter gradients and BN running statistics as ``off``."""
    for (n, p), (_, q) in zip(off.named_parameters(), on.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * max(p.grad.abs().max().item(), 1e-12),
                                   msg=lambda m: f"grad {n}: {m}")
    for (n, p), (_, q) in zip(off.named_buffers(), on.named_buffers()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"buffer {n}: {m}")


def test_reference_by_hand_with_its_defaults():
    """The reference with its default arguments (training=True, momentum 0.1, eps 1e-5) against the
    stem written out by hand: per-channel batch mean and biased variance over (B, H, W), the affine
    normalisation, ReLU, the max over every 3×3 window at stride 2 (no padding), and the running
    statistics moved 10 % towards the batch mean and the unbiased variance. Channel 1 has a variance
    of 4e-6, below eps = 1e-5, so eps shapes its output."""
    B, C, H, W = 2, 2, 7, 6                                              # pooled: 3 × 2
    x = torch.randn(B, C, H, W, generator=gen(11), dtype=torch.float64)
    z = x[:, 1] - x[:, 1].mean()
    x[:, 1] = 0.3 + 2e-3 * z / z.pow(2).mean().sqrt()                    # channel 1: variance 4e-6 < eps
    w, b = torch.tensor([1.5, -0.7], dtype=torch.float64), torch.tensor([-3.0, 0.1], dtype=torch.float64)
    rm, rv = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([3.0, 0.5], dtype=torch.float64)
    n = B * H * W
    mean = x.sum(dim=(0, 2, 3)) / n                                      # (C,)
    var = ((x - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / n  # (C,) biased
    y = (x - mean[None, :, None, None]) / (var[None, :, None, None] + 1e-5).sqrt() * w[None, :, None, None] \
        + b[None, :, None, None]
    y = y.clamp_min(0)                                                   # channel 0: most windows all < 0
    Ho, Wo = (H - 3) // 2 + 1, (W - 3) // 2 + 1
    want = torch.empty(B, C, Ho, Wo, dtype=torch.float64)
    for i in range(Ho):
        for j in range(Wo):
            want[:, :, i, j] = y[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].amax(dim=(2, 3))
    want_rm = 0.9 * torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.1 * mean
    want_rv = 0.9 * torch.tensor([3.0, 0.5], dtype=torch.float64) + 0.1 * var * n / (n - 1)
    got = op.reference(x, rm, rv, w, b)
    assert got.shape == (B, C, Ho, Wo) == (2, 2, 3, 2)
    assert 0 < int((want[:, 0] == 0).sum()) < want[:, 0].numel()             # ReLU shapes the result
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, want_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, want_rv, rtol=1e-12, atol=1e-12)
