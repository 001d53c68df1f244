"""DMTG grouping weights and the weighted K·N-head loss, against hand-computed values."""
import math

import pytest
import torch

from fastdmtg import ops
from fastdmtg.methods.dmtg import DMTGConfig
from fastdmtg.methods.dmtg import DMTG
from fastdmtg.methods.naive import NaiveMTL
from fastdmtg.tasks.attributes import AttributeTaskSet


def test_gumbel_weights_rows_sum_to_one_and_grad_reaches_S():
    m = DMTG(5, 3, DMTGConfig(tau=2.5))
    z = m.weights()
    assert z.shape == (5, 3)
    assert torch.allclose(z.sum(1), torch.ones(5), atol=1e-6)
    assert (z > 0).all()
    L = torch.arange(15, dtype=torch.float32).view(5, 3)
    (z * L).sum().backward()
    # z = softmax((S + g)/τ) row-wise, so ∂(Σ_k z_k L_k)/∂S_j = z_j (L_j − Σ_k z_k L_k) / τ (τ = 2.5)
    zd = z.detach()
    want = zd * (L - (zd * L).sum(1, keepdim=True)) / 2.5
    torch.testing.assert_close(m.logits.grad, want, rtol=1e-5, atol=1e-6)


def test_initial_logits_are_one_and_noise_changes_each_step():
    m = DMTG(4, 3, DMTGConfig(tau=2.5, init_logit=1.0))
    assert torch.equal(m.logits.detach(), torch.ones(4, 3))
    z1, z2 = m.weights().detach(), m.weights().detach()
    assert not torch.allclose(z1, z2)          # the seed advanced: fresh noise
    m2 = DMTG(4, 3, DMTGConfig(tau=2.5, init_logit=1.0))
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
    m = DMTG(3, 4, DMTGConfig())
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
    # ∂total/∂logits[k, i, b] = z[i, k] / B · (softmax(logits[k, i, b]) − onehot(label))
    want = torch.zeros(2, 2, 2, 2)
    for k in range(2):
        for i in range(2):
            for b in range(2):
                row = logits[k, i, b].tolist()
                e = [math.exp(v) for v in row]
                for c in range(2):
                    want[k, i, b, c] = z[i, k].item() / 2 * (e[c] / sum(e) - (c == int(labels[b, i])))
    torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-7)


def test_tau_anneal_schedule():
    g = DMTGConfig(tau_schedule="anneal", tau_start=100, tau_end=4, tau_decay=0.5)
    m = DMTG(2, 2, g)
    assert [m.tau_at(e) for e in range(7)] == [100, 50, 25, 12.5, 6.25, 4, 4]
    m.on_epoch_start(2)
    assert float(m.tau) == 25


def test_initial_tau_is_the_first_epochs():
    """Before any epoch hook the method already samples at τ of epoch 0 (τ_start when annealing)."""
    g = DMTGConfig(tau_schedule="anneal", tau_start=100, tau_end=4, tau_decay=0.5)
    assert float(DMTG(2, 2, g).tau) == 100.0 and float(DMTG(2, 2, DMTGConfig(tau=2.5)).tau) == 2.5


def test_naive_mtl_weights_are_ones():
    m = NaiveMTL(4)
    assert torch.equal(m.weights(), torch.ones(4, 1))
    assert m.assignment().tolist() == [0, 0, 0, 0]
    assert list(m.parameters()) == []


def test_seed_derivation_and_ddp_noise_offsets():
    """The noise seed is part of reproducibility: seed s starts the counter at 7919·s + 17; under DDP
    ``per_rank`` rank r adds r·2^40 (its own draws), ``shared`` adds nothing (the same draw)."""
    g = DMTGConfig(tau=2.5)
    assert int(DMTG(2, 3, g).seed) == 17 and int(DMTG(2, 3, g, seed=2).seed) == 2 * 7919 + 17
    shared, per_rank = DMTGConfig(ddp_noise="shared"), DMTGConfig(ddp_noise="per_rank")
    a, b, c = DMTG(4, 3, per_rank), DMTG(4, 3, per_rank), DMTG(4, 3, shared)
    a.set_rank(0), b.set_rank(3), c.set_rank(3)
    assert a.seed_offset == 0 and b.seed_offset == 3 << 40 and c.seed_offset == 0
    za, zb, zc = a.weights().detach(), b.weights().detach(), c.weights().detach()
    assert torch.equal(za, zc) and not torch.allclose(za, zb)
    assert torch.equal(DMTG(4, 3, per_rank).weights().detach(), za)   # no set_rank: the base seed (rank 0)
    ref = DMTG(4, 3, shared)
    ref.seed.fill_(17 + (3 << 40))                             # rank 3's draw is the draw at seed + 3·2^40
    assert torch.equal(zb, ref.weights().detach())
    assert int(a.seed) == int(b.seed) == 18                  # one step = one counter value (resume, graphs)
    assert int(a.seed) + int(a.seed_offset) == 18 and int(b.seed) + b.seed_offset == 18 + (3 << 40)


