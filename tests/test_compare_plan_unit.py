"""The compare planner and the Ray executor (fastdmtg/compare_plan.py) without training and without
Ray: plans of a Comparison on the synthetic data (its runs, dependencies, stages, finished runs, ETA),
the plan's text, the FLOPs estimate, and ``run_on_ray`` driving a stand-in ``ray`` module (waves,
dependencies passed as object references, failures, interruption, the signal handlers). Fast; the
real Ray runs are tests/test_compare_ray.py (slow). Written for the mutation targets
``compare_plan`` and ``compare_ray`` (benchmarks/mutation.py)."""
from __future__ import annotations

import json
import math
import signal
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastdmtg import compare_plan as CP
from fastdmtg.compare import Comparison
from fastdmtg.config import apply_overrides, get_recipe

SETS = ["train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=64", "data.synthetic_val=32",
        "data.synthetic_test=32", "train.epochs=3", "train.batch_size=32", "data.image_size=16", "model.width=2",
        "train.init=naive"]


def _cmp(out: Path, ks=(2,), seeds=2, **kw) -> Comparison:
    return Comparison(apply_overrides(get_recipe("synthetic_k3"), SETS), out, list(ks), seeds=seeds, flops=False, **kw)


def _runs(plan) -> list[tuple]:
    return [(r.key, r.label, r.method, r.deps, r.resume, r.branch_epochs) for r in plan.runs]


# ----------------------------------------------------------------------------- plans

def test_plan_runs_dependencies_and_stages(tmp_path):
    """N = 4 tasks, K = 2, 2 RG seeds, 3 epochs: every run once, in the order the methods need them;
    dmtg and the two-shot's naive-init retraining start from the naive run (a dependency), the
    selections and the retraining are stages known later; nothing is written."""
    out = tmp_path / "cmp"
    plan = CP.make_plan(_cmp(out), ["stl", "rg", "dmtg", "tag", "dmtg-two-shot", "uw"])
    assert _runs(plan) == [
        ("naive", "naive", "naive", [], False, 3.0),
        ("stl", "stl", "stl", [], False, 12.0),                      # K = N = 4
        ("rg/k2/seed0", "rg K=2 seed 0", "rg", [], False, 6.0),
        ("rg/k2/seed1", "rg K=2 seed 1", "rg", [], False, 6.0),
        ("dmtg/k2", "dmtg K=2", "dmtg", ["naive"], False, 6.0),
        ("tag/affinity", "tag affinity", "tag", [], False, 3.0),
        ("uw", "uw", "uw", [], False, 3.0)]
    assert [r.run_dir for r in plan.runs] == [out / r.key for r in plan.runs]
    assert [r.cfg.grouping.method for r in plan.runs] == ["naive-mtl", "fixed", "fixed", "fixed", "dmtg",
                                                         "tag-affinity", "uw"]
    assert plan.runs[4].cfg.train.init_from == str(out / "naive")
    assert plan.stages == [("tag", "tag/affinity"), ("dmtg-two-shot", "dmtg/k2")]
    assert plan.errors == [] and plan.finished == []
    # run() calls: naive, stl, 2 × rg, dmtg, affinity, uw (dmtg-two-shot stops at its first config)
    assert plan.calls == 7 and plan.total == "7+"
    assert plan.sec_per_branch_epoch is None and plan.eta_s() is None
    assert not out.exists()


def test_identical_configs_are_planned_once(tmp_path):
    """K = N: every random partition into 4 groups is the STL partition — the same config, so the RG
    runs are the STL run (the local executor would reuse it), not runs of their own."""
    plan = CP.make_plan(_cmp(tmp_path / "cmp", ks=(4,)), ["stl", "rg"])
    assert [r.key for r in plan.runs] == ["naive", "stl"]
    assert plan.calls == 4 and plan.total == "4"


