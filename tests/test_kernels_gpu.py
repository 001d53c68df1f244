"""GPU-only checks of fastdmtg.ops' Triton kernels (skipped without CUDA + triton).

* CUDA-graph capture/replay: the captured step increments the seed tensor in place, so every
  replay must draw fresh noise that matches the reference for that seed value.
* A captured fwd+bwd DMTG step replays to the same numbers as eager.
* Realistic Taskonomy/CelebA sizes vs the reference (relative error norms), for ce_ignore with
  every setting the benchmark sweep may choose.
* The fused CelebA stem (bn_relu_maxpool) at the real size, bf16 channels_last, eager, captured in a
  CUDA graph and under torch.compile.
* Gumbel noise stays finite and accurate over millions of draws (U near 1 included).
* bf16 autocast end to end, torch.compile on CUDA.

Every call passes ``backend=`` explicitly (``T`` = triton); there is no process-wide backend.
"""
import os

import pytest
import torch

from fastdmtg import ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.triton_available())
    or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA device, triton, and TRITON_INTERPRET unset",
)
DEV = "cuda"
T = "triton"


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _capture(fn):
    """Warm up on a side stream (allocator + triton compile), then capture ``fn`` in a graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def test_cuda_graph_replay_draws_fresh_noise():
    N, K = 40, 5
    S = torch.randn(N, K, device=DEV)
    seed = torch.tensor(0, dtype=torch.int64, device=DEV)
    tau = torch.tensor(0.5, device=DEV)

    def step():
        seed.add_(1)  # the trainer's in-place increment, captured in the graph
        return ops.gumbel_softmax_mask(S, tau, seed, backend=T)

    g, out = _capture(step)
    seed.fill_(100)
    g.replay()
    z1 = out.clone()
    g.replay()
    z2 = out.clone()
    torch.cuda.synchronize()
    assert seed.item() == 102
    assert not torch.allclose(z1, z2)
    for value, z in ((101, z1), (102, z2)):
        u = ops.gumbel_uniforms(torch.tensor(value, device=DEV), N, K, DEV, backend=T)
        torch.testing.assert_close(z, ops.gumbel_softmax_from_uniform(S, u, tau), rtol=1e-5, atol=1e-6)
    # annealing tau in place is also picked up by replays (it is read from the tensor)
    tau.fill_(2.0)
    seed.fill_(100)
    g.replay()
    u = ops.gumbel_uniforms(torch.tensor(101, device=DEV), N, K, DEV, backend=T)
    torch.testing.assert_close(out, ops.gumbel_softmax_from_uniform(S, u, 2.0), rtol=1e-5, atol=1e-6)


def test_cuda_graph_full_step_fwd_bwd():
    """Capture mask + grouped CE + backward; replays equal eager for the same seed."""
    N, K, B = 40, 5, 256
    S = torch.randn(N, K, device=DEV, requires_grad=True)
    logits = torch.randn(K, N, B, 2, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 2, (B, N), device=DEV)
    seed = torch.tensor(0, dtype=torch.int64, device=DEV)

    def step():
        seed.add_(1)
        z = ops.gumbel_softmax_mask(S, 0.6, seed, backend=T)
        total, L = ops.grouped_ce_loss(logits, target, z, backend=T)
        gS, gx = torch.autograd.grad(total, (S, logits))
        return total, L, gS, gx

    g, outs = _capture(step)
    for start in (10, 20):
        seed.fill_(start)
        g.replay()
        got = [o.clone() for o in outs]
        seed.fill_(start)
        ref = step()
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, same order: bitwise


def test_gumbel_many_draws_finite_and_accurate():
    """4M uniforms per seed include values within a few ulps of 1 (the fragile -log(-log U))."""
    N, K = 262144, 16
    S = torch.randn(N, K, device=DEV)
    for value in (1, 2):
        seed = torch.tensor(value, device=DEV)
        z = ops.gumbel_softmax_mask(S, 0.5, seed, backend=T)
        assert torch.isfinite(z).all()
        u = ops.gumbel_uniforms(seed, N, K, DEV, backend=T)
        assert (u > 1 - 2**-18).any()  # the near-1 regime really is exercised
        ref = ops.gumbel_softmax_from_uniform(S.double(), u.double(), 0.5)
        assert (z.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taskonomy_sizes(dtype):
    K, B, H, W = 5, 4, 256, 256
    pred = torch.randn(K, B, 3, H, W, device=DEV, dtype=dtype, requires_grad=True)
    target = torch.randn(B, 3, H, W, device=DEV)
    mask = torch.rand(B, 1, H, W, device=DEV) > 0.2
    z = torch.softmax(torch.randn(K, device=DEV), 0).requires_grad_(True)
    seg = torch.randn(K, B, 18, H, W, device=DEV, dtype=dtype, requires_grad=True)
    seg_t = torch.randint(0, 18, (B, H, W), device=DEV)
    res = {}
    for backend in ("reference", "triton"):
        t1, L1 = ops.masked_l1_loss(pred, target, mask, z, backend=backend)
        t2, L2 = ops.ce_ignore_loss(seg, seg_t, z, backend=backend)
        grads = torch.autograd.grad(0.7 * t1 + 1.3 * t2, (pred, seg, z))
        res[backend] = (t1, L1, t2, L2) + grads
    gtol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(res["triton"], res["reference"])):
        tol = 1e-5 if i < 4 else gtol
        assert _rel(a, b) < tol, (i, _rel(a, b))


def _seg_candidate(i):
    from fastdmtg.kernels.ce_ignore import SWEEP

    settings = {}
    for keys, values in SWEEP.items():
        settings.update(zip(keys, values[i % len(values)]))
    return settings


@pytest.mark.parametrize("H,W", [(256, 256), (250, 250)])  # 250x250: partial and empty blocks
@pytest.mark.parametrize("cand", range(5))
def test_ce_ignore_sweep_candidates(cand, H, W):
    """Every ce_ignore setting benchmarks/kernels.py --sweep may pick, vs the reference."""
    from fastdmtg.kernels.ce_ignore import CONFIG

    saved = dict(CONFIG)
    CONFIG.update(_seg_candidate(cand))
    try:
        K, B, C = 3, 2, 18
        seg = torch.randn(K, B, C, H, W, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        seg_t = torch.randint(0, C, (B, H, W), device=DEV)  # class 0 = ignored
        z = torch.softmax(torch.randn(K, device=DEV), 0).requires_grad_(True)
        res = {}
        for backend in ("reference", "triton"):
            total, L = ops.ce_ignore_loss(seg, seg_t, z, backend=backend)
            res[backend] = (total, L) + torch.autograd.grad(1.3 * total, (seg, z))
        for i, (a, b) in enumerate(zip(res["triton"], res["reference"])):
            assert torch.isfinite(a).all()
            assert _rel(a, b) < (1e-5 if i != 2 else 1e-2), (i, _rel(a, b))
    finally:
        CONFIG.clear()
        CONFIG.update(saved)


def test_celeba_sizes_bf16_autocast():
    """Heads under bf16 autocast produce bf16 logits; the loss and grads must stay finite/fp32."""
    K, N, B, F = 5, 40, 256, 64
    feats = torch.randn(K, B, F, device=DEV)
    w = torch.randn(K, F, N * 2, device=DEV, requires_grad=True)
    target = torch.randint(0, 2, (B, N), device=DEV)
    z = torch.softmax(torch.randn(N, K, device=DEV), 1)
    res = {}
    for backend in ("reference", "triton"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = torch.bmm(feats, w).view(K, B, N, 2).permute(0, 2, 1, 3)  # (K, N, B, 2) bf16
            assert logits.dtype == torch.bfloat16
            total, L = ops.grouped_ce_loss(logits, target, z, backend=backend)
        assert total.dtype == torch.float32
        (gw,) = torch.autograd.grad(total, (w,))
        res[backend] = (total, L, gw)
    assert _rel(res["triton"][0], res["reference"][0]) < 1e-5
    assert _rel(res["triton"][1], res["reference"][1]) < 1e-5
    assert _rel(res["triton"][2], res["reference"][2]) < 1e-2


def test_torch_compile_cuda():
    torch._dynamo.reset()
    N, K, B = 40, 5, 256
    S = torch.randn(N, K, device=DEV)
    logits = torch.randn(K, N, B, device=DEV)
    target = torch.randint(0, 2, (B, N), device=DEV)
    seed = torch.tensor(3, device=DEV)

    def step(S, logits):
        z = ops.gumbel_softmax_mask(S, 0.5, seed, hard=True, backend=T)
        return ops.grouped_bce_loss(logits, target, z, backend=T)[0]

    outs = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, fullgraph=True))):
        S_l, x_l = S.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        total = fn(S_l, x_l)
        total.backward()
        outs[name] = (total.detach(), S_l.grad, x_l.grad)
    for a, b in zip(outs["compiled"], outs["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# the fused CelebA stem at the real size
# ----------------------------------------------------------------------------------------------
def _stem_inputs(C, B=256, S=64, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(C)
    x = (torch.randn(B, C, S, S, device=DEV, generator=g) * 1.5 + 0.3).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, device=DEV, generator=g) + 0.5
    b = torch.randn(C, device=DEV, generator=g) * 0.2
    return x, w, b


def _stem_step(x, w, b, rm, rv, backend):
    out = ops.bn_relu_maxpool(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend)
    gout = torch.linspace(-1, 1, out.numel(), device=DEV).view(out.shape).to(out.dtype)
    return (out,) + torch.autograd.grad(out, (x, w, b), gout)


@pytest.mark.parametrize("C", [64, 192])   # one branch; K = 3 batched branches
def test_fused_stem_celeba_size(C):
    x, w, b = _stem_inputs(C)
    res = {}
    for backend in ("reference", "triton"):
        xx, ww, bb = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
        res[backend] = _stem_step(xx, ww, bb, rm, rv, backend) + (rm, rv)
    for i, (a, r) in enumerate(zip(res["triton"], res["reference"])):
        assert torch.isfinite(a).all()
        assert _rel(a, r) < (1e-2 if i < 4 else 1e-5), (i, _rel(a, r))   # bf16 out / dx / sums of bf16 dy


def test_fused_stem_graph_replay_and_compile():
    """The op inside a captured CUDA graph replays to the eager numbers; torch.compile(fullgraph) traces it."""
    C = 64
    x, w, b = _stem_inputs(C, B=32)
    xx, ww, bb = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    g, outs = _capture(lambda: _stem_step(xx, ww, bb, rm, rv, T))
    g.replay()
    got = [o.clone() for o in outs]
    ref = _stem_step(xx, ww, bb, rm, rv, T)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)                     # same kernels: bitwise
    torch._dynamo.reset()
    comp = torch.compile(lambda *a: ops.bn_relu_maxpool(*a, True, 0.1, 1e-5, backend=T), fullgraph=True)
    out = comp(xx, rm.clone(), rv.clone(), ww, bb)
    gout = torch.linspace(-1, 1, out.numel(), device=DEV).view(out.shape).to(out.dtype)
    for a, r in zip((out,) + torch.autograd.grad(out, (xx, ww, bb), gout), ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
