"""fastdmtg.ops as a whole: backend resolution, the generated registration of every fused op (custom
op + fake + autograd, and the eager fast path from the same description), torch.compile, and the
package without triton. The per-op kernel-vs-reference tests are tests/test_op_<name>.py."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdmtg import ops
from fastdmtg.kernels import bn_relu_maxpool, ce_ignore, grouped_bce, grouped_ce, gumbel_mask, masked_l1
from op_testing import DEVICE, INTERPRET, gen, needs_triton, randn


# ----------------------------------------------------------------------------------------------
# backend resolution: per call, from config; no process-wide switch
# ----------------------------------------------------------------------------------------------
def test_resolve_backend():
    with pytest.raises(ValueError, match="train.kernels"):
        ops.resolve_backend("cuda-magic", "cpu")
    assert ops.resolve_backend("reference", "cpu") == "reference"
    assert ops.resolve_backend("auto", "cpu") == "reference"      # auto never picks triton off CUDA
    assert ops.resolve_backend(None, "cpu") == "reference"
    if INTERPRET and ops.triton_available():
        assert ops.resolve_backend("triton", "cpu") == "triton"
    if torch.cuda.is_available() and ops.triton_available() and not INTERPRET:
        assert ops.resolve_backend("auto", "cuda") == "triton"
    assert not hasattr(ops, "set_backend")


@needs_triton
def test_backend_is_per_call():
    """Two calls side by side with different backends: each runs its own (no shared state)."""
    S = randn(9, 3, seed=1, scale=3.0)
    seed = torch.tensor(5, device=DEVICE)
    z_t = ops.gumbel_softmax_mask(S, 0.5, seed, backend="triton")
    z_r = ops.gumbel_softmax_mask(S, 0.5, seed, backend="reference")
    torch.testing.assert_close(z_t, z_r, rtol=1e-5, atol=1e-6)
    S_l = S.clone().requires_grad_(True)
    assert "gumbel_mask_eager" in type(ops.gumbel_softmax_mask(S_l, 0.5, seed, backend="triton").grad_fn).__name__
    assert "Softmax" in type(ops.gumbel_softmax_mask(S_l, 0.5, seed, backend="reference").grad_fn).__name__


# ----------------------------------------------------------------------------------------------
# every op: the custom op (compile path) and the generated autograd.Function (eager path) agree
# bit for bit, and torch.library.opcheck passes on the custom op
# ----------------------------------------------------------------------------------------------
def _cases():
    d = DEVICE
    S = randn(9, 5, seed=61)
    x_cl = randn(2, 3, 7, 9, seed=69).contiguous(memory_format=torch.channels_last)
    wb = (torch.rand(3, generator=gen(11)).to(d) + 0.5, randn(3, seed=12))
    return [
        ("gumbel_mask", gumbel_mask.OP, (S, None, 0.7, torch.tensor(3, device=d), False), [0]),
        ("gumbel_mask", gumbel_mask.OP, (S, torch.tensor(0.7, device=d), 1.0, torch.tensor(3, device=d), True), [0]),
        ("grouped_ce", grouped_ce.OP, (randn(3, 9, 7, 2, seed=62), torch.randint(0, 2, (7, 9), generator=gen(1)).to(d),
                                       torch.rand(9, 3, generator=gen(2)).to(d)), [0, 2]),
        ("grouped_bce", grouped_bce.OP, (randn(3, 9, 7, seed=63), torch.randint(0, 2, (7, 9), generator=gen(3)).to(d),
                                         torch.rand(9, 3, generator=gen(4)).to(d)), [0, 2]),
        ("masked_l1", masked_l1.OP, (randn(3, 2, 3, 5, 7, seed=64), randn(2, 3, 5, 7, seed=65),
                                     (torch.rand(2, 1, 5, 7, generator=gen(5)) > 0.5).to(d),
                                     torch.rand(3, generator=gen(6)).to(d)), [0, 3]),
        ("masked_l1", masked_l1.OP, (randn(3, 2, 3, 5, 7, seed=66), randn(2, 3, 5, 7, seed=67), None,
                                     torch.rand(3, generator=gen(7)).to(d)), [0, 3]),
        ("ce_ignore", ce_ignore.OP, (randn(3, 2, 6, 5, 7, seed=68), torch.randint(0, 6, (2, 5, 7), generator=gen(8)).to(d),
                                     torch.rand(3, generator=gen(9)).to(d), 0), [0, 2]),
        ("bn_relu_maxpool", bn_relu_maxpool.OP, (randn(2, 3, 7, 9, seed=70), *wb, 1e-5), [0, 1, 2]),
        ("bn_relu_maxpool", bn_relu_maxpool.OP, (x_cl, *wb, 1e-5), [0, 1, 2]),
    ]


CASES = list(range(len(_cases())))


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_eager_path_equals_custom_op(case):
    name, op, args, diff = _cases()[case]
    outs = {}
    for path in ("eager", "custom_op"):
        a = tuple(t.detach().clone().requires_grad_(True) if i in diff else t for i, t in enumerate(args))
        res = op.fn.apply(*a) if path == "eager" else op.op(*a)
        res = res if isinstance(res, tuple) else (res,)
        g = torch.randn(res[0].shape, generator=gen(99)).to(device=res[0].device, dtype=res[0].dtype)
        grads = torch.autograd.grad(res[0], [a[i] for i in diff], g)
        assert all(not r.requires_grad for r in res[1:]), f"{name}: by-products must be non-differentiable"
        outs[path] = [r.detach() for r in res] + list(grads)
    for x, y in zip(outs["eager"], outs["custom_op"]):
        assert torch.equal(x, y), name


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    name, op, args, diff = _cases()[case]
    args = tuple(a.requires_grad_(True) if i in diff else a for i, a in enumerate(args))
    torch.library.opcheck(getattr(torch.ops.fastdmtg, name).default, args)


@needs_triton
def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the custom ops (fwd + bwd), one small case."""
    torch._dynamo.reset()
    N, K, B = 9, 3, 7

    def step(S, logits, target, seed, tau):
        z = ops.gumbel_softmax_mask(S, tau, seed, backend="triton")
        total, L = ops.grouped_ce_loss(logits, target, z, backend="triton")
        return total, L, z

    S = randn(N, K, seed=71)
    logits = randn(K, N, B, 2, seed=72)
    target = torch.randint(0, 2, (B, N), generator=gen(73)).to(DEVICE)
    seed = torch.tensor(11, device=DEVICE)
    tau = torch.tensor(0.5, device=DEVICE)
    compiled = torch.compile(step, fullgraph=True)
    outs = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        S_l = S.clone().requires_grad_(True)
        x_l = logits.clone().requires_grad_(True)
        total, L, z = fn(S_l, x_l, target, seed, tau)
        total.backward()
        outs[name] = (total.detach(), L, z.detach(), S_l.grad, x_l.grad)
    for a, b in zip(outs["compiled"], outs["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_triton
def test_public_api_both_backends_one_step():
    """One DMTG step through the public API on each backend, same inputs and seed."""
    N, K, B = 9, 3, 33
    S = randn(N, K, seed=41)
    logits = randn(K, N, B, 2, seed=42)
    target = torch.randint(0, 2, (B, N), generator=gen(43)).to(DEVICE)
    res = {}
    for backend in ("reference", "triton"):
        S_l = S.clone().requires_grad_(True)
        x_l = logits.clone().requires_grad_(True)
        z = ops.gumbel_softmax_mask(S_l, torch.tensor(0.7, device=DEVICE), torch.tensor(5, device=DEVICE),
                                    backend=backend)
        total, L = ops.grouped_ce_loss(x_l, target, z, backend=backend)
        total.backward()
        res[backend] = (total.detach(), L, S_l.grad, x_l.grad)
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# triton is an optional extra
# ----------------------------------------------------------------------------------------------
_NO_TRITON = textwrap.dedent("""
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):      # as if triton were not installed
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, NoTriton())
    import torch
    from fastdmtg import ops
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.models import build_multibranch
    from fastdmtg.data import task_specs as _task_specs
    from fastdmtg.models.resnet_celeba import set_fused_stem
    assert "triton" not in sys.modules
    assert not ops.triton_available() and "blocked" in ops.TRITON_IMPORT_ERROR
    assert ops.resolve_backend("auto", "cpu") == "reference"
    try:
        ops.resolve_backend("triton", "cpu")
        raise SystemExit("forcing triton without triton must fail")
    except ValueError as e:
        assert "train.kernels=triton" in str(e) and "blocked" in str(e), e
    g = torch.Generator().manual_seed(0)
    S = torch.randn(9, 3, generator=g, requires_grad=True)
    z = ops.gumbel_softmax_mask(S, 1.0, torch.tensor(3))
    x = torch.randn(3, 9, 5, 2, generator=g, requires_grad=True)
    total, L = ops.grouped_ce_loss(x, torch.randint(0, 2, (5, 9), generator=g), z)
    t2, _ = ops.grouped_bce_loss(torch.randn(3, 9, 5, generator=g, requires_grad=True),
                                 torch.randint(0, 2, (5, 9), generator=g), z)
    p = torch.randn(3, 2, 1, 6, 6, generator=g, requires_grad=True)
    t3, _ = ops.masked_l1_loss(p, torch.randn(2, 1, 6, 6, generator=g), None, torch.rand(3, generator=g))
    s = torch.randn(3, 2, 4, 6, 6, generator=g, requires_grad=True)
    t4, _ = ops.ce_ignore_loss(s, torch.randint(0, 4, (2, 6, 6), generator=g), torch.rand(3, generator=g))
    (total + t2 + t3 + t4).backward()
    assert all(torch.isfinite(t.grad).all() for t in (S, x, p, s))
    # the CelebA model with the fused stem switched on runs the reference sequence
    cfg = apply_overrides(get_recipe("celeba9_k3"), ["model.width=4", "data.image_size=16"])
    model = build_multibranch(cfg.model, _task_specs(cfg), 16)
    assert set_fused_stem(model, "auto") == 3
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    assert "triton" not in sys.modules
    print("NO-TRITON OK")
""")


def test_everything_but_the_kernels_works_without_triton():
    env = dict(os.environ, FASTDMTG_KERNELS="")
    p = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "NO-TRITON OK" in p.stdout, p.stderr[-3000:]


def test_env_override_replaces_auto():
    code = ("from fastdmtg import ops; print(ops.resolve_backend('auto', 'cpu'), "
            "ops.resolve_backend('reference', 'cpu'))")
    env = dict(os.environ, FASTDMTG_KERNELS="triton", TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if not ops.triton_available():
        pytest.skip(f"triton unavailable: {ops.TRITON_IMPORT_ERROR}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["triton", "reference"]       # explicit values are kept


def test_grouped_bce_reference_by_hand():
    """The BCE reference against the definition: L[i, k] = mean_b BCE(logits[k, i, b], target[b, i]),
    total = Σ z·L, and ∂total/∂logits[k, i, b] = z[i, k] (σ(x) − t) / B."""
    import math
    logits = torch.tensor([[[1.0, -2.0], [0.5, 0.0]], [[-1.0, 3.0], [2.0, -0.5]]], requires_grad=True)  # (K, N, B)
    target = torch.tensor([[1, 0], [0, 1]])                                                               # (B, N)
    z = torch.tensor([[0.3, 0.7], [0.6, 0.4]])                                                            # (N, K)

    def bce(x, t):
        return -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
    L = [[sum(bce(float(logits[k, i, b].detach()), int(target[b, i])) for b in range(2)) / 2 for k in range(2)] for i in range(2)]
    total, Lt = grouped_bce.reference(logits, target, z)
    assert torch.allclose(Lt, torch.tensor(L), atol=1e-6)
    assert float(total.detach()) == pytest.approx(sum(float(z[i, k]) * L[i][k] for i in range(2) for k in range(2)), rel=1e-6)
    total.backward()
    sig = torch.sigmoid(logits.detach())
    want = torch.stack([torch.stack([z[i, k] * (sig[k, i] - target[:, i].float()) / 2 for i in range(2)])
                        for k in range(2)])
    torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-7)


def test_gumbel_reference_is_soft_unless_asked():
    """``hard`` defaults to False: soft weights in (0, 1); hard=True gives the one-hot of the soft argmax."""
    S = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.0, 0.5]])
    soft = gumbel_mask.reference(S, 0.7, torch.tensor(11))
    assert ((soft > 0) & (soft < 1)).all() and torch.allclose(soft.sum(1), torch.ones(2))
    hard = gumbel_mask.reference(S, 0.7, torch.tensor(11), hard=True)
    assert torch.equal(hard, torch.nn.functional.one_hot(soft.argmax(1), 3).float())
