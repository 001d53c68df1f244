"""What every baseline of ``fastdmtg compare`` shares: its declaration (``Baseline``), the table row it
returns (``Row``) and the helpers several baselines use (partitions, a network's best validation
losses, training a TAG/HOA/CS selection).

A baseline talks to the comparison only through its run machinery (fastdmtg/compare_runs.py):
``cmp.cfg(method, groups, ...)`` builds a run's config, ``cmp.run(key, cfg, label)`` trains or reuses
it, ``cmp.once(name, fn)`` shares a run or a measurement between baselines, ``cmp.repeats(r, label)``
adds the ``--seeds`` repeats, ``cmp.cost(r)`` is a run's cost entry; ``cmp.ks``, ``cmp.n``,
``cmp.names``, ``cmp.specs``, ``cmp.image_size``, ``cmp.base``, ``cmp.overlap``, ``cmp.seeds``
(``--rg-partitions``), ``cmp.rsa_images`` and ``cmp.details`` (comparison.json) are its inputs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:                        # type-only: the run machinery imports this package
    from ..compare_runs import Comparison

#: the table sections in the TAG paper's order (§5): grouping methods, training augmentations on one
#: shared network, combinations of the two
SECTIONS = ("grouping", "augmentation", "combination")


@dataclass(frozen=True)
class RowStyle:
    """How the tables treat a baseline's row (the table writer never looks at a method's name)."""
    display: str | None = None          # its name in the Markdown/LaTeX tables (default: the method key)
    reference: bool = False             # the NormGain reference (naive MTL): its NormGain is "—"
    partitions: bool = False            # its results are independent partitions (RG), not seeds: cost and
    #                                     time per partition, not counted as seeds
    learned_grouping: bool = False      # the grouping comes out of training: a stability matrix per K
    two_shot: tuple[int, str, bool] | None = None   # one-shot vs two-shot table: (order, label, retrained)


@dataclass
class Row:
    method: str
    k: int | None
    results: list[dict]                      # the evaluated run(s): one, or one per RG seed
    cost_runs: list[tuple[str, float, float]] = field(default_factory=list)   # (key, branch-epochs, seconds)
    groups: list[list[list[int]]] = field(default_factory=list)   # per result: served partition
    networks: list[list[list[int]]] = field(default_factory=list)  # per result: trained networks (overlap)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    flops: float | None = None
    style: RowStyle | None = None            # how the tables treat it; None: its baseline's (by method name)


@dataclass(frozen=True)
class Baseline:
    """One baseline module's declaration (its module-level ``BASELINE``; fastdmtg/baselines/__init__.py
    finds it). ``rows(cmp, name)`` runs what the baseline needs through ``cmp`` and returns its rows."""
    names: tuple[str, ...]                           # the --methods names it serves
    rows: Callable[[Comparison, str], list[Row]]
    section: str = "grouping"                        # one of SECTIONS
    order: int = 100                                 # place within its section (then: names' order)
    default: bool = False                            # part of compare's default --methods
    aggregated: bool = False                         # --aggregator trains its selected networks
    aliases: tuple[tuple[str, str], ...] = ()        # (other spelling, name)
    later: str = "the runs chosen from its results"  # a plan's "+ … (known after X)"
    reference: Callable[[Comparison], dict] | None = None   # the NormGain reference run (one baseline)
    style: RowStyle = RowStyle()                     # its rows' table treatment (Row.style overrides)
    help: str = ""

    def __post_init__(self):
        if self.section not in SECTIONS:
            raise ValueError(f"baseline {self.names}: section must be one of {', '.join(SECTIONS)}, "
                             f"got {self.section!r}")
        if not self.names:
            raise ValueError("a baseline needs at least one name")


# ----------------------------------------------------------------------------- partitions

def random_partition(n: int, k: int, seed: int) -> list[list[int]]:
    """A uniformly random assignment of n tasks to exactly k non-empty groups (rejection sampling
    of uniform labellings; groups ordered by their smallest task)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} tasks into {k} non-empty groups")
    rng = random.Random(1_000_003 * seed + k)
    for _ in range(100_000):
        labels = [rng.randrange(k) for _ in range(n)]
        if len(set(labels)) == k:
            break
    else:  # vanishingly unlikely; fall back to seeding each group with one task
        perm = list(range(n))
        rng.shuffle(perm)
        labels = [0] * n
        for g, t in enumerate(perm):
            labels[t] = g if g < k else rng.randrange(k)
    groups = [[t for t in range(n) if labels[t] == g] for g in range(k)]
    return sorted(groups, key=lambda g: g[0])