def test_a_method_that_reads_a_planned_runs_files_waits_for_the_first_of_them(tmp_path):
    """A method failing on the files of runs still to train waits for them (the first by key); one
    that fails otherwise is an error of the plan, with the exception's type and message."""

    class P(CP.Planner):
        def m_reads_two(self):
            a, b = self.stl()["_dir"], self.naive()["_dir"]          # two planned folders read
            return (Path(a) / "results.json").read_text() + (Path(b) / "results.json").read_text()

        def m_broken(self):
            raise KeyError("no such thing")

    plan = P(_cmp(tmp_path / "cmp")).make(["reads-two", "broken"])
    assert [r.key for r in plan.runs] == ["naive", "stl"]
    assert plan.stages == [("reads-two", "naive")]
    assert plan.errors == [("broken", "KeyError: 'no such thing'")]
    text = CP.format_plan(plan)
    assert "  reads-two: + the runs chosen from its results (known after naive)" in text
    assert "  broken: cannot be planned: KeyError: 'no such thing'" in text


def test_stages_are_listed_once(tmp_path):
    """tag and tag-pcgrad both wait for the one affinity run: two stages; a method listed twice: once."""
    plan = CP.make_plan(_cmp(tmp_path / "cmp"), ["tag", "tag-pcgrad", "tag"])
    assert plan.stages == [("tag", "tag/affinity"), ("tag-pcgrad", "tag/affinity")]
    assert [r.key for r in plan.runs] == ["naive", "tag/affinity"]


def _finish(out: Path, run, **res):
    """A finished run in OUT: its config and a results.json (what Comparison.run reads back)."""
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(run.cfg.to_dict()))
    (run.run_dir / "results.json").write_text(json.dumps(res))


def test_plan_after_runs_finished_reuses_them_and_measures_the_eta(tmp_path):
    """naive finished in 6 s (1 branch × 3 epochs: 2 s per branch-epoch) and stl with an unknown time:
    both reused (no dependency on naive left); the ETA counts only the planned runs and only the
    finished run with a time."""
    out = tmp_path / "cmp"
    first = CP.make_plan(_cmp(out), ["stl", "dmtg"])
    base = {"epochs": 3, "assignment": [0, 0, 0, 0], "tasks": ["a", "b", "c", "d"]}
    _finish(out, first.runs[0], num_branches=1, train_time_s=6.0, **base)
    _finish(out, first.runs[1], num_branches=4, train_time_s=float("nan"), **base)
    (out / "dmtg" / "k2").mkdir(parents=True)
    (out / "dmtg" / "k2" / "checkpoints").mkdir()
    plan = CP.make_plan(_cmp(out), ["stl", "dmtg"])
    assert [(r.key, r.deps) for r in plan.runs] == [("dmtg/k2", [])]
    assert plan.finished == ["naive"]                              # stl: no measured time
    assert plan.sec_per_branch_epoch == pytest.approx(2.0)
    assert plan.eta_s() == pytest.approx(6.0 * 2.0)                # K = 2 × 3 epochs × 2 s
    text = CP.format_plan(plan, device="cpu")
    assert text.splitlines()[0] == "plan: 1 runs to train, 1 finished (reused)"
    assert text.splitlines()[-1] == ("ETA on cpu: 12 s for the planned runs, sequentially (2.0 s per branch-epoch "
                                     "measured by the finished runs)")


def test_every_string_of_a_config_is_a_possible_dependency():
    """A run depends on a planned run whose folder appears anywhere in its config: nested sections,
    lists and tuples included."""
    d = {"a": "x", "b": {"c": ["y", ("z", {"d": "w"}), 3]}, "e": 1.5, "f": None}
    assert list(CP._strings(d)) == ["x", "y", "z", "w"]


def test_rate_of_the_finished_runs():
    """Seconds per branch-epoch: Σ seconds / Σ branch-epochs over the finished runs with a time and a
    cost; planned runs never count; nothing measured → None."""
    nan = float("nan")
    cost = {"a": (2.0, 10.0), "b": (3.0, 5.0), "planned": (4.0, 100.0), "nan": (1.0, nan), "free": (0.0, 7.0)}
    assert CP._rate(Path("."), cost, {"planned": None}) == pytest.approx(15.0 / 5.0)
    assert CP._rate(Path("."), {"z": (2.0, 0.0)}, {}) is None                # no time measured
    assert CP._rate(Path("."), {"free": (0.0, 7.0)}, {}) is None             # no cost
    assert CP._rate(Path("."), {"n": (1.0, nan)}, {}) is None
    assert CP._rate(Path("."), {}, {}) is None
    assert CP._rate(Path("."), {"one": (1.0, 4.0)}, {}) == 4.0               # 1 branch × 1 epoch: the least cost
    assert CP._rate(Path("."), {"quick": (2.0, 0.5)}, {}) == 0.25            # under a second in all


