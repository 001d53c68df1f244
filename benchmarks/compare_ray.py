"""Wall time of one comparison, --executor local vs --executor ray (fastdmtg/compare_plan.py).

    python benchmarks/compare_ray.py [--epochs 2] [--cpus 2] [--out benchmarks/results/cpu_DATE_compare_ray.md]

The comparison: naive, stl, rg (2 partitions), dmtg at K=2 on the embedded synthetic data (16 px).
Local: one process, torch's default threads. Ray: a local instance with --cpus CPUs, one CPU (and one
torch thread) per run. Each in a fresh folder; the tables are checked equal (Train time aside).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = ["train.tensorboard=false", "train.progress=false", "data.image_size=16"]


def run(out: Path, extra: list[str], epochs: int, threads: int | None = None) -> float:
    cmd = [sys.executable, "-m", "fastdmtg", "compare", "--recipe", "synthetic_k3", "--methods", "naive,stl,rg,dmtg",
           "--k", "2", "--rg-partitions", "2", "--no-flops", "--quiet", "--out", str(out),
           *[x for s in SETS + [f"train.epochs={epochs}"] for x in ("--set", s)], *extra]
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-default-threads", action="store_true",
                   help="skip the local run with torch's default threads (slow on a loaded machine)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t_local = math.nan if a.skip_default_threads else run(Path(d) / "local", [], a.epochs)
        t_local1 = run(Path(d) / "local1", [], a.epochs, threads=1)
        t_ray = run(Path(d) / "ray", ["--executor", "ray", "--ray-num-cpus", str(a.cpus)], a.epochs)
        # Ray's runs use one torch thread each: the same numerics as the 1-thread local run
        same = all((Path(d) / "local1" / f).read_bytes() == (Path(d) / "ray" / f).read_bytes()
                   for f in ("groupings.csv", "per_task.csv"))
    load = os.getloadavg()
    text = (f"# compare: --executor local vs ray ({time.strftime('%Y-%m-%d')})\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end (shared machine).\n"
            f"Comparison: naive, stl, rg ×2, dmtg, K=2, synthetic 16 px, {a.epochs} epochs (5 runs).\n\n"
            "| executor | wall time (s) |\n|---|---|\n"
            f"| local (1 process, torch's default threads) | {'not run' if math.isnan(t_local) else f'{t_local:.1f}'} |\n"
            f"| local (1 process, OMP_NUM_THREADS=1) | {t_local1:.1f} |\n"
            f"| ray ({a.cpus} CPUs, 1 per run) | {t_ray:.1f} |\n\n"
            "Speed-up of ray: " + ("" if math.isnan(t_local) else f"{t_local / t_ray:.2f}× over the default local run, ")
            + f"{t_local1 / t_ray:.2f}× over the "
            f"1-thread one; tables of ray and the 1-thread local run identical (groupings.csv, per_task.csv): {same}.\n")
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
