"""Wall time of one comparison, --executor local vs --executor ray (fastdmtg/compare_plan.py).

    python benchmarks/compare_ray.py                      # the measurement (idle machine; ~10 min on 2 cores)
    python benchmarks/compare_ray.py --epochs 1 --train 1000 --out -     # a quick check that it works

The comparison: naive, stl, rg (2 partitions), dmtg at K=2 on the embedded synthetic data (5 runs;
DMTG starts from the naive model: a dependency). Sized so that each run takes tens of seconds on a
2-core CPU (--epochs, --train, --image-size), so that Ray's start-up is small next to the training.

Every measurement runs in a fresh Python process (no state carried from one to the next), which
imports torch and fastdmtg before the clock starts:

* local, 1 thread: ``--executor local`` with ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``;
* local, N threads: the same with N = the machine's cores (what a plain ``fastdmtg compare`` uses);
* ray: a local Ray instance with --cpus CPUs and ``--ray-cpus-per-run 1`` (so each task sets its
  torch threads to 1: fastdmtg/compare_plan.py ``_train_task``). Ray's one-off start is measured
  apart: ``ray.init`` and the warm-up of its workers (one task per CPU that imports torch and
  fastdmtg, as the first run in a fresh worker would); the comparison's clock starts after them,
  on the same, initialised instance (``run_on_ray`` keeps an instance it did not start).

Each row's "comparison" time is the ``compare`` call itself (planning, training, evaluation, tables);
"process" is the child's whole wall time, start-up and imports included. The tables of ray and of the
1-thread local run are checked byte-identical (groupings.csv, per_task.csv: Ray's tasks train with
one thread, the same float reductions). The "2-worker bound" is the best a 2-worker scheduler can do
with the 1-thread local run's per-run training times, the plan's order and its dependencies (what
Ray does: first free worker takes the next ready run): the speed-up ceiling of this comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = "naive,stl,rg,dmtg"
FILES = ("groupings.csv", "per_task.csv")          # the tables without wall-clock cells


def compare_args(out: Path, a) -> list[str]:
    sets = compare_sets(a)
    return ["--recipe", "synthetic_k3", "--methods", METHODS, "--k", "2", "--rg-partitions", "2", "--no-flops",
            "--quiet", "--out", str(out), *[x for s in sets for x in ("--set", s)]]


# ----------------------------------------------------------------------------- child: one measurement

def _warm_worker(seconds: float) -> dict:
    """A Ray task: what the first run in a fresh worker pays (torch and fastdmtg's trainer imported);
    held for a moment so that the CPUs' tasks land on different workers."""
    t0 = time.perf_counter()
    import torch

    import fastdmtg.compare_plan  # noqa: F401  (the module of the run task)
    import fastdmtg.train  # noqa: F401
    took = time.perf_counter() - t0
    time.sleep(seconds)
    return {"pid": os.getpid(), "import_s": took, "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS")}


def child(mode: str, out: Path, a) -> dict:
    t_proc = time.perf_counter()
    import torch

    from fastdmtg.compare import compare_main
    info: dict = {"mode": mode}
    if mode.startswith("local"):
        threads = int(mode[len("local"):])
        torch.set_num_threads(threads)
        argv = compare_args(out, a)
    else:
        import ray
        t0 = time.perf_counter()
        # the arguments run_on_ray would use for a local instance
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        info["ray_init_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = ray.get([ray.remote(_warm_worker).options(num_cpus=1).remote(2.0) for _ in range(a.cpus)])
        info["ray_warmup_s"] = time.perf_counter() - t0 - 2.0     # the hold is not start-up
        info["ray_workers"] = warm
        argv = compare_args(out, a) + ["--executor", "ray", "--ray-cpus-per-run", "1"]
    info["torch_threads_driver"] = torch.get_num_threads()
    info["imports_s"] = time.perf_counter() - t_proc
    t0 = time.perf_counter()
    code = compare_main(argv)
    info["compare_s"] = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"compare exited {code} ({mode})")
    if mode == "ray":
        import ray
        ray.shutdown()
    return info


# ----------------------------------------------------------------------------- parent

def run_child(mode: str, out: Path, a, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)       # before torch starts its thread pool
    # (ray: unset, so Ray sets OMP_NUM_THREADS per task from its CPUs; the task sets torch's threads too)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    info_file = out.parent / f"{out.name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--folder", str(out),
           "--info", str(info_file), *passthrough(a)]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w+") as log:      # the runs' warnings: shown on a failure only
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if p.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{mode} failed (exit {p.returncode}):\n{log.read()[-4000:]}")
    info = json.loads(info_file.read_text())
    info["process_s"] = time.perf_counter() - t0
    info["load"] = os.getloadavg()
    return info


def passthrough(a) -> list[str]:
    return ["--epochs", str(a.epochs), "--train", str(a.train), "--image-size", str(a.image_size),
            "--cpus", str(a.cpus)]


def compare_sets(a) -> list[str]:
    return ["train.tensorboard=false", "train.progress=false", f"data.image_size={a.image_size}",
            f"train.epochs={a.epochs}", f"data.synthetic_train={a.train}"]


def run_times(folder: Path, a) -> list[tuple[str, float, list[str]]]:
    """(run, training seconds, dependencies) in the plan's order: the plan of an empty folder with the
    comparison's arguments (what Ray is given), the times from the finished local comparison."""
    from fastdmtg.compare_runs import Comparison
    from fastdmtg.compare_plan import make_plan
    from fastdmtg.config import apply_overrides, get_recipe
    with tempfile.TemporaryDirectory() as d:
        cmp = Comparison(apply_overrides(get_recipe("synthetic_k3"), compare_sets(a)), Path(d), [2], seeds=2,
                         flops=False, progress=False, log=lambda *x, **k: None)
        runs = make_plan(cmp, METHODS.split(",")).runs
        keys = {r.key: str(r.run_dir.relative_to(d)) for r in runs}
    return [(r.key, float(json.loads((folder / keys[r.key] / "results.json").read_text())["train_time_s"]),
             list(r.deps)) for r in runs]


