"""DMTG grouping weights and the weighted K·N-head loss, against hand-computed values."""
import math

import pytest
import torch

from fastdmtg import ops
from fastdmtg.config import GroupingConfig
from fastdmtg.methods.dmtg import DMTG
from fastdmtg.methods.naive import NaiveMTL
from fastdmtg.tasks.attributes import AttributeTaskSet


def test_gumbel_weights_rows_sum_to_one_and_grad_reaches_S():
    m = DMTG(5, 3, GroupingConfig(tau=2.5))
    z = m.weights()
    assert z.shape == (5, 3)
    assert torch.allclose(z.sum(1), torch.ones(5), atol=1e-6)
    assert (z > 0).all()
    L = torch.arange(15, dtype=torch.float32).view(5, 3)
    (z * L).sum().backward()
    assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0


def test_initial_logits_are_one_and_noise_changes_each_step():
    m = DMTG(4, 3, GroupingConfig(tau=2.5, init_logit=1.0))
    assert torch.equal(m.logits.detach(), torch.ones(4, 3))
    z1, z2 = m.weights().detach(), m.weights().detach()
    assert not torch.allclose(z1, z2)          # the seed advanced: fresh noise
    m2 = DMTG(4, 3, GroupingConfig(tau=2.5, init_logit=1.0))
    assert torch.allclose(m2.weights().detach(), z1)  # same seed → same draw (resumable)


def test_gumbel_softmax_formula_by_hand():
    S = torch.tensor([[1.0, 2.0, 0.5]])
    U = torch.tensor([[0.3, 0.6, 0.9]])
    tau = 2.5
    g = [-math.log(-math.log(u)) for u in U[0].tolist()]
    e = [math.exp((s + gi) / tau) for s, gi in zip(S[0].tolist(), g)]
    want = torch.tensor([[v / sum(e) for v in e]])
    got = ops.gumbel_softmax_from_uniform(S, U, torch.tensor(tau))
    assert torch.allclose(got, want, atol=1e-6)


def test_argmax_readout_and_probabilities():
    m = DMTG(3, 4, GroupingConfig())
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[0., 3., 1., 0.], [5., 0., 0., 0.], [0., 0., 0., 2.]]))
    assert m.assignment().tolist() == [1, 0, 3]
    p = m.probabilities()
    assert torch.allclose(p.sum(1), torch.ones(3))
    assert torch.allclose(p[1], torch.softmax(torch.tensor([5., 0., 0., 0.]), 0))


def test_weighted_loss_equals_hand_computed_sum():
    # K=2 branches, N=2 tasks, B=2 samples, 2-way logits
    logits = torch.tensor([
        [[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [3.0, 0.0]]],     # branch 0: task 0, task 1
        [[[0.0, 2.0], [1.0, 0.0]], [[0.5, 0.0], [0.0, 0.5]]],     # branch 1
    ], requires_grad=True)                                          # (K, N, B, C)
    labels = torch.tensor([[0, 1], [1, 0]])                         # (B, N)
    z = torch.tensor([[0.25, 0.75], [0.6, 0.4]])                    # (N, K)

    def ce(row, y):
        return math.log(sum(math.exp(v) for v in row)) - row[y]
    L = [[0.0, 0.0], [0.0, 0.0]]
    for k in range(2):
        for i in range(2):
            L[i][k] = sum(ce(logits[k, i, b].tolist(), int(labels[b, i])) for b in range(2)) / 2
    want_total = sum(z[i, k].item() * L[i][k] for i in range(2) for k in range(2))
    total, Lt = AttributeTaskSet(["a", "b"]).head_losses(logits, {"labels": labels}, z)
    assert Lt.shape == (2, 2)
    assert torch.allclose(Lt, torch.tensor(L), atol=1e-6)
    assert abs(total.item() - want_total) < 1e-6
    total.backward()
    assert logits.grad is not None


def test_tau_anneal_schedule():
    g = GroupingConfig(tau_schedule="anneal", tau_start=100, tau_end=4, tau_decay=0.5)
    m = DMTG(2, 2, g)
    assert [m.tau_at(e) for e in range(7)] == [100, 50, 25, 12.5, 6.25, 4, 4]
    m.on_epoch_start(2)
    assert float(m.tau) == 25


def test_naive_mtl_weights_are_ones():
    m = NaiveMTL(4)
    assert torch.equal(m.weights(), torch.ones(4, 1))
    assert m.assignment().tolist() == [0, 0, 0, 0]
    assert list(m.parameters()) == []
