"""Progressive head pruning (issue 8, docs/pruning.md): the decision rule on scripted probability
trajectories, exactness of the loss/forward with dropped heads, no compute for dropped heads,
ε = 0 ≡ no pruning, resume, the exported model of a pruned run."""
import json

import pytest
import torch
from torch import nn

from fastdmtg.config import Config, ConfigError, GroupingConfig, apply_overrides, get_recipe
from fastdmtg.methods import HeadsPruned, StepContext
from fastdmtg.methods.dmtg import DMTG, DMTGConfig
from fastdmtg.methods.dmtg_pruning import (active_probabilities, branch_alive, head_steps, per_part_flops, prune_update,
                                             training_flops)
from fastdmtg.models.multibranch import ModuleHeads, MultiBranchNet
from fastdmtg.step import StepModule, StepRunner
from fastdmtg.tasks.taskonomy import TaskonomyTaskSet
from fastdmtg.train import TrainingInterrupted, train

FAST = ["train.tensorboard=false", "train.progress=false"]


def run_rule(S_over_tau, eps, patience, active=None):
    """Feed a sequence of S/τ (N, K) through the rule; return {(i, k): step} and the final state."""
    n, k = S_over_tau[0].shape
    active = torch.ones(n, k, dtype=torch.bool) if active is None else active
    below = torch.zeros(n, k, dtype=torch.long)
    dropped = {}
    for t, x in enumerate(S_over_tau, start=1):
        p = active_probabilities(torch.as_tensor(x, dtype=torch.float64), 1.0, active)
        active, below, events = prune_update(p, active, below, eps, patience)
        for i, j, prob in events:
            assert prob < eps
            dropped[(i, j)] = t
    return dropped, active, below


def logits_for(p_rows):
    """S/τ giving exactly these probabilities (log p)."""
    return torch.tensor(p_rows, dtype=torch.float64).log()


def test_rule_drops_after_patience_and_resets_when_probability_rises():
    lo, hi = [0.05, 0.475, 0.475], [0.2, 0.4, 0.4]
    # task 0: below ε at steps 1,2 then above (reset) then below at 4,5,6 -> dropped at 6
    # task 1: below ε from step 1 -> dropped at step 3
    traj = [logits_for([lo, lo]), logits_for([lo, lo]), logits_for([hi, lo]),
            logits_for([lo, lo]), logits_for([lo, lo]), logits_for([lo, lo]), logits_for([lo, lo])]
    dropped, active, _ = run_rule(traj, eps=0.1, patience=3)
    assert dropped == {(1, 0): 3, (0, 0): 6}
    assert active.tolist() == [[False, True, True], [False, True, True]]
    assert branch_alive(active).tolist() == [False, True, True]          # nobody can choose branch 0


def test_probabilities_renormalise_over_active_heads():
    S = torch.tensor([[0.0, 1.0, 2.0]])
    a = torch.tensor([[False, True, True]])
    p = active_probabilities(S, 2.0, a)
    assert p[0, 0] == 0 and torch.allclose(p[0, 1:], torch.softmax(S[0, 1:].double() / 2.0, 0))
    full = active_probabilities(S, 2.0, torch.ones_like(a))
    assert torch.allclose(full, torch.softmax(S.double() / 2.0, 1))


def test_rule_never_drops_the_last_head_of_a_task():
    # ε above 1/K: every head of the task is below ε -> the most probable one (lowest k on ties) stays
    traj = [logits_for([[0.45, 0.55]])] * 4
    dropped, active, _ = run_rule(traj, eps=0.6, patience=2)
    assert dropped == {(0, 0): 2} and active.tolist() == [[False, True]]
    traj = [logits_for([[0.5, 0.5]])] * 3
    dropped, active, _ = run_rule(traj, eps=0.6, patience=1)
    assert dropped == {(0, 1): 1} and active.tolist() == [[True, False]]
    # a single remaining head has p = 1 and is never dropped, whatever its logit
    dropped, active, _ = run_rule([logits_for([[1e-9, 1.0]])] * 5, eps=0.5, patience=1,
                                  active=torch.tensor([[True, False]]))
    assert dropped == {} and active.tolist() == [[True, False]]


