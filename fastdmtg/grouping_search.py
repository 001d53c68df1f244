"""Group-selection algorithms of the two-shot baselines: pure functions over matrices (numpy), no
training, no torch models. Used by ``fastdmtg.compare``; documented in docs/baselines.md.

The common problem (TAG and HOA network selection)
--------------------------------------------------
Tasks 0..N-1. A *network* is a set S of tasks trained together; ``v(S, t)`` (t ∈ S) is the value
of serving task t from network S — lower is better (HOA: the estimated loss of t in S; TAG: minus
the affinity onto t from its partners in S). Choose at most ``budget`` networks covering every
task so that

    objective = Σ_t  min_{chosen S ∋ t} v(S, t)

is minimal. Networks may overlap; each task is *served* by the chosen network where its value is
best (the paper's ■) and only *trained* in the others (□). Three solvers, equal on small inputs
(tests/test_baselines.py checks it on random cases):

* ``select_exhaustive`` — every combination of ≤ budget candidates (the reference; tiny inputs).
* ``select_dp``         — exact over *all* 2^N − 1 subsets via the equivalent "served partition"
  form: a solution is a partition of the tasks into ≤ budget served parts P, each part paying
  w(P) = min_{S ⊇ P} Σ_{t∈P} v(S, t) (its best network, possibly with helper tasks), so
  objective* = min over partitions of Σ w(P), a subset DP in O(3^N · budget). Exact up to N ≈ 14.
* ``select_bnb``        — branch and bound over an explicit candidate list (Standley et al.'s
  search): depth-first over candidate combinations in a fixed order, pruned by the bound
  Σ_t min(current_t, best value of t among the candidates still available) and by coverage.
  With ``max_nodes`` it becomes an anytime search (the result says whether optimality was proven).

Value models (mean-over-partners of a pairwise matrix, singles separately):
    TAG  v(S, t) = −mean_{u ∈ S∖t} Z[u → t]   (|S| ≥ 2),   v({t}, t) = 0    (no partner, no transfer)
    HOA  v(S, t) =  mean_{u ∈ S∖t} Lpair[t, u] (|S| ≥ 2),   v({t}, t) = Lsingle[t]
(for |S| = 2 the mean is the measured pair value itself, as in both papers).

BMTN (Vandenhende et al.) task clustering: ``bmtn_select`` over RSA affinity matrices at D
locations, with the clustering cost Σ_d mean_{tasks t} max_{u in t's cluster} (1 − A[d, t, u])
(``cluster_cost`` explains this reading of the paper and the alternative).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

INF = float("inf")


# ----------------------------------------------------------------------------- partitions

def set_partitions(n: int, max_groups: int | None = None, min_groups: int = 1):
    """Yield every partition of range(n) into between ``min_groups`` and ``max_groups`` non-empty
    blocks, each as a list of sorted lists (blocks ordered by their smallest task). Restricted
    growth strings: task t joins an existing block or opens block max+1, so each partition
    appears exactly once."""
    max_groups = n if max_groups is None else min(max_groups, n)
    if n == 0:
        if min_groups <= 0:
            yield []
        return
    labels = [0] * n

    def rec(t: int, used: int):
        if t == n:
            if used >= min_groups:
                blocks = [[] for _ in range(used)]
                for i, g in enumerate(labels):
                    blocks[g].append(i)
                yield blocks
            return
        # not enough tasks left to open the blocks still required
        if used + (n - t) < min_groups:
            return
        for g in range(min(used + 1, max_groups)):
            labels[t] = g
            yield from rec(t + 1, max(used, g + 1))

    yield from rec(1, 1)                    # task 0 opens block 0


def stirling2(n: int, k: int) -> int:
    """Number of partitions of n labelled items into exactly k non-empty blocks."""
    return sum((-1) ** j * math.comb(k, j) * (k - j) ** n for j in range(k + 1)) // math.factorial(k)


def num_partitions(n: int, max_groups: int, min_groups: int = 1) -> int:
    return sum(stirling2(n, k) for k in range(min_groups, min(max_groups, n) + 1))


# ----------------------------------------------------------------------------- value models

def mean_partner_values(pairwise: np.ndarray, single: np.ndarray, sets) -> np.ndarray:
    """Values v(S, t) for the given task sets: (len(sets), N), +inf where t ∉ S.

    ``pairwise[u, t]`` is the value contributed to task t by partner u; v(S, t) is the mean over
    the partners u ∈ S∖t, or ``single[t]`` when S = {t}."""
    W, single = check_value_model(pairwise, single)
    n = W.shape[0]
    sets = list(sets)
    M = np.zeros((len(sets), n))
    for r, s in enumerate(sets):
        M[r, list(s)] = 1.0
    sums = M @ W                                        # Σ_{u ∈ S, u ≠ t} W[u, t] (zero diagonal)
    size = M.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        V = sums / (size - 1)
    V = np.where(size == 1, np.broadcast_to(single[None, :], V.shape), V)
    return np.where(M > 0, V, INF)


def check_value_model(pairwise, single) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, N) pairwise values and (N,) singles; the diagonal is ignored (set to 0)."""
    W = np.array(pairwise, dtype=np.float64)
    s = np.asarray(single, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"pairwise values must be a square (N, N) matrix, got shape {W.shape}")
    n = W.shape[0]
    if s.shape != (n,):
        raise ValueError(f"single values must have shape ({n},), got {s.shape}")
    np.fill_diagonal(W, 0.0)
    if not (np.isfinite(W).all() and np.isfinite(s).all()):
        raise ValueError("pairwise/single values must be finite (a missing pair or single result?)")
    return W, s


