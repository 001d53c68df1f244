"""fastdmtg.ops: Triton kernels vs the PyTorch reference (Liger-Kernel style).

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1, set below before torch/triton
are imported when no NVIDIA driver is present) and unchanged on a CUDA machine. The interpreter
costs ~5 ms per program instance, so shapes stay small but straddle the block boundaries:
  gumbel     BLOCK_K = next_pow2(K) (K = 1, 2, 3, 5, 16), BLOCK_N = 1024 // BLOCK_K rows
  attr (ce/bce) BLOCK_B = min(next_pow2(B), 256): B = 7, 33, 300 (two batch blocks)
  masked_l1  BLOCK = 1024 pixels (pinned below): H*W = 2145 spans three blocks
  ce_ignore  BLOCK_HW = 128 pixels, 2 blocks per program (pinned below): H*W = 17*19 = 323 spans
             three blocks and two programs per head, the last block partly and the one after it
             entirely masked
(The dense block sizes are pinned small here so the boundaries are exercised at test sizes;
tests/test_kernels_gpu.py runs the production defaults on realistic sizes.)

Tolerances (kernel vs reference, both accumulate in fp32):
  fp32 inputs: L / total rtol 1e-5 atol 1e-6; gradients rtol 1e-5 atol 1e-7 (relative to scale)
  bf16 inputs: the same fp32 math on the same bf16 values, but gradients are rounded to bf16:
               losses rtol 1e-5, gradients atol = 1e-2 * max|grad| (bf16 has an 8-bit mantissa)
"""
import os

# TRITON_INTERPRET must be in the environment before triton is first imported (torch.compile
# imports it as well). Decide without importing torch: no NVIDIA driver -> interpret on CPU.
if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastdmtg import ops  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
HAS_TRITON = ops.triton_available()
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or INTERPRET)
_reason = (
    f"triton kernels unavailable: {ops._kernels_import_error()}"
    if not HAS_TRITON
    else "no CUDA device and TRITON_INTERPRET != 1 (set it before triton is imported)"
)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=_reason)


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = ops._backend
    cfg = None
    if HAS_TRITON:
        from fastdmtg.kernels import CONFIG

        cfg = dict(CONFIG)
        CONFIG.update(l1_block=1024, l1_warps=4, seg_block_hw=128, seg_warps=4, seg_px=256, seg_unroll=2,
                      seg_bwd_block_hw=128, seg_bwd_warps=4, seg_bwd_px=256)
    yield
    ops._backend = saved
    if cfg is not None:
        CONFIG.update(cfg)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    # drawn on CPU with an explicit generator (same values on any device), then moved
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=DEVICE, dtype=dtype)


def _run(backend: str, fn, inputs: dict, diff: list, grad_out: torch.Tensor):
    """Call ``fn(**inputs)`` on ``backend``; backprop ``grad_out`` into total.

    Returns (total, L, {name: grad}) with fresh leaf copies of the differentiable inputs.
    """
    ops.set_backend(backend)
    args = {k: (v.detach().clone().requires_grad_(True) if k in diff else v) for k, v in inputs.items()}
    total, L = fn(**args)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert L.dtype == torch.float32 and not L.requires_grad
    total.backward(grad_out)
    return total.detach(), L, {k: args[k].grad for k in diff}


def _close(a, b, dtype, what, grad=False):
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


def _compare(fn, inputs, diff, dtype, grad_seed=0):
    # the SAME upstream gradient for both backends (not 1.0, so scaling bugs show)
    g = (0.5 + torch.rand((), generator=_gen(grad_seed))).to(DEVICE)
    t_ref, L_ref, g_ref = _run("reference", fn, inputs, diff, g)
    t_tri, L_tri, g_tri = _run("triton", fn, inputs, diff, g)
    _close(t_tri, t_ref, dtype, "total")
    _close(L_tri, L_ref, dtype, "L")
    for k in diff:
        assert g_tri[k].dtype == inputs[k].dtype, f"grad {k} dtype {g_tri[k].dtype}"
        _close(g_tri[k], g_ref[k], dtype, f"grad {k}", grad=True)
    return L_tri, g_tri


# ----------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------
def test_backend_selection():
    with pytest.raises(ValueError):
        ops.set_backend("cuda-magic")
    ops.set_backend("reference")
    assert ops.get_backend("cpu") == "reference"
    ops.set_backend("auto")
    assert ops.get_backend("cpu") == "reference"  # auto never picks triton off CUDA
    if torch.cuda.is_available() and HAS_TRITON:
        assert ops.get_backend("cuda") == "triton"