def test_branch_dropped_once_no_task_can_choose_it():
    # two tasks, K=3: both move away from branch 2, at different times
    a = [0.5, 0.45, 0.05]
    b = [0.45, 0.5, 0.05]
    mid = [0.4, 0.4, 0.2]
    traj = [logits_for([a, mid]), logits_for([a, mid]), logits_for([a, b]), logits_for([a, b])]
    dropped, active, _ = run_rule(traj, eps=0.1, patience=2)
    assert dropped == {(0, 2): 2, (1, 2): 4}
    assert branch_alive(active).tolist() == [True, True, False]


def test_rule_on_hand_states():
    """prune_update on given probabilities and counters (no softmax in between): the threshold is
    strict (p = ε exactly is not below ε), the counters of dropped heads stay as they were, and the
    "keep the best head" exception applies only when *every* active head of the task qualifies."""
    # p = ε exactly: not below, counter reset; the other head counts on
    a = torch.ones(1, 2, dtype=torch.bool)
    act, below, ev = prune_update(torch.tensor([[0.25, 0.75]]), a, torch.tensor([[3, 0]]), 0.25, 1)
    assert act.tolist() == [[True, True]] and below.tolist() == [[0, 0]] and ev == []
    # task 0: head 0 qualifies (counter reaches patience 2) while heads 1, 2 are below ε but not yet
    # for long enough -> head 0 is dropped although it is the most probable (not every head qualifies);
    # task 1: a dropped head's counter is frozen; both active heads qualify -> the more probable stays
    probs = torch.tensor([[0.4, 0.35, 0.25], [0.0, 0.3, 0.7]], dtype=torch.float64)
    active = torch.tensor([[True, True, True], [False, True, True]])
    act, below, ev = prune_update(probs, active, torch.tensor([[1, 0, 0], [7, 1, 1]]), 0.8, 2)
    assert act.tolist() == [[False, True, True], [False, False, True]]
    assert below.tolist() == [[2, 1, 1], [7, 2, 2]]
    assert ev == [(0, 0, 0.4), (1, 1, 0.3)]
    assert act.dtype == torch.bool and below.dtype == torch.long
    # a counter already past the patience (a resumed run with a smaller patience) qualifies at once
    p = torch.tensor([[0.1, 0.9]], dtype=torch.float64)
    act, below, ev = prune_update(p, a, torch.tensor([[4, 0]]), 0.5, 2)
    assert act.tolist() == [[False, True]] and below.tolist() == [[5, 0]] and ev == [(0, 0, 0.1)]


def test_config_validation():
    with pytest.raises(ConfigError):
        DMTGConfig(prune_eps=1.5)
    with pytest.raises(ConfigError):
        DMTGConfig(prune_eps=0.1, prune_patience=0)
    with pytest.raises(ConfigError, match="needs grouping.method=dmtg"):
        Config(grouping=GroupingConfig(method="naive-mtl"), dmtg=DMTGConfig(prune_eps=0.1))
    with pytest.raises(ConfigError):
        DMTGConfig(prune_eps=0.1, hard=True)