def tag_value_model(Z: np.ndarray):
    """TAG: Z[u, t] = affinity of u onto t. Minimise −(mean affinity onto t); alone = 0."""
    Z = np.asarray(Z, dtype=np.float64)
    return -Z, np.zeros(Z.shape[0])


def hoa_value_model(single: np.ndarray, pair: np.ndarray):
    """HOA: pair[t, u] = loss of task t in the network trained on {t, u}; single[t] its
    single-task loss. The pairwise matrix is indexed [partner, task], hence the transpose."""
    return np.asarray(pair, dtype=np.float64).T, np.asarray(single, dtype=np.float64)


def all_subsets(n: int):
    """All non-empty subsets of range(n) as sorted tuples, ordered by bit mask."""
    return [tuple(i for i in range(n) if m >> i & 1) for m in range(1, 1 << n)]


# ----------------------------------------------------------------------------- selections

@dataclass
class Selection:
    """Chosen networks (possibly overlapping) and the one serving each task."""
    networks: list[tuple[int, ...]]
    served: list[int]                       # served[t] = index into ``networks``
    objective: float                        # Σ_t v(served network, t)
    optimal: bool = True                    # proven optimal (False: anytime search hit its limit)
    solver: str = ""
    info: dict = field(default_factory=dict)

    def partition(self) -> list[list[int]]:
        """The served parts (each task once), in network order: the groups as the paper reports
        them (each task with its best group)."""
        parts = [[t for t, k in enumerate(self.served) if k == j] for j in range(len(self.networks))]
        return [p for p in parts if p]

    def auxiliary(self) -> list[list[int]]:
        """Per network, the tasks trained there but served elsewhere."""
        return [[t for t in net if self.served[t] != j] for j, net in enumerate(self.networks)]

    def to_dict(self) -> dict:
        return {"networks": [list(n) for n in self.networks], "served": self.served,
                "partition": self.partition(), "auxiliary": self.auxiliary(),
                "objective": self.objective, "optimal": self.optimal, "solver": self.solver, **self.info}


