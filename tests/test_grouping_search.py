"""The group-selection algorithms of the two-shot baselines (fastdmtg/grouping_search.py: TAG/HOA
network selection, partitions, RSA and the BMTN tree search) against hand-built matrices with known
optima, and branch and bound = DP = brute force on random small cases. Pure numpy, no training: the
mutation run of this module (benchmarks/mutation.py) uses this file alone."""
import numpy as np
import pytest

from fastdmtg import grouping_search as gs
from fastdmtg.data.synthetic import planted_groups
from fastdmtg.partition import format_groups


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
    assert sel.info["mean_affinity"] == pytest.approx((.15 + .15 + .1) / 4)
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
    assert ex.optimal and ex.solver == "exhaustive"
    # a tie between combinations: the first enumerated (fewest networks first) is kept —
    # {0,1} alone costs 2, as do {0} + {1} and {0} + {0,1}
    V = np.array([[1.0, np.inf], [np.inf, 1.0], [1.0, 1.0]])
    tie = gs.select_exhaustive([(0,), (1,), (0, 1)], V, 2, 2)
    assert tie.networks == [(0, 1)] and tie.objective == 2.0




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
    # a constant vector has no correlation: 0, not a division by zero
    assert gs.pearson(np.ones(3), np.array([1., 2., 3.])) == 0.0
    assert gs.spearman(np.array([1., 2., 3.]), np.full(3, 7.)) == 0.0


def _rdm_from_upper(upper):
    """(M=3) symmetric RDM with the upper triangle (0,1), (0,2), (1,2) = ``upper``, zero diagonal."""
    R = np.zeros((3, 3))
    R[np.triu_indices(3, k=1)] = upper
    return R + R.T