# ------------------------------------------------------------------ model/loss with dropped heads
class Counting(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.calls = m, 0

    def forward(self, x):
        self.calls += 1
        return self.m(x)


TX = ["segment_semantic", "depth_zbuffer", "keypoints2d"]


def tiny_taskonomy(k=3):
    torch.manual_seed(0)
    ts = TaskonomyTaskSet(TX)
    heads = ModuleHeads([Counting(nn.Conv2d(4, s.out_channels, 1)) for s in ts.specs])
    model = MultiBranchNet(nn.Conv2d(3, 4, 3, padding=1), Counting(nn.Conv2d(4, 4, 3, padding=1)), heads, k)
    b, h = 2, 8
    batch = {"image": torch.randn(b, 3, h, h),
             "targets": {"segment_semantic": torch.randint(0, 18, (b, h, h)),
                         "depth_zbuffer": torch.randn(b, 1, h, h), "keypoints2d": torch.randn(b, 1, h, h)},
             "mask": torch.rand(b, 1, h, h) > 0.3}
    return ts, model, batch


def test_dropped_heads_get_no_compute_and_no_gradient():
    ts, model, batch = tiny_taskonomy()
    mask = torch.tensor([[True, False, False], [True, True, False], [False, True, False]])   # branch 2 dead
    model.set_active(mask)
    model.train()
    out = model(batch["image"])
    assert [o.shape[0] for o in out] == [1, 2, 1]
    calls = [[model.heads[k].heads[i].calls for k in range(3)] for i in range(3)]
    assert calls == mask.int().tolist()                                   # each active head once, no other
    assert [model.branches[k].calls for k in range(3)] == [1, 1, 0]
    z = torch.softmax(torch.randn(3, 3), 1) * mask
    z = z / z.sum(1, keepdim=True)
    total, L = ts.head_losses(out, batch, z, active=model.task_branches)
    total.backward()
    assert all(p.grad is None for p in model.branches[2].parameters())
    assert all(p.grad is None for p in model.heads[1].heads[0].parameters())
    # exact: the same losses as the full K·N forward at the active heads
    model.set_active(None)
    with torch.no_grad():
        full_total, full_L = ts.head_losses(model(batch["image"]), batch, z)
    assert torch.allclose(total.detach(), full_total, rtol=1e-6)
    assert torch.allclose(L, full_L * mask, rtol=1e-6)
    # evaluation mode computes every head (the argmax model reads any branch)
    model.set_active(mask)
    model.eval()
    assert all(o.shape[0] == 3 for o in model(batch["image"]))


def test_weights_restricted_to_active_heads_and_dropped_logits_frozen():
    g = DMTGConfig(tau=2.0, prune_eps=0.1, prune_patience=1)
    m = DMTG(2, 3, g)
    with torch.no_grad():
        m.logits.copy_(torch.tensor([[0.0, 5.0, 4.0], [5.0, 0.0, 1.0]]))
    ref = DMTG(2, 3, g)
    ref.load_state_dict(m.state_dict())
    z_full = ref.weights()
    (decision,) = m.observe_step(StepContext(global_step=0, epoch=0))   # S/τ → p(0,0) ≈ 0.02 < 0.1: dropped at once
    assert isinstance(decision, HeadsPruned) and decision.step == 1 and decision.mask.tolist() == [
        [False, True, True], [True, False, True]]
    assert m.prune_active.tolist() == [[False, True, True], [True, False, True]]
    z = m.weights()                            # the same noise (seed state) as z_full
    a = m.prune_active
    assert torch.allclose(z, z_full * a / (z_full * a).sum(1, keepdim=True), atol=1e-6)
    (z * torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])).sum().backward()
    assert torch.all(m.logits.grad[~a] == 0) and torch.any(m.logits.grad[a] != 0)
    assert m.assignment().tolist() == [1, 0]
    # the mask is saved state
    m2 = DMTG(2, 3, g)
    m2.load_state_dict(m.state_dict())
    assert m2.head_mask().tolist() == a.tolist() and m2.prune_events() == m.prune_events()


def test_step_runner_invalidate_and_stacked_layout():
    from fastdmtg.models.multibranch import LinearHeads
    from fastdmtg.tasks.attributes import AttributeTaskSet
    ts = AttributeTaskSet(["a", "b"])
    model = MultiBranchNet(nn.Identity(), nn.Flatten(), LinearHeads(2, 12, 2), 3)
    g = DMTGConfig(prune_eps=0.1, prune_patience=1)
    m = DMTG(2, 3, g)
    with torch.no_grad():
        m.prune_active.copy_(torch.tensor([[True, True, False], [True, True, False]]))
    m._refresh()
    model.set_active(m.head_mask())
    sm = StepModule(model, m, ts, autocast=lambda: torch.autocast("cpu", enabled=False))
    opt = torch.optim.SGD(list(model.parameters()) + list(m.parameters()), lr=0.1)
    runner = StepRunner(sm, opt)
    batch = {"image": torch.randn(4, 3, 2, 2), "labels": torch.randint(0, 2, (4, 2))}
    total, L = runner(batch)
    assert torch.all(L[:, 2] == 0) and torch.all(L[:, :2] > 0)
    assert all(p.grad is None for p in model.heads[2].parameters())
    runner.graph, runner.eager_steps = object(), 5
    runner.invalidate()
    assert runner.graph is None and runner.eager_steps == 0


