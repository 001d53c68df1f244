"""Gumbel-softmax grouping mask (fastdmtg/kernels/gumbel_mask.py): kernel vs reference, shared noise.

BLOCK_K = next_pow2(K) (K = 1, 2, 3, 5, 16), BLOCK_N = 1024 // BLOCK_K rows: N = 300 spans programs.
"""
import pytest
import torch

from fastdmtg import ops
from fastdmtg.kernels import gumbel_mask
from op_testing import BACKENDS, DEVICE, TRITON_OK, needs_triton, randn


@pytest.mark.parametrize("seed", [0, 1, 123456789012, -5, 2**62 + 7])
def test_philox_reference_is_bit_identical_to_tl_rand(seed):
    """The reference backend's PyTorch Philox must draw exactly the kernel's uniforms."""
    s = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    for n, k in [(1, 1), (9, 5), (300, 16)]:
        u_ref = gumbel_mask.philox_uniform(s, n, k)
        assert u_ref.shape == (n, k) and u_ref.dtype == torch.float32
        assert (u_ref >= 0).all() and (u_ref < 1).all()
        if TRITON_OK:
            u_tri = ops.gumbel_uniforms(s, n, k, DEVICE, backend="triton")
            assert torch.equal(u_tri, u_ref), (seed, n, k)


@needs_triton
@pytest.mark.parametrize("N", [1, 9, 40, 300])
@pytest.mark.parametrize("K", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("hard", [False, True])
def test_matches_reference_given_uniforms(N, K, hard):
    seed = torch.tensor(1000 + 17 * N + K, dtype=torch.int64, device=DEVICE)
    tau = torch.tensor(0.5 + 0.1 * K, device=DEVICE) if (N + K) % 2 else 0.5 + 0.1 * K
    S = randn(N, K, seed=N * 31 + K, scale=2.0)
    dZ = randn(N, K, seed=N * 37 + K + 1)  # same upstream gradient for both
    S_t = S.clone().requires_grad_(True)
    Z = ops.gumbel_softmax_mask(S_t, tau, seed, hard=hard, backend="triton")
    Z.backward(dZ)
    U = ops.gumbel_uniforms(seed, N, K, DEVICE, backend="triton")
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
def test_bf16_logits():
    N, K = 40, 5
    seed = torch.tensor(3, device=DEVICE)
    S = randn(N, K, seed=5, dtype=torch.bfloat16)
    dZ = randn(N, K, seed=6)
    S_t = S.clone().requires_grad_(True)
    Z = ops.gumbel_softmax_mask(S_t, 0.7, seed, backend="triton")
    Z.backward(dZ)
    S_r = S.clone().requires_grad_(True)
    Z_ref = ops.gumbel_softmax_from_uniform(S_r, ops.gumbel_uniforms(seed, N, K, DEVICE, backend="triton"), 0.7)
    Z_ref.backward(dZ)
    assert Z.dtype == torch.float32 and S_t.grad.dtype == torch.bfloat16
    torch.testing.assert_close(Z, Z_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S_t.grad.float(), S_r.grad.float(), rtol=0, atol=1e-2 * S_r.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_is_read_at_run_time(backend):
    S = randn(9, 5, seed=0)
    seed = torch.tensor(42, device=DEVICE)
    z0 = ops.gumbel_softmax_mask(S, 1.0, seed, backend=backend)
    z0_again = ops.gumbel_softmax_mask(S, 1.0, seed, backend=backend)
    seed.add_(1)  # what the trainer does in place every step
    z1 = ops.gumbel_softmax_mask(S, 1.0, seed, backend=backend)
    assert torch.equal(z0, z0_again)  # deterministic for a seed value
    assert not torch.allclose(z0, z1)  # a new seed value draws new noise


@needs_triton
def test_backends_agree():
    """Same seed -> same draw on both backends (the reference reproduces tl.rand)."""
    S = randn(40, 5, seed=1)
    seed = torch.tensor(77, device=DEVICE)
    for hard in (False, True):
        z_ref = ops.gumbel_softmax_mask(S, 0.5, seed, hard, backend="reference")
        z_tri = ops.gumbel_softmax_mask(S, 0.5, seed, hard, backend="triton")
        torch.testing.assert_close(z_tri, z_ref.detach(), rtol=1e-5, atol=1e-6)


# upper p = 1e-3 quantiles of chi2(df) (standard tables)
_CHI2_CRIT_1E3 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 7: 24.322, 15: 37.697}


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_frequencies_match_softmax(backend):
    """Gumbel-max: P(argmax_k Z = k) = softmax(S)_k for any tau. One launch, 16384 draws.

    Fixed seed -> deterministic; chi-square at p = 1e-3 (df = K - 1) over the argmax counts.
    """
    K, draws = 5, 16384
    s_row = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0], device=DEVICE)
    S = s_row.expand(draws, K).contiguous()  # repeated rows: each row is an independent draw
    Z = ops.gumbel_softmax_mask(S, 0.3, torch.tensor(2024, device=DEVICE), hard=True, backend=backend)
    counts = Z.sum(0).double().cpu()
    assert counts.sum().item() == draws
    expected = torch.softmax(s_row.double(), 0).cpu() * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < _CHI2_CRIT_1E3[K - 1], (chi2, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_forward_onehot_backward_soft(backend):
    N, K = 9, 3
    S = randn(N, K, seed=2)
    dZ = randn(N, K, seed=3)
    seed = torch.tensor(9, device=DEVICE)
    grads, outs = {}, {}
    for hard in (False, True):
        S_l = S.clone().requires_grad_(True)
        outs[hard] = ops.gumbel_softmax_mask(S_l, 0.4, seed, hard, backend=backend)
        outs[hard].backward(dZ)
        grads[hard] = S_l.grad
    hard_z, soft_z = outs[True].detach(), outs[False].detach()
    torch.testing.assert_close(hard_z, torch.nn.functional.one_hot(soft_z.argmax(1), K).float())
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-6, atol=1e-7)
