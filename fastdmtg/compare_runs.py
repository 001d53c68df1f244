"""A comparison's run machinery: the runs the baselines (fastdmtg/baselines/) ask for, trained or
reused one after the other in this process.

``Comparison.cfg`` builds a run's config, ``run`` trains (or reuses) it in OUT/KEY, ``once`` shares a
run or a measurement between baselines, ``repeats`` adds the ``--seeds`` repeats (fastdmtg/seeds.py),
``cost`` is a run's entry in the cost columns. ``run_methods`` asks each baseline named in --methods
for its rows. fastdmtg/compare_plan.py's Planner is a Comparison that records the runs instead.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from . import baselines
from .baselines import Row
# config keys that may differ between invocations without invalidating a finished run (config.FIELD_EFFECTS)
from .config import SAME_RESULTS_FIELDS as _VOLATILE
from .config import Config, evolve
from .log import get_logger
from .methods import method_class

_log = get_logger("fastdmtg.compare")


def _info(msg: str, flush: bool = True) -> None:
    _log.info(msg)


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
        # the progress lines' ETA (compare_plan.ProgressETA: the plan's runs and a measured step time)
        self.eta: Callable[[Comparison], str] | None = None
        self._cost: dict[str, tuple[float, float]] = {}
        # runs trained by this object: (branch-epochs, wall seconds of the whole run, start-up and
        # evaluation included — what the ETA needs; train_time_s counts the training loop only)
        self._wall: dict[str, tuple[float, float]] = {}
        self.clock: Callable[[], float] = time.perf_counter
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
        if self.aggregator and method_class(method).groups_example:
            # --aggregator: the networks a grouping method selected (the methods given their groups:
            # fixed, networks), not the reference run (naive MTL stays plain: NormGain's base)
            train.setdefault("aggregator", self.aggregator)
        model = {"branches": branches, **sections.pop("model", {})}
        return evolve(base or self.base, grouping=grouping, train=train, model=model, **sections)

    def _tag(self, label: str, key: str) -> str:
        """The progress line's head: ``[done/total, ETA …] label: key``."""
        count = f"{self.count}{'' if self.total is None else '/' + self.total}"
        eta = self.eta(self) if self.eta is not None else ""
        return f"[{count}{', ETA ' + eta if eta else ''}] {label}: {key}"

    def run(self, key: str, cfg: Config, label: str, cost_factor: float = 1.0) -> dict:
        """Train (or reuse) the run in OUT/key; returns its results with '_dir' and '_key'."""
        from .checkpoint import has_checkpoint, read_json
        self.count += 1
        run_dir = self.out / key
        cfg = evolve(cfg, name=key.replace('/', '-'))
        ident = json.dumps(_comparable(cfg.to_dict()), sort_keys=True)
        tag, wall = self._tag(label, key), None
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
                t0 = self.clock()
                res = self._train(cfg, run_dir, resume)
                if not res.get("_planned"):
                    wall = self.clock() - t0
                    self.log(f"    done in {wall:.0f} s: {_summary(res)}", flush=True)
            self._by_config[ident] = key
        res["_dir"], res["_key"] = str(run_dir), key
        self._cfgs[key] = cfg
        self._cost[key] = (res["num_branches"] * res["epochs"] * cost_factor, float(res["train_time_s"]))
        if wall is not None:
            self._wall[key] = (self._cost[key][0], wall)
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

    def reference(self) -> dict:
        """The NormGain reference run (the baseline declaring ``reference``: naive MTL)."""
        return baselines.reference(self)

    # ------------------------------------------------------------------ baselines
    def method_rows(self, name: str) -> list[Row]:
        """The rows of the baseline serving ``name`` (its runs trained or reused through this object)."""
        rows = baselines.get(name).rows(self, name)
        if self.aggregator and baselines.get(name).aggregated:
            for row in rows:
                row.method += f"+{self.aggregator}"
        return rows

    def run_methods(self, methods: list[str]) -> tuple[list[Row], int]:
        from .train import TrainingInterrupted, WriteStopped
        rows, failed = [], 0
        self.reference()                               # the reference of every NormGain
        for m in methods:
            try:
                rows.extend(self.method_rows(m))
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