def test_shape_validation():
    ops.set_backend("reference")
    with pytest.raises(ValueError):
        ops.grouped_ce_loss(torch.zeros(2, 3, 4, 2), torch.zeros(4, 2, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(ValueError):
        ops.masked_l1_loss(torch.zeros(2, 1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# Gumbel-softmax mask
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 123456789012, -5, 2**62 + 7])
def test_philox_reference_is_bit_identical_to_tl_rand(seed):
    """The reference backend's PyTorch Philox must draw exactly the kernel's uniforms."""
    s = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    for n, k in [(1, 1), (9, 5), (300, 16)]:
        u_ref = ops._philox_uniform(s, n, k)
        assert u_ref.shape == (n, k) and u_ref.dtype == torch.float32
        assert (u_ref >= 0).all() and (u_ref < 1).all()
        if TRITON_OK:
            ops.set_backend("triton")
            u_tri = ops.gumbel_uniforms(s, n, k, DEVICE)
            assert torch.equal(u_tri, u_ref), (seed, n, k)


@needs_triton
@pytest.mark.parametrize("N", [1, 9, 40, 300])
@pytest.mark.parametrize("K", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_matches_reference_given_uniforms(N, K, hard):
    seed = torch.tensor(1000 + 17 * N + K, dtype=torch.int64, device=DEVICE)
    tau = torch.tensor(0.5 + 0.1 * K, device=DEVICE) if (N + K) % 2 else 0.5 + 0.1 * K
    S = _randn(N, K, seed=N * 31 + K, scale=2.0)
    dZ = _randn(N, K, seed=N * 37 + K + 1)  # same upstream gradient for both
    ops.set_backend("triton")
    S_t = S.clone().requires_grad_(True)
    Z = ops.gumbel_softmax_mask(S_t, tau, seed, hard=hard)
    Z.backward(dZ)
    U = ops.gumbel_uniforms(seed, N, K, DEVICE)
    S_r = S.clone().requires_grad_(True)
    Z_ref = ops.gumbel_softmax_from_uniform(S_r, U, tau, hard=hard)
    Z_ref.backward(dZ)
    assert Z.dtype == torch.float32 and Z.shape == (N, K)
    torch.testing.assert_close(Z, Z_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S_t.grad, S_r.grad, rtol=1e-5, atol=1e-6)
    if hard:
        assert torch.equal(Z.sum(1), torch.ones(N, device=DEVICE))
        assert ((Z == 0) | (Z == 1)).all()
    else:
        torch.testing.assert_close(Z.sum(1), torch.ones(N, device=DEVICE))


@needs_triton
def test_gumbel_bf16_logits():
    N, K = 40, 5
    seed = torch.tensor(3, device=DEVICE)
    S = _randn(N, K, seed=5, dtype=torch.bfloat16)
    dZ = _randn(N, K, seed=6)
    ops.set_backend("triton")
    S_t = S.clone().requires_grad_(True)
    Z = ops.gumbel_softmax_mask(S_t, 0.7, seed)
    Z.backward(dZ)
    S_r = S.clone().requires_grad_(True)
    Z_ref = ops.gumbel_softmax_from_uniform(S_r, ops.gumbel_uniforms(seed, N, K, DEVICE), 0.7)
    Z_ref.backward(dZ)
    assert Z.dtype == torch.float32 and S_t.grad.dtype == torch.bfloat16
    torch.testing.assert_close(Z, Z_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S_t.grad.float(), S_r.grad.float(), rtol=0, atol=1e-2 * S_r.grad.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_gumbel_seed_is_read_at_run_time(backend):
    ops.set_backend(backend)
    S = _randn(9, 5, seed=0)
    seed = torch.tensor(42, device=DEVICE)
    z0 = ops.gumbel_softmax_mask(S, 1.0, seed)
    z0_again = ops.gumbel_softmax_mask(S, 1.0, seed)
    seed.add_(1)  # what the trainer does in place every step
    z1 = ops.gumbel_softmax_mask(S, 1.0, seed)
    assert torch.equal(z0, z0_again)  # deterministic for a seed value
    assert not torch.allclose(z0, z1)  # a new seed value draws new noise


@needs_triton
def test_gumbel_backends_agree():
    """Same seed -> same draw on both backends (the reference reproduces tl.rand)."""
    S = _randn(40, 5, seed=1)
    seed = torch.tensor(77, device=DEVICE)
    for hard in (False, True):
        ops.set_backend("reference")
        z_ref = ops.gumbel_softmax_mask(S, 0.5, seed, hard)
        ops.set_backend("triton")
        z_tri = ops.gumbel_softmax_mask(S, 0.5, seed, hard)
        torch.testing.assert_close(z_tri, z_ref.detach(), rtol=1e-5, atol=1e-6)


# upper p = 1e-3 quantiles of chi2(df) (standard tables)
_CHI2_CRIT_1E3 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 7: 24.322, 15: 37.697}


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_gumbel_argmax_frequencies_match_softmax(backend):
    """Gumbel-max: P(argmax_k Z = k) = softmax(S)_k for any tau. One launch, 16384 draws.

    Fixed seed -> deterministic; chi-square at p = 1e-3 (df = K - 1) over the argmax counts.
    """
    ops.set_backend(backend)
    K, draws = 5, 16384
    s_row = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0], device=DEVICE)
    S = s_row.expand(draws, K).contiguous()  # repeated rows: each row is an independent draw
    Z = ops.gumbel_softmax_mask(S, 0.3, torch.tensor(2024, device=DEVICE), hard=True)
    counts = Z.sum(0).double().cpu()
    assert counts.sum().item() == draws
    expected = torch.softmax(s_row.double(), 0).cpu() * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < _CHI2_CRIT_1E3[K - 1], (chi2, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_gumbel_hard_forward_onehot_backward_soft(backend):
    ops.set_backend(backend)
    N, K = 9, 3
    S = _randn(N, K, seed=2)
    dZ = _randn(N, K, seed=3)
    seed = torch.tensor(9, device=DEVICE)
    grads, outs = {}, {}
    for hard in (False, True):
        S_l = S.clone().requires_grad_(True)
        outs[hard] = ops.gumbel_softmax_mask(S_l, 0.4, seed, hard)
        outs[hard].backward(dZ)
        grads[hard] = S_l.grad
    hard_z, soft_z = outs[True].detach(), outs[False].detach()
    torch.testing.assert_close(hard_z, torch.nn.functional.one_hot(soft_z.argmax(1), K).float())
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# grouped CE / BCE (CelebA attributes)
# ----------------------------------------------------------------------------------------------
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
    logits = _randn(K, N, B, C, seed=seed, dtype=dtype, scale=2.0)
    target = torch.randint(0, C, (B, N), generator=_gen(seed + 1)).to(DEVICE)
    z = torch.softmax(_randn(N, K, seed=seed + 2), dim=1)
    _compare(ops.grouped_ce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], dtype)


@needs_triton
@pytest.mark.parametrize("tdtype", [torch.int32, torch.uint8])
def test_grouped_ce_target_dtypes(tdtype):
    K, N, B, C = 2, 9, 33, 4
    logits = _randn(K, N, B, C, seed=5)
    target = torch.randint(0, C, (B, N), generator=_gen(6)).to(device=DEVICE, dtype=tdtype)
    z = torch.rand(N, K, generator=_gen(7)).to(DEVICE)
    _compare(ops.grouped_ce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], torch.float32)