# ----------------------------------------------------------------------------- the placeholder result

def test_pending_result_knows_its_folder_and_nothing_else(tmp_path):
    planner = CP.Planner(_cmp(tmp_path / "cmp"))
    cfg = apply_overrides(get_recipe("synthetic_k3"), SETS)
    r = CP.PendingResult("dmtg/k2", tmp_path / "d", planner, cfg)
    assert r["_key"] == "dmtg/k2" and r["_planned"] is True
    assert r["num_branches"] == 3 and r["epochs"] == 3 and math.isnan(r["train_time_s"])
    with pytest.raises(CP.Pending):
        r["_affinity"]                                  # any other field: not a read of the folder's files
    assert planner.touched == set()
    assert r["_dir"] == str(tmp_path / "d") and planner.touched == {"dmtg/k2"}
    assert r["assignment"].pending_key == "dmtg/k2"
    for read in (lambda: r["tag_affinity"], lambda: r.get("tag_affinity"), lambda: r.get("x", 1)):
        with pytest.raises(CP.Pending) as e:
            read()
        assert e.value.key == "dmtg/k2" and e.value.args == ("dmtg/k2",)
    auto = apply_overrides(cfg, ["model.branches=0", "grouping.method=naive-mtl"])
    assert CP.PendingResult("n", tmp_path, planner, auto)["num_branches"] == auto.num_branches
    # a grouping still unknown is refused as a config's groups
    with pytest.raises(CP.Pending, match="dmtg/k2"):
        planner.cfg("fixed", CP.PendingValue("dmtg/k2"))
    assert planner.cfg("fixed", [[0, 1], [2, 3]]).grouping.groups == [[0, 1], [2, 3]]


def test_plan_total_and_eta():
    run = CP.PlannedRun("a", "a", "naive", None, Path("a"), [], False, branch_epochs=4.0)
    plan = CP.Plan(runs=[run, CP.PlannedRun("b", "b", "stl", None, Path("b"), [], False, branch_epochs=2.5)], calls=3)
    assert plan.total == "3" and plan.eta_s() is None
    plan.sec_per_branch_epoch = 2.0
    assert plan.eta_s() == pytest.approx(13.0)
    plan.stages.append(("tag", "tag/affinity"))
    assert plan.total == "3+"
    assert CP.PlannedRun("c", "c", "m", None, Path("c"), [], True).branch_epochs == 0.0
    assert CP.PlannedRun("c", "c", "m", None, Path("c"), [], True).gflops is None


# ----------------------------------------------------------------------------- the plan's text and FLOPs

def _cfg(k, epochs):
    return SimpleNamespace(num_branches=k, train=SimpleNamespace(epochs=epochs))