# ------------------------------------------------------------------ whole runs
def small_cfg(extra=()):
    return apply_overrides(get_recipe("synthetic_k3"), FAST + [
        "data.synthetic_train=600", "data.synthetic_val=200", "data.synthetic_test=200",
        "train.epochs=3", "train.batch_size=64", "model.width=4", *extra])


def test_pruning_on_but_never_triggered_equals_no_pruning(tmp_path):
    """ε = 0 is off (the same code path); a positive ε that never triggers gives the same run."""
    off = train(small_cfg(["train.epochs=2"]), tmp_path / "off")
    on = train(small_cfg(["train.epochs=2", "dmtg.prune_eps=1e-30", "dmtg.prune_patience=5"]),
               tmp_path / "on")
    assert on["pruning"]["events"] == [] and on["pruning"]["head_step_fraction"] == 1.0
    assert on["assignment"] == off["assignment"] and on["probabilities"] == off["probabilities"]
    assert on["test"]["loss"] == off["test"]["loss"]


def test_resume_with_pruning_is_exact(tmp_path):
    extra = ["dmtg.tau=0.05", "dmtg.prune_eps=0.2", "dmtg.prune_patience=3"]
    full = train(small_cfg(extra), tmp_path / "full")
    assert full["pruning"]["events"], "the settings are meant to prune"
    with pytest.raises(TrainingInterrupted):
        train(small_cfg(extra), tmp_path / "cut", stop_after_steps=13)
    resumed = train(small_cfg(extra), tmp_path / "cut", resume=True)
    assert resumed["pruning"] == full["pruning"]
    assert resumed["assignment"] == full["assignment"]
    for t in full["test"]["loss"]:
        assert resumed["test"]["loss"][t] == pytest.approx(full["test"]["loss"][t], rel=1e-5)
    hist = json.loads((tmp_path / "full" / "history.json").read_text())
    logged = [e for h in hist for e in h["pruned"]]
    assert [(e["task"], e["branch"], e["step"]) for e in logged] == \
        [(e["task"], e["branch"], e["step"]) for e in full["pruning"]["events"]]
    # the kept head of every task is still active, and every task keeps at least one head
    act = torch.tensor(full["pruning"]["active"])
    assert act.any(1).all()
    assert all(act[i, a] for i, a in enumerate(full["assignment"]))
    # the exported pruned model (argmax over active heads) reproduces the run's test evaluation
    from fastdmtg import load_grouped
    from fastdmtg.config import Config
    from fastdmtg.pipelines import build_source
    from fastdmtg.train import evaluate
    model, _ = load_grouped(tmp_path / "full")
    data = build_source(Config.load(tmp_path / "full" / "config.json").data, progress=False)
    got = evaluate(model, data.taskset, data, "test", 500, "cpu")
    for t in full["test"]["loss"]:
        assert got["loss"][t] == pytest.approx(full["test"]["loss"][t], rel=1e-5, abs=1e-6)