def _finalise(networks, values_of, n: int, solver: str, optimal: bool) -> Selection:
    """Serve each task from its best chosen network; drop networks serving nobody (they only
    cost budget), and order networks by their smallest served task."""
    networks = [tuple(sorted(s)) for s in networks]
    vals = [values_of(s) for s in networks]
    served = []
    for t in range(n):
        best = min(range(len(networks)), key=lambda j: (vals[j][t], j))
        served.append(best)
    keep = sorted({k for k in served}, key=lambda j: min(t for t in range(n) if served[t] == j))
    remap = {old: new for new, old in enumerate(keep)}
    nets = [networks[j] for j in keep]
    served = [remap[k] for k in served]
    obj = float(sum(vals[keep[served[t]]][t] for t in range(n)))
    return Selection(nets, served, obj, optimal, solver)


def _check_inputs(n: int, budget: int):
    if n < 1:
        raise ValueError("need at least one task")
    if budget < 1:
        raise ValueError(f"budget (number of networks) must be >= 1, got {budget}")


def select_exhaustive(candidates, values: np.ndarray, n: int, budget: int) -> Selection:
    """Brute force: every combination of 1..budget candidates that covers all tasks."""
    _check_inputs(n, budget)
    V = np.asarray(values, dtype=np.float64)
    best, best_combo = INF, None
    for r in range(1, budget + 1):
        for combo in itertools.combinations(range(len(candidates)), r):
            cur = V[list(combo)].min(0)
            if not np.isfinite(cur).all():
                continue
            obj = cur.sum()
            if obj < best - 1e-12:
                best, best_combo = obj, combo
    if best_combo is None:
        raise ValueError("no combination of candidates within the budget covers every task")
    lookup = {tuple(sorted(candidates[i])): V[i] for i in best_combo}
    return _finalise([candidates[i] for i in best_combo], lambda s: lookup[s], n, "exhaustive", True)


def select_bnb(candidates, values: np.ndarray, n: int, budget: int, max_nodes: int | None = None,
               incumbent: list | None = None) -> Selection:
    """Branch and bound over candidate networks (see the module docstring).

    ``incumbent``: an optional feasible list of candidate indices to start from (a good one makes
    the pruning effective at once; default: a greedy cover). ``max_nodes``: stop after that many search nodes and return
    the best solution found (``optimal`` False if the search was cut)."""
    _check_inputs(n, budget)
    V = np.asarray(values, dtype=np.float64)
    m = len(candidates)
    # order: cheapest regret first (candidates whose members are near their per-task best), then
    # bigger sets — good incumbents early make the bound bite
    per_task_best = V.min(0)
    if not np.isfinite(per_task_best).all():
        raise ValueError("some task is in no candidate network")
    member = np.isfinite(V)
    regret = np.where(member, V - per_task_best[None, :], 0.0).sum(1)
    order = sorted(range(m), key=lambda i: (regret[i] / member[i].sum(), -member[i].sum(), i))
    Vo, Mo = V[order], member[order]
    # suffix minima: the best value of each task among candidates order[i:]
    suffix = np.full((m + 1, n), INF)
    for i in range(m - 1, -1, -1):
        suffix[i] = np.minimum(suffix[i + 1], Vo[i])
    size_suffix = np.zeros(m + 1, dtype=int)
    for i in range(m - 1, -1, -1):
        size_suffix[i] = max(size_suffix[i + 1], int(Mo[i].sum()))

    best = {"obj": INF, "combo": None}
    if not incumbent:
        incumbent = _greedy_cover(V, budget)
    if incumbent:
        cur = V[list(incumbent)].min(0)
        if np.isfinite(cur).all() and len(incumbent) <= budget:
            best = {"obj": float(cur.sum()), "combo": [order.index(i) for i in incumbent]}
    nodes = [0]
    cut = [False]

    def dfs(start: int, chosen: list, cur: np.ndarray):
        nodes[0] += 1
        if max_nodes is not None and nodes[0] > max_nodes:
            cut[0] = True
            return
        covered = np.isfinite(cur)
        if covered.all():
            obj = float(cur.sum())
            if obj < best["obj"] - 1e-12:
                best["obj"], best["combo"] = obj, list(chosen)
        left = budget - len(chosen)
        if left == 0 or start >= m:
            return
        uncovered = int((~covered).sum())
        if uncovered > left * size_suffix[start]:
            return
        for i in range(start, m):
            if cut[0]:
                return
            # the bound of the children from i on, checked before descending (cheap, prunes most of
            # the tree): min(cur, suffix[i]) only grows with i (and best only falls), so once it
            # fails — a task no longer coverable, or no better than best — every later child fails
            lb_i = np.minimum(cur, suffix[i])
            if not np.isfinite(lb_i).all() or lb_i.sum() >= best["obj"] - 1e-12:
                break
            new = np.minimum(cur, Vo[i])
            if not (new < cur).any():
                continue                    # improves no task: only spends budget
            chosen.append(i)
            dfs(i + 1, chosen, new)
            chosen.pop()

    dfs(0, [], np.full(n, INF))
    if best["combo"] is None:
        raise ValueError("no combination of candidates within the budget covers every task")
    chosen = [order[i] for i in best["combo"]]
    lookup = {tuple(sorted(candidates[i])): V[i] for i in chosen}
    sel = _finalise([candidates[i] for i in chosen], lambda s: lookup[s], n, "bnb", not cut[0])
    sel.info["nodes"] = nodes[0]
    return sel


