"""The plan of a comparison (``fastdmtg compare --dry-run``) and its executors (``--executor local|ray``).

A plan is found by running the baselines' own code (fastdmtg/baselines/) with a ``Planner``: a
``Comparison`` whose ``_train`` records the run (key, config, dependencies) instead of training it
and returns a placeholder result. A placeholder knows its folder (``_dir``: a later run
may start from it, e.g. DMTG's ``train.init_from`` = the naive run — a dependency) and nothing else:
reading a result (TAG's affinity matrix, HOA's validation losses, DMTG's grouping for the two-shot
retraining) stops that method there, and the plan says which runs are still to come:
"+ the selected networks (known after tag/affinity)". Finished runs (results.json) are read as the
local executor reads them, so a plan made after some runs finished goes further.

Executors:

* ``local`` (default): the comparison as it always ran — in this process, one run after the other;
  the plan only gives the progress lines their ``[done/total]``.
* ``ray``: waves. Each wave plans, submits every planned run as a Ray task (``num_cpus`` per run,
  ``num_gpus`` per run on a GPU node; a dependency inside the wave is passed as the object reference
  of the run it needs, so Ray starts it when that run has finished) and waits; the next wave plans
  again with the finished runs' results (the selected networks). When a wave plans nothing, the
  local executor writes the tables from the finished runs — it trains nothing more, so the tables
  are those of ``--executor local`` on the same seeds. A task whose worker dies is retried by Ray
  (``max_retries``) and resumes from the run's last checkpoint, as a re-invoked compare does; the
  run folder's lock (fastdmtg.checkpoint.RunLock: a lock file taken atomically, recording host and pid) keeps two executors out of one folder.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import baselines
from .compare_runs import Comparison, _comparable
from .log import get_logger
from .seeds import fmt_flops, fmt_time

_log = get_logger("fastdmtg.compare")

RAY_MISSING = ("error: --executor ray needs Ray: pip install -e \".[ray]\" (or pip install \"ray>=2.9\"), "
               "or use --executor local")

class Pending(Exception):
    """A result of a run that has not been trained yet was needed."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class PendingValue:
    """A planned run's field that is only known once it has run (e.g. DMTG's assignment); usable as a
    Row's groups, refused as a config's groups (Planner.cfg)."""

    def __init__(self, key: str):
        self.pending_key = key


class PendingResult(dict):
    """The result of a planned run: its folder and key; reading anything else raises Pending."""

    def __init__(self, key: str, run_dir: Path, planner: "Planner", cfg):
        # the fields Comparison.run itself reads (its cost entry); the time is unknown
        super().__init__(_dir=str(run_dir), _key=key, _planned=True, num_branches=cfg.num_branches or planner.n,
                         epochs=cfg.train.epochs, train_time_s=math.nan)
        self._planner, self.key = planner, key

    def __getitem__(self, name):
        if name == "_dir":
            self._planner.touched.add(self.key)
        if name == "assignment":
            return PendingValue(self.key)
        if name in self:
            return dict.__getitem__(self, name)
        raise Pending(self.key)

    def get(self, name, default=None):
        return self[name]                 # a field the run will have: unknown yet (Pending), never "absent"


@dataclass
class PlannedRun:
    key: str
    label: str
    method: str                    # the --methods entry that first needed it
    cfg: object                    # fastdmtg.config.Config
    run_dir: Path
    deps: list[str]                # keys of planned runs it starts from (their folders appear in its config)
    resume: bool                   # a checkpoint is there: the run continues
    branch_epochs: float = 0.0     # K × epochs (the tables' encoder-cost unit)
    gflops: float | None = None    # forward GFLOPs per image of its network (fastdmtg.flops), --dry-run only