def bound(times: list[tuple[str, float, list[str]]], workers: int) -> float:
    """Makespan of greedy list scheduling in plan order: a worker that comes free takes the first run
    whose dependencies have finished (Ray's order over ready tasks); no start-up or transfer costs."""
    keys = {k for k, _, _ in times}
    free = [0.0] * workers
    done: dict[str, float] = {}
    left = [(k, t, [d for d in deps if d in keys]) for k, t, deps in times]
    while left:
        w = min(range(workers), key=free.__getitem__)
        now = free[w]
        ready = [r for r in left if all(d in done and done[d] <= now for d in r[2])]
        if not ready:            # this worker idles until the next dependency finishes
            free[w] = min(done[d] for r in left for d in r[2] if d in done and done[d] > now)
            continue
        key, t, _ = ready[0]
        done[key] = free[w] = now + t
        left.remove(ready[0])
    return max(done.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10, the recipe's)")
    p.add_argument("--train", type=int, default=6000, help="synthetic training images (default 6000, the recipe's)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic image size (default 32, the recipe's)")
    p.add_argument("--cpus", type=int, default=2, help="Ray: CPUs of the local instance = parallel runs (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="the threads of the multi-thread local run (default: the machine's cores)")
    p.add_argument("--modes", default="local1,localN,ray", help="which measurements (default all three)")
    p.add_argument("--out", default=None, help="the report (default benchmarks/results/cpu_DATE_compare_ray.md; "
                                               "'-': print only)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        Path(a.info).write_text(json.dumps(child(a.child, Path(a.folder), a)))
        return 0

    modes = [m.replace("localN", f"local{a.threads}") for m in a.modes.split(",")]
    load0 = os.getloadavg()
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for m in modes:
            print(f"{m} …", flush=True)
            res[m] = run_child(m, Path(d) / m, a, threads=None if m == "ray" else int(m[len("local"):]))
            print(f"  comparison {res[m]['compare_s']:.1f} s, process {res[m]['process_s']:.1f} s", flush=True)
        same = None
        if "local1" in res and "ray" in res:
            same = all((Path(d) / "local1" / f).read_bytes() == (Path(d) / "ray" / f).read_bytes() for f in FILES)
        sched = None
        if "local1" in res:
            times = run_times(Path(d) / "local1", a)
            sched = (times, sum(t for _, t, _ in times), bound(times, a.cpus))
    text = report(a, modes, res, same, sched, load0)
    print(text)
    if a.out != "-":
        out = Path(a.out or ROOT / "benchmarks" / "results" / f"cpu_{time.strftime('%Y-%m-%d')}_compare_ray.md")
        out.write_text(text)
        print(f"written: {out}")
    return 0


def report(a, modes, res, same, sched, load0) -> str:
    load1 = os.getloadavg()
    lines = [f"# compare: --executor local vs ray ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
             f"{load0[0]:.2f} before, {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} after.",
             f"Comparison: {METHODS} (rg ×2), K=2, synthetic_k3 at {a.image_size} px, {a.train} training images, "
             f"{a.epochs} epochs (5 runs).",
             f"Command: `python benchmarks/compare_ray.py --epochs {a.epochs} --train {a.train} --image-size "
             f"{a.image_size} --cpus {a.cpus} --threads {a.threads}`", "",
             "| executor | torch threads per run | comparison (s) | process (s) | Ray start-up, not counted (s) |",
             "|---|---|---|---|---|"]
    names = {"ray": f"ray ({a.cpus} CPUs, 1 per run)"}
    for m in modes:
        r = res[m]
        if m == "ray":
            th = "1 (set by the task)"
            start = f"init {r['ray_init_s']:.1f} + workers {r['ray_warmup_s']:.1f}"
        else:
            th, start = m[len("local"):], "—"
        lines.append(f"| {names.get(m, 'local (1 process)')} | {th} | {r['compare_s']:.1f} | {r['process_s']:.1f} | {start} |")
    lines.append("")
    if "ray" in res:
        r = res["ray"]
        for m in modes:
            if m != "ray":
                lines.append(f"* Speed-up of ray over local with {m[len('local'):]} thread(s): "
                             f"{res[m]['compare_s'] / r['compare_s']:.2f}× (comparison), "
                             f"{res[m]['process_s'] / r['process_s']:.2f}× (process, Ray's start-up included).")
        w = r["ray_workers"]
        imports = ", ".join(f"{x['import_s']:.1f}" for x in w)
        threads = ", ".join(str(x["threads"]) for x in w)
        omp = ", ".join(str(x["omp"]) for x in w)
        lines.append(f"* Ray workers warmed: {len({x['pid'] for x in w})} (imports {imports} s; torch threads in a "
                     f"worker before the task sets them: {threads}; OMP_NUM_THREADS there: {omp}).")
    if same is not None:
        lines.append(f"* Tables of ray and the 1-thread local run identical ({', '.join(FILES)}): {same}.")
    if sched is not None:
        times, total, mk = sched
        lines.append(f"* Runs of the 1-thread local run (training s): "
                     + ", ".join(f"{k} {t:.1f}" + (f" (after {', '.join(dd)})" if dd else "") for k, t, dd in times)
                     + f"; sum {total:.1f} s. {a.cpus}-worker bound (list scheduling in plan order): {mk:.1f} s → "
                     f"at most {total / mk:.2f}× over the 1-thread local run's training.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