def test_format_plan_by_hand():
    runs = [CP.PlannedRun("naive", "naive", "naive", _cfg(1, 3), Path("naive"), [], False),
            CP.PlannedRun("dmtg/k2", "dmtg K=2", "dmtg", _cfg(2, 3), Path("d"), ["naive", "stl"], True, gflops=0.5),
            CP.PlannedRun("dmtg/k3", "dmtg K=3", "dmtg", _cfg(3, 5), Path("e"), ["naive"], False, gflops=None)]
    plan = CP.Plan(runs=runs, finished=["stl"], stages=[("tag", "tag/affinity"), ("hoa", "stl")],
                   errors=[("bmtn", "ValueError: no splits")])
    assert CP.format_plan(plan, device="cuda").splitlines() == [
        "plan: 3 runs to train, 1 finished (reused), 2 stage(s) known later",
        "  naive: 1 run",
        "    naive (K=1, 3 epochs)",
        "  dmtg: 2 runs",
        "    dmtg/k2 (K=2, 3 epochs, resumes, 500 MFLOP/image) ← after naive, stl",
        "    dmtg/k3 (K=3, 5 epochs) ← after naive",
        "  tag: + the selected networks (known after tag/affinity)",
        "  hoa: + the selected networks (known after stl)",
        "  bmtn: cannot be planned: ValueError: no splits",
        "ETA on cuda: unknown (no finished run in this folder to measure a step time)"]
    plan = CP.Plan(runs=runs[:1], sec_per_branch_epoch=1200.0)
    runs[0].branch_epochs = 3.0
    assert CP.format_plan(plan).splitlines() == [
        "plan: 1 runs to train", "  naive: 1 run", "    naive (K=1, 3 epochs)",
        "ETA on cpu: 1.00 h for the planned runs, sequentially (1200.0 s per branch-epoch measured by the "
        "finished runs)"]
    runs[0].branch_epochs = 1.0                                        # just under an hour: minutes
    assert CP.format_plan(CP.Plan(runs=runs[:1], sec_per_branch_epoch=3599.9)).splitlines()[-1] == (
        "ETA on cpu: 60.0 min for the planned runs, sequentially (3599.9 s per branch-epoch measured by the "
        "finished runs)")


def _flops_cfg(arch, method):
    return SimpleNamespace(model=SimpleNamespace(arch=arch), data=SimpleNamespace(image_size=16, tasks="t"),
                           grouping=SimpleNamespace(method=method, groups=[]))


def test_add_flops_counts_each_distinct_model_once(monkeypatch):
    import fastdmtg.flops as flops
    calls = []

    def count(cfg):
        calls.append(cfg.model.arch)
        if cfg.model.arch == "broken":
            raise RuntimeError("no")
        return {"a": {"fvcore_1_per_mac": 3e9, "torch_2_per_mac": 1e9},
                "b": {"fvcore_1_per_mac": None, "torch_2_per_mac": 5e9}}[cfg.model.arch]

    monkeypatch.setattr(flops, "count_flops", count)
    runs = [CP.PlannedRun(str(i), "", "m", _flops_cfg(a, m), Path("."), [], False)
            for i, (a, m) in enumerate([("a", "naive-mtl"), ("a", "naive-mtl"), ("b", "fixed"), ("broken", "x"),
                                        ("a", "fixed")])]
    CP.add_flops(CP.Plan(runs=runs))
    assert [r.gflops for r in runs] == [3.0, 3.0, 2.5, None, 3.0]      # exact: MACs / 1e9
    assert calls == ["a", "b", "broken", "a"]                       # the same model twice: counted once


def test_add_flops_without_the_counter_leaves_the_plan_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastdmtg.flops", None)         # import → ImportError (fvcore missing)
    run = CP.PlannedRun("a", "", "m", _flops_cfg("a", "m"), Path("."), [], False)
    CP.add_flops(CP.Plan(runs=[run]))
    assert run.gflops is None


# ----------------------------------------------------------------------------- the Ray executor

class _Ref:
    """An object reference (hashable, by identity)."""

    def __init__(self, args, fn):
        self.args, self.fn, self.value = args, fn, None


class FakeRay(types.ModuleType):
    """The part of ``ray`` run_on_ray uses: tasks run when asked for their result (ray.wait), in
    submission order; a task whose function raises is a failed task (ray.get raises)."""

    def __init__(self, initialized=False, init_error=None, interrupt=False):
        super().__init__("ray")
        self.initialized, self.init_error, self.interrupt = initialized, init_error, interrupt
        self.events: list = []

    def is_initialized(self):
        return self.initialized

    def init(self, **kw):
        self.events.append(("init", kw))
        if self.init_error:
            raise self.init_error
        signal.signal(signal.SIGTERM, signal.SIG_DFL)                 # as ray.init: its own handler
        self.initialized = True

    def shutdown(self):
        self.events.append(("shutdown",))
        self.initialized = False

    def remote(self, fn):
        ray = self

        class Remote:
            def options(self, **kw):
                ray.events.append(("options", kw))
                return self

            def remote(self, *args):
                ref = _Ref(args, fn)
                ray.events.append(("submit", args[1], [d.args[1] for d in args[3:]]))
                return ref
        return Remote()

    def wait(self, refs, num_returns=1):
        assert num_returns == 1
        if self.interrupt:
            raise KeyboardInterrupt
        first = refs[0]
        try:
            first.value = first.fn(*first.args[:3], *[d.args[1] for d in first.args[3:]])
        except Exception as e:                   # noqa: BLE001
            first.value = e
        return [first], refs[1:]

    def get(self, ref):
        if isinstance(ref.value, Exception):
            raise RuntimeError(f"task failed: {ref.value}")
        return ref.value