def _greedy_cover(V: np.ndarray, budget: int) -> list[int] | None:
    """A feasible start for branch and bound: add, ≤ budget times, the candidate that most lowers
    Σ_t current value, an uncovered task counting as a large penalty. None if it covers nothing."""
    finite = V[np.isfinite(V)]
    big = (finite.max() - min(finite.min(), 0.0) + 1.0) * V.shape[1]
    cur = np.full(V.shape[1], np.inf)
    chosen = []
    for _ in range(budget):
        cost = np.where(np.isfinite(np.minimum(cur[None, :], V)), np.minimum(cur[None, :], V), big).sum(1)
        i = int(np.argmin(cost))
        if not (np.minimum(cur, V[i]) < cur).any():
            break
        chosen.append(i)
        cur = np.minimum(cur, V[i])
    return chosen if np.isfinite(cur).all() else None


def _submasks_with_lowbit(mask: int) -> np.ndarray:
    low = mask & -mask
    rest = mask ^ low
    subs = []
    s = rest
    while True:
        subs.append(s | low)
        if s == 0:
            break
        s = (s - 1) & rest
    return np.array(subs, dtype=np.int64)


def select_dp(pairwise: np.ndarray, single: np.ndarray, budget: int) -> Selection:
    """Exact selection over all 2^N − 1 networks for the mean-over-partners value model."""
    W, single = check_value_model(pairwise, single)
    n = W.shape[0]
    _check_inputs(n, budget)
    if n > 16:
        raise ValueError(f"select_dp is exponential (3^N); N = {n} is too large — use select_bnb")
    full = (1 << n) - 1
    subsets = all_subsets(n)                                 # index m-1 ↔ mask m
    V = mean_partner_values(W, single, subsets)              # (2^N − 1, N)
    # w[P] = min over S ⊇ P of Σ_{t∈P} V[S, t]; arg[P] = that S
    w = np.full(full + 1, INF)
    arg = np.zeros(full + 1, dtype=np.int64)
    bits_cache: dict[int, np.ndarray] = {}
    for S in range(1, full + 1):
        members = [t for t in range(n) if S >> t & 1]
        k = len(members)
        B = bits_cache.get(k)
        if B is None:
            B = ((np.arange(1 << k)[:, None] >> np.arange(k)[None, :]) & 1).astype(np.float64)
            bits_cache[k] = B
        sums = B @ V[S - 1, members]                         # Σ over each submask of S
        sub_masks = (B.astype(np.int64) << np.array(members, dtype=np.int64)[None, :]).sum(1)
        better = sums < w[sub_masks] - 1e-15
        w[sub_masks[better]] = sums[better]
        arg[sub_masks[better]] = S
    # f[k][mask]: best cover of ``mask`` by exactly k served parts (the part holding the lowest task first)
    f = np.full((budget + 1, full + 1), INF)
    choice = np.zeros((budget + 1, full + 1), dtype=np.int64)
    f[0, 0] = 0.0
    subs_of = [None] + [_submasks_with_lowbit(mk) for mk in range(1, full + 1)]
    for k in range(1, budget + 1):
        prev = f[k - 1]
        for mk in range(1, full + 1):
            subs = subs_of[mk]
            tot = w[subs] + prev[mk ^ subs]
            j = int(np.argmin(tot))
            f[k, mk], choice[k, mk] = tot[j], subs[j]
    k_best = int(np.argmin(f[1:, full])) + 1
    parts, mk, k = [], full, k_best
    while mk:
        p = int(choice[k, mk])
        parts.append(p)
        mk ^= p
        k -= 1
    networks = [tuple(t for t in range(n) if arg[p] >> t & 1) for p in parts]
    lookup = {s: V[(sum(1 << t for t in s)) - 1] for s in networks}
    sel = _finalise(networks, lambda s: lookup[s], n, "dp", True)
    # serving from the best chosen network can only improve on the DP's served parts (it is optimal)
    sel.objective = min(sel.objective, float(f[k_best, full]))
    return sel