def test_training_flops_accounting():
    parts = {"shared": 10.0, "branch": 100.0, "heads": [50.0, 50.0]}
    never = torch.full((2, 2), -1)
    r = training_flops(parts, never, total_steps=10, batch_size=1, backward_factor=1.0)
    assert r["ratio"] == 1.0 and r["full"] == (10 + 200 + 200) * 10
    st = torch.tensor([[-1, 5], [-1, 5]])                                   # branch 1 dead after step 5
    r = training_flops(parts, st, total_steps=10, batch_size=1, backward_factor=1.0)
    assert r["pruned"] == 10 * 10 + 100 * (10 + 5) + 50 * (10 + 5 + 10 + 5)
    # unequal heads, a drop step past the end (clamped), a branch kept alive by its later head,
    # batch size and the backward factor (each 3: a rule that ignored either could not pass)
    parts = {"shared": 10.0, "branch": 100.0, "heads": [50.0, 70.0]}
    st = torch.tensor([[-1, 4], [12, 6]])                       # head steps 10, 4 / 10, 6; branches 10, 6
    r = training_flops(parts, st, total_steps=10, batch_size=3, backward_factor=3.0)
    per_sample = 10 * 10 + 100 * (10 + 6) + 50 * (10 + 4) + 70 * (10 + 6)            # 3520
    assert r["pruned"] == pytest.approx(9 * per_sample) and r["full"] == pytest.approx(9 * 4500)
    assert r["ratio"] == pytest.approx(3520 / 4500)
    assert r["head_share"] == pytest.approx(240 / 450)
    # defaults: forward + backward = 3 × forward; a drop step of 0 means the head never ran (steps 1..0)
    assert training_flops(parts, st, total_steps=10, batch_size=1)["full"] == pytest.approx(3 * 4500)
    assert head_steps(torch.tensor([[0, -1, 3]]), 10).tolist() == [[0, 10, 3]]


def test_per_part_flops_by_hand(capsys):
    """Forward FLOPs per sample of the trunk, one branch and each head, against 2·MACs by hand:
    a convolution costs 2·C_out·C_in·k²·H·W, a linear layer 2·in·out (biases are not counted).
    Nothing is printed (the counter's table stays off)."""
    s = 8
    heads = ModuleHeads([nn.Conv2d(5, 2, 1), nn.Conv2d(5, 7, 3, padding=1)])          # unequal heads
    model = MultiBranchNet(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 1), heads, 3)
    model.train()
    parts = per_part_flops(model, s)
    assert parts == {"shared": 2 * 4 * 3 * 9 * s * s, "branch": 2 * 5 * 4 * s * s,
                     "heads": [2 * 2 * 5 * s * s, 2 * 7 * 5 * 9 * s * s]}
    assert model.training                                          # the mode is restored
    # stacked heads: one batched matmul for all N heads, split evenly
    from fastdmtg.models.multibranch import LinearHeads
    model = MultiBranchNet(nn.Identity(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6)),
                           LinearHeads(3, 6, 2), 1)                                  # K = 1
    model.eval()
    parts = per_part_flops(model, 4)
    assert parts == {"shared": 0, "branch": 2 * 48 * 6, "heads": [2 * 6 * 2] * 3}
    assert not model.training
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ batched branches with dead branches
def _pair(k=3, n=4, seed=0):
    from fastdmtg.config import ModelConfig
    from fastdmtg.models import build_multibranch
    from fastdmtg.models.batched import BatchedMultiBranchNet
    from fastdmtg.tasks.attributes import AttributeTaskSet
    torch.manual_seed(seed)
    specs = AttributeTaskSet([f"t{i}" for i in range(n)]).specs
    mb = build_multibranch(ModelConfig(branches=k, width=8, shared="stem"), specs, 32)
    for p in mb.parameters():                                   # branches must differ for the test to bite
        p.data.add_(0.1 * torch.randn_like(p))
    return mb, BatchedMultiBranchNet(mb)