@dataclass
class Plan:
    runs: list[PlannedRun] = field(default_factory=list)           # to train (or resume)
    finished: list[str] = field(default_factory=list)              # reused as they are
    calls: int = 0                                                 # run() calls: the progress total
    stages: list[tuple[str, str]] = field(default_factory=list)    # (method, key it waits for)
    errors: list[tuple[str, str]] = field(default_factory=list)    # (method, message)
    sec_per_branch_epoch: float | None = None                      # from the finished runs in OUT

    @property
    def total(self) -> str:
        return f"{self.calls}{'+' if self.stages else ''}"

    def eta_s(self) -> float | None:
        if self.sec_per_branch_epoch is None:
            return None
        return sum(r.branch_epochs for r in self.runs) * self.sec_per_branch_epoch


class Planner(Comparison):
    """A Comparison that records the runs it would train (see the module's docstring)."""

    def __init__(self, cmp: Comparison):          # noqa: super().__init__ would rebuild the data source
        self.__dict__.update(cmp.__dict__)
        self._cfgs, self._cost, self._by_config, self._memo, self.details = {}, {}, {}, {}, {}
        self._wall = {}
        self.count, self.total, self.log = 0, None, lambda *a, **k: None
        self.plan = Plan()
        self.touched: set[str] = set()
        self._planned: dict[str, PlannedRun] = {}            # by key
        self._dirs: dict[str, str] = {}                      # run folder → planned key
        self._idents: dict[str, str] = {}                    # config identity → planned key
        self._method = ""

    def cfg(self, method, groups=None, *args, **kwargs):
        if hasattr(groups, "pending_key"):
            raise Pending(groups.pending_key)
        return super().cfg(method, groups, *args, **kwargs)

    def run(self, key, cfg, label, cost_factor=1.0):
        self.plan.calls += 1
        self._label = label
        return super().run(key, cfg, label, cost_factor)

    def _train(self, cfg, run_dir, resume):
        key = str(Path(run_dir).relative_to(self.out))
        ident = json.dumps(_comparable(cfg.to_dict()), sort_keys=True)
        same = self._idents.get(ident)
        if same is not None:                  # the local executor would reuse that run when it has finished
            self._dirs[str(run_dir)] = same
            return PendingResult(same, run_dir, self, cfg)
        leaves = set(_strings(cfg.to_dict()))
        deps = sorted({k for d, k in self._dirs.items() if d in leaves})
        run = PlannedRun(key, self._label, self._method, cfg, Path(run_dir), deps, resume,
                         branch_epochs=float(cfg.num_branches or self.n) * cfg.train.epochs)
        self.plan.runs.append(run)
        self._planned[key], self._dirs[str(run_dir)], self._idents[ident] = run, key, key
        return PendingResult(key, run_dir, self, cfg)

    def make(self, methods: list[str]) -> Plan:
        # as Comparison.run_methods: the reference run first (every NormGain's: naive MTL), then each
        # method's baseline (fastdmtg/baselines/)
        steps = [(baselines.reference_name(), self.reference)] + [
            (m, lambda m=m: baselines.get(m).rows(self, m)) for m in methods]
        for m, fn in steps:
            self._method, self.touched = m, set()
            try:
                fn()
            except Pending as e:
                self.plan.stages.append((m, e.key))
            except Exception as e:                   # noqa: BLE001 — the local executor reports it
                waits = sorted(k for k in self.touched if k in self._planned)
                if waits:                             # it read the files of a run that is not there yet
                    self.plan.stages.append((m, waits[0]))
                else:
                    self.plan.errors.append((m, f"{type(e).__name__}: {e}"))
        self.plan.stages = list(dict.fromkeys(self.plan.stages))
        self.plan.finished = [k for k, (_, s) in self._cost.items() if k not in self._planned and not math.isnan(s)]
        self.plan.sec_per_branch_epoch = _rate(self.out, self._cost, self._planned)
        return self.plan


def _later(method: str) -> str:
    """What a method still adds once the run it waits for is done (its baseline's ``later``)."""
    return baselines.get(method).later


