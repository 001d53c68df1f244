"""compare plans first (--dry-run) and runs on Ray (--executor ray) with the tables of --executor local
(issue 33; fastdmtg/compare_plan.py)."""
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from fastdmtg import compare_plan
from fastdmtg.checkpoint import has_checkpoint
from fastdmtg.compare import compare_main

SETS = ["train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=256", "data.synthetic_val=64",
        "data.synthetic_test=64", "train.epochs=3", "train.batch_size=64", "data.image_size=16", "model.width=2",
        "train.init=naive"]     # DMTG starts from the naive model: a dependency the executors must respect
SMALL = ["--recipe", "synthetic_k3", "--k", "2", "--rg-partitions", "2", "--no-flops",
         *[x for s in SETS for x in ("--set", s)]]
TABLES = ("comparison.md", "groupings.csv", "per_task.csv", "comparison.tex")


def _plan_lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]


def test_dry_run_plan_by_hand(tmp_path, capsys):
    """naive, stl, rg ×2, dmtg (from the naive model), TAG (affinity, then its selection), HOA (its six
    pair networks at once; the selection after STL and the pairs) and the two-shot retraining (after
    DMTG): the runs, their dependencies and the stages known later; nothing is trained."""
    out = tmp_path / "cmp"
    rc = compare_main(["--methods", "naive,stl,rg,dmtg,tag,hoa,dmtg-two-shot", "--out", str(out), "--dry-run",
                       *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan: 12 runs to train, 3 stage(s) known later" in text
    assert _plan_lines(text) == [
        "naive: 1 run", "naive (K=1, 3 epochs)",
        "stl: 1 run", "stl (K=4, 3 epochs)",
        "rg: 2 runs", "rg/k2/seed0 (K=2, 3 epochs)", "rg/k2/seed1 (K=2, 3 epochs)",
        "dmtg: 1 run", "dmtg/k2 (K=2, 3 epochs) ← after naive",
        "tag: 1 run", "tag/affinity (K=1, 3 epochs)",
        "hoa: 6 runs", *[f"hoa/pair_{a}_{b} (K=1, 3 epochs)" for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))],
        "tag: + the selected networks (known after tag/affinity)",
        "hoa: + the selected networks (known after stl)",
        "dmtg-two-shot: + the retrained groups (known after dmtg/k2)"]
    assert "ETA on auto: unknown" in text
    assert sorted(p.name for p in out.iterdir()) == []          # nothing trained, no run folder made


def test_plan_after_runs_finished(tmp_path, capsys):
    """With the naive run finished the plan reuses it (no dependency left) and measures an ETA from it."""
    out = tmp_path / "cmp"
    assert compare_main(["--methods", "naive", "--out", str(out), *SMALL]) == 0
    assert "[1/1] naive: naive — training" in capsys.readouterr().out        # progress: [done/total]
    rc = compare_main(["--methods", "naive,dmtg", "--out", str(out), "--dry-run", *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan: 1 runs to train, 1 finished (reused)" in text
    assert "dmtg/k2 (K=2, 3 epochs)" in _plan_lines(text)                    # no "← after": naive is there
    res = json.loads((out / "naive" / "results.json").read_text())
    rate = res["train_time_s"] / (1 * res["epochs"])
    assert f"({rate:.1f} s per branch-epoch" in text


def test_progress_total_counts_the_stages():
    """[done/total]: the total is the runs known now, with "+" while a stage is still to expand."""
    plan = compare_plan.Plan(calls=7, stages=[("tag", "tag/affinity")])
    assert plan.total == "7+" and compare_plan.Plan(calls=7).total == "7"


def test_ray_missing_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare_plan, "ray_available", lambda: False)
    rc = compare_main(["--methods", "naive", "--out", str(tmp_path / "x"), "--executor", "ray", *SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == compare_plan.RAY_MISSING and 'pip install -e ".[ray]"' in err
    assert not (tmp_path / "x" / "naive").exists()


# ------------------------------------------------------------------------------------------------ Ray

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is an optional extra: pip install -e '.[ray]' "
                                                   "(.ci/setup.sh installs it)")
METHODS = ["--methods", "naive,stl,rg,dmtg"]


def _tables(out: Path) -> dict:
    """The tables, byte for byte, except the Train time column (wall-clock seconds of each run)."""
    # a Train time cell (fastdmtg.seeds.fmt_time: "3 s", "1.5 min", "2.00 h") → "T"; everything else as is
    got = {f: re.sub(r"(?<=[|&] )\d+(\.\d+)? (s|min|h)(?= [|&\\])", "T", (out / f).read_text()) for f in TABLES}
    csv = (out / "comparison.csv").read_text().splitlines()
    col = csv[0].split(",").index("hours")
    got["comparison.csv"] = [ln.split(",")[:col] + ln.split(",")[col + 1:] for ln in csv]
    return got


@pytest.fixture(scope="module")
def local_tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "cmp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as each Ray task (--ray-cpus-per-run 1)
    try:
        assert compare_main([*METHODS, "--out", str(out), *SMALL]) == 0
    finally:
        torch.set_num_threads(threads)
    return _tables(out)


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_tables_identical_to_local(tmp_path, capsys, local_tables):
    out = tmp_path / "cmp"
    # 0.4 CPU per run: all five runs may start at once; dmtg/k2 must still wait for naive (its init_from)
    assert compare_main([*METHODS, "--out", str(out), "--executor", "ray", "--ray-num-cpus", "2",
                         "--ray-cpus-per-run", "0.4", *SMALL]) == 0
    log = capsys.readouterr().out
    assert "ray wave 1: 5 runs" in log and log.count("— finished earlier, reused") == 5   # all trained on Ray
    assert "[5/5] dmtg K=2: dmtg/k2" in log
    assert "the local pass trains it again" not in log     # dmtg/k2 waited for naive (its init_from)
    assert _tables(out) == local_tables
    assert not ray.is_initialized()


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_worker_killed_mid_run_same_tables(tmp_path, capsys, local_tables):
    """SIGKILL the worker training a run after its first epoch (its checkpoint saved): Ray retries the
    task, the run resumes from last.pt, and the tables are those of the local comparison. (3 epochs: a
    whole epoch of margin between the check and the kill on a loaded machine.)"""
    out = tmp_path / "cmp"
    killed: list[str] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for lock in out.glob("**/.lock"):
                run = lock.parent
                hist = run / "history.json"
                # after epoch 1's checkpoint (history.json is written just before it), before the end
                if (run / "results.json").exists() or not hist.exists() or not has_checkpoint(run):
                    continue
                try:
                    if len(json.loads(hist.read_text())) != 1:
                        continue
                    pid = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if pid == os.getpid():
                    continue
                os.kill(pid, signal.SIGKILL)
                killed.append(str(run.relative_to(out)))
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rc = compare_main([*METHODS, "--out", str(out), "--executor", "ray", "--ray-num-cpus", "2", *SMALL])
    finally:
        stop.set()
        t.join(10)
    assert killed, "no run was caught between its first and last epoch"
    assert rc == 0
    log = capsys.readouterr().out
    assert "the local pass trains it again" not in log           # Ray's retry finished it
    assert log.count("— finished earlier, reused") == 5                 # nothing left to the local pass
    hist = json.loads((out / killed[0] / "history.json").read_text())
    assert len(hist) == 3
    assert _tables(out) == local_tables