def _run(key, deps=()):
    return CP.PlannedRun(key, key, "m", SimpleNamespace(key=key), Path("/o") / key, list(deps), False)


@pytest.fixture
def ray_env(monkeypatch):
    """A stand-in ray module, training replaced by a record of what each task trains, and make_plan
    replaced by a script of waves (a key in FAIL: that run's task raises)."""
    trained, fail, waves = [], set(), []

    def train(cfg, run_dir, resume, progress):
        if cfg.key in fail:
            raise RuntimeError("boom")
        trained.append((cfg.key, run_dir, resume, progress, torch.get_num_threads()))

    import fastdmtg.checkpoint as ck
    import fastdmtg.train as tr
    monkeypatch.setattr(tr, "train", train)
    monkeypatch.setattr(ck, "has_checkpoint", lambda d: str(d).endswith("b"))
    monkeypatch.setattr(CP, "make_plan", lambda cmp, methods: waves.pop(0) if waves else CP.Plan())
    threads = torch.get_num_threads()
    yield SimpleNamespace(trained=trained, fail=fail, waves=waves, monkeypatch=monkeypatch)
    torch.set_num_threads(threads)


def _use(monkeypatch, ray):
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


def test_ray_waves_dependencies_and_failures(ray_env, monkeypatch):
    """Wave 1: a, b (after a), c (fails); wave 2 plans c again (not retried: the local pass reports
    it) and d; wave 3 only c: nothing left to train, the executor returns."""
    ray = _use(monkeypatch, FakeRay())
    ray_env.fail.add("c")
    ray_env.waves += [CP.Plan(runs=[_run("a"), _run("b", ["a", "x"]), _run("c")], stages=[("tag", "a")]),
                      CP.Plan(runs=[_run("c"), _run("d")]), CP.Plan(runs=[_run("c")])]
    log = []
    before = signal.getsignal(signal.SIGTERM)
    handler = lambda *a: None                                        # noqa: E731
    signal.signal(signal.SIGTERM, handler)
    try:
        CP.run_on_ray(None, ["m"], CP.RayOptions(cpus_per_run=2.0, gpus_per_run=0.5, max_retries=5, num_cpus=3),
                      log=log.append)
        assert signal.getsignal(signal.SIGTERM) is handler          # ray.init's handler replaced back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ray.events[0] == ("init", {"log_to_driver": False, "configure_logging": False, "num_cpus": 3,
                                      "include_dashboard": False})
    assert ray.events[1] == ("options", {"num_cpus": 2.0, "num_gpus": 0.5, "max_retries": 5,
                                         "retry_exceptions": False})
    # b gets a's object reference (x is no run of this wave); c, failed in wave 1, is not submitted again
    assert [e for e in ray.events if e[0] == "submit"] == [
        ("submit", "/o/a", []), ("submit", "/o/b", ["/o/a"]), ("submit", "/o/c", []), ("submit", "/o/d", [])]
    assert ray.events[-1] == ("shutdown",) and not ray.initialized
    assert ray_env.trained == [("a", "/o/a", False, False, 2), ("b", "/o/b", True, False, 2),
                               ("d", "/o/d", False, False, 2)]
    assert log == ["ray wave 1: 3 runs (+ 1 stage(s) after them)",
                   "[1/3] ray: a done", "[2/3] ray: b done",
                   "[3/3] ray: c failed (RuntimeError); the local pass trains it again and reports it",
                   "ray wave 2: 1 runs", "[1/1] ray: d done"]