def _strings(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _strings(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            yield from _strings(v)
    elif isinstance(d, str):
        yield d


def _rate(out: Path, cost: dict, planned: dict) -> float | None:
    """Seconds per branch-epoch measured by the finished runs of this comparison (their train_time_s)."""
    be = sec = 0.0
    for key, (b, s) in cost.items():
        if key not in planned and b > 0 and not math.isnan(s):
            be, sec = be + b, sec + s
    return sec / be if be > 0 and sec > 0 else None


class ProgressETA:
    """The ETA of the local pass's progress lines (``[3/12, ETA 4.0 min] label: key``): the branch-epochs
    of the plan's runs not done yet × the seconds per branch-epoch measured so far — the wall time of
    the runs trained in this pass (start-up and evaluation included), else the train_time_s of the
    runs finished earlier in OUT (the plan's measurement). "" while no step time is known or nothing
    of the plan is left; the runs known after a stage ("12+") are not in it."""

    def __init__(self, plan: Plan):
        self.left = {r.key: r.branch_epochs for r in plan.runs}      # by key: the plan's runs to train
        self.rate = plan.sec_per_branch_epoch

    def seconds(self, cmp: Comparison) -> float | None:
        rate = _rate(cmp.out, cmp._wall, {}) or _rate(cmp.out, cmp._cost, {}) or self.rate
        left = sum(be for key, be in self.left.items() if key not in cmp._cost)
        return None if rate is None or left <= 0 else left * rate

    def __call__(self, cmp: Comparison) -> str:
        s = self.seconds(cmp)
        return "" if s is None else fmt_time(s / 3600)


def make_plan(cmp: Comparison, methods: list[str]) -> Plan:
    return Planner(cmp).make(methods)


def add_flops(plan: Plan) -> None:
    """Forward GFLOPs per image of each planned run's network (fastdmtg.flops.count_flops, one count
    per distinct model); left None when fvcore is not installed or the count fails."""
    try:
        from .flops import count_flops
    except ImportError:
        return
    cache: dict[str, float | None] = {}
    for r in plan.runs:
        c = r.cfg
        key = json.dumps([c.model.__dict__, c.data.image_size, str(c.data.tasks), c.grouping.method,
                          str(c.grouping.groups)], sort_keys=True, default=str)
        if key not in cache:
            try:
                f = count_flops(c)
                cache[key] = (f.get("fvcore_1_per_mac") or f["torch_2_per_mac"] / 2) / 1e9
            except Exception:                          # noqa: BLE001 — an estimate never sinks the plan
                cache[key] = None
        r.gflops = cache[key]


def format_plan(plan: Plan, device: str = "cpu") -> str:
    lines = [f"plan: {len(plan.runs)} runs to train" + (f", {len(plan.finished)} finished (reused)" if plan.finished else "")
             + (f", {len(plan.stages)} stage(s) known later" if plan.stages else "")]
    by_method: dict[str, list[PlannedRun]] = {}
    for r in plan.runs:
        by_method.setdefault(r.method, []).append(r)
    for m, runs in by_method.items():
        lines.append(f"  {m}: {len(runs)} run{'s' if len(runs) != 1 else ''}")
        for r in runs:
            extra = [f"K={r.cfg.num_branches}", f"{r.cfg.train.epochs} epochs"]
            if r.resume:
                extra.append("resumes")
            if r.gflops is not None:
                extra.append(f"{fmt_flops(r.gflops)}/image")
            dep = f" ← after {', '.join(r.deps)}" if r.deps else ""
            lines.append(f"    {r.key} ({', '.join(extra)}){dep}")
    for m, key in plan.stages:
        lines.append(f"  {m}: + {_later(m)} (known after {key})")
    for m, msg in plan.errors:
        lines.append(f"  {m}: cannot be planned: {msg}")
    eta = plan.eta_s()
    lines.append(f"ETA on {device}: " + (f"{fmt_time(eta / 3600)} for the planned runs, sequentially "
                                         f"({plan.sec_per_branch_epoch:.1f} s per branch-epoch measured by the "
                                         "finished runs)" if eta is not None else
                                         "unknown (no finished run in this folder to measure a step time)"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Ray

@dataclass
class RayOptions:
    address: str | None = None          # --ray-address: an existing cluster; None: a local instance
    cpus_per_run: float = 1.0
    gpus_per_run: float | None = None   # None: 1 when this machine has a GPU, else 0
    max_retries: int = 3
    num_cpus: int | None = None         # a local instance's CPUs (None: Ray's count)


def ray_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def _train_task(cfg, run_dir: str, threads: int, *deps) -> str:
    """One run in a Ray worker: torch's threads set to the task's CPUs (two runs on one machine do not
    fight over the cores), resumed from its checkpoint when one is there (a retry after a killed
    worker). Returns the run folder: the object a dependent run waits for."""
    import torch
    torch.set_num_threads(max(1, int(threads)))
    from .checkpoint import has_checkpoint
    from .train import train
    train(cfg, run_dir, resume=has_checkpoint(run_dir), progress=False)
    return run_dir


def _start_ray(opts: RayOptions) -> bool:
    """Connect to --ray-address or start a local instance (unless Ray is up) → whether it was started here."""
    import ray
    if ray.is_initialized():
        return False
    kw = {"address": opts.address} if opts.address else {"num_cpus": opts.num_cpus, "include_dashboard": False}
    try:
        ray.init(log_to_driver=False, configure_logging=False, **kw)    # fastdmtg's log format stays
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(f"--ray-address {opts.address}: cannot connect to a Ray cluster there ({e})"
                         if opts.address else f"cannot start a local Ray instance: {e}") from None
    return True


def _ray_wave(task, todo: list[PlannedRun], opts: RayOptions, failed: set[str], log) -> None:
    """Submit the wave's runs (a dependency inside the wave as the object reference of the run it needs)
    and wait for them, in the order they finish; a failed run's key goes to ``failed``."""
    import ray
    refs: dict[str, object] = {}
    for r in todo:               # plan order: a run's dependencies come before it
        deps = [refs[d] for d in r.deps if d in refs]
        refs[r.key] = task.remote(r.cfg, str(r.run_dir), opts.cpus_per_run, *deps)
    keys = {ref: key for key, ref in refs.items()}
    left, done = list(refs.values()), 0
    while left:
        ready, left = ray.wait(left, num_returns=1)
        done += 1
        try:
            ray.get(ready[0])
            log(f"[{done}/{len(refs)}] ray: {keys[ready[0]]} done")
        except Exception as e:     # noqa: BLE001 — ray wraps the run's error
            failed.add(keys[ready[0]])
            log(f"[{done}/{len(refs)}] ray: {keys[ready[0]]} failed ({type(e).__name__}); "
                "the local pass trains it again and reports it")


def run_on_ray(cmp: Comparison, methods: list[str], opts: RayOptions, log=_log.info) -> None:
    """Train every run of the comparison on Ray (waves of plans, see the module's docstring); returns
    when nothing is left to train. Failed runs are left to the local pass that writes the tables
    (it trains them again in this process and reports the failure as today)."""
    import signal

    import ray
    import torch
    # ray.init installs its own SIGTERM handler in this process and leaves it there; the local pass
    # that follows needs the trainer's (a stop request saves the run): restored at the end
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    started = _start_ray(opts)
    gpus = opts.gpus_per_run if opts.gpus_per_run is not None else (1.0 if torch.cuda.is_available() else 0.0)
    task = ray.remote(_train_task).options(num_cpus=opts.cpus_per_run, num_gpus=gpus,
                                           max_retries=opts.max_retries, retry_exceptions=False)
    failed: set[str] = set()
    try:
        wave = 0
        while True:
            plan = make_plan(cmp, methods)
            todo = [r for r in plan.runs if r.key not in failed]
            if not todo:
                return
            wave += 1
            log(f"ray wave {wave}: {len(todo)} runs" + (f" (+ {len(plan.stages)} stage(s) after them)"
                                                         if plan.stages else ""))
            _ray_wave(task, todo, opts, failed, log)
    except KeyboardInterrupt:
        from .train import TrainingInterrupted
        raise TrainingInterrupted("interrupted while the runs trained on Ray (each keeps its last checkpoint)") from None
    finally:
        if started:
            ray.shutdown()
        for sig, h in handlers.items():
            signal.signal(sig, h)