def test_batched_live_branches_equal_per_branch_pruned_forward():
    """A dead branch (here the middle one, so blocks really move) is not computed by the batched net:
    outputs, gradients, BN statistics and the optimizer (Adam state permuted with the blocks) follow
    the per-branch pruned model exactly; conversion back and state-dict reload keep the layout."""
    from fastdmtg.models.batched import BatchedMultiBranchNet, BlockConv2d
    mb, bt = _pair()
    x = torch.rand(6, 3, 32, 32)
    opt_a = torch.optim.Adam(mb.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(bt.parameters(), lr=1e-2)
    g = torch.randn(3, 4, 6, 2)
    mask = torch.tensor([[True, False, True], [True, False, False], [False, False, True], [True, False, True]])
    for step in range(4):
        if step == 2:                                           # branch 1 dies after two full steps
            mb.set_active(mask)
            bt.set_active(mask, optimizer=opt_b)
            assert bt.branch_slot.tolist() == [0, 2, 1] and bt.live == 2
        live_g = g * (mask.any(0)[:, None, None, None] if step >= 2 else 1)
        for model, opt in ((mb, opt_a), (bt, opt_b)):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            (out * live_g).sum().backward()
            opt.step()
        torch.testing.assert_close(mb(x) * (live_g != 0), bt(x), rtol=1e-4, atol=1e-5)   # training mode
    # the dead branch's slot is zeros and its convolutions ran on 2 of 3 blocks
    seen = []
    conv = next(m for m in bt.branch.modules() if isinstance(m, BlockConv2d))
    h = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    assert torch.all(bt(x)[1] == 0)
    mb(x)                                                       # the same BN-statistics updates on both
    h.remove()
    assert seen == [2 * conv.out_channels // 3]
    # live branches: same parameters and BN running statistics as the per-branch model
    back = bt.to_multibranch()
    for k in (0, 2):
        for (n1, t1), (n2, t2) in zip(mb.branches[k].state_dict().items(), back.branches[k].state_dict().items()):
            torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-5, msg=f"branch {k} {n1}")
        torch.testing.assert_close(mb.heads[k].weight, back.heads[k].weight, rtol=1e-4, atol=1e-5)
    # evaluation computes every branch, in logical order, like the per-branch model
    mb.eval(), bt.eval()
    torch.testing.assert_close(mb(x)[[0, 2]], bt(x)[[0, 2]], rtol=1e-4, atol=1e-5)
    # a fresh batched net loads the permuted state (layout included) and predicts the same
    fresh = BatchedMultiBranchNet(_pair()[0]).eval()
    fresh.load_state_dict(bt.state_dict())
    torch.testing.assert_close(fresh(x), bt(x))
    # re-applying the same mask (resume) moves nothing
    before = [t.clone() for t in bt.parameters()]
    bt.train()
    bt.set_active(mask, optimizer=opt_b)
    assert all(torch.equal(a, b) for a, b in zip(before, bt.parameters()))


def test_pruning_with_batched_branches_matches_per_branch_run(tmp_path):
    """model.batched=on composes with pruning: the same drops, groups and test losses as the
    per-branch run; interrupted after a branch died and resumed, the same result again."""
    # 2 tasks on 3 branches: the middle branch dies mid-run (at step 20 of 30), so blocks move
    extra = ["dmtg.tau=0.05", "dmtg.prune_eps=0.2", "dmtg.prune_patience=3",
             "data.synthetic_groups=2", "data.synthetic_tasks_per_group=1"]
    sep = train(small_cfg(extra + ["model.batched=off"]), tmp_path / "sep")
    bat = train(small_cfg(extra + ["model.batched=on"]), tmp_path / "bat")
    assert bat["speed"]["batched"] and not sep["speed"]["batched"]
    dead = [k for k in range(3) if not any(row[k] for row in bat["pruning"]["active"])]
    assert dead and min(dead) < 2, "the settings are meant to kill a branch that is not the last block"
    key = lambda r: [(e["task"], e["branch"], e["step"]) for e in r["pruning"]["events"]]
    assert key(bat) == key(sep)
    assert bat["assignment"] == sep["assignment"]
    for t in sep["test"]["loss"]:
        assert bat["test"]["loss"][t] == pytest.approx(sep["test"]["loss"][t], rel=1e-3, abs=1e-5)
    first_death = min(e["step"] for e in bat["pruning"]["events"] if e["branch"] in dead)
    with pytest.raises(TrainingInterrupted):
        train(small_cfg(extra + ["model.batched=on"]), tmp_path / "cut", stop_after_steps=first_death + 2)
    resumed = train(small_cfg(extra + ["model.batched=on"]), tmp_path / "cut", resume=True)
    assert key(resumed) == key(bat) and resumed["assignment"] == bat["assignment"]
    for t in bat["test"]["loss"]:
        assert resumed["test"]["loss"][t] == pytest.approx(bat["test"]["loss"][t], rel=1e-5, abs=1e-6)