def partition_of(assignment: list[int]) -> list[list[int]]:
    if hasattr(assignment, "pending_key"):        # a planned run's grouping (compare_plan): known after it
        return assignment
    used = sorted(set(assignment), key=lambda a: assignment.index(a))
    return [[t for t, a in enumerate(assignment) if a == k] for k in used]


def groups_text(groups: list[list[int]], names: list[str]) -> str:
    return " ".join("{" + ",".join(names[t] for t in g) + "}" for g in groups)


def best_val_losses(res: dict, task_sets: list[list[int]]) -> list[list[float]]:
    """For each task set: the per-task validation losses at the epoch where the set's summed val
    loss is lowest (a network's own best epoch; the trainer's best epoch would also count
    untrained tasks of a partial run). Single tasks each get their own best epoch."""
    from ..checkpoint import read_json
    names = res["tasks"]                      # first: a planned run (compare_plan) stops here, not at the file
    hist = read_json(Path(res["_dir"]) / "history.json")
    vals = [h["val"]["loss"] for h in hist if "val" in h]
    if not vals:
        raise ValueError(f"{res['_dir']}: no validation results in history.json")
    out = []
    for ts in task_sets:
        best = min(vals, key=lambda v: sum(v[names[t]] for t in ts))
        out.append([best[names[t]] for t in ts])
    return out


# ----------------------------------------------------------------------------- selections (TAG, HOA, CS)

def train_selection(cmp: Comparison, key: str, label: str, sel: Any, **sections) -> dict:
    """Train a TAG/HOA selection: overlapping networks as such (``networks`` method: a task is
    trained in every chosen network containing it, served by its best one), or — with
    --overlap partition — only the served partition (``fixed``). ``sections``: config fields
    per section (e.g. train={"aggregator": "pcgrad"})."""
    aux = any(sel.auxiliary())
    if aux and cmp.overlap == "train":
        cfg = cmp.cfg("networks", [list(s) for s in sel.networks], [list(a) for a in sel.auxiliary()], **sections)
    else:
        cfg = cmp.cfg("fixed", sel.partition(), **sections)
    return cmp.run(key, cfg, label)


def trained_networks(cmp: Comparison, sel: Any) -> list:
    return [[list(s) for s in sel.networks]] if cmp.overlap == "train" and any(sel.auxiliary()) else []


def selection_notes(cmp: Comparison, sel: Any) -> list[str]:
    notes = []
    if any(sel.auxiliary()):
        how = ("each task trained in every chosen network containing it and evaluated from its best one"
               if cmp.overlap == "train" else "only the served partition trained (--overlap partition)")
        nets = groups_text([list(s) for s in sel.networks], cmp.names)
        notes.append(f"overlapping networks {nets}: {how}; groups = each task's best network, as the paper "
                     "reports")
    if not sel.optimal:
        notes.append(f"selection not proven optimal ({sel.solver}, node limit)")
    return notes


def selection_row(cmp: Comparison, method: str, k: int, label: str, sel: Any, r: dict,
                  costs: list[tuple[str, float, float]]) -> Row:
    """The row of a trained selection ``sel`` (run ``r``; ``costs``: every run it needed)."""
    return Row(method, k, cmp.repeats(r, label), costs, [sel.partition()], trained_networks(cmp, sel),
               notes=selection_notes(cmp, sel))


def affinity_rows(cmp: Comparison, method: str, key: str, label: str, matrix, run: dict, detail: str,
                  **sections) -> list[Row]:
    """TAG's selection (``grouping_search.tag_select``) per K on ``matrix`` (N, N) — TAG's affinity or
    CS's similarity, measured in ``run`` —, each selection trained (OUT/KEY/kK; ``sections``: config
    fields per section, e.g. train={"aggregator": "pcgrad"}); ``detail``: the prefix of the
    selections' entries in comparison.json."""
    from ..grouping_search import tag_select
    out = []
    for k in cmp.ks:
        sel = tag_select(matrix, k)
        cmp.details[f"{detail}_selection_k{k}"] = sel.to_dict()
        r = train_selection(cmp, f"{key}/k{k}", f"{label} K={k}", sel, **sections)
        out.append(selection_row(cmp, method, k, f"{label} K={k}", sel, r, [cmp.cost(run), cmp.cost(r)]))
    return out