# ----------------------------------------------------------------------------- TAG / HOA front ends

def agglomerate(dist: np.ndarray, groups: int, linkage) -> tuple[list[list[int]], list[tuple[int, ...]]]:
    """Greedy agglomerative clustering of tasks 0..N−1: repeatedly merge the two clusters whose
    ``linkage(dist[block])`` is smallest (first pair wins ties) until ``groups`` clusters remain →
    (clusters, every merged cluster in merge order)."""
    clusters = [[t] for t in range(dist.shape[0])]
    merges = []
    while len(clusters) > max(groups, 1):
        best, pair = INF, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = linkage(dist[np.ix_(clusters[a], clusters[b])])
                if d < best:
                    best, pair = d, (a, b)
        a, b = pair
        merged = sorted(clusters[a] + clusters[b])
        merges.append(tuple(merged))
        clusters = [c for i, c in enumerate(clusters) if i not in (a, b)] + [merged]
    return clusters, merges


def linkage_partition(pairwise: np.ndarray, groups: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Average-linkage agglomeration on the symmetrised values (lower = closer), stopped at
    ``groups`` clusters → (those clusters: a cheap feasible partition, the B&B incumbent for large
    N; every cluster formed on the way)."""
    W = np.asarray(pairwise, dtype=np.float64)
    clusters, merges = agglomerate((W + W.T) / 2, groups, np.mean)
    return [tuple(c) for c in clusters], merges


def restricted_candidates(pairwise: np.ndarray, budget: int) -> list[tuple[int, ...]]:
    """Candidate networks for large N (the 2^N family is intractable), O(N²) of them: all
    singletons and pairs; for every task t and size m = 3..N−1, t with its m−1 best partners (by
    the pairwise value onto t); every cluster formed by average-linkage agglomeration down to one
    cluster (the last one is the whole set), and the clusters of its cut at ``budget``."""
    W = np.asarray(pairwise, dtype=np.float64)
    n = W.shape[0]
    cands = {(t,) for t in range(n)}
    cands |= {(a, b) for a in range(n) for b in range(a + 1, n)}
    for t in range(n):
        partners = [int(u) for u in np.argsort(W[:, t], kind="stable") if u != t]   # lowest = best
        for m in range(3, n):               # sizes 2 and N are there already (pairs, last merge)
            cands.add(tuple(sorted([t, *partners[:m - 1]])))
    cut, _ = linkage_partition(W, budget)
    _, merges = linkage_partition(W, 1)
    cands |= set(cut) | set(merges)
    return sorted(cands, key=lambda s: (len(s), s))


def select_networks(pairwise: np.ndarray, single: np.ndarray, budget: int, exact_max_n: int = 14,
                    max_nodes: int = 300_000) -> Selection:
    """Exact DP over all subsets for N ≤ exact_max_n; otherwise branch and bound over the
    restricted candidate family (anytime, node-limited; ``optimal`` tells whether it finished)."""
    W, single = check_value_model(pairwise, single)
    n = W.shape[0]
    if n <= exact_max_n:
        return select_dp(W, single, budget)
    cands = restricted_candidates(W, budget)
    V = mean_partner_values(W, single, cands)
    index = {c: i for i, c in enumerate(cands)}
    incumbent = [index[c] for c in linkage_partition(W, budget)[0]]
    sel = select_bnb(cands, V, n, budget, max_nodes=max_nodes, incumbent=incumbent)
    sel.info["candidates"] = len(cands)
    return sel


def tag_select(Z: np.ndarray, budget: int, **kw) -> Selection:
    """TAG network selection: maximise Σ_t (mean affinity onto t from its partners in its serving
    network) with ≤ budget networks. ``info['total_affinity']`` is that sum."""
    W, single = tag_value_model(Z)
    sel = select_networks(W, single, budget, **kw)
    sel.info["total_affinity"] = -sel.objective
    sel.info["mean_affinity"] = -sel.objective / len(sel.served)
    return sel


def hoa_select(single: np.ndarray, pair: np.ndarray, budget: int, **kw) -> Selection:
    """HOA network selection: minimise Σ_t (estimated loss of t in its serving network) with
    ≤ budget networks; higher-order losses are the mean of the task's pair losses."""
    W, s = hoa_value_model(single, pair)
    sel = select_networks(W, s, budget, **kw)
    sel.info["total_estimated_loss"] = sel.objective
    return sel


# ----------------------------------------------------------------------------- BMTN (RSA)

def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what Spearman's coefficient needs)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0          # mean of ranks s+1..e
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(rankdata(a), rankdata(b))


def rdm(features: np.ndarray) -> np.ndarray:
    """Representation dissimilarity matrix of M images: 1 − Pearson correlation between the
    flattened feature vectors of every image pair (M, M). An image whose features are constant
    (e.g. all-zero after a ReLU) has no defined correlation: it is treated as uncorrelated
    (dissimilarity 1) with every other image."""
    F = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    # constant is decided on the raw values: the mean of a constant row can differ from it by a
    # rounding step, and the normalised residue would then be noise with a correlation of ±1
    varies = F.max(1) > F.min(1)
    F = F - F.mean(1, keepdims=True)
    F[~varies] = 0.0
    F[varies] /= np.linalg.norm(F[varies], axis=1, keepdims=True)
    corr = F @ F.T
    np.fill_diagonal(corr, 1.0)
    return 1.0 - corr


def rsa_affinity(rdms: np.ndarray) -> np.ndarray:
    """rdms (D, N, M, M) → affinity A (D, N, N): Spearman correlation between the upper
    triangles (diagonal excluded) of two tasks' RDMs at each location; diagonal 1."""
    rdms = np.asarray(rdms, dtype=np.float64)
    D, N, M, _ = rdms.shape
    iu = np.triu_indices(M, k=1)
    A = np.ones((D, N, N))
    for d in range(D):
        ranked = [rankdata(rdms[d, i][iu]) for i in range(N)]
        for i in range(N):
            for j in range(i + 1, N):
                A[d, i, j] = A[d, j, i] = pearson(ranked[i], ranked[j])
    return A


def cluster_cost(partition, dissim: np.ndarray, reduce: str = "task") -> float:
    """BMTN clustering cost at one location from the maximum dissimilarity inside clusters.

    The paper: "averaging the maximum distance between the dissimilarity scores of the elements in
    every cluster" — ambiguous about what is averaged:
      reduce="task"    (default) mean over tasks of the task's largest dissimilarity to a member of
                       its cluster (a singleton: 0);
      reduce="cluster" mean over clusters of the cluster's largest pairwise dissimilarity.
    The cluster mean is degenerate: K − 1 singletons (free) plus one cluster of all other tasks
    costs (that cluster's max)/K, which beats a balanced clustering whenever the mean of its
    within-cluster maxima exceeds that — as on the planted synthetic data. The task mean weighs a
    cluster by its size and has no such optimum."""
    if reduce == "cluster":
        return sum(float(dissim[np.ix_(c, c)].max()) if len(c) > 1 else 0.0 for c in partition) / len(partition)
    if reduce != "task":
        raise ValueError(f"reduce: expected task|cluster, got {reduce!r}")
    tot, n = 0.0, 0
    for c in partition:
        for t in c:
            others = [u for u in c if u != t]
            tot += float(dissim[t, others].max()) if others else 0.0
            n += 1
    return tot / n


def bmtn_tree_cost(partition, A: np.ndarray, shared_locations: int, reduce: str = "task") -> float:
    """Σ over locations d of the clustering cost; the first ``shared_locations`` locations lie in
    the shared trunk, where all tasks form one cluster."""
    D, N, _ = A.shape
    everyone = [list(range(N))]
    return sum(cluster_cost(everyone if d < shared_locations else partition, 1.0 - A[d], reduce)
               for d in range(D))


def _best_partition(A, shared_locations, groups, exhaustive_limit, reduce="task"):
    """Min-cost partition into exactly ``groups`` clusters: exhaustive when the number of
    partitions is small, else complete-linkage agglomeration (it greedily minimises the
    max-distance cost) refined by single-task moves."""
    D, N, _ = A.shape
    if stirling2(N, groups) <= exhaustive_limit:
        best, best_p = INF, None
        for p in set_partitions(N, groups, groups):
            c = bmtn_tree_cost(p, A, shared_locations, reduce)
            if c < best - 1e-12:
                best, best_p = c, p
        return best_p, best, True
    dis = (1.0 - A[shared_locations:]).sum(0) if shared_locations < D else (1.0 - A).sum(0)
    clusters, _ = agglomerate(dis, groups, np.max)        # complete linkage
    cost = bmtn_tree_cost(clusters, A, shared_locations, reduce)
    improved = True
    while improved:
        improved = False
        for t in range(N):
            src = next(i for i, c in enumerate(clusters) if t in c)
            if len(clusters[src]) == 1:
                continue
            for dst in range(len(clusters)):
                if dst == src:
                    continue
                trial = [list(c) for c in clusters]
                trial[src].remove(t)
                trial[dst] = sorted(trial[dst] + [t])
                c = bmtn_tree_cost(trial, A, shared_locations, reduce)
                if c < cost - 1e-12:
                    clusters, cost, improved = trial, c, True
                    break
    return sorted(clusters), cost, False


def bmtn_select(A: np.ndarray, max_groups: int, splits: dict, budget: float | None = None,
                exhaustive_limit: int = 200_000, reduce: str = "task") -> dict:
    """Choose the split point and the task clustering of a one-split branched network.

    A: (D, N, N) RSA affinities at D locations in encoder order. ``splits``: name →
    {"shared_locations": s (locations inside the shared trunk), "shared_params": P_s,
    "branch_params": P_b}; a split with G groups costs P_s + G·P_b encoder parameters, which must
    not exceed ``budget`` (None: no parameter budget). Every (split, G ≤ max_groups) within the
    budget is scored with the BMTN clustering cost; the cheapest wins (ties: fewer parameters,
    then fewer groups). Returns {"split", "groups", "cost", "params", "optimal", "candidates"}."""
    A = np.asarray(A, dtype=np.float64)
    D, N, _ = A.shape
    results = []
    for name, s in splits.items():
        for g in range(1, min(max_groups, N) + 1):
            params = s["shared_params"] + g * s["branch_params"]
            if budget is not None and params > budget:
                continue
            part, cost, exact = _best_partition(A, s["shared_locations"], g, exhaustive_limit, reduce)
            results.append({"split": name, "num_groups": g, "groups": part, "cost": cost, "params": params,
                            "optimal": exact})
    if not results:
        raise ValueError("no split point fits the parameter budget")
    best = min(results, key=lambda r: (round(r["cost"], 12), r["params"], r["num_groups"]))
    return {**best, "candidates": results}