def test_ray_on_a_running_cluster_is_left_running(ray_env, monkeypatch):
    """Ray already initialised (a cluster the caller connected to): no init, no shutdown; GPUs per run
    default to 1 on a machine with a GPU, 0 without."""
    for cuda, gpus in ((True, 1.0), (False, 0.0)):
        ray = _use(monkeypatch, FakeRay(initialized=True))
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        ray_env.waves[:] = [CP.Plan(runs=[_run("a")])]
        CP.run_on_ray(None, ["m"], CP.RayOptions(), log=lambda s: None)
        assert ray.events == [("options", {"num_cpus": 1.0, "num_gpus": gpus, "max_retries": 3,
                                           "retry_exceptions": False}), ("submit", "/o/a", [])]
        assert ray.initialized


def test_ray_address_and_start_errors(ray_env, monkeypatch):
    ray = _use(monkeypatch, FakeRay())
    CP.run_on_ray(None, ["m"], CP.RayOptions(address="ray://head:10001"), log=lambda s: None)
    assert ray.events == [("init", {"log_to_driver": False, "configure_logging": False,
                                    "address": "ray://head:10001"}),
                          ("options", {"num_cpus": 1.0, "num_gpus": 0.0, "max_retries": 3, "retry_exceptions": False}),
                          ("shutdown",)]
    for err in (ConnectionError("refused"), RuntimeError("no"), ValueError("bad")):
        _use(monkeypatch, FakeRay(init_error=err))
        with pytest.raises(ValueError) as e:
            CP.run_on_ray(None, ["m"], CP.RayOptions(address="h:1"), log=lambda s: None)
        assert str(e.value) == f"--ray-address h:1: cannot connect to a Ray cluster there ({err})"
        assert e.value.__suppress_context__
    _use(monkeypatch, FakeRay(init_error=RuntimeError("no cores")))
    with pytest.raises(ValueError, match=r"^cannot start a local Ray instance: no cores$"):
        CP.run_on_ray(None, ["m"], CP.RayOptions(), log=lambda s: None)
    _use(monkeypatch, FakeRay(init_error=KeyError("other")))
    with pytest.raises(KeyError):                                    # not a start error: as it is
        CP.run_on_ray(None, ["m"], CP.RayOptions(), log=lambda s: None)


def test_ray_interrupted_is_a_training_interruption_and_shuts_down(ray_env, monkeypatch):
    from fastdmtg.train import TrainingInterrupted
    ray = _use(monkeypatch, FakeRay(interrupt=True))
    ray_env.waves[:] = [CP.Plan(runs=[_run("a")])]
    with pytest.raises(TrainingInterrupted, match="interrupted while the runs trained on Ray"):
        CP.run_on_ray(None, ["m"], CP.RayOptions(), log=lambda s: None)
    assert ray.events[-1] == ("shutdown",)


def test_train_task_sets_the_threads_and_resumes_from_a_checkpoint(ray_env):
    for threads, expect in ((0.4, 1), (1, 1), (3.0, 3)):
        assert CP._train_task(SimpleNamespace(key="k"), "/o/b", threads, "dep") == "/o/b"
        assert ray_env.trained[-1] == ("k", "/o/b", True, False, expect)
    CP._train_task(SimpleNamespace(key="k"), "/o/a", 2)
    assert ray_env.trained[-1] == ("k", "/o/a", False, False, 2)


def test_ray_available_follows_the_import_system(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "ray" else None)
    assert CP.ray_available() is True
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert CP.ray_available() is False


def test_annotations_resolve():
    """The ``X | None`` annotations evaluate (a mutant of ``|`` raises once something reads them,
    e.g. typing.get_type_hints or a dataclass tool)."""
    import inspect
    import typing
    for name, obj in vars(CP).items():
        if getattr(obj, "__module__", None) != CP.__name__:
            continue
        typing.get_type_hints(obj)
        for member in vars(obj).values() if inspect.isclass(obj) else ():
            if inspect.isfunction(member):
                typing.get_type_hints(member)
