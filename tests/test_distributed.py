"""DDP through torchrun on CPU (gloo, 2 processes): sharding, a full run, resume."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--quiet", "--set", "train.tensorboard=false", "--set", "data.synthetic_train=400",
        "--set", "data.synthetic_val=100", "--set", "data.synthetic_test=100", "--set", "train.batch_size=32",
        "--set", "model.width=2"]


def torchrun(tmp_path: Path, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastdmtg", "train", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """One torchrun launch (2 processes, 1 epoch) shared by the resume test and the two-node test: each
    launch starts three Python processes that import torch; one fewer saves its start-up."""
    base = tmp_path_factory.mktemp("one_node")
    p = torchrun(base, "--out", str(base / "one"), "--set", "train.epochs=1", *ARGS)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(p.name for p in base.iterdir()) == ["one"]                # nothing else written
    return base / "one"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_two_processes_train_and_resume(one_node, tmp_path):
    run = tmp_path / "ddp"
    shutil.copytree(one_node, run)            # the fixture's run stays as it was for the two-node test
    res = json.loads((run / "results.json").read_text())
    assert res["speed"]["world_size"] == 2
    assert res["batch"] == {"per_rank": 32, "world_size": 2, "global": 64}
    assert sorted(i for g in res["groups"] for i in g) == sorted(res["tasks"])
    hist = json.loads((run / "history.json").read_text())
    # 400 samples / 2 ranks / 32 per rank → 7 steps per epoch on each rank
    assert [h["global_step"] for h in hist] == [7]
    # resume with more epochs: continues from last.pt on both ranks
    p = torchrun(tmp_path, "--resume", str(run), "--set", "train.epochs=3", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    hist = json.loads((run / "history.json").read_text())
    assert [h["global_step"] for h in hist] == [7, 14, 21]
    assert json.loads((run / "results.json").read_text())["epochs"] == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_two_processes_with_head_pruning_and_batched_branches(tmp_path):
    """Both ranks drop the same heads at the same steps (compared across ranks at every drop step;
    a mismatch would stop the run) and the batched net skips the dead branch on both."""
    run = tmp_path / "ddp_prune"
    p = torchrun(tmp_path, "--out", str(run), "--set", "train.epochs=4", *ARGS,
                 "--set", "data.synthetic_groups=2", "--set", "data.synthetic_tasks_per_group=1",
                 "--set", "model.batched=on", "--set", "dmtg.tau=0.05", "--set", "dmtg.prune_eps=0.2",
                 "--set", "dmtg.prune_patience=3", "--set", "dmtg.ddp_noise=per_rank")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["speed"]["world_size"] == 2 and res["speed"]["batched"]
    ev = res["pruning"]["events"]
    assert ev, "the settings are meant to prune"
    assert res["pruning"]["ddp_checked_drop_steps"] == len({e["step"] for e in ev})
    act = res["pruning"]["active"]
    assert all(act[i][a] for i, a in enumerate(res["assignment"]))
    assert not all(any(r[k] for r in act) for k in range(3))             # a branch died


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_two_nodes_same_as_one_node(one_node, tmp_path):
    """Two "nodes" on 127.0.0.1 (torchrun --nnodes 2 --node-rank R, one process each, the c10d
    rendezvous; docs/cluster.md) train exactly as one node with two processes: same global batch, same
    history and test results; one run folder written once, by rank 0."""
    one = one_node
    two = tmp_path / "two"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "fastdmtg-test",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "fastdmtg", "train", "--out", str(two),
                               "--set", "train.epochs=1", *ARGS],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [pr.communicate(timeout=600) for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], [o[1][-2000:] for o in outs]
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert b["batch"] == a["batch"] == {"per_rank": 32, "world_size": 2, "global": 64}
    assert b["test"] == a["test"] and b["groups"] == a["groups"]
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert [h["val"] for h in hb] == [h["val"] for h in ha] and [h["global_step"] for h in hb] == [7]
    assert not (two / ".lock").exists() and (two / "checkpoints").is_dir()      # the lock removed at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]             # nothing else written