def test_rsa_affinity_by_hand():
    """Spearman correlation of the upper triangles, every off-diagonal entry (k = 1) included, by
    hand: [1, 2, 3] vs [3, 2, 1] → −1; vs [1, 3, 2] → centred (−1, 0, 1)·(−1, 1, 0) / 2 = 0.5;
    [3, 2, 1] vs [1, 3, 2] → centred (1, 0, −1)·(−1, 1, 0) / 2 = −0.5. Locations are independent."""
    rd = np.stack([_rdm_from_upper(u) for u in ([1., 2., 3.], [3., 2., 1.], [1., 3., 2.])])
    A = gs.rsa_affinity(np.stack([rd, rd[[1, 0, 2]]]))                     # (D=2, N=3, 3, 3)
    np.testing.assert_allclose(A[0], [[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [0.5, -0.5, 1.0]], atol=1e-12)
    np.testing.assert_allclose(A[1], [[1.0, -1.0, -0.5], [-1.0, 1.0, 0.5], [-0.5, 0.5, 1.0]], atol=1e-12)


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
    assert r["optimal"] and r["num_groups"] == 2                            # the exhaustive search
    # every (split, G = 1..max_groups) within the budget is a candidate, nothing else
    assert sorted((c["split"], c["num_groups"]) for c in r["candidates"]) == [
        ("none", 1), ("none", 2), ("stem", 1), ("stem", 2)]
    # costs equal to 12 decimals are a tie (float noise): still the cheaper split. Here the stem
    # shared costs 3e-13 more than unshared (the cross pairs' affinity lowered by 3e-13)
    A_noise = A.copy()
    A_noise[0][np.ix_([0, 1], [2, 3])] -= 3e-13
    A_noise[0][np.ix_([2, 3], [0, 1])] -= 3e-13
    costs = {c["split"]: c["cost"] for c in gs.bmtn_select(A_noise, 2, splits)["candidates"] if c["num_groups"] == 2}
    assert 1e-13 < costs["stem"] - costs["none"] < 1e-12
    assert gs.bmtn_select(A_noise, 2, splits)["split"] == "stem"
    # 5e-12 is more than float noise: the cheaper clustering wins whatever its parameter count
    A_more = A.copy()
    A_more[0][np.ix_([0, 1], [2, 3])] -= 5e-12
    A_more[0][np.ix_([2, 3], [0, 1])] -= 5e-12
    assert gs.bmtn_select(A_more, 2, splits)["split"] == "none"
    with pytest.raises(ValueError, match="no split point fits the parameter budget"):
        gs.bmtn_select(A, 2, splits, budget=99)
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


#: seeds of random 5-task affinities where complete linkage alone is not optimal and single-task
#: moves reach the exhaustive optimum (seed 16 needs a move to a later cluster and one to an earlier)
REFINED_SEEDS = (1, 9, 12, 16, 18)


def _random_affinity(seed, n=5, d=1):
    X = np.random.default_rng(seed).uniform(0, 1, size=(d, n, n))
    A = (X + X.transpose(0, 2, 1)) / 2
    for a in A:
        np.fill_diagonal(a, 1.0)
    return A


@pytest.mark.parametrize("seed", REFINED_SEEDS)
def test_bmtn_heuristic_refines_complete_linkage_to_the_optimum(seed):
    A = _random_affinity(seed)
    linked, _ = gs.agglomerate(1.0 - A[0], 2, np.max)
    groups, cost, exact = gs._best_partition(A, 0, 2, exhaustive_limit=0)
    best_groups, best_cost, proven = gs._best_partition(A, 0, 2, exhaustive_limit=10**6)
    assert not exact and proven
    assert cost < gs.bmtn_tree_cost(linked, A, 0) - 1e-6                    # the moves improved on linkage
    assert cost == pytest.approx(best_cost, abs=1e-12)
    assert _sorted_groups(groups) == _sorted_groups(best_groups) and len(groups) == 2


@pytest.mark.timeout(20)
def test_bmtn_heuristic_fully_shared_trunk_and_ties():
    """With every location in the shared trunk all clusterings cost the same (one cluster
    everywhere): complete linkage on the dissimilarity 1 − A summed over all locations decides, and
    no task moves on those equal costs (accepting a tie would move tasks back and forth forever).
    Pairs (0,1), (2,3): A = (0.9, 0.2) at the two locations → Σ(1 − A) = 0.9; (0,2), (1,3): (0.5, 0.5)
    → 1.0; (0,3), (1,2): 0.1 → 1.8. Linkage merges (0,1) then (2,3) — a transform other than 1 − A
    (1/A: 6.1 vs 4; A itself) would pick (0,2), (1,3) or (0,3), (1,2) instead. Cost: every task's
    largest dissimilarity is 0.9 at both locations → 1.8."""
    A = np.ones((2, 4, 4))
    for (a, b), v in {(0, 2): (0.9, 0.2), (1, 3): (0.9, 0.2), (0, 1): (0.5, 0.5), (2, 3): (0.5, 0.5),
                      (0, 3): (0.1, 0.1), (1, 2): (0.1, 0.1)}.items():
        A[:, a, b] = A[:, b, a] = v
    groups, cost, exact = gs._best_partition(A, 2, 2, exhaustive_limit=0)
    # (no dissimilarity at all would merge in index order: (0,1), (2,3))
    assert not exact and sorted(groups) == [[0, 2], [1, 3]] and cost == pytest.approx(1.8)


def test_bmtn_heuristic_links_on_the_branch_locations_only():
    """With a shared trunk (location 0 here) the clustering only pays at the branch locations, so
    linkage starts from those: on this random case it then reaches the exhaustive optimum, while
    linkage on all locations starts from {0,1,2,3}, {4} where no single move helps (cost 1.19)."""
    A = _random_affinity(0, n=5, d=2)
    groups, cost, _ = gs._best_partition(A, 1, 2, exhaustive_limit=0)
    best_groups, best_cost, _ = gs._best_partition(A, 1, 2, exhaustive_limit=10**6)
    assert cost == pytest.approx(best_cost, abs=1e-12) and sorted(groups) == [[0, 1, 4], [2, 3]]
    # two branch locations: linkage on Σ_d (1 − A[d]) reaches the optimum here; on Σ_d 1/A[d] or on
    # no dissimilarity at all (index order) it ends at {0,1,2,3}, {4}-like local optima (cost 1.04)
    A = _random_affinity(88, n=5, d=2)
    groups, cost, _ = gs._best_partition(A, 0, 2, exhaustive_limit=0)
    assert cost == pytest.approx(gs._best_partition(A, 0, 2, exhaustive_limit=10**6)[1], abs=1e-12)
    assert sorted(groups) == [[0, 1, 3, 4], [2]]


@pytest.mark.parametrize("seed,expected", [
    (8, [[0, 1, 3], [2, 5], [4]]),          # needs a move to a cluster after the first tried one
    (17, [[0, 4], [1, 2, 5], [3]]),         # linkage leaves singletons before tasks that must move
])
def test_bmtn_heuristic_three_groups(seed, expected):
    """Three groups (six random tasks): after an improving move the search restarts from the
    new clusters (it does not go on with the moved task's old cluster), and a singleton (which
    cannot move) does not stop the scan of the tasks after it. Both reach the exhaustive optimum."""
    A = _random_affinity(seed, n=6)
    groups, cost, _ = gs._best_partition(A, 0, 3, exhaustive_limit=0)
    assert cost == pytest.approx(gs._best_partition(A, 0, 3, exhaustive_limit=10**6)[1], abs=1e-12)
    assert groups == expected


def test_bmtn_exhaustive_limit_and_first_optimum_on_ties():
    A = np.full((1, 4, 4), 0.5)
    np.fill_diagonal(A[0], 1.0)
    # S(4, 2) = 7 partitions: a limit of exactly 7 is still exhaustive
    assert gs._best_partition(A, 0, 2, exhaustive_limit=7)[2] is True
    assert gs._best_partition(A, 0, 2, exhaustive_limit=6)[2] is False
    # all 3 + 1 splits cost 3·0.5/4 (2 + 2: 0.5): the first one enumerated wins the tie
    groups, cost, _ = gs._best_partition(A, 0, 2, exhaustive_limit=7)
    assert groups == [[0, 1, 2], [3]] and cost == pytest.approx(0.375)


def test_cluster_cost_by_hand_and_unknown_reduce():
    d = np.array([[0.0, 0.4, 0.9], [0.4, 0.0, 0.7], [0.9, 0.7, 0.0]])
    # {0,1}, {2}: cluster mean (0.4 + 0) / 2; task mean (0.4 + 0.4 + 0) / 3
    assert gs.cluster_cost([[0, 1], [2]], d, "cluster") == pytest.approx(0.2)
    assert gs.cluster_cost([[0, 1], [2]], d, "task") == pytest.approx(0.8 / 3)
    assert gs.cluster_cost([[0, 1, 2]], d, "cluster") == pytest.approx(0.9)
    for bad in ("bad", "zzz", "Task"):
        with pytest.raises(ValueError, match="reduce: expected task|cluster"):
            gs.cluster_cost([[0, 1], [2]], d, bad)


def test_correlations_at_small_scale_and_constant_images():
    """Scale-free: features of magnitude 1e-3 (norms < 1) give the same RDM and correlations as
    the unscaled ones. Two constant (e.g. all-zero) images are uncorrelated with every image,
    each other included (dissimilarity 1); a task whose RDM is constant still has affinity 1 with
    itself (the diagonal)."""
    assert gs.pearson(np.array([0.0, 0.1, 0.3]), np.array([0.0, 0.2, 0.6])) == pytest.approx(1.0)
    F = np.array([[1., 2., 4.], [2., 1., 0.], [0., 0., 0.], [3., 3., 3.], [1., 0., 2.], [.1, .1, .1], [.7, .7, .7]])
    np.testing.assert_allclose(gs.rdm(1e-3 * F), gs.rdm(F), atol=1e-12)
    R = gs.rdm(F)
    assert R[2, 3] == R[3, 2] == 1.0 and R[2, 0] == R[3, 4] == 1.0 and R[2, 2] == 0.0
    # constants whose mean is not exact in floating point (0.1·3/3 ≠ 0.1): still uncorrelated, not
    # the ±1 of two rounding residues (the old check on the centred norm gave dissimilarity 2 here)
    assert R[5, 6] == 1.0 and R[5, 0] == 1.0 and R[6, 3] == 1.0
    assert R[0, 1] == pytest.approx(1.0 - np.corrcoef(F[0], F[1])[0, 1])
    rdms = np.stack([np.stack([np.ones((3, 3)) - np.eye(3), _rdm_from_upper([1., 2., 3.])])])
    A = gs.rsa_affinity(rdms)
    assert A[0, 0, 0] == A[0, 1, 1] == 1.0 and A[0, 0, 1] == 0.0


# ----------------------------------------------------------------------------- edges of the helpers

def test_partition_and_counting_edges():
    # no tasks: one empty partition when zero groups are allowed, none otherwise (the default asks
    # for at least one group)
    assert list(gs.set_partitions(0)) == [] and list(gs.set_partitions(0, min_groups=0)) == [[]]

    def s2(n, k):                              # the recurrence S(n,k) = k·S(n−1,k) + S(n−1,k−1)
        return 1 if n == k == 0 else 0 if n == 0 or k == 0 else k * s2(n - 1, k) + s2(n - 1, k - 1)
    # exact integers also where a float would round (S(30, 7) ≈ 3.4e20 > 2^53)
    assert gs.stirling2(30, 7) == s2(30, 7) and isinstance(gs.stirling2(30, 7), int)
    assert gs.num_partitions(6, 3, 2) == s2(6, 2) + s2(6, 3)
    assert gs.stirling2(0, 0) == 1 and gs.stirling2(4, 0) == 0 and gs.stirling2(3, 5) == 0
    assert gs.num_partitions(0, 3) == 0 == len(list(gs.set_partitions(0, 3)))


def test_value_model_shapes_are_checked():
    with pytest.raises(ValueError, match=r"square \(N, N\) matrix, got shape \(2, 3\)"):
        gs.check_value_model(np.zeros((2, 3)), np.zeros(2))
    for shape in [(3, 2), (2, 2, 2), (2,)]:
        with pytest.raises(ValueError, match="square"):
            gs.check_value_model(np.zeros(shape), np.zeros(2))
    with pytest.raises(ValueError, match=r"single values must have shape \(2,\), got \(3,\)"):
        gs.check_value_model(np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="at least one task"):
        gs.select_exhaustive([], np.zeros((0, 0)), 0, 1)
    with pytest.raises(ValueError, match="budget .* must be >= 1, got 0"):
        gs.select_bnb([(0,)], np.zeros((1, 1)), 1, 0)


def test_selection_auxiliary_tasks_of_earlier_networks():
    """A network's auxiliary tasks are those it trains but that another network serves — served by
    an earlier *or a later* network."""
    sel = gs.Selection([(0, 1), (1, 2)], [0, 1, 1], 0.0)
    assert sel.auxiliary() == [[1], []] and sel.partition() == [[0], [1, 2]]
    d = sel.to_dict()
    assert d["networks"] == [[0, 1], [1, 2]] and d["auxiliary"] == [[1], []] and d["optimal"] is True


def test_bnb_needs_the_last_candidates_and_ignores_an_infeasible_incumbent():
    """Candidates in B&B order (regret: the singletons 0, {0,1,2} 10/3): {0}, {1}, {0,1,2} — the only
    one with task 2 comes last, and the optimum needs all three (objective 0). Started from the
    feasible but poor incumbent [{0,1,2}] (objective 10) the search must still reach the last
    candidate after the second-to-last. With a budget of 2, an incumbent of three networks (though
    cheaper) is not a solution: best is 5 ({0} or {1} with {0,1,2})."""
    cands = [(0,), (1,), (0, 1, 2)]
    V = np.array([[0.0, np.inf, np.inf], [np.inf, 0.0, np.inf], [5.0, 5.0, 0.0]])
    sel = gs.select_bnb(cands, V, 3, 3, incumbent=[2])
    assert sel.objective == 0.0 and sel.networks == [(0,), (1,), (0, 1, 2)] and sel.optimal
    two = gs.select_bnb(cands, V, 3, 2, incumbent=[0, 1, 2])
    assert two.objective == 5.0 and len(two.networks) == 2


def test_bnb_coverage_bound_is_exact_at_the_limit():
    """Six tasks, pairs only, three networks: a perfect matching is the only cover — uncovered 6 =
    3 networks × 2 tasks is feasible, not pruned. Matching {0,1},{2,3},{4,5} costs 0, the other
    {0,2},{1,4},{3,5} 1 per task; starting from the costly one B&B finds the free one."""
    cands = [(0, 1), (2, 3), (4, 5), (0, 2), (1, 4), (3, 5)]
    V = np.full((6, 6), np.inf)
    for i, c in enumerate(cands):
        V[i, list(c)] = 0.0 if i < 3 else 1.0
    sel = gs.select_bnb(cands, V, 6, 3, incumbent=[3, 4, 5])
    assert sel.objective == 0.0 and sel.networks == [(0, 1), (2, 3), (4, 5)]


def test_bnb_node_count_by_hand_and_node_limit():
    """{0}: (1, –), {1}: (–, 1), {0,1}: (3, 3); incumbent {0,1} (6). Nodes: the root; {0} (bound 1 + 1
    < 6); {0},{1} → covered, objective 2. Every other child is cut by its bound (≥ 4) → 3 nodes.
    A limit of exactly 3 nodes still proves optimality; with 2 the third node (where objective 2 is
    found) is refused: the incumbent comes back, not proven optimal."""
    cands = [(0,), (1,), (0, 1)]
    V = np.array([[1.0, np.inf], [np.inf, 1.0], [3.0, 3.0]])
    sel = gs.select_bnb(cands, V, 2, 2, incumbent=[2])
    assert sel.info["nodes"] == 3 and sel.objective == 2.0 and sel.optimal
    assert gs.select_bnb(cands, V, 2, 2, incumbent=[2], max_nodes=3).optimal
    cut = gs.select_bnb(cands, V, 2, 2, incumbent=[2], max_nodes=2)
    assert not cut.optimal and cut.objective == 6.0 and cut.networks == [(0, 1)]
    # a generous limit changes nothing
    rng = np.random.default_rng(5)
    W = rng.normal(size=(6, 6))
    all6 = gs.all_subsets(6)
    V6 = gs.mean_partner_values(W, np.zeros(6), all6)
    free = gs.select_bnb(all6, V6, 6, 3)
    limited = gs.select_bnb(all6, V6, 6, 3, max_nodes=10**6)
    assert limited.optimal and limited.objective == free.objective == pytest.approx(
        gs.select_dp(W, np.zeros(6), 3).objective)
    assert limited.info["nodes"] == free.info["nodes"]


def test_greedy_start_covers_every_task_when_it_can():
    """The penalty of an uncovered task must outweigh any spread of values: all-zero values (no
    spread at all) still give a full cover, and a cheap network missing a task loses to a costly
    one covering all: {0..3} at 5 each (20) vs {0,1,2} at −5 each plus task 3 uncovered."""
    assert gs._greedy_cover(np.diag([0.0, 0.0, 0.0]) + np.where(np.eye(3), 0, np.inf), 3) == [0, 1, 2]
    V = np.array([[5.0, 5.0, 5.0, 5.0], [-5.0, -5.0, -5.0, np.inf]])
    assert gs._greedy_cover(V, 1) == [0]
    assert gs._greedy_cover(V, 2) == [0, 1]
    assert gs._greedy_cover(V, 5) == [0, 1]                  # stops once nothing improves
    assert gs._greedy_cover(np.array([[0.0, np.inf]]), 1) is None        # nothing covers task 1


def test_linkage_by_hand():
    # ties merge the first pair in index order
    assert gs.agglomerate(np.zeros((3, 3)), 2, np.mean) == ([[2], [0, 1]], [(0, 1)])
    # more groups than tasks: nothing to merge; zero groups: down to one cluster
    assert gs.agglomerate(np.zeros((2, 2)), 3, np.mean) == ([[0], [1]], [])
    assert gs.agglomerate(np.zeros((2, 2)), 0, np.mean) == ([[0, 1]], [(0, 1)])
    # the symmetrised mean (W + Wᵀ)/2, lowest first: −3 for (0,1) beats 1 for (1,2) and 2 for (0,2)
    # (squares would merge (1,2) first)
    W = np.array([[0.0, -4.0, 2.0], [-2.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    assert gs.linkage_partition(W, 2) == ([(2,), (0, 1)], [(0, 1)])
    assert gs.linkage_partition(W, 1)[1] == [(0, 1), (0, 1, 2)]


def test_restricted_candidates():
    """Four tasks (W[u, t]: lower = better partner u for t): the best two partners of 0 are 1, 2;
    of 1: 3, 0; of 2: 3, 1; of 3: 0, 2 → every triple; with the singles, pairs and the whole set
    that is all 15 subsets, by size."""
    W = np.zeros((4, 4))
    W[[1, 2, 3], 0] = [.1, .2, .9]
    W[[0, 2, 3], 1] = [.5, .9, .1]
    W[[0, 1, 3], 2] = [.9, .2, .1]
    W[[0, 1, 2], 3] = [.1, .9, .5]
    assert gs.restricted_candidates(W, 2) == sorted(gs.all_subsets(4), key=lambda s: (len(s), s))
    # six tasks: the linkage clusters (merges and the cut at the budget) are candidates even where
    # no task's best partners give them
    W6 = np.random.default_rng(60).normal(size=(6, 6))
    cands = set(gs.restricted_candidates(W6, 2))
    assert (1, 3, 5) in cands and (0, 1, 3, 4, 5) in cands and len(cands) < 2 ** 6 - 1
    cut, _ = gs.linkage_partition(W6, 2)
    _, merges = gs.linkage_partition(W6, 1)
    assert set(cut) | set(merges) <= cands


def test_select_networks_switches_to_bnb_above_exact_max_n(monkeypatch):
    class UsedDP(Exception):
        pass

    def dp(*a, **k):
        raise UsedDP
    monkeypatch.setattr(gs, "select_dp", dp)
    with pytest.raises(UsedDP):
        gs.select_networks(np.zeros((14, 14)), np.zeros(14), 2)                 # default limit 14: DP
    for n, limit in [(3, 3), (3, 14), (2, 5)]:
        with pytest.raises(UsedDP):
            gs.select_networks(np.zeros((n, n)), np.zeros(n), 2, exact_max_n=limit)
    big = gs.select_networks(np.zeros((15, 15)), np.zeros(15), 2, max_nodes=50)   # 15: B&B
    assert big.solver == "bnb" and big.info["candidates"] > 15
    assert gs.select_networks(np.zeros((3, 3)), np.zeros(3), 2, exact_max_n=2).solver == "bnb"


def _integer_values(r, n, cands):
    """Values of ``cands`` from small random integers (pairwise −2..2, singles −1..1): many ties."""
    return gs.mean_partner_values(r.integers(-2, 3, (n, n)).astype(float), r.integers(-1, 2, n).astype(float), cands)


def test_bnb_search_effort_is_pinned():
    """Golden node counts of branch and bound (deterministic): its candidate order (regret per
    member, bigger sets first on ties), its bounds and its starting incumbent (greedy cover; the
    linkage partition in the large-N path) decide how much of the tree is visited but never the
    objective, so only the count can show a change to them. Cases: random normal values (a unique
    optimum), small integer values (many ties), the 12-task planted-block TAG matrix and an 8-task
    restricted-candidate search. If a change is deliberate, check the counts did not grow much and
    update them."""
    counts = []
    for seed, n, budget in [(0, 6, 2), (1, 7, 3), (3, 6, 3)]:
        W = np.random.default_rng(seed).normal(size=(n, n))
        cands = gs.all_subsets(n)
        counts.append(gs.select_bnb(cands, gs.mean_partner_values(W, np.zeros(n), cands), n, budget).info["nodes"])
    for seed in (0, 1):
        r = np.random.default_rng(seed)
        cands = gs.all_subsets(6)
        V = _integer_values(r, 6, cands)
        counts.append(gs.select_bnb(cands, V, 6, 3).info["nodes"])
    Z = _block_affinity([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]], 12, noise=0.005)
    counts.append(gs.tag_select(Z, 4, exact_max_n=0).info["nodes"])
    W = np.random.default_rng(7).normal(size=(8, 8))
    counts.append(gs.select_networks(W, np.zeros(8), 3, exact_max_n=0).info["nodes"])
    # a sparse candidate list where the coverage bound (tasks left > networks left × largest
    # candidate left) cuts subtrees the value bound does not
    r = np.random.default_rng(4112)
    n, budget = int(r.integers(4, 7)), int(r.integers(2, 4))
    alls = gs.all_subsets(n)
    cands = [alls[i] for i in r.choice(len(alls), size=int(r.integers(n, 2 * n + 2)), replace=False)]
    cands += [(t,) for t in range(n) if (t,) not in cands]
    V = _integer_values(r, n, cands)
    counts.append(gs.select_bnb(cands, V, n, budget).info["nodes"])
    assert counts == [427, 2410, 1297, 10896, 9805, 263, 22294, 15]


def test_bnb_keeps_the_first_optimum_found():
    """Small integer values have tied optima: the first one the search reaches is kept (a later
    one of equal objective does not replace it), so the same matrices always give the same groups."""
    r = np.random.default_rng(3)
    n, budget = int(r.integers(3, 6)), int(r.integers(2, 4))
    cands = gs.all_subsets(n)
    V = _integer_values(r, n, cands)
    sel = gs.select_bnb(cands, V, n, budget)
    assert (n, budget) == (5, 2) and sel.networks == [(0, 1, 3, 4), (2, 3)]
    assert sel.objective == pytest.approx(gs.select_exhaustive(cands, V, n, budget).objective)


def test_annotations_resolve():
    """Every annotation of the module is a valid type (they are strings until something resolves
    them — documentation tools and typing.get_type_hints do)."""
    import inspect
    import typing
    for name, obj in vars(gs).items():
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == gs.__name__:
            for f in [obj] if inspect.isfunction(obj) else [obj, *[v for v in vars(obj).values()
                                                                   if inspect.isfunction(v)]]:
                typing.get_type_hints(f)
    assert typing.get_type_hints(gs.select_bnb)["max_nodes"] == int | None
    assert typing.get_type_hints(gs.bmtn_select)["budget"] == float | None
    assert typing.get_type_hints(gs._greedy_cover)["return"] == list[int] | None


def test_documented_node_limit_is_the_default():
    """docs/baselines.md states the node limit of the large-N search; it is the code's default."""
    import inspect
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "baselines.md").read_text()
    stated = int(re.search(r"node-limited \(([\d ]+) nodes", doc).group(1).replace(" ", ""))
    assert inspect.signature(gs.select_networks).parameters["max_nodes"].default == stated == 300_000