@needs_triton
@pytest.mark.parametrize("K,N,B", [(K, N, B) for K, N, B, _ in ATTR_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_bce(K, N, B, dtype):
    if N == 300 and dtype == torch.bfloat16:
        pytest.skip("one N=300 case is enough for the interpreter budget")
    seed = K * 1000 + N * 10 + B + 5
    logits = _randn(K, N, B, seed=seed, dtype=dtype, scale=3.0)
    target = torch.randint(0, 2, (B, N), generator=_gen(seed + 1)).to(DEVICE)
    z = torch.softmax(_randn(N, K, seed=seed + 2), dim=1)
    _compare(ops.grouped_bce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], dtype)


@needs_triton
@pytest.mark.parametrize("tdtype", [torch.bool, torch.float32])
def test_grouped_bce_target_dtypes(tdtype):
    K, N, B = 3, 9, 7
    logits = _randn(K, N, B, seed=8, scale=20.0)  # large |x|: exercises the stable softplus
    target = torch.randint(0, 2, (B, N), generator=_gen(9)).to(device=DEVICE, dtype=tdtype)
    z = torch.rand(N, K, generator=_gen(10)).to(DEVICE)
    _compare(ops.grouped_bce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], torch.float32)


# ----------------------------------------------------------------------------------------------
# masked L1 (Taskonomy depth / normal / keypoints / edges)
# ----------------------------------------------------------------------------------------------
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
    m = torch.rand(B, ch, H, W, generator=_gen(seed)) > 0.3
    if kind == "uint8":
        m = m.to(torch.uint8)
    elif kind == "float":
        m = torch.rand(B, ch, H, W, generator=_gen(seed))  # soft weights
    return m.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("K,B,C,H,W", DENSE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_masked_l1(K, B, C, H, W, dtype, mask_kind):
    seed = K * 100 + B * 10 + H
    pred = _randn(K, B, C, H, W, seed=seed, dtype=dtype)
    target = _randn(B, C, H, W, seed=seed + 1, dtype=dtype)
    mask = _mask(mask_kind, B, C, H, W, seed + 2)
    z = torch.softmax(_randn(K, seed=seed + 3), 0)
    _compare(ops.masked_l1_loss, dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"], dtype)


@needs_triton
@pytest.mark.parametrize("mask_kind", ["uint8", "float", "per_channel"])
def test_masked_l1_mask_kinds(mask_kind):
    K, B, C, H, W = 3, 2, 3, 9, 11
    pred = _randn(K, B, C, H, W, seed=1)
    target = _randn(B, C, H, W, seed=2)
    pred[0, :, :, :2] = target[:, :, :2]  # exact ties: |x|' = 0 at 0 on both backends
    mask = _mask(mask_kind, B, C, H, W, 3)
    z = torch.rand(K, generator=_gen(4)).to(DEVICE)
    _compare(ops.masked_l1_loss, dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"], torch.float32)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_masked_l1_none_equals_all_ones(backend):
    K, B, C, H, W = 3, 2, 3, 9, 11
    pred = _randn(K, B, C, H, W, seed=11)
    target = _randn(B, C, H, W, seed=12)
    z = torch.rand(K, generator=_gen(13)).to(DEVICE)
    g = torch.tensor(0.7, device=DEVICE)
    out = {}
    for name, mask in [("none", None), ("ones", torch.ones(B, 1, H, W, dtype=torch.bool, device=DEVICE))]:
        t, L, grads = _run(backend, ops.masked_l1_loss, dict(pred=pred, target=target, mask=mask, z=z), ["pred", "z"], g)
        out[name] = (t, L, grads)
    torch.testing.assert_close(out["none"][0], out["ones"][0], rtol=0, atol=0)
    torch.testing.assert_close(out["none"][1], out["ones"][1], rtol=0, atol=0)
    for k in ("pred", "z"):
        torch.testing.assert_close(out["none"][2][k], out["ones"][2][k], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# CE with ignore_index (Taskonomy segmentation)
# ----------------------------------------------------------------------------------------------
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
    logits = _randn(K, B, C, H, W, seed=seed, dtype=dtype, scale=2.0)
    target = torch.randint(0, C, (B, H, W), generator=_gen(seed + 1)).to(DEVICE)  # ~1/C ignored
    if B * H * W > 1:
        target.view(-1)[1] = 1  # at least one valid pixel
    z = torch.softmax(_randn(K, seed=seed + 2), 0)
    _compare(ops.ce_ignore_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], dtype)


@needs_triton
def test_ce_ignore_custom_index_uint8_target():
    K, B, C, H, W = 2, 2, 6, 5, 7
    logits = _randn(K, B, C, H, W, seed=21)
    target = torch.randint(0, C, (B, H, W), generator=_gen(22)).to(torch.uint8)
    target[0, :2] = 255
    z = torch.rand(K, generator=_gen(23)).to(DEVICE)
    _compare(
        lambda **kw: ops.ce_ignore_loss(**kw, ignore_index=255),
        dict(logits=logits, target=target.to(DEVICE), z=z), ["logits", "z"], torch.float32,
    )


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_ce_ignore_all_ignored_is_zero(backend):
    """Every pixel ignored: L = 0 and all gradients 0 (torch's mean reduction would be NaN)."""
    K, B, C, H, W = 3, 2, 18, 5, 6
    logits = _randn(K, B, C, H, W, seed=31)
    target = torch.zeros(B, H, W, dtype=torch.long, device=DEVICE)
    z = torch.rand(K, generator=_gen(32)).to(DEVICE)
    t, L, grads = _run(backend, ops.ce_ignore_loss, dict(logits=logits, target=target, z=z), ["logits", "z"],
                       torch.tensor(1.0, device=DEVICE))
    assert t.item() == 0.0
    assert torch.equal(L, torch.zeros(K, device=DEVICE))
    assert torch.equal(grads["logits"], torch.zeros_like(logits))
    assert torch.equal(grads["z"], torch.zeros_like(z))


# ----------------------------------------------------------------------------------------------
# cross-cutting
# ----------------------------------------------------------------------------------------------
@needs_triton
def test_public_api_both_backends_one_step():
    """One DMTG step through the public API on each backend, same inputs and seed."""
    N, K, B = 9, 3, 33
    S = _randn(N, K, seed=41)
    logits = _randn(K, N, B, 2, seed=42)
    target = torch.randint(0, 2, (B, N), generator=_gen(43)).to(DEVICE)
    res = {}
    for backend in ("reference", "triton"):
        ops.set_backend(backend)
        S_l = S.clone().requires_grad_(True)
        x_l = logits.clone().requires_grad_(True)
        z = ops.gumbel_softmax_mask(S_l, torch.tensor(1.0, device=DEVICE), torch.tensor(5, device=DEVICE))
        total, L = ops.grouped_ce_loss(x_l, target, z)
        total.backward()
        res[backend] = (total.detach(), L, S_l.grad, x_l.grad)
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
def test_non_contiguous_inputs():
    K, N, B, C = 3, 9, 7, 2
    base = _randn(N, K, B, C, seed=51)
    logits = base.transpose(0, 1)  # (K, N, B, C), non-contiguous
    target = torch.randint(0, C, (N, B), generator=_gen(52)).to(DEVICE).t()  # (B, N) view
    z = torch.rand(K, N, generator=_gen(53)).to(DEVICE).t()
    assert not logits.is_contiguous() and not target.is_contiguous()
    _compare(ops.grouped_ce_loss, dict(logits=logits, target=target, z=z), ["logits", "z"], torch.float32)


def _opcheck_cases():
    d = DEVICE
    S = _randn(9, 5, seed=61)
    yield "gumbel_mask", (S, None, 0.7, torch.tensor(3, device=d), False)
    yield "gumbel_mask", (S, torch.tensor(0.7, device=d), 1.0, torch.tensor(3, device=d), True)
    yield "grouped_ce", (_randn(3, 9, 7, 2, seed=62), torch.randint(0, 2, (7, 9), generator=_gen(1)).to(d),
                         torch.rand(9, 3, generator=_gen(2)).to(d))
    yield "grouped_bce", (_randn(3, 9, 7, seed=63), torch.randint(0, 2, (7, 9), generator=_gen(3)).to(d),
                          torch.rand(9, 3, generator=_gen(4)).to(d))
    yield "masked_l1", (_randn(3, 2, 3, 5, 7, seed=64), _randn(2, 3, 5, 7, seed=65),
                        (torch.rand(2, 1, 5, 7, generator=_gen(5)) > 0.5).to(d), torch.rand(3, generator=_gen(6)).to(d))
    yield "masked_l1", (_randn(3, 2, 3, 5, 7, seed=66), _randn(2, 3, 5, 7, seed=67), None,
                        torch.rand(3, generator=_gen(7)).to(d))
    yield "ce_ignore", (_randn(3, 2, 6, 5, 7, seed=68), torch.randint(0, 6, (2, 5, 7), generator=_gen(8)).to(d),
                        torch.rand(3, generator=_gen(9)).to(d), 0)


@needs_triton
@pytest.mark.parametrize("case", list(range(7)))
def test_opcheck(case):
    name, args = list(_opcheck_cases())[case]
    diff_idx = {"gumbel_mask": [0], "grouped_ce": [0, 2], "grouped_bce": [0, 2], "masked_l1": [0, 3],
                "ce_ignore": [0, 2]}[name]
    args = tuple(a.requires_grad_(True) if i in diff_idx else a for i, a in enumerate(args))
    op = getattr(torch.ops.fastdmtg, name).default
    torch.library.opcheck(op, args)


@needs_triton
def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the custom ops (fwd + bwd), one small case."""
    torch._dynamo.reset()
    ops.set_backend("triton")
    N, K, B = 9, 3, 7

    def step(S, logits, target, seed, tau):
        z = ops.gumbel_softmax_mask(S, tau, seed)
        total, L = ops.grouped_ce_loss(logits, target, z)
        return total, L, z

    S = _randn(N, K, seed=71)
    logits = _randn(K, N, B, 2, seed=72)
    target = torch.randint(0, 2, (B, N), generator=_gen(73)).to(DEVICE)
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
