"""Baselines (issue 7): the group-selection algorithms against hand-built matrices with known optima
(and branch-and-bound = DP = brute force on random small cases), TAG's lookahead affinity against a
direct computation with real optimizer steps, the ``networks`` method, and end-to-end comparisons
on the planted-group synthetic data."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from fastdmtg import grouping_search as gs
from fastdmtg.compare import compare_main, random_partition
from fastdmtg.config import Config, apply_overrides, get_recipe
from fastdmtg.pipelines import build_source
from fastdmtg.data.synthetic import planted_groups
from fastdmtg.methods import StepContext
from fastdmtg.methods.networks import NetworkGroups
from fastdmtg.partition import format_groups, parse_text, resolve_networks
from fastdmtg.methods.tag import TagAffinity, update_direction
from fastdmtg.models import build_multibranch
from fastdmtg.train import build_optimizer, train

FAST = ["--set", "train.tensorboard=false", "--set", "train.progress=false"]


def _sorted_groups(groups):
    return sorted(sorted(g) for g in groups)


# ----------------------------------------------------------------------------- partitions

@pytest.mark.parametrize("n,kmax", [(1, 1), (4, 4), (5, 2), (6, 3), (7, 7)])
def test_set_partitions_are_all_distinct_and_counted(n, kmax):
    parts = list(gs.set_partitions(n, kmax))
    assert len(parts) == gs.num_partitions(n, kmax)
    canon = {tuple(tuple(b) for b in sorted(p)) for p in parts}
    assert len(canon) == len(parts)
    for p in parts:
        assert sorted(t for b in p for t in b) == list(range(n)) and 1 <= len(p) <= kmax
    assert gs.num_partitions(4, 4) == 15 and gs.stirling2(9, 3) == 3025       # Bell(4), S(9,3)
    assert all(len(p) == 2 for p in gs.set_partitions(5, 2, 2))


# ----------------------------------------------------------------------------- TAG / HOA selection

def test_three_solvers_agree_on_random_small_cases():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, budget = int(rng.integers(2, 6)), int(rng.integers(1, 4))
        W, single = rng.normal(size=(n, n)), rng.normal(size=n)
        cands = gs.all_subsets(n)
        V = gs.mean_partner_values(W, single, cands)
        ex = gs.select_exhaustive(cands, V, n, budget)
        bb = gs.select_bnb(cands, V, n, budget)
        dp = gs.select_dp(W, single, budget)
        assert bb.optimal and dp.optimal
        assert bb.objective == pytest.approx(ex.objective, abs=1e-9), trial
        assert dp.objective == pytest.approx(ex.objective, abs=1e-9), trial
        for sel in (ex, bb, dp):
            assert len(sel.networks) <= budget
            assert sorted(t for p in sel.partition() for t in p) == list(range(n))
            # objective = Σ_t value of t in its serving network, recomputed from scratch
            vals = gs.mean_partner_values(W, single, sel.networks)
            assert sum(vals[sel.served[t], t] for t in range(n)) == pytest.approx(sel.objective, abs=1e-9)
    # the large-N path (B&B over a restricted candidate family) is feasible and never beats the
    # exact optimum over all subsets
    W = rng.normal(size=(7, 7))
    restricted = gs.select_networks(W, np.zeros(7), 3, exact_max_n=0)
    assert restricted.solver == "bnb" and len(restricted.networks) <= 3
    assert restricted.objective >= gs.select_dp(W, np.zeros(7), 3).objective - 1e-9


def test_mean_partner_values_by_hand():
    W = np.array([[0., 1., 2.], [3., 0., 4.], [5., 6., 0.]])        # W[u, t]: partner u onto task t
    V = gs.mean_partner_values(W, np.array([7., 8., 9.]), [(0,), (0, 1), (0, 1, 2)])
    assert V[0, 0] == 7 and np.isinf(V[0, 1:]).all()
    assert V[1, 0] == 3 and V[1, 1] == 1 and np.isinf(V[1, 2])
    assert V[2].tolist() == [(3 + 5) / 2, (1 + 6) / 2, (2 + 4) / 2]


def _block_affinity(groups, n, inside=0.05, across=-0.03, noise=0.0, seed=0):
    Z = np.full((n, n), across)
    for g in groups:
        for a in g:
            for b in g:
                Z[a, b] = inside
    return Z + noise * np.random.default_rng(seed).normal(size=(n, n))


def test_tag_selection_recovers_planted_blocks():
    planted = planted_groups(3, 3)
    Z = _block_affinity(planted, 9, noise=0.005)
    sel = gs.tag_select(Z, 3)
    assert _sorted_groups(sel.partition()) == _sorted_groups(planted) and not any(sel.auxiliary())
    # with one network only, all tasks together
    assert gs.tag_select(Z, 1).partition() == [list(range(9))]
    # large-N path (restricted candidates + B&B) on 12 tasks in 4 blocks
    blocks = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    big = gs.tag_select(_block_affinity(blocks, 12, noise=0.005), 4, exact_max_n=0)
    assert _sorted_groups(big.partition()) == blocks


def test_tag_selection_by_hand_overlap_and_singletons():
    # task 3 hurts and is hurt by everyone: alone (score 0) beats any partner (negative)
    Z = np.array([[0, .2, .1, -.3],
                  [.2, 0, .1, -.3],
                  [.1, .1, 0, -.3],
                  [-.3, -.3, -.3, 0]])
    sel = gs.tag_select(Z, 2)
    assert _sorted_groups(sel.partition()) == [[0, 1, 2], [3]]
    assert sel.info["total_affinity"] == pytest.approx(.15 + .15 + .1)
    # overlap: 0 and 1 help each other, 2 is helped most by 0 but 0 prefers 1 —
    # best with 2 networks: {0,1} serving 0,1 and {0,2} serving 2 (0 auxiliary there)
    Z = np.array([[0, .5, .4],
                  [.5, 0, -.2],
                  [-.1, -.1, 0]])
    sel = gs.tag_select(Z, 2)
    assert sel.networks == [(0, 1), (0, 2)] and sel.served == [0, 0, 1]
    assert sel.auxiliary() == [[], [0]] and sel.partition() == [[0, 1], [2]]
    assert sel.info["total_affinity"] == pytest.approx(.5 + .5 + .4)
    assert format_groups([list(s) for s in sel.networks], sel.served) == "0,1|+0,2"


def test_hoa_selection_by_hand():
    # 4 tasks: {0,1} and {2,3} are good pairs, cross pairs bad
    single = np.array([1.0, 1.0, 1.0, 1.0])
    pair = np.full((4, 4), 1.5)                       # pair[t, u]: loss of t trained with u
    pair[0, 1] = pair[1, 0] = 0.5
    pair[2, 3] = pair[3, 2] = 0.6
    sel = gs.hoa_select(single, pair, 2)
    assert _sorted_groups(sel.partition()) == [[0, 1], [2, 3]]
    assert sel.objective == pytest.approx(0.5 + 0.5 + 0.6 + 0.6)
    # one network: the 4-task estimate is the mean of each task's 3 pair losses
    one = gs.hoa_select(single, pair, 1)
    assert one.partition() == [[0, 1, 2, 3]]
    assert one.objective == pytest.approx(2 * (0.5 + 1.5 + 1.5) / 3 + 2 * (0.6 + 1.5 + 1.5) / 3)
    # three networks: a single never helps here (singles 1.0 > pair 0.5/0.6) → same as two
    assert gs.hoa_select(single, pair, 3).objective == pytest.approx(sel.objective)
    # a good single: task 3 alone (0.1) → best is {0,1}, {2,3} serving 2, {3}
    single[3] = 0.1
    s3 = gs.hoa_select(single, pair, 3)
    assert s3.objective == pytest.approx(0.5 + 0.5 + 0.6 + 0.1)
    assert _sorted_groups(s3.partition()) == [[0, 1], [2], [3]]
    # the diagonal of the pair table is meaningless and ignored (compare leaves it NaN)
    pair_nan = pair.copy()
    np.fill_diagonal(pair_nan, np.nan)
    assert gs.hoa_select(single, pair_nan, 3).objective == pytest.approx(s3.objective)
    pair_nan[0, 2] = np.nan                              # a missing pair result is an error
    with pytest.raises(ValueError, match="finite"):
        gs.hoa_select(single, pair_nan, 3)
    with pytest.raises(ValueError, match="shape"):
        gs.hoa_select(single[:1], pair, 3)


@pytest.mark.timeout(60)
def test_dp_tie_keeps_the_parts_own_network_and_n_over_16_is_refused(monkeypatch):
    """Part {0} costs 0 in its own network {0} and also 0 in {0, 1} (task 1 helping 0 for free);
    on that exact tie the DP keeps the smaller network (no helper task to train). By hand:
    v({0},0) = v({1},1) = 0, v({0,1},0) = W[1,0] = 0, v({0,1},1) = W[0,1] = 5 → two networks {0}, {1}
    (objective 0); with one network only {0, 1} (objective 5)."""
    W = np.array([[0.0, 5.0], [0.0, 0.0]])
    sel = gs.select_dp(W, np.zeros(2), 2)
    assert sel.networks == [(0,), (1,)] and sel.served == [0, 1] and sel.objective == 0.0
    assert not any(sel.auxiliary())
    one = gs.select_dp(W, np.zeros(2), 1)
    assert one.networks == [(0, 1)] and one.objective == 5.0
    # an improvement of 1e-15 (float noise) is no improvement: still a tie, still the own network
    W_eps = np.array([[0.0, 5.0], [-1e-15, 0.0]])
    assert gs.select_dp(W_eps, np.zeros(2), 2).networks == [(0,), (1,)]
    # one task: its own network, served at its single value (a hang here is a failure, not a stall)
    one_task = gs.select_dp(np.zeros((1, 1)), np.array([2.5]), 1)
    assert one_task.networks == [(0,)] and one_task.served == [0] and one_task.objective == 2.5
    # the exact DP is refused above 16 tasks (3^N), before any work; 16 tasks are accepted (the
    # DP starts: stopped at once here by a stand-in for its first step)
    with pytest.raises(ValueError, match=r"N = 17 is too large — use select_bnb"):
        gs.select_dp(np.zeros((17, 17)), np.zeros(17), 2)

    class Started(Exception):
        pass

    def stop(n):
        raise Started(n)
    monkeypatch.setattr(gs, "all_subsets", stop)
    with pytest.raises(Started):
        gs.select_dp(np.zeros((16, 16)), np.zeros(16), 2)


def test_dp_partition_tie_and_network_order_are_pinned():
    """Equal-cost optima: {0,1}|{2} and {0}|{1,2} both cost 2 (pairs 1 + 1, singles 0; {0,2} costs
    5 + 5). The DP returns the first it enumerates, {0,1}|{2} — pinned, so that a change of the
    enumeration cannot silently change the groups returned for the same matrices. Networks are
    ordered by their smallest served task, whatever order the solver found them in."""
    W = np.array([[0.0, 1.0, 5.0], [1.0, 0.0, 1.0], [5.0, 1.0, 0.0]])
    sel = gs.select_dp(W, np.zeros(3), 2)
    assert sel.networks == [(0, 1), (2,)] and sel.served == [0, 0, 1] and sel.objective == 2.0
    # exhaustive search over singletons listed as {1}, {0}, {2}: the only cover uses all three
    V = np.array([[np.inf, 0.5, np.inf], [0.25, np.inf, np.inf], [np.inf, np.inf, 0.75]])
    ex = gs.select_exhaustive([(1,), (0,), (2,)], V, 3, 3)
    assert ex.networks == [(0,), (1,), (2,)] and ex.served == [0, 1, 2] and ex.objective == 1.5




def test_bnb_node_limit_is_anytime():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(8, 8))
    cands = gs.all_subsets(8)
    V = gs.mean_partner_values(W, np.zeros(8), cands)
    cut = gs.select_bnb(cands, V, 8, 3, max_nodes=5)
    assert not cut.optimal and len(cut.networks) <= 3
    assert sorted(t for p in cut.partition() for t in p) == list(range(8))


# ----------------------------------------------------------------------------- BMTN

def test_rank_spearman_rdm():
    assert gs.rankdata(np.array([3., 1., 3., 2.])).tolist() == [3.5, 1., 3.5, 2.]
    assert gs.spearman(np.array([1., 2., 3., 4.]), np.array([10., 20., 25., 100.])) == pytest.approx(1.0)
    assert gs.spearman(np.array([1., 2., 3.]), np.array([3., 2., 1.])) == pytest.approx(-1.0)
    F = np.array([[1., 2., 3.], [2., 4., 6.], [3., 2., 1.], [0., 0., 0.]])
    R = gs.rdm(F)
    assert R[0, 1] == pytest.approx(0.0, abs=1e-12) and R[0, 2] == pytest.approx(2.0)
    assert R[3, 0] == pytest.approx(1.0) and np.allclose(np.diag(R), 0)    # constant features: uncorrelated
    rdms = np.stack([np.stack([R, R, 2 * R])])                               # (D=1, N=3, M, M)
    A = gs.rsa_affinity(rdms)
    assert np.allclose(A, 1.0)                                              # Spearman: scale-free


def test_bmtn_clustering_and_split_choice():
    N = 4
    A = np.full((3, N, N), 0.1)
    for d in range(3):
        A[d][np.ix_([0, 1], [0, 1])] = 0.9
        A[d][np.ix_([2, 3], [2, 3])] = 0.8
    A[0] = 0.95                                              # stem: every task alike (shallow features)
    part = [[0, 1], [2, 3]]
    # cost by hand: locations block/pool: mean(max dissim) = mean(0.1, 0.2) each; stem: 0.05 per cluster
    assert gs.bmtn_tree_cost(part, A, 0) == pytest.approx(0.05 + 0.15 + 0.15)
    assert gs.bmtn_tree_cost(part, A, 1) == pytest.approx(0.05 + 0.15 + 0.15)   # stem shared: same cost
    splits = {"none": {"shared_locations": 0, "shared_params": 0, "branch_params": 100},
              "stem": {"shared_locations": 1, "shared_params": 40, "branch_params": 60}}
    # no parameter budget: the two-group clustering, and the cheaper split on a cost tie
    r = gs.bmtn_select(A, 2, splits)
    assert _sorted_groups(r["groups"]) == part and r["split"] == "stem" and r["params"] == 160
    # a budget of 170 parameters: two unshared branches (200) no longer fit, the shared stem does
    assert gs.bmtn_select(A, 2, splits, budget=170)["split"] == "stem"
    # stem features that disagree make sharing the stem expensive: no sharing when it fits
    A2 = A.copy()
    A2[0] = A[1]
    r2 = gs.bmtn_select(A2, 2, splits, budget=200)
    assert r2["split"] == "none" and _sorted_groups(r2["groups"]) == part
    # the heuristic path (exhaustive_limit=0) finds the same blocks
    r3 = gs.bmtn_select(A2, 2, splits, budget=200, exhaustive_limit=0)
    assert _sorted_groups(r3["groups"]) == part and not r3["optimal"]


def test_bmtn_cost_reading_task_mean_vs_cluster_mean():
    """Three planted blocks with inside dissimilarity 0.4 and across 1.0: the per-task reading finds
    the blocks; the per-cluster reading prefers two singletons plus one big cluster (1.0/3 < 0.4)."""
    blocks = planted_groups(3, 3)
    A = np.zeros((1, 9, 9))
    for g in blocks:
        A[0][np.ix_(g, g)] = 0.6
    np.fill_diagonal(A[0], 1.0)
    splits = {"none": {"shared_locations": 0, "shared_params": 0, "branch_params": 1}}
    r = gs.bmtn_select(A, 3, splits)
    assert _sorted_groups(r["groups"]) == _sorted_groups(blocks) and r["cost"] == pytest.approx(0.4)
    degenerate = gs.bmtn_select(A, 3, splits, reduce="cluster")
    assert sorted(len(g) for g in degenerate["groups"]) == [1, 1, 7]
    assert degenerate["cost"] == pytest.approx(1.0 / 3)


def test_random_partition():
    for s in range(5):
        p = random_partition(9, 3, s)
        assert len(p) == 3 and all(p) and sorted(t for g in p for t in g) == list(range(9))
        assert p == random_partition(9, 3, s)
    assert len({json.dumps(random_partition(9, 3, s)) for s in range(5)}) > 1
    with pytest.raises(ValueError):
        random_partition(2, 3, 0)


# ----------------------------------------------------------------------------- TAG lookahead

@pytest.mark.parametrize("make,kw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True)),
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, betas=(0.8, 0.9))),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
])
def test_update_rule_matches_torch_optim(make, kw):
    from fastdmtg.methods.tag import optimizer_kind
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = make([p], **kw)
    for _ in range(3):                                   # build up optimizer state
        p.grad = torch.randn_like(p)
        opt.step()
    g = torch.randn_like(p)
    h = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
    want = update_direction(optimizer_kind(opt), p.detach().clone(), g, state, h)
    p.grad = g.clone()
    opt.step()
    assert torch.allclose(want, p.detach(), atol=1e-6, rtol=1e-5)


def _tiny_cfg(extra=()):
    return apply_overrides(get_recipe("synthetic_k3"), [
        "train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=256", "data.synthetic_val=64",
        "data.synthetic_test=64", "data.image_size=16", "model.width=2", "train.batch_size=64", *extra])


def _manual_affinity(model, optimizer, batch, taskset):
    """Z[i, j] by brute force: a copy of the model per task i, a real optimizer step (with the
    optimizer's state) on the encoder only, losses before/after in train mode."""
    from fastdmtg.methods.tag import encoder_param_names
    names = encoder_param_names(model)
    assert names and not any("head" in n for n in names)
    params = dict(model.named_parameters())
    state_by_name = {n: optimizer.state[params[n]] for n in names}
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    N = taskset.num_tasks
    Z = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        m = copy.deepcopy(model).train()
        mp = dict(m.named_parameters())
        opt = type(optimizer)([mp[n] for n in names], **{k: v for k, v in hyper.items()
                                                        if k not in ("initial_lr",)})
        for n in names:
            opt.state[mp[n]] = copy.deepcopy(state_by_name[n])
        out = m(batch["image"])                                    # (1, N, B, C)
        ce = [torch.nn.functional.cross_entropy(out[0, j], batch["labels"][:, j]) for j in range(N)]
        before = torch.stack(ce).detach().double()
        opt.zero_grad()
        ce[i].backward()
        opt.step()
        with torch.no_grad():
            out2 = m(batch["image"])
            after = torch.stack([torch.nn.functional.cross_entropy(out2[0, j], batch["labels"][:, j])
                                 for j in range(N)]).double()
        Z[i] = 1 - after / before
    return Z


@pytest.mark.parametrize("optim,batched", [("adam", False), ("sgd", False), ("adam", True)])
def test_tag_affinity_matches_direct_computation(optim, batched):
    cfg = _tiny_cfg(["grouping.method=tag-affinity", "model.branches=1", "tag.affinity_every=2",
                     f"optim.name={optim}", "optim.lr=0.05", "optim.momentum=0.9"])
    torch.manual_seed(0)
    data = build_source(cfg.data, progress=False)
    ts = data.taskset
    model = build_multibranch(cfg.model, ts.specs, data.image_size)
    if batched:                                             # the trainer's model.batched=on form
        from fastdmtg.models.batched import BatchedMultiBranchNet
        model = BatchedMultiBranchNet(model)
    method = TagAffinity.from_config(cfg, ts.num_tasks)
    opt = build_optimizer(cfg, list(model.parameters()), torch.device("cpu"))
    batches = list(data.batches("train", 64, shuffle=True, seed=0, epoch=0, train=True))
    ref = None
    for step in range(4):
        batch = batches[step]
        if step == 1:                                       # the state the measured step starts from
            ref = (copy.deepcopy(model), copy.deepcopy(opt))
            ref_opt = type(opt)(list(ref[0].parameters()), **{k: v for k, v in opt.param_groups[0].items()
                                                              if k != "params"})
            ref_opt.load_state_dict(opt.state_dict())
            want = _manual_affinity(ref[0], ref_opt, batch, ts)
        z = method.weights()
        total, _ = ts.head_losses(model(batch["image"]), batch, z)
        opt.zero_grad()
        total.backward()
        opt.step()
        bn_before = {n: b.clone() for n, b in model.named_buffers()}
        method.observe_step(StepContext(step, 0, batch, model, opt, ts))        # step = optimizer steps before
        for n, b in model.named_buffers():                  # the lookahead never touches BN statistics
            assert torch.equal(b, bn_before[n]), n
        if step == 1:
            assert int(method.affinity_count) == 1
            got = method.last
            assert torch.allclose(got, want, atol=2e-6, rtol=1e-4), (got, want)
            assert got.abs().max() > 1e-3                    # a real signal, not all zeros
    assert int(method.affinity_count) == 2                  # steps 1 and 3 (affinity_every=2)
    res = method.extra_results()
    assert res["tag_affinity_measurements"] == 2 and len(res["tag_affinity"]) == ts.num_tasks


def test_tag_affinity_method_refuses_k_gt_1():
    with pytest.raises(ValueError, match="model.branches=1"):
        _tiny_cfg(["grouping.method=tag-affinity", "model.branches=2"])


# ----------------------------------------------------------------------------- networks method

def test_networks_method_parse_weights_and_training(tmp_path):
    names = ["a", "b", "c", "d"]
    nets, served = resolve_networks(*parse_text("0,1,+2|2,3"), names)
    assert nets == [[0, 1, 2], [2, 3]] and served == [[0, 1], [2, 3]]
    m = NetworkGroups(nets, served, 4)
    assert m.weights().tolist() == [[1, 0], [1, 0], [1, 1], [0, 1]]
    assert m.assignment().tolist() == [0, 0, 1, 1]
    for bad, msg in (("0,1|1,2,3", "more than one"), ("0,+1|2,3", "no network serves"), ("0,0|1,2,3", "twice"),
                     ("0,x|1,2,3", "unknown task")):
        with pytest.raises(ValueError, match=msg):
            resolve_networks(*parse_text(bad), names)
    res = train(_tiny_cfg(["grouping.method=networks", "grouping.groups=0,1,+2|2,3", "model.branches=2",
                           "train.epochs=1"]), tmp_path / "net")
    assert res["assignment"] == [0, 0, 1, 1] and res["networks"] == [[0, 1, 2], [2, 3]]
    assert res["untrained_tasks"] == []
    pair = train(_tiny_cfg(["grouping.method=networks", "grouping.groups=1,3", "model.branches=1",
                            "train.epochs=1"]), tmp_path / "pair")
    assert pair["untrained_tasks"] == [0, 2]
    with pytest.raises(ValueError, match="set model.branches=2"):
        _tiny_cfg(["grouping.method=networks", "grouping.groups=0,1|2,3", "model.branches=3"])


# ----------------------------------------------------------------------------- end to end

def _rows(out):
    return {(r["method"], r["K"]): r for r in json.loads((out / "comparison.json").read_text())["rows"]}


def test_compare_planted_groups_dmtg_and_tag_beat_naive(tmp_path, capsys):
    """The synthetic_k3 recipe at 16 px (a few seconds per run): DMTG (seed 0), TAG and BMTN all
    recover the three planted groups and beat naive MTL by a wide margin. (HOA does too, but its 36
    pair networks are too slow for CI; see docs/baselines.md.)"""
    out = tmp_path / "cmp"
    args = ["--recipe", "synthetic_k3", "--methods", "naive,tag,dmtg,bmtn", "--k", "3", "--out", str(out),
            *FAST, "--set", "data.image_size=16", "--no-flops"]
    assert compare_main(args) == 0
    first = capsys.readouterr().out
    rows = _rows(out)
    planted = _sorted_groups([[f"g{g}_t{j}" for j in range(3)] for g in range(3)])
    assert _sorted_groups(rows[("dmtg", 3)]["groups"][0]) == planted
    assert _sorted_groups(rows[("tag", 3)]["groups"][0]) == planted
    assert _sorted_groups(rows[("bmtn", 3)]["groups"][0]) == planted
    naive = rows[("naive", None)]
    for m in ("dmtg", "tag", "bmtn"):
        assert rows[(m, 3)]["total_error"] < 0.5 * naive["total_error"]
        assert rows[(m, 3)]["normgain_error"] > 20 and rows[(m, 3)]["normgain_loss"] > 20
    assert rows[("tag", 3)]["rel_encoder_cost"] == pytest.approx(1 + 9 / 10 + 3)
    assert rows[("dmtg", 3)]["rel_encoder_cost"] == pytest.approx(3)
    # the affinity: within-group affinity above across-group affinity for every task
    Z = np.array(json.loads((out / "comparison.json").read_text())["details"]["tag_affinity"]["matrix"])
    for t in range(9):
        inside = [Z[u, t] for u in range(9) if u != t and u // 3 == t // 3]
        across = [Z[u, t] for u in range(9) if u // 3 != t // 3]
        assert min(inside) > max(across), t
    md = (out / "comparison.md").read_text()
    assert "Total error" in md and "Groupings" in md and "| tag | 3 |" in md
    # naive, tag affinity, tag K=3, stl, dmtg; BMTN's K=3 groups = TAG's: the same run, reused
    assert first.count("— training (") == 5 and "identical to tag/k3, reused" in first
    # resumable: a second invocation trains nothing
    assert compare_main(args) == 0
    again = capsys.readouterr().out
    assert "— training (" not in again and again.count("finished earlier, reused") == 5


def test_compare_all_methods_tiny(tmp_path, capsys):
    """Every method on a 4-task problem with a shared stem: runs, tables, STL's trunk override,
    HOA's pair networks, BMTN's split choice, RG seeds, the two-shot ablation."""
    out = tmp_path / "all"
    sets = ["data.synthetic_groups=2", "data.synthetic_tasks_per_group=2", "data.synthetic_train=256",
            "data.synthetic_val=128", "data.synthetic_test=128", "train.epochs=2", "train.batch_size=64",
            "data.image_size=16", "model.width=2", "model.shared=stem", "tag.affinity_every=2"]
    args = ["--recipe", "synthetic_k3", "--k", "2", "--rg-partitions", "2", "--out", str(out), *FAST,
            *[x for s in sets for x in ("--set", s)]]
    assert compare_main(args) == 0
    log = capsys.readouterr().out
    rows = _rows(out)
    for key in [("naive", None), ("stl", None), ("rg", 2), ("tag", 2), ("hoa", 2), ("bmtn", 2), ("dmtg", 2),
                ("dmtg two-shot (scratch)", 2), ("dmtg two-shot (naive init)", 2)]:
        assert key in rows and "error" not in rows[key], key
    stl_cfg = json.loads((out / "stl" / "config.json").read_text())
    assert stl_cfg["model"]["shared"] == "none" and stl_cfg["model"]["branches"] == 0 \
        and Config.from_dict(stl_cfg).num_branches == 4 and stl_cfg["grouping"]["groups"] == [[0], [1], [2], [3]]
    assert any("overridden to none" in n for n in rows[("stl", None)]["notes"])
    assert rows[("stl", None)]["rel_encoder_cost"] == pytest.approx(4)
    assert len(list((out / "hoa").glob("pair_*"))) == math.comb(4, 2)
    assert rows[("hoa", 2)]["runs"] == 1 + 6 + 1
    details = json.loads((out / "comparison.json").read_text())["details"]
    hoa = details["hoa_selection_k2"]
    assert math.isfinite(hoa["objective"]) and sorted(t for p in hoa["partition"] for t in p) == [0, 1, 2, 3]
    assert len(details["hoa_losses"]["single"]) == 4
    singles = details["hoa_losses"]["single"]
    stl_hist = json.loads((out / "stl" / "history.json").read_text())
    assert singles[1] == pytest.approx(min(h["val"]["loss"]["g0_t1"] for h in stl_hist))
    assert math.isfinite(details["tag_selection_k2"]["objective"])
    assert rows[("rg", 2)]["n"] == 2 and rows[("rg", 2)]["total_loss_std"] is not None
    bmtn_cfg = json.loads((out / "bmtn" / "k2" / "config.json").read_text())
    assert bmtn_cfg["model"]["shared"] in ("none", "stem")
    init_cfg = json.loads((out / "dmtg-two-shot" / "k2" / "naive-init" / "config.json").read_text())
    assert init_cfg["train"]["init_from"].endswith("naive") and init_cfg["grouping"]["method"] == "fixed"
    dm = rows[("dmtg", 2)]["groups"][0]
    assert rows[("dmtg two-shot (scratch)", 2)]["groups"][0] == dm
    for f in ("comparison.md", "comparison.csv", "groupings.csv", "per_task.csv"):
        assert (out / f).stat().st_size > 0
    g = (out / "groupings.csv").read_text().splitlines()
    assert g[0].startswith("method,K,g0_t0") and len(g) == 1 + 1 + 1 + 2 + 1 + 1 + 1 + 1 + 2
    assert "| stl |" in log and "Two" not in log.split("## Results")[0]


def test_compare_cli_errors(tmp_path, capsys):
    assert compare_main(["--out", str(tmp_path / "x"), "--methods", "naive,bogus"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert compare_main(["--out", str(tmp_path / "x"), "--set", "train.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
