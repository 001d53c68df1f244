"""Comparison of grouping methods on one recipe: the DMTG paper's Tables 1–4 and A4/A5.

    fastdmtg compare --recipe synthetic_k3 --methods naive,stl,rg,tag,hoa,bmtn,dmtg,dmtg-two-shot \\
                     --k 2,3 --out DIR [--set KEY=VALUE ...] [--seeds N] [--rg-partitions 3] [--data-root PATH]

Every method is a grouping method of the same trainer on the same models, data and metrics; this
module only decides which runs a method needs (each in its own folder under DIR, trained by
``fastdmtg.train.train``), reads their results and writes the tables. Resumable: a run folder with
results.json is reused, one with only checkpoints is resumed; re-running the same command continues
an interrupted comparison. One progress line per run ([done/total]). The runs are planned first
(``--dry-run`` prints the plan) and trained by ``--executor local`` (here, one after the other) or
``--executor ray`` (fastdmtg/compare_plan.py; docs/cluster.md).

Methods (docs/baselines.md has the details and the deviations from the papers):
    naive          naive MTL, one encoder (the NormGain reference)
    stl            one network per task: ``fixed`` groups 0|1|...|N−1 with nothing shared
    rg             random partition into K groups, mean ± std over --rg-partitions partitions
    tag            TAG: affinity run (tag-affinity) → tag_select → train the chosen networks
    hoa            HOA: all pair networks + the STL singles → hoa_select → train the chosen networks
    bmtn           BMTN: RSA affinity from the STL networks → split point + clustering → train
    dmtg           DMTG (one shot)
    dmtg-two-shot  DMTG's groups retrained from scratch and from the naive-MTL weights (Table 4)
    cs             the TAG paper's CS: gradient cosine similarity (cs-affinity run) → tag_select → train
    uw, gradnorm, pcgrad, mgda, cagrad, nash-mtl, imtl, aligned-mtl, upgrad
                   training augmentations on one shared network (fastdmtg.methods.AUGMENTATIONS)
    tag-pcgrad     TAG's selected networks trained with PCGrad (the TAG paper §5)
    --aggregator NAME trains every grouping method's selected networks with NAME (rows METHOD+NAME)

Outputs in DIR: comparison.md (all tables), comparison.csv (one row per method × K),
groupings.csv (Table A4/A5 shape), per_task.csv, comparison.json (everything, including the
affinity matrices and the selections), comparison.tex (booktabs) and, with --seeds N ≥ 2, the DMTG
grouping-stability matrices (fastdmtg/seeds.py).

Relative encoder cost = Σ over the runs a method needed of (encoder branches × epochs), divided by
naive MTL's (1 × epochs). A TAG affinity run counts 1 + N/affinity_every (each measurement costs
about N encoder forward+backward passes). Hours = Σ train_time_s of those runs / 3600; for RG
both are per random partition (the mean over seeds).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, apply_overrides, evolve, get_recipe
from .log import add_output_flags, get_logger, progress_flag
from .log import setup as setup_logging

_log = get_logger("fastdmtg.compare")


def _info(msg: str, flush: bool = True) -> None:
    _log.info(msg)
from .partition import format_groups

ALL_METHODS = ["naive", "stl", "rg", "tag", "hoa", "bmtn", "dmtg", "dmtg-two-shot"]
ALIASES = {"naive-mtl": "naive", "two-shot": "dmtg-two-shot"}
# the TAG paper's comparison (§5): the CS grouping, the training augmentations on one shared network
# (fastdmtg.methods.AUGMENTATIONS: uw, gradnorm, pcgrad, and the torchjd aggregators) and TAG's groups
# trained with PCGrad; tables in the paper's order: grouping methods, augmentations, combinations
GROUPING_EXTRA = ["cs"]
COMBINATIONS = ["tag-pcgrad"]
# grouping methods whose selected networks (fixed / networks runs) --aggregator trains
AGGREGATED = ("stl", "rg", "tag", "hoa", "bmtn", "dmtg-two-shot", "cs")


def known_methods() -> list[str]:
    from .methods import AUGMENTATIONS
    return ALL_METHODS + GROUPING_EXTRA + list(AUGMENTATIONS) + COMBINATIONS


def method_order(m: str) -> int:
    """0 grouping methods, 1 training augmentations, 2 combinations (the TAG paper's layout)."""
    from .methods import AUGMENTATIONS
    return 2 if m in COMBINATIONS else 1 if m in AUGMENTATIONS else 0


# config keys that may differ between invocations without invalidating a finished run (config.FIELD_EFFECTS)
from .config import SAME_RESULTS_FIELDS as _VOLATILE  # noqa: E402


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    d.pop("name", None)
    for sec, key in _VOLATILE:
        d.get(sec, {}).pop(key, None)
    return d


def _same_config(old: dict, new: dict) -> bool:
    """Equal up to volatile keys; a key the old run's config does not have (added to the config
    since) counts as equal."""
    a, b = _comparable(old), _comparable(new)
    for sec, vals in b.items():
        if isinstance(vals, dict):
            prev = a.get(sec, {})
            if any(k in prev and prev[k] != v for k, v in vals.items()):
                return False
        elif sec in a and a[sec] != vals:
            return False
    return True


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


class Comparison:
    def __init__(self, base: Config, out: Path, ks: list[int], seeds: int = 3, overlap: str = "train",
                 rsa_images: int = 256, naive_cfg: Config | None = None, progress: bool | None = False,
                 flops: bool = True, log=_info, train_seeds: int = 1, aggregator: str | None = None):
        from .pipelines import build_source
        self.aggregator = aggregator            # --aggregator: the grouping methods' networks train with it
        self.base, self.out, self.ks, self.seeds = base, Path(out), ks, seeds
        self.overlap, self.rsa_images, self.progress, self.log = overlap, rsa_images, progress, log
        self.flops = flops
        self.train_seeds = train_seeds          # --seeds: every evaluated run trained with this many seeds
        self._cfgs: dict[str, Config] = {}
        data = build_source(base.data, progress=False)
        self.names = data.taskset.names
        self.specs = data.taskset.specs
        self.image_size = data.image_size
        self.unified_error = data.taskset.unified_error
        self.n = len(self.names)
        self.naive_base = naive_cfg
        self.count = 0
        self.total: str | None = None           # the plan's run count ("12", or "12+" with stages to expand)
        self._cost: dict[str, tuple[float, float]] = {}
        self._by_config: dict[str, str] = {}
        self._memo: dict[str, object] = {}
        self.details: dict[str, object] = {}

    # ------------------------------------------------------------------ runs
    def cfg(self, method: str, groups: list[list[int]] | None = None, auxiliary: list[list[int]] | None = None,
            branches: int = 0, base: Config | None = None, **sections: dict) -> Config:
        """The base config trained by ``method`` (typed values; ``sections``: other fields per section,
        e.g. ``model={"shared": "none"}``). K = ``branches``, or 0: the method's own (auto)."""
        grouping = {"method": method, "groups": groups or [], "auxiliary": auxiliary or []}
        train = {"progress": self.progress is not False, **sections.pop("train", {})}
        if self.aggregator and method in ("fixed", "networks"):
            train.setdefault("aggregator", self.aggregator)
        model = {"branches": branches, **sections.pop("model", {})}
        return evolve(base or self.base, grouping=grouping, train=train, model=model, **sections)

    def run(self, key: str, cfg: Config, label: str, cost_factor: float = 1.0) -> dict:
        """Train (or reuse) the run in OUT/key; returns its results with '_dir' and '_key'."""
        from .checkpoint import has_checkpoint, read_json
        self.count += 1
        run_dir = self.out / key
        cfg = evolve(cfg, name=key.replace('/', '-'))
        ident = json.dumps(_comparable(cfg.to_dict()), sort_keys=True)
        tag = f"[{self.count}{'' if self.total is None else '/' + self.total}] {label}: {key}"
        same = self._by_config.get(ident)
        if same is not None and same != key and (self.out / same / "results.json").exists():
            res = read_json(self.out / same / "results.json")
            self.log(f"{tag} — identical to {same}, reused", flush=True)
            run_dir, key = self.out / same, same
        else:
            cfg_path = run_dir / "config.json"
            if cfg_path.exists():
                old = read_json(cfg_path)
                if not _same_config(old, cfg.to_dict()):
                    raise ValueError(f"{run_dir} holds a run with another configuration (the recipe, --set or "
                                     "--k changed?); delete the folder or use another --out")
            res_path = run_dir / "results.json"
            if res_path.exists():
                res = read_json(res_path)
                self.log(f"{tag} — finished earlier, reused", flush=True)
                _refuse_diverged(res, cfg, run_dir)
            else:
                resume = has_checkpoint(run_dir)
                self.log(f"{tag} — {'resuming' if resume else 'training'} "
                         f"({cfg.grouping.method}, K={cfg.num_branches}, {cfg.train.epochs} epochs)", flush=True)
                t0 = time.perf_counter()
                res = self._train(cfg, run_dir, resume)
                if not res.get("_planned"):
                    self.log(f"    done in {time.perf_counter() - t0:.0f} s: {_summary(res)}", flush=True)
            self._by_config[ident] = key
        res["_dir"], res["_key"] = str(run_dir), key
        self._cfgs[key] = cfg
        self._cost[key] = (res["num_branches"] * res["epochs"] * cost_factor, float(res["train_time_s"]))
        return res

    def _train(self, cfg: Config, run_dir: Path, resume: bool) -> dict:
        """Train one run in this process (fastdmtg.compare_plan.Planner records it instead)."""
        from .train import train
        return train(cfg, run_dir, resume=resume, progress=self.progress)

    def repeats(self, r: dict, label: str) -> list[dict]:
        """``r`` and its repeats with training seeds train.seed + 1 … + (--seeds − 1) (folders KEY-seedS),
        the same config otherwise: the runs a row's mean ± std is taken over."""
        from .seeds import repeat_runs
        return repeat_runs(self, r, label)

    def cost(self, res: dict) -> tuple[str, float, float]:
        be, sec = self._cost[res["_key"]]
        return res["_key"], be, sec

    def once(self, name: str, fn):
        if name not in self._memo:
            self._memo[name] = fn()
        return self._memo[name]

    # ------------------------------------------------------------------ shared runs
    def naive(self) -> dict:
        def go():
            cfg = self.cfg("naive-mtl", base=self.naive_base)     # --naive-recipe, else the recipe itself
            return self.run("naive", cfg, "naive")
        return self.once("naive", go)

    def stl_cfg(self) -> tuple[Config, list[str]]:
        """STL: nothing may be shared between the task networks — a configured shared trunk is
        switched off (and the result checked on the built model)."""
        from .models import build_parts
        notes, model = [], {}
        m = self.base.model
        if m.arch == "resnet_celeba" and m.shared != "none":
            model["shared"] = "none"
            notes.append(f"STL: model.shared={m.shared} overridden to none (single-task networks share nothing)")
        if m.arch in ("xception", "vit_base") and m.shared_blocks != 0:
            model["shared_blocks"] = 0
            notes.append(f"STL: model.shared_blocks={m.shared_blocks} overridden to 0 (nothing shared)")
        cfg = self.cfg("fixed", [[t] for t in range(self.n)], model=model)
        shared = build_parts(cfg.model, self.specs, self.image_size).shared
        if any(True for _ in shared.parameters()):
            raise ValueError("STL: this model still has a shared trunk with parameters (model.shared); "
                             "single-task networks must not share one")
        return cfg, notes

    def stl(self) -> dict:
        def go():
            cfg, notes = self.stl_cfg()
            for note in notes:
                self.log(f"    note: {note}", flush=True)
            res = self.run("stl", cfg, "stl")
            res["_notes"] = notes
            return res
        return self.once("stl", go)

    def dmtg_run(self, k: int) -> dict:
        train = {}
        if self.base.train.init == "naive" and not self.base.train.init_from:
            train["init_from"] = self.naive()["_dir"]     # the paper's recipes start from it
        return self.once(f"dmtg{k}", lambda: self.run(f"dmtg/k{k}", self.cfg("dmtg", branches=k, train=train),
                                                      f"dmtg K={k}"))

    def train_selection(self, key: str, label: str, sel, **sections) -> dict:
        """Train a TAG/HOA selection: overlapping networks as such (``networks`` method: a task is
        trained in every chosen network containing it, served by its best one), or — with
        --overlap partition — only the served partition (``fixed``). ``sections``: config fields
        per section (e.g. train={"aggregator": "pcgrad"})."""
        aux = any(sel.auxiliary())
        if aux and self.overlap == "train":
            cfg = self.cfg("networks", [list(s) for s in sel.networks], [list(a) for a in sel.auxiliary()], **sections)
        else:
            cfg = self.cfg("fixed", sel.partition(), **sections)
        return self.run(key, cfg, label)

    # ------------------------------------------------------------------ methods
    def m_naive(self) -> list[Row]:
        r = self.naive()
        return [Row("naive", None, self.repeats(r, "naive"), [self.cost(r)], [partition_of(r["assignment"])])]

    def m_stl(self) -> list[Row]:
        r = self.stl()
        return [Row("stl", None, self.repeats(r, "stl"), [self.cost(r)], [partition_of(r["assignment"])], notes=list(r["_notes"]) +
                    ["K=N branches with nothing shared in one model train exactly like N separate networks "
                     "(losses never mix; same initialisation and batch order; one joint best epoch)"])]

    def m_rg(self) -> list[Row]:
        rows = []
        for k in self.ks:
            if k > self.n:
                continue
            res, costs, groups = [], [], []
            for s in range(self.seeds):
                part = random_partition(self.n, k, s)
                r = self.run(f"rg/k{k}/seed{s}", self.cfg("fixed", part), f"rg K={k} seed {s}")
                res.append(r)
                costs.append(self.cost(r))
                groups.append(part)
            rows.append(Row("rg", k, res, costs, groups, notes=[f"mean ± std over {self.seeds} random partitions; "
                                                                "cost and hours per partition"]))
        return rows

    def tag_affinity(self) -> tuple[dict, np.ndarray]:
        def go():
            cfg = self.cfg("tag-affinity")
            r = self.run("tag/affinity", cfg, "tag affinity", cost_factor=1.0 + self.n / cfg.tag.affinity_every)
            if r.get("tag_affinity") is None:
                raise ValueError("the TAG affinity run recorded no measurement (tag.affinity_every larger "
                                 "than the number of steps?)")
            return r, np.array(r["tag_affinity"])
        return self.once("tag_affinity", go)

    def m_tag(self) -> list[Row]:
        return self._tag_rows("tag", "tag", "tag")

    def _tag_rows(self, method: str, key: str, label: str, **sections) -> list[Row]:
        """TAG's selection per K from the one affinity run, each trained (``sections``: config fields
        per section, e.g. train={"aggregator": "pcgrad"} for TAG + PCGrad)."""
        from .grouping_search import tag_select
        aff_run, Z = self.tag_affinity()
        self.details["tag_affinity"] = {"matrix": Z.tolist(), "measurements": aff_run["tag_affinity_measurements"],
                                        "every": aff_run["tag_affinity_every"], "run": aff_run["_key"]}
        rows = []
        for k in self.ks:
            sel = tag_select(Z, k)
            self.details[f"tag_selection_k{k}"] = sel.to_dict()
            r = self.train_selection(f"{key}/k{k}", f"{label} K={k}", sel, **sections)
            rows.append(Row(method, k, self.repeats(r, f"{label} K={k}"), [self.cost(aff_run), self.cost(r)],
                            [sel.partition()], self._trained_networks(sel), notes=self._selection_notes(sel)))
        return rows

    def _trained_networks(self, sel) -> list:
        return [[list(s) for s in sel.networks]] if self.overlap == "train" and any(sel.auxiliary()) else []

    def _selection_notes(self, sel) -> list[str]:
        notes = []
        if any(sel.auxiliary()):
            how = ("each task trained in every chosen network containing it and evaluated from its best one"
                   if self.overlap == "train" else "only the served partition trained (--overlap partition)")
            nets = _groups_text([list(s) for s in sel.networks], self.names)
            notes.append(f"overlapping networks {nets}: {how}; groups = each task's best network, as the paper "
                         "reports")
        if not sel.optimal:
            notes.append(f"selection not proven optimal ({sel.solver}, node limit)")
        return notes

    def hoa_tables(self) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Single-task and pair validation losses, each network at its own best epoch."""
        def go():
            stl = self.stl()
            pair = np.full((self.n, self.n), np.nan)
            pairs = [(a, b) for a in range(self.n) for b in range(a + 1, self.n)]
            # every pair run before any result is read: a plan (compare_plan) lists them all at once
            runs = [self.run(f"hoa/pair_{a}_{b}", self.cfg("networks", [[a, b]]),
                             f"hoa pair ({self.names[a]}, {self.names[b]})") for a, b in pairs]
            single = np.array([v[0] for v in _best_val_losses(stl, [[t] for t in range(self.n)])])
            for (a, b), r in zip(pairs, runs):
                la, lb = _best_val_losses(r, [[a, b]])[0]
                pair[a, b], pair[b, a] = la, lb
            return single, pair, runs
        return self.once("hoa_tables", go)

    def m_hoa(self) -> list[Row]:
        from .grouping_search import hoa_select
        single, pair, pair_runs = self.hoa_tables()
        stl = self.stl()
        self.details["hoa_losses"] = {"single": single.tolist(), "pair": np.nan_to_num(pair).tolist(),
                                      "note": "pair[t][u] = val loss of t in the network {t,u}"}
        rows = []
        for k in self.ks:
            sel = hoa_select(single, pair, k)
            self.details[f"hoa_selection_k{k}"] = sel.to_dict()
            r = self.train_selection(f"hoa/k{k}", f"hoa K={k}", sel)
            costs = [self.cost(stl)] + [self.cost(p) for p in pair_runs] + [self.cost(r)]
            rows.append(Row("hoa", k, self.repeats(r, f"hoa K={k}"), costs, [sel.partition()], self._trained_networks(sel),
                            notes=self._selection_notes(sel)))
        return rows

    def m_bmtn(self) -> list[Row]:
        from .grouping_search import bmtn_select
        from .methods.bmtn import split_options, stl_rsa_affinity
        splits = split_options(self.base.model, self.specs, self.image_size)   # refuses other backbones
        stl = self.stl()
        rsa = self.once("rsa", lambda: stl_rsa_affinity(stl["_dir"], self.rsa_images))
        A = rsa["affinity"]
        self.details["bmtn_rsa"] = {"locations": rsa["locations"], "num_images": rsa["num_images"],
                                    "affinity": A.tolist()}
        recipe_split = splits[self.base.model.shared]
        rows = []
        for k in self.ks:
            budget = recipe_split["shared_params"] + k * recipe_split["branch_params"]
            sel = bmtn_select(A, k, splits, budget)
            self.details[f"bmtn_selection_k{k}"] = {key: v for key, v in sel.items()}
            r = self.run(f"bmtn/k{k}", self.cfg("fixed", sel["groups"], model={"shared": sel["split"]}), f"bmtn K={k}")
            notes = [f"split {sel['split']} (encoder params {sel['params']:,} ≤ budget {budget:,}), "
                     f"clustering cost {sel['cost']:.3f}"]
            if not sel["optimal"]:
                notes.append("clustering by complete linkage + local moves (too many partitions to enumerate)")
            rows.append(Row("bmtn", k, self.repeats(r, f"bmtn K={k}"), [self.cost(stl), self.cost(r)], [sel["groups"]],
                            notes=notes))
        return rows

    def m_dmtg(self) -> list[Row]:
        rows = []
        for k in self.ks:
            r = self.dmtg_run(k)
            rs = self.repeats(r, f"dmtg K={k}")             # each seed may find its own grouping
            rows.append(Row("dmtg", k, rs, [self.cost(r)], [partition_of(x["assignment"]) for x in rs]))
        return rows

    def m_dmtg_two_shot(self) -> list[Row]:
        rows = []
        for k in self.ks:
            d = self.dmtg_run(k)
            groups = partition_of(d["assignment"])
            scratch = self.run(f"dmtg-two-shot/k{k}/scratch", self.cfg("fixed", groups),
                               f"dmtg two-shot K={k} (scratch)")
            nv = self.naive()
            init = self.run(f"dmtg-two-shot/k{k}/naive-init",
                            self.cfg("fixed", groups, train={"init_from": nv["_dir"]}),
                            f"dmtg two-shot K={k} (naive init)")
            rows.append(Row("dmtg two-shot (scratch)", k, self.repeats(scratch, f"dmtg two-shot K={k} (scratch)"),
                            [self.cost(d), self.cost(scratch)], [groups]))
            rows.append(Row("dmtg two-shot (naive init)", k, self.repeats(init, f"dmtg two-shot K={k} (naive init)"),
                            [self.cost(d), self.cost(nv), self.cost(init)], [groups]))
        return rows

    # ------------------------------------------------------------------ the TAG paper's comparison
    def m_cs(self) -> list[Row]:
        """CS: the cosine similarity of the tasks' gradients measured in one naive-MTL run
        (cs-affinity), then TAG's selection on it; each selection trained as TAG's."""
        from .grouping_search import tag_select
        def go():
            cfg = self.cfg("cs-affinity")
            r = self.run("cs/affinity", cfg, "cs similarity", cost_factor=1.0 + self.n / cfg.cs.every)
            if r.get("cs_similarity") is None:
                raise ValueError("the CS run recorded no measurement (cs.every larger than the number of steps?)")
            return r, np.array(r["cs_similarity"])
        run, C = self.once("cs_similarity", go)
        self.details["cs_similarity"] = {"matrix": C.tolist(), "measurements": run["cs_measurements"],
                                         "every": run["cs_every"], "run": run["_key"]}
        rows = []
        for k in self.ks:
            sel = tag_select(C, k)
            self.details[f"cs_selection_k{k}"] = sel.to_dict()
            r = self.train_selection(f"cs/k{k}", f"cs K={k}", sel)
            rows.append(Row("cs", k, self.repeats(r, f"cs K={k}"), [self.cost(run), self.cost(r)], [sel.partition()],
                            self._trained_networks(sel), notes=self._selection_notes(sel)))
        return rows

    def m_augmentation(self, name: str) -> list[Row]:
        """A training augmentation (UW, GradNorm, PCGrad, a torchjd aggregator) on one shared network."""
        r = self.run(name, self.cfg(name), name)
        return [Row(name, None, self.repeats(r, name), [self.cost(r)], [partition_of(r["assignment"])],
                    notes=["one shared network (naive-MTL shape); Train time includes the augmentation's "
                           "extra backward passes"])]

    def m_tag_pcgrad(self) -> list[Row]:
        """TAG's selected networks trained with PCGrad (the TAG paper §5: the two are complementary)."""
        return self._tag_rows("tag+pcgrad", "tag-pcgrad", "tag+pcgrad", train={"aggregator": "pcgrad"})

    def run_methods(self, methods: list[str]) -> tuple[list[Row], int]:
        from .train import TrainingInterrupted, WriteStopped
        rows, failed = [], 0
        self.naive()                                   # the reference of every NormGain
        from .methods import AUGMENTATIONS
        for m in methods:
            fn = (lambda m=m: self.m_augmentation(m)) if m in AUGMENTATIONS else getattr(self, "m_" + m.replace("-", "_"))
            try:
                new = fn()
                if self.aggregator and m in AGGREGATED:
                    for row in new:
                        row.method += f"+{self.aggregator}"
                rows.extend(new)
            except (TrainingInterrupted, WriteStopped):       # stop the comparison: resumable / disk full
                raise
            except (ValueError, NotImplementedError, RuntimeError, FileNotFoundError) as e:
                failed += 1
                self.log(f"method {m} failed: {e}", flush=True)
                rows.append(Row(m, None, [], error=str(e)))
        _add_flops(rows, self)
        return rows, failed


def _refuse_diverged(res: dict, cfg: Config, run_dir: Path) -> None:
    """A reused run that diverged fails again (as it did when it ran) unless train.on_divergence=warn."""
    from .train import Diverged
    if res.get("diverged") and cfg.train.on_divergence == "error":
        rule = (res.get("divergence") or {}).get("rule", "")
        raise Diverged(f"{run_dir}: training diverged ({rule}); results.json says \"diverged\": true", res)


def _summary(res: dict) -> str:
    """One-line test summary; a partial run (``networks`` with untrained tasks) over its tasks only."""
    skip = set(res.get("untrained_tasks") or [])
    tasks = [t for i, t in enumerate(res["tasks"]) if i not in skip]
    loss = sum(res["test"]["loss"][t] for t in tasks)
    text = f"test total loss {loss:.4f}"
    if res.get("total_error") is not None:
        text += f", total error {sum(res['test']['error'][t] for t in tasks):.2f}"
    return text + (f" (over its {len(tasks)} trained tasks)" if skip else "")


def _best_val_losses(res: dict, task_sets: list[list[int]]) -> list[list[float]]:
    """For each task set: the per-task validation losses at the epoch where the set's summed val
    loss is lowest (a network's own best epoch; the trainer's best epoch would also count
    untrained tasks of a partial run). Single tasks each get their own best epoch."""
    from .checkpoint import read_json
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


def _add_flops(rows: list[Row], cmp: Comparison) -> None:
    """GFLOPs per image (forward, batch 1, 1 FLOP per multiply-add as the paper's thop count) of
    each row's evaluated training network, from ``fastdmtg.bench.count_flops``; skipped when the
    bench module or fvcore is unavailable, or with --no-flops."""
    if not cmp.flops:
        return
    try:
        from .bench import count_flops
    except ImportError:
        return
    cache: dict[str, float | None] = {}
    for row in rows:
        if not row.results:
            continue
        cfg = Config.load(Path(row.results[0]["_dir"]) / "config.json")
        key = json.dumps([cfg.model.__dict__, cfg.data.image_size, cfg.data.synthetic_groups,
                          cfg.data.synthetic_tasks_per_group, str(cfg.data.tasks)], sort_keys=True, default=str)
        if key not in cache:
            try:
                f = count_flops(cfg)
                macs = f.get("fvcore_1_per_mac") or f["torch_2_per_mac"] / 2
                cache[key] = macs / 1e9
            except Exception:                          # a benchmark helper must never sink the tables
                cache[key] = None
        row.flops = cache[key]


# ----------------------------------------------------------------------------- tables

def _ms(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def row_metrics(row: Row, naive: dict) -> dict:
    from .metrics import normgain, normgain_error
    if row.error:
        return {}
    tl = [r["total_loss"] for r in row.results]
    te = [r.get("total_error") for r in row.results]
    ngl = [normgain(naive["test"]["loss"], r["test"]["loss"])["value"] for r in row.results]
    # NormGain_E over the tasks that have an evaluation metric (all of them for CelebA and Taskonomy; the
    # classification tasks of a folder dataset with regression tasks too)
    nge = [(normgain_error(naive["test"], r["test"]) or {}).get("value") for r in row.results]
    naive_units = naive["epochs"]
    # RG: one row holds S independent partitions; its cost is that of one of them (mean)
    per = max(len(row.results), 1) if row.method == "rg" else 1
    cost = sum(c[1] for c in row.cost_runs) / naive_units / per
    hours = sum(c[2] for c in row.cost_runs) / 3600 / per
    out = {}
    for name, vals in (("total_loss", tl), ("total_error", te), ("normgain_loss", ngl), ("normgain_error", nge)):
        out[name], out[name + "_std"] = _ms(vals)
    out.update(rel_encoder_cost=cost, hours=hours, runs=len(row.cost_runs), n=len(row.results))
    return out


def _task_metrics(results: list[dict], names: list[str]) -> dict:
    """Per task, the mean over ``results`` of its test error (when it has one) and of its MAE / RMSE
    (regression tasks): {"error:<task>": …, "mae:<task>": …, "rmse:<task>": …}."""
    out = {}
    for t in names:
        errs = [r["test"]["error"][t] for r in results if (r["test"].get("error") or {}).get(t) is not None]
        if errs:
            out[f"error:{t}"] = float(np.mean(errs))
        for key in ("mae", "rmse"):
            v = [r["test"]["metrics"][t][key] for r in results
                 if key in ((r["test"].get("metrics") or {}).get(t) or {})]
            if v:
                out[f"{key}:{t}"] = float(np.mean(v))
    return out


def _fmt(v, std=None, n=1, digits=4, signed=False):
    if v is None:
        return "—"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    if n > 1 and std is not None:
        s += f" ± {std:.{digits}f}"
    return s


def _groups_text(groups: list[list[int]], names: list[str]) -> str:
    return " ".join("{" + ",".join(names[t] for t in g) + "}" for g in groups)


#: the name the human-read tables (Markdown, LaTeX) give a method: naive MTL as `fastdmtg train`
#: calls it (grouping.method); comparison.json / .csv keep the method keys of --methods
DISPLAY = {"naive": "naive-mtl"}


def display(method: str) -> str:
    return DISPLAY.get(method, method)


def _cite(tables: str, paper: bool) -> str:
    """" (Tables …)" after a heading when the comparison runs one of the paper's recipes, else nothing:
    on your own data the table numbers of the paper would be a false citation."""
    return f" ({tables})" if paper else ""


def _reference_metrics(row: Row, m: dict) -> dict:
    """The naive-MTL row is the NormGain reference: its NormGain is "—" (empty in the CSV and null in the
    JSON), not a number. (With --seeds the reference is the first naive seed; the other naive seeds
    against it would measure seed noise, not a gain.)"""
    if row.method != "naive" or not m:
        return m
    return dict(m, **{k: None for k in ("normgain_loss", "normgain_loss_std", "normgain_error", "normgain_error_std")})


def _seeds_note(rows: list[Row]) -> str:
    n = max((len(r.results) for r in rows if not r.error and r.method != "rg"), default=1)
    rg = any(r.method == "rg" and not r.error for r in rows)
    parts = ([f"each cell the mean of {n} seeds"] if n > 1 else []) + \
        (["RG: the mean over its random partitions"] if rg else [])
    return ("" if not parts else " — " + "; ".join(parts))


def build_tables(rows: list[Row], names: list[str], naive: dict, paper: bool = False) -> dict:
    """→ {"markdown": str, "csv": str, "groupings_csv": str, "per_task_csv": str, "rows": [...]}.
    ``paper``: the recipe is one of the paper's (its table numbers are cited in the headings)."""
    from .seeds import fmt_flops, fmt_time
    has_flops = any(r.flops is not None for r in rows)
    ms = [_reference_metrics(r, row_metrics(r, naive)) for r in rows]
    # a column no row has a value in is left out (e.g. the total error when a task is a regression)
    has_te = any(m.get("total_error") is not None for m in ms)
    has_nge = any(m.get("normgain_error") is not None for m in ms)
    head = ["Method", "K", "Total loss ↓"] + (["Total error ↓"] if has_te else []) + ["NormGain_L (%) ↑"] + \
        (["NormGain_E (%) ↑"] if has_nge else []) + \
        ["Rel. encoder cost", "Train time", "Runs"] + (["FLOPs/image"] if has_flops else []) + ["Groups (served)"]
    md = [f"## Results{_cite('Tables 1 and 3', paper)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv_rows, json_rows = [], []
    for row, m in zip(rows, ms):
        k = "—" if row.k is None else str(row.k)
        if row.error:
            md.append(f"| {display(row.method)} | {k} | failed: {row.error} |" + " |" * (len(head) - 3))
            json_rows.append({"method": row.method, "K": row.k, "error": row.error})
            continue
        groups = (_groups_text(row.groups[0], names) if len({format_groups(g) for g in row.groups}) == 1 else
                  f"{len(row.groups)} random partitions" if row.method == "rg" else
                  f"{len({format_groups(g) for g in row.groups})} groupings over {len(row.groups)} seeds")
        cells = [display(row.method), k, _fmt(m["total_loss"], m["total_loss_std"], m["n"])] + \
            ([_fmt(m["total_error"], m["total_error_std"], m["n"], 2)] if has_te else []) + \
            [_fmt(m["normgain_loss"], m["normgain_loss_std"], m["n"], 2, True)] + \
            ([_fmt(m["normgain_error"], m["normgain_error_std"], m["n"], 2, True)] if has_nge else []) + \
            [f"{m['rel_encoder_cost']:.2f}", fmt_time(m["hours"]), str(m["runs"])]
        if has_flops:
            cells.append(fmt_flops(row.flops))
        cells.append(groups)
        md.append("| " + " | ".join(cells) + " |")
        rec = {"method": row.method, "K": row.k, **m, "gflops_per_image": row.flops,
               "groups": [[[names[t] for t in g] for g in part] for part in row.groups],
               "networks": [[[names[t] for t in g] for g in nets] for nets in row.networks],
               "runs_used": [c[0] for c in row.cost_runs], "notes": row.notes}
        json_rows.append(rec)
        csv_rows.append({"method": row.method, "K": "" if row.k is None else row.k,
                         **{key: ("" if m[key] is None else m[key]) for key in
                            ("total_loss", "total_loss_std", "total_error", "total_error_std", "normgain_loss",
                             "normgain_loss_std", "normgain_error", "normgain_error_std", "rel_encoder_cost",
                             "hours", "runs", "n")},
                         "gflops_per_image": "" if row.flops is None else row.flops,
                         "groups": _groups_text(row.groups[0], names) if len(row.groups) == 1 else ""})
    notes = [(row.method, row.k, n) for row in rows for n in row.notes]
    if notes:
        md += ["", "Notes:"] + [f"- {m}{'' if k is None else f' K={k}'}: {n}" for m, k, n in notes]
    md += ["", "Total loss/error: sums over tasks on the test split (total error = Σ 100·(1 − acc)). NormGain vs "
           "the naive-MTL run (its own row: — , the reference). Rel. encoder cost: Σ branches × epochs of every run the method needed / naive MTL's "
           "(TAG's affinity run counts 1 + N/affinity_every); RG: per random partition. Train time: Σ train_time_s of "
           "those runs (one seed). ± : std over the seeds (--seeds) or RG's partitions." + (" FLOPs/image: forward per image of the evaluated training network (all K·N heads, batch 1), "
                            "1 FLOP per multiply-add (fastdmtg.bench.count_flops; the paper's thop convention)."
                            if has_flops else "")]

    # per-task table (Table 2 shape)
    md += ["", f"## Per task: test loss (NormGain_L %){_cite('Table 2', paper)}{_seeds_note(rows)}", "",
           "| Method | K | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    pt_rows = []
    from .metrics import normgain
    for row in rows:
        if row.error or not row.results:
            continue
        k = "—" if row.k is None else str(row.k)
        per = [np.mean([r["test"]["loss"][t] for r in row.results]) for t in names]
        gain = [np.mean([normgain(naive["test"]["loss"], r["test"]["loss"])["per_task"].get(t, float("nan"))
                         for r in row.results]) for t in names]
        md.append(f"| {display(row.method)} | {k} | " + " | ".join(
            f"{v:.4f}" + ("" if row.method == "naive" else f" ({g:+.1f})") for v, g in zip(per, gain)) + " |")
        pt_rows.append({"method": row.method, "K": row.k, **{f"loss:{t}": v for t, v in zip(names, per)},
                        **{f"gain:{t}": g for t, g in zip(names, gain)}, **_task_metrics(row.results, names)})

    # per-task metric table: the error where a task has one, MAE / RMSE for regression tasks (your own tasks)
    md += ["", f"## Per task: test error (%) or MAE / RMSE{_seeds_note(rows)}", "",
           "| Method | K | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for row in rows:
        if row.error or not row.results:
            continue
        m = _task_metrics(row.results, names)
        cells = [f"{m[f'error:{t}']:.2f}" if f"error:{t}" in m else
                 (f"{m[f'mae:{t}']:.4g} / {m[f'rmse:{t}']:.4g}" if f"mae:{t}" in m else "—") for t in names]
        md.append(f"| {display(row.method)} | {'—' if row.k is None else row.k} | " + " | ".join(cells) + " |")

    # two-shot ablation (Table 4 shape)
    ts = [r for r in rows if r.method.startswith("dmtg") and not r.error]
    if any(r.method.startswith("dmtg two-shot") for r in ts):
        md += ["", f"## One-shot vs two-shot with DMTG's groups{_cite('Table 4', paper)}", "",
               "| K | Method | Total loss ↓ | NormGain_L (%) ↑ | Total error ↓ | NormGain_E (%) ↑ |",
               "|---|---|---|---|---|---|"]
        order = {"dmtg two-shot (scratch)": 0, "dmtg two-shot (naive init)": 1, "dmtg": 2}
        for row in sorted(ts, key=lambda r: (r.k, order.get(r.method, 3))):
            m = row_metrics(row, naive)
            label = {"dmtg": "DMTG (one-shot)", "dmtg two-shot (scratch)": "retrain from scratch",
                     "dmtg two-shot (naive init)": "retrain from naive-MTL init"}[row.method]
            md.append(f"| {row.k} | {label} | {_fmt(m['total_loss'])} | {_fmt(m['normgain_loss'], signed=True, digits=2)} "
                      f"| {_fmt(m['total_error'], digits=2)} | {_fmt(m['normgain_error'], signed=True, digits=2)} |")

    # groupings (Tables A4/A5 shape): entry = the group serving the task (1-based); "+g" = also trained in g
    md += ["", f"## Groupings{_cite('Tables A4/A5', paper)}: group serving each task; (+g) also trained in group g", "",
           "| Method | K | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    g_rows = []
    for row in rows:
        if row.error:
            continue
        for i, part in enumerate(row.groups):
            label = display(row.method) + (f" (seed {i})" if len(row.groups) > 1 else "")     # RG: partition i
            served = {t: gi + 1 for gi, g in enumerate(part) for t in g}
            aux = {t: [] for t in range(len(names))}
            if i < len(row.networks):
                # a selection's networks are in the order of its served groups (each serves >= 1 task)
                for ni, net in enumerate(row.networks[i]):
                    for t in net:
                        if served[t] != ni + 1:
                            aux[t].append(ni + 1)
            cells = [f"{served[t]}" + (f" (+{','.join(map(str, aux[t]))})" if aux[t] else "") for t in range(len(names))]
            k = "—" if row.k is None else str(row.k)
            md.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
            g_rows.append({"method": label, "K": row.k, **{t: c for t, c in zip(names, cells)}})

    def to_csv(dict_rows):
        if not dict_rows:
            return ""
        buf = io.StringIO()
        keys = list(dict_rows[0].keys())
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(dict_rows)
        return buf.getvalue()

    return {"markdown": "\n".join(md) + "\n", "csv": to_csv(csv_rows), "groupings_csv": to_csv(g_rows),
            "per_task_csv": to_csv(pt_rows), "rows": json_rows}


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdmtg compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="named recipe (fastdmtg recipes); default synthetic_k3, or "
                                                  "with --data-root the dataset found there (folder_k3, celeba9_k3, "
                                                  "taskonomy5_k3)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list of {','.join(ALL_METHODS)} "
                   "(naive = naive-mtl, as `train --method` calls it); also "
                   "cs, tag-pcgrad and the training augmentations uw, gradnorm, pcgrad, mgda, cagrad, nash-mtl, imtl, "
                   "aligned-mtl, upgrad (one shared network each)")
    p.add_argument("--aggregator", default=None, metavar="NAME",
                   help="train the grouping methods' selected networks (stl, rg, tag, hoa, bmtn, cs, dmtg-two-shot) "
                        "with this training augmentation (train.aggregator; rows named METHOD+NAME)")
    p.add_argument("--k", default=None, help="comma list of K values (default: the recipe's model.branches)")
    p.add_argument("--out", required=True, help="comparison folder (one subfolder per run; re-run to resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every run, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--data-root", help="dataset folder (CelebA / Taskonomy / your own DIR/labels.csv)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every method's evaluated networks with N seeds (train.seed, +1, …) → mean ± std "
                        "in every numeric column, and a grouping-stability matrix (default 1)")
    p.add_argument("--rg-partitions", type=int, default=3, help="RG: random partitions per K (default 3)")
    p.add_argument("--overlap", choices=["train", "partition"], default="train",
                   help="TAG/HOA overlapping selections: train every chosen network (default) or only the "
                        "served partition")
    p.add_argument("--naive-recipe", help="recipe of the naive-MTL reference (default: the recipe itself with "
                                          "grouping.method=naive-mtl, i.e. the same optimizer as every method)")
    p.add_argument("--rsa-images", type=int, default=256, help="BMTN: images for the RDMs (default 256)")
    add_output_flags(p, "the trainer's progress bars")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOPs column (fastdmtg.bench.count_flops)")
    add_executor_flags(p)
    p.add_argument("--stability", nargs="+", metavar="RUN_DIR",
                   help="only write the grouping-stability matrix of these finished runs (e.g. DMTG trained with "
                        "several --set train.seed=S) to --out, and exit")
    return p


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (runs, dependencies, estimated cost) and exit; trains nothing")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one run after the other in this process (default); ray: every run a Ray task "
                        "(pip install -e \".[ray]\"; docs/cluster.md)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (ray start --head); default: a "
                                                      "local Ray instance on this machine's CPUs/GPUs")
    p.add_argument("--ray-cpus-per-run", type=float, default=1.0,
                   help="Ray: CPUs per run, also its torch threads (default 1)")
    p.add_argument("--ray-gpus-per-run", type=float, default=None,
                   help="Ray: GPUs per run (default 1 when this machine has a GPU, else 0)")
    p.add_argument("--ray-max-retries", type=int, default=3,
                   help="Ray: retries of a run whose worker died; it resumes from its last checkpoint (default 3)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="Ray: CPUs of the local instance (default: all)")


def execute(cmp: Comparison, methods: list[str], args) -> int | None:
    """Plan; with --dry-run print the plan (→ exit 0); with --executor ray train every run on Ray. Then
    (None) the local pass trains what is left in this process and writes the tables."""
    from .compare_plan import RAY_MISSING, RayOptions, add_flops, format_plan, make_plan, ray_available, run_on_ray
    if args.executor == "ray" and not ray_available():
        print(RAY_MISSING, file=sys.stderr)
        return 2
    if args.ray_cpus_per_run <= 0 or (args.ray_gpus_per_run or 0) < 0 or args.ray_max_retries < 0:
        print("error: --ray-cpus-per-run must be > 0, --ray-gpus-per-run and --ray-max-retries >= 0", file=sys.stderr)
        return 2
    plan = make_plan(cmp, methods)
    if args.dry_run:
        if cmp.flops:
            add_flops(plan)
        print(format_plan(plan, device=cmp.base.train.device))
        return 0
    _log.info(f"plan: {len(plan.runs)} runs to train, {plan.total} in all"
              + (f" (+ the runs known after {', '.join(sorted({k for _, k in plan.stages}))})" if plan.stages else ""))
    if args.executor == "ray":
        run_on_ray(cmp, methods, RayOptions(args.ray_address, args.ray_cpus_per_run, args.ray_gpus_per_run,
                                            args.ray_max_retries, args.ray_num_cpus))
        plan = make_plan(cmp, methods)
    cmp.total = plan.total
    return None


def compare_main(argv: list[str]) -> int:
    from .checkpoint import WriteFailed
    from .train import RunStopped, TrainingInterrupted, exit_code
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.stability:
        from .seeds import stability_main
        return stability_main(args.stability, args.out)
    methods = []
    for m in (x.strip() for x in args.methods.split(",") if x.strip()):
        m = ALIASES.get(m, m)
        if m not in known_methods():
            print(f"error: --methods: unknown method {m!r}; known: {', '.join(known_methods())}", file=sys.stderr)
            return 2
        if m not in methods:
            methods.append(m)
    methods.sort(key=method_order)            # grouping methods, augmentations, combinations (stable)
    from .methods import AUGMENTATIONS
    if args.aggregator is not None and args.aggregator not in AUGMENTATIONS:
        print(f"error: --aggregator: unknown training augmentation {args.aggregator!r}; known: "
              f"{', '.join(AUGMENTATIONS)}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.rg_partitions < 1:
        print("error: --seeds and --rg-partitions must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.recipe is None:
            from .cli import default_recipe
            args.recipe = default_recipe(args.data_root)
        over = ([f"data.root={args.data_root}"] if args.data_root else []) + list(args.overrides)
        base = apply_overrides(get_recipe(args.recipe), over)
        naive_cfg = apply_overrides(get_recipe(args.naive_recipe), over) if args.naive_recipe else None
        ks = [int(x) for x in args.k.split(",")] if args.k else [base.num_branches]
        if ks == [None]:
            raise ConfigError("--k: the recipe's K depends on the data's number of tasks, which is unknown; give --k")
        if any(k < 1 for k in ks):
            raise ConfigError("--k: every K must be >= 1")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cmp = Comparison(base, out, ks, seeds=args.rg_partitions, train_seeds=args.seeds, overlap=args.overlap, rsa_images=args.rsa_images,
                         naive_cfg=naive_cfg, progress=progress_flag(args), flops=not args.no_flops,
                         aggregator=args.aggregator)
        _log.info(f"comparison of {', '.join(methods)} on {args.recipe} ({cmp.n} tasks), K ∈ {ks}, in {out}")
        code = execute(cmp, methods, args)        # the plan; --dry-run prints it; --executor ray trains the runs
        if code is not None:
            return code
        rows, failed = cmp.run_methods(methods)
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"\n{e}\ninterrupted: re-run the same command to continue the comparison"
              if isinstance(e, TrainingInterrupted) else f"error: {e}", file=sys.stderr)
        return exit_code(e)
    naive = cmp.naive()
    from .config import RECIPE_FOLLOWS
    paper = RECIPE_FOLLOWS.get(args.recipe) in ("paper", "reference")       # the paper's datasets and recipes
    tables = build_tables(rows, cmp.names, naive, paper=paper)
    from .checkpoint import atomic_write_json, atomic_write_text
    atomic_write_text(out / "comparison.md", f"# Comparison: {args.recipe}, K ∈ {ks}\n\n" + tables["markdown"])
    atomic_write_text(out / "comparison.csv", tables["csv"])
    atomic_write_text(out / "groupings.csv", tables["groupings_csv"])
    atomic_write_text(out / "per_task.csv", tables["per_task_csv"])
    from .seeds import write_extra_tables
    written = write_extra_tables(out, rows, cmp.names, naive, title=f"Comparison: {args.recipe}, K ∈ {ks}")
    from .report import round_floats
    atomic_write_json(out / "comparison.json", round_floats({"recipe": args.recipe, "ks": ks, "methods": methods,
                                                 "aggregator": args.aggregator,
                                                 "tasks": cmp.names, "seeds": args.seeds,
                                                 "rg_partitions": args.rg_partitions, "overlap": args.overlap,
                                                 "rows": tables["rows"], "details": cmp.details}))
    print()
    print(tables["markdown"])
    print(f"tables: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'groupings.csv'}, "
          + ", ".join(str(p) for p in written))
    return 1 if failed else 0