def test_pruned_weights_stay_finite_when_the_dropped_head_dominates():
    """z over the active heads is renormalised; if the dropped head takes all the mass (its logit
    frozen high, τ small) the active heads' share underflows to 0 — the result stays finite."""
    g = DMTGConfig(tau=0.05, prune_eps=0.1, prune_patience=1)
    m = DMTG(1, 3, g)
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[200.0, 0.0, 0.0]]))
        m.prune_active.copy_(torch.tensor([[False, True, True]]))
    m._refresh()
    z = m.weights()
    assert torch.isfinite(z).all() and z[0, 0] == 0


def test_pruning_state_only_when_on_and_events_carry_the_step():
    """prune_eps = 0: no pruning state at all (the state dict of a run without pruning); > 0: no
    event before a drop; a drop after the trainer's global step g is recorded at step g + 1 (steps
    done), with its probability, and returned as the decision the trainer applies."""
    from fastdmtg.methods import StepContext
    off = DMTG(2, 3, DMTGConfig())
    assert not off.pruning and "prune_active" not in off.state_dict() and off.head_mask() is None
    assert off.prune_events() == []
    g = DMTGConfig(tau=2.0, prune_eps=0.1, prune_patience=1)
    m = DMTG(2, 3, g)
    assert m.pruning and m.prune_events() == [] and m.head_mask() is None
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[0.0, 5.0, 4.0], [5.0, 1.0, 0.0]]))
    assert m.observe_step(StepContext(global_step=4, epoch=0)) != []
    p = torch.softmax(m.logits.detach().double() / 2.0, 1)      # (0, 0) ≈ 0.049 and (1, 2) ≈ 0.067 < 0.1
    assert m.prune_events() == [{"task": 0, "branch": 0, "step": 5, "probability": pytest.approx(float(p[0, 0]))},
                                {"task": 1, "branch": 2, "step": 5, "probability": pytest.approx(float(p[1, 2]))}]
    # the decision the trainer applies: the drop step, the events and the new head mask
    m2 = DMTG(2, 3, g)
    m2.load_state_dict(DMTG(2, 3, g).state_dict())
    with torch.no_grad():
        m2.logits.copy_(m.logits)
    (d,) = m2.observe_step(StepContext(global_step=0, epoch=0))
    assert d.step == 1 and [(e["task"], e["branch"], e["step"]) for e in d.events] == [(0, 0, 1), (1, 2, 1)]
    assert d.mask.tolist() == m.head_mask().tolist() == [[False, True, True], [True, True, False]]
    assert m2.observe_step(StepContext(global_step=1, epoch=0)) == []          # nothing new to drop
    # the argmax model never reads a dropped head, even one whose (frozen) logit is the highest
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[9.0, 1.0, 2.0], [0.0, 1.0, 9.0]]))
    assert m.assignment().tolist() == [2, 1]
    with pytest.raises(RuntimeError, match="Missing key"):
        DMTG(2, 3, g).load_state_dict(off.state_dict())         # strict: pruning state missing


def test_pruning_state_buffers_start_as_nothing_dropped():
    """The checkpointed pruning state of a fresh model: every head active, no step below ε, drop step
    −1 (= never dropped, the encoding fastdmtg.methods.dmtg_pruning.head_steps reads), probability NaN."""
    m = DMTG(2, 3, DMTGConfig(prune_eps=0.1, prune_patience=2))
    sd = m.state_dict()
    assert sd["prune_active"].dtype == torch.bool and sd["prune_active"].all()
    assert torch.equal(sd["prune_below"], torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(sd["prune_step"], torch.full((2, 3), -1, dtype=torch.long))
    assert sd["prune_prob"].dtype == torch.float64 and sd["prune_prob"].isnan().all()


def test_annotations_resolve():
    """The annotations are valid types (strings until typing.get_type_hints or a tool evaluates them)."""
    import typing
    assert typing.get_type_hints(DMTG.head_mask) == {"return": torch.Tensor | None}
    assert typing.get_type_hints(DMTG.prune_events) == {"return": list[dict]}
    assert typing.get_type_hints(DMTG.log_scalars) == {"return": dict[str, float]}
    for f in (DMTG.__init__, DMTG.set_rank, DMTG.tau_at, DMTG.weights, DMTG.assignment, DMTG.observe_step,
              DMTG.probabilities):
        typing.get_type_hints(f)
