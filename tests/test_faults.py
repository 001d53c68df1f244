"""Fault suite: what a run folder does under hostile conditions (issue 14).

One test per case: two writers, resume with changes (safe / refused / wrongly typed), NaN/inf
(loss, weights, validation, config values, JSON), divergence, unreadable checkpoints, a full disk,
paths from another working folder, corrupt files, Ctrl-C at start-up, eval of a missing folder; and
SIGKILL at random moments → resume → bit-identical results (the CI-sized version of
benchmarks/kill_resume.py).
"""
import errno
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdmtg import checkpoint as ckpt
from fastdmtg.cli import main
from fastdmtg.config import Config, ConfigError, apply_overrides, get_recipe
from fastdmtg.train import Diverged, NonFiniteLoss, Trainer, TrainingInterrupted, WriteStopped, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.tensorboard=false", "train.progress=false"]
# 4 steps per epoch at 16×16 with 2-channel branches: about a second per run on a 2-core CPU
TINY = ["data.synthetic_train=256", "data.synthetic_val=64", "data.synthetic_test=64", "train.batch_size=64",
        "model.width=2", "data.image_size=16"]
TINY_SET = [a for x in FAST + TINY for a in ("--set", x)]


def tiny(extra=()):
    return apply_overrides(get_recipe("synthetic_k3"), FAST + TINY + ["train.epochs=2", *extra])


def cli(capsys, *args):
    """`fastdmtg ARGS` in this process → (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch tiny run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(), run)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. one writer per folder

def test_second_writer_exits_2_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    t = Trainer(tiny(), run)                                     # a run in progress holds the folder
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET)
    line = one_line_error(err)
    assert rc == 2 and "is in use by another run" in line and f"pid {os.getpid()}" in line
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert rc == 2 and f"pid {os.getpid()}" in one_line_error(err)
    res = t.fit()                                                # the holder is unaffected and finishes
    assert json.loads((run / "results.json").read_text())["assignment"] == res["assignment"]
    train(tiny(["train.epochs=3"]), run, resume=True)            # released when it ended


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from fastdmtg.checkpoint import RunLock; l = RunLock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunLocked, match=f"pid {p.pid} "):
            ckpt.RunLock(run)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == p.pid   # a killed holder leaves its record
    lock = ckpt.RunLock(run)                                      # its process is gone: taken over
    assert lock.reclaimed["pid"] == p.pid and json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / ".lock").exists()                           # released = removed


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def _record(pid: int, host: str | None = None, **kw) -> str:
    import platform
    return json.dumps({"pid": pid, "host": host or platform.node(), "started": "2026-12-08 00:00:00 +0000",
                       "command": "fastdmtg train --out run", **kw}) + "\n"


# rounds of: wait for the round's start (a file), ask for the round's folder lock, say what happened;
# the holder keeps the lock until the round ends (another file)
_RACER = ("import sys, time\n"
          "from pathlib import Path\n"
          "from fastdmtg import checkpoint as ckpt\n"
          "top, rounds = Path(sys.argv[1]), int(sys.argv[2])\n"
          "print('ready', flush=True)\n"
          "for i in range(rounds):\n"
          "    while not (top / f'go{i}').exists():\n"
          "        time.sleep(0)\n"
          "    try:\n"
          "        lock = ckpt.RunLock(top / str(i))\n"
          "    except ckpt.RunLocked as e:\n"
          "        print('refused', e, flush=True)\n"
          "        continue\n"
          "    print('held', flush=True)\n"
          "    while not (top / f'done{i}').exists():\n"
          "        time.sleep(0.001)\n"
          "    lock.release()\n")


@pytest.mark.timeout(300)
def test_lock_is_taken_by_exactly_one_of_racing_processes(tmp_path):
    """Four processes released at the same instant (each spins on one file) ask for the lock of one
    folder, 40 rounds, every other folder holding a stale lock of this host (a pid that is gone): in
    every round exactly one holds it and the three others are refused naming that one. (A real race:
    it shows the outcome, and caught a record read by name instead of from the file judged; a
    check-then-write creation loses only within microseconds, which two cores rarely hit.)"""
    rounds, dead = 40, _dead_pid()
    for i in range(rounds):
        (tmp_path / str(i)).mkdir()
        if i % 2:
            (tmp_path / str(i) / ".lock").write_text(_record(dead))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(rounds)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
        for i in range(rounds):
            (tmp_path / f"go{i}").touch()
            said = [p.stdout.readline().strip() for p in procs]
            (tmp_path / f"done{i}").touch()
            holders = [p.pid for p, line in zip(procs, said) if line == "held"]
            assert len(holders) == 1, (i, said)
            run = tmp_path / str(i)
            assert all(line.startswith(f"refused {run} is in use by another run (pid {holders[0]} ")
                       for line in said if line != "held"), (i, said)
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            p.kill()
    assert not list(tmp_path.glob("*/.lock*"))                   # every lock removed, no temporary file left


@pytest.mark.timeout(600)
def test_two_processes_racing_for_one_run_folder_one_trains(tmp_path):
    """Two real `fastdmtg train --out RUN` processes started together (released at the same instant
    once both have imported everything): exactly one trains, the other exits 2 with one line naming it."""
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from fastdmtg.cli import main\n"
            "import fastdmtg.train\n"
            "print('ready', flush=True)\n"
            "while not Path(sys.argv[1]).exists():\n"
            "    time.sleep(0.001)\n"
            "sys.exit(main(sys.argv[2:]))\n")
    run, go = tmp_path / "run", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(go), "train", "--out", str(run), "--quiet", *TINY_SET,
                               "--set", "train.epochs=2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    winner, loser = (procs[0], outs[1]) if codes[0] == 0 else (procs[1], outs[0])
    line = one_line_error(loser[1])
    assert f"{run} is in use by another run (pid {winner.pid} " in line
    res = json.loads((run / "results.json").read_text())
    assert res["epochs"] == 2 and len(json.loads((run / "history.json").read_text())) == 2
    assert not (run / ".lock").exists()


def test_lock_of_another_host_is_refused_and_kept(tmp_path, capsys):
    """A lock written on another host (a shared file system) is never taken over, even when its pid
    does not exist here: one line naming the holder and how to remove the lock; the file untouched."""
    run = tmp_path / "run"
    run.mkdir()
    text = _record(_dead_pid(), host="gpu-node-7.cluster")
    (run / ".lock").write_text(text)
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET)
    line = one_line_error(err)
    assert rc == 2 and f"{run} is in use by a run on another host (pid " in line and "on gpu-node-7.cluster" in line
    assert f"if that run is really gone, delete {run / '.lock'} and start again" in line
    assert (run / ".lock").read_text() == text and sorted(p.name for p in run.iterdir()) == [".lock"]
    (run / ".lock").unlink()                                      # what the message says to do
    assert cli(capsys, "train", "--out", run, *TINY_SET, "--set", "train.epochs=1", "--quiet")[0] == 0


@pytest.mark.skipif(ckpt._process_start(os.getpid()) is None, reason="needs /proc (process start times)")
def test_stale_lock_of_this_host_is_taken_over_a_live_one_is_not(tmp_path, capsys):
    """This host's lock records are judged by their process: gone (no such pid), or its pid now
    another process's (another start time) → taken over; a live process (same pid and start time) →
    refused, even when it holds no flock."""
    run = tmp_path / "run"
    run.mkdir()
    boot = ckpt._boot_id()
    (run / ".lock").write_text(_record(_dead_pid(), boot_id=boot, process_start=1))
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET, "--set", "train.epochs=1", "--quiet")
    assert rc == 0, err
    assert (run / "results.json").exists() and not (run / ".lock").exists()
    # a reused pid: this very process, recorded with another start time
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").write_text(_record(os.getpid(), boot_id=boot, process_start=ckpt._process_start(os.getpid()) + 1))
    ckpt.RunLock(other).release()
    # a live holder without flock (e.g. a file system without it): refused
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        text = _record(sleeper.pid, boot_id=boot, process_start=ckpt._process_start(sleeper.pid))
        (other / ".lock").write_text(text)
        with pytest.raises(ckpt.RunLocked, match=f"is in use by another run \\(pid {sleeper.pid} "):
            ckpt.RunLock(other)
        assert (other / ".lock").read_text() == text
    finally:
        sleeper.kill()
        sleeper.wait()
    ckpt.RunLock(other).release()                                 # gone now: taken over


@pytest.mark.timeout(600)
def test_ddp_ranks_stop_together_on_a_locked_folder(tmp_path):
    """Only rank 0 takes the lock; the other rank learns the outcome from it and exits 2 by itself
    (two ranks started as torchrun starts them, without torchrun's agent, which would otherwise
    terminate a rank left waiting and hide a hang)."""
    import socket
    run = tmp_path / "run"
    run.mkdir()
    lock = ckpt.RunLock(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "fastdmtg", "train", "--out", str(run), *TINY_SET],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2"))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
        lock.release()
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "is in use by another run" in outs[0][1] and outs[1][1].strip() == "", outs   # said once, by rank 0
    assert not (run / "config.json").exists()


def test_finished_run_is_never_overwritten(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")                            # deleted to save space
    before = (run / "results.json").read_bytes(), (run / "grouped_model.safetensors").read_bytes()
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET, "--set", "train.epochs=1")
    assert rc == 2 and "holds a finished run" in one_line_error(err)
    (run / "results.json").unlink()                               # the grouped model alone marks it too
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET, "--set", "train.epochs=1")
    assert rc == 2 and "grouped_model" in one_line_error(err)
    assert (run / "grouped_model.safetensors").read_bytes() == before[1]


# ----------------------------------------------------------------------------- 2. resume semantics

def test_resume_applies_safe_changes_and_records_them(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    rc, out, _ = cli(capsys, "train", "--resume", run, "--quiet", "--set", "train.epochs=3",
                     "--set", "train.val_every=2")
    assert rc == 0 and "train.epochs: 2 → 3" in out
    cfg = json.loads((run / "config.json").read_text())
    res = json.loads((run / "results.json").read_text())
    meta = json.loads((run / "grouped_model.json").read_text())
    assert cfg["train"]["epochs"] == res["epochs"] == meta["config"]["train"]["epochs"] == 3
    assert cfg == meta["config"] and cfg["train"]["val_every"] == 2
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    changes = {c["field"]: c for c in hist[2]["config_changes"]}    # recorded in the epoch they started in
    assert changes["train.epochs"]["old"] == 2 and changes["train.epochs"]["new"] == 3
    assert changes["train.epochs"]["epoch"] == 3 and changes["train.val_every"]["new"] == 2
    assert res["config_changes"] == hist[2]["config_changes"]
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["config"] == cfg                                     # the config lives in last.pt
    # a later plain --resume: nothing to do, nothing rewritten
    before = (run / "results.json").read_bytes()
    rc, out, _ = cli(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0 and "nothing to resume" in out
    assert (run / "results.json").read_bytes() == before


def test_resume_refuses_unsafe_changes_listing_each(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny(), run, stop_after_steps=3)
    cfg_text = (run / "config.json").read_text()
    rc, _, err = cli(capsys, "train", "--resume", run, "--set", "optim.lr=0.5", "--set", "train.seed=3",
                     "--set", "train.epochs=5")
    assert rc == 2 and "Traceback" not in err
    assert "optim.lr: 0.01 → 0.5" in err and "train.seed: 0 → 3" in err and "train.epochs: " not in err
    for flags, field in ((["--data-root", tmp_path / "d"], "data.root"),
                         (["--method", "naive-mtl"], "model.branches=3, but grouping.method"),   # K = 3 kept
                         (["--reference", tmp_path / "ref"], "train.reference"),
                         (["--init-from", tmp_path / "ref"], "train.init_from"),
                         (["--recipe", "synthetic_naive"], "grouping.method")):
        rc, _, err = cli(capsys, "train", "--resume", run, *flags)
        assert rc == 2 and (f"{field}: " in err or "but" in field and field in err) and "Traceback" not in err, (flags, err)
    rc, _, err = cli(capsys, "train", "--resume", run, "--out", tmp_path / "other")
    assert rc == 2 and "--out" in one_line_error(err)
    # hand edits of config.json are changes too
    d = json.loads(cfg_text)
    d["model"]["width"], d["data"]["synthetic_train"] = 4, 300
    (run / "config.json").write_text(json.dumps(d))
    rc, _, err = cli(capsys, "train", "--resume", run)
    assert rc == 2 and "model.width: 2 → 4" in err and "data.synthetic_train: 256 → 300" in err
    (run / "config.json").write_text(cfg_text)
    rc, _, err = cli(capsys, "train", "--resume", run, "--set", "train.epochs=0")
    assert rc == 2
    st = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert st["global_step"] == 3                                  # nothing was trained or rewritten
    assert (run / "config.json").read_text() == cfg_text


def test_wrongly_typed_config_value_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny(), run, stop_after_steps=3)
    d = json.loads((run / "config.json").read_text())
    for section, key, bad in (("train", "epochs", "4"), ("optim", "lr", "fast"), ("train", "progress", 1)):
        e = json.loads(json.dumps(d))
        e[section][key] = bad
        (run / "config.json").write_text(json.dumps(e))
        rc, _, err = cli(capsys, "train", "--resume", run)
        line = one_line_error(err)
        assert rc == 2 and "config.json" in line and f"{section}.{key}: expected" in line, line


# ----------------------------------------------------------------------------- 3. NaN / inf

def test_nan_in_first_epoch_says_no_checkpoint_exists(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET, "--set", "optim.name=sgd", "--set", "optim.lr=1e4")
    assert rc == 3 and "no checkpoint was written" in err and "still holds" not in err
    assert not (run / "checkpoints" / "last.pt").exists()


def _poison_after(t: Trainer, step: int, param) -> None:
    """Make ``param`` NaN by the optimizer step ``step`` (the loss of that step is still finite)."""
    real = t.runner

    def runner(batch):
        out = real(batch)
        if t.global_step + 1 == step:
            with torch.no_grad():
                param.view(-1)[0] = float("nan")
        return out
    t.runner = runner


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    # the weights become NaN at epoch 1's last step; no validation that epoch → the last.pt guard
    no_val = ["train.val_every=2", "train.val_first_epoch=false"]
    t = Trainer(tiny(no_val), tmp_path / "a")
    _poison_after(t, 4, next(t.model.parameters()))
    with pytest.raises(NonFiniteLoss, match="non-finite parameter .* after step 4.*last.pt was not written; "
                                            "no checkpoint was written"):
        t.fit()
    assert not (tmp_path / "a" / "checkpoints" / "last.pt").exists()
    # on interruption: the state saved on Ctrl-C is checked too; the epoch-1 last.pt stays
    t = Trainer(tiny(no_val), tmp_path / "b")
    _poison_after(t, 6, next(t.model.parameters()))
    with pytest.raises(NonFiniteLoss, match="holds the state at the end of epoch 1"):
        t.fit(stop_after_steps=6)
    st = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert st["global_step"] == 4 and all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    # a resumed run knows which checkpoint it came from
    t = Trainer(tiny(no_val), tmp_path / "b", resume=True)
    _poison_after(t, 8, next(t.model.parameters()))
    with pytest.raises(NonFiniteLoss, match=f"{tmp_path / 'b' / 'checkpoints' / 'last.pt'} holds the state at "
                                            "the end of epoch 1 \\(step 4\\)"):
        t.fit()
    # best.pt: a NaN grouping logit leaves the validation loss finite (argmax picks some branch)
    t = Trainer(tiny(), tmp_path / "c")
    _poison_after(t, 4, next(t.method.parameters()))
    with pytest.raises(NonFiniteLoss, match="grouping parameter .*best.pt was not written"):
        t.fit()
    assert not (tmp_path / "c" / "checkpoints" / "best.pt").exists()


def test_nonfinite_validation_loss_stops_the_run(tmp_path, monkeypatch):
    from fastdmtg import train as train_mod
    real = train_mod.evaluate
    calls = {"n": 0}

    def evaluate(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:                                       # epoch 2's validation
            out["total_loss"] = float("nan")
        return out
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    with pytest.raises(NonFiniteLoss, match=r"non-finite validation loss \(nan\) at epoch 2.*holds the state at "
                                            r"the end of epoch 1 \(step 4\).*best.pt holds epoch 1"):
        train(tiny(["train.epochs=3"]), tmp_path / "run")
    st = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert st["epoch"] == 1
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("setting", ["optim.lr=inf", "dmtg.tau=inf", "optim.momentum=nan",
                                     "optim.weight_decay=inf", "dmtg.tau_end=-inf"])
def test_config_rejects_nonfinite_numbers(setting, capsys):
    rc, _, err = cli(capsys, "train", "--dry-run", "--set", setting)
    assert rc == 2 and setting.split("=")[0] in one_line_error(err)


def test_config_json_with_infinity_is_rejected(tmp_path):
    d = get_recipe("synthetic_k3").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(d).replace('"lr": 0.01', '"lr": Infinity'))
    with pytest.raises(ConfigError, match=r"config.json: optim.lr: expected a finite number, got inf"):
        Config.load(tmp_path / "config.json")


def _strict_load(path: Path):
    def bad(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=bad)


def test_all_json_written_is_strict(finished, tmp_path):
    ckpt.atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": -float("inf")})
    assert _strict_load(tmp_path / "x.json") == {"a": None, "b": [1.5, None], "c": None}
    for f in ("config.json", "history.json", "results.json", "grouped_model.json"):
        _strict_load(finished / f)
    # a legitimately undefined value: NormGain against a reference whose losses are all 0 is NaN → null
    from fastdmtg.results_writer import compare_to_reference
    ref = json.loads((finished / "results.json").read_text())
    ckpt.atomic_write_json(tmp_path / "ref.json", dict(ref, test=dict(ref["test"], loss={k: 0.0 for k in ref["test"]["loss"]})))
    out = compare_to_reference(str(tmp_path / "ref.json"), ref["test"])
    assert math.isnan(out["normgain_loss"]["value"])
    ckpt.atomic_write_json(tmp_path / "ng.json", out)
    assert _strict_load(tmp_path / "ng.json")["normgain_loss"]["value"] is None


# ----------------------------------------------------------------------------- 4. divergence

def test_divergence_fails_the_run_by_default(tmp_path, capsys):
    """Adam at lr 1e4 on the default synthetic recipe: caught in epoch 1, results flagged, exit 4."""
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--out", run, "--quiet", "--set", "train.tensorboard=false",
                       "--set", "optim.lr=1e4")
    assert rc == 4, err
    assert "training diverged" in err and "Traceback" not in err
    res = json.loads((run / "results.json").read_text())
    assert res["diverged"] is True and res["divergence"]["epoch"] == 1
    assert res["divergence"]["train_loss"] > 10 * res["divergence"]["initial_loss"]
    assert len(json.loads((run / "history.json").read_text())) == 1            # stopped after epoch 1
    assert "test total loss" in out                                           # evaluated and shown


def test_divergence_can_warn_only(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET, "--set", "optim.lr=1e4", "--set", "train.epochs=2",
                     "--set", "train.on_divergence=warn")
    assert rc == 0 and "warning: training diverged" in err
    res = json.loads((run / "results.json").read_text())
    assert res["diverged"] is True and len(json.loads((run / "history.json").read_text())) == 2


def test_healthy_run_is_not_diverged(finished):
    assert json.loads((finished / "results.json").read_text())["diverged"] is False


# ----------------------------------------------------------------------------- 5. checkpoints, full disk

def test_unreadable_last_pt_falls_back_to_the_previous_one(tmp_path, capsys):
    full = train(tiny(["train.epochs=3"]), tmp_path / "full")
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny(["train.epochs=3"]), run, stop_after_steps=8)          # end of epoch 2
    assert torch.load(run / "checkpoints" / "last.prev.pt", weights_only=True)["global_step"] == 4
    data = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0
    assert "warning:" in err and "last.pt is unreadable" in err and "resuming from" in err and "last.prev.pt" in err
    res = json.loads((run / "results.json").read_text())
    assert res["assignment"] == full["assignment"] and res["test"] == full["test"]   # exact from epoch 1's state


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_last_pt_without_previous_is_a_one_line_error(tmp_path, capsys, damage):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny(), run, stop_after_steps=2)
    p = run / "checkpoints" / "last.pt"
    data = p.read_bytes()
    p.write_bytes({"empty": b"", "truncated": data[:1000], "garbage": b"not a checkpoint" * 10}[damage])
    rc, _, err = cli(capsys, "train", "--resume", run)
    line = one_line_error(err)
    assert rc == 2 and str(p) in line and "not a readable checkpoint" in line and not line.endswith("()")


class _FullDisk:
    """``open`` for fastdmtg.checkpoint whose writes to ``victim`` temp files fail with ENOSPC after
    ``budget`` bytes (a partial file is left on disk, as a real full disk does)."""

    def __init__(self, victim: str, after_calls: int, budget: int = 4096):
        self.victim, self.after, self.budget, self.calls = victim, after_calls, budget, 0

    def __call__(self, file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if "w" in mode and f".{self.victim}.tmp" in str(file):
            self.calls += 1
            if self.calls > self.after:
                budget = self.budget

                class Full:
                    def __enter__(s):
                        return s

                    def __exit__(s, *exc):
                        f.close()
                        return False

                    def write(s, data):
                        f.write(data[:budget])
                        f.flush()
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                    def __getattr__(s, name):
                        return getattr(f, name)
                return Full()
        return f


def test_disk_full_removes_temp_files_and_says_what_was_kept(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt, "open", _FullDisk("last.pt", after_calls=1), raising=False)
    rc, _, err = cli(capsys, "train", "--out", run, *TINY_SET, "--set", "train.epochs=3")
    line = one_line_error(err)
    assert rc == 5
    assert f"cannot write {run / 'checkpoints' / 'last.pt'}: No space left on device" in line
    assert "holds the state at the end of epoch 1 (step 4)" in line and f"--resume {run}" in line
    left = [p.name for p in run.rglob("*") if ".tmp" in p.name]
    assert left == []
    st = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert st["epoch"] == 1                                       # the previous last.pt survived
    monkeypatch.undo()
    rc, _, _ = cli(capsys, "train", "--resume", run, "--quiet")   # space freed: continue
    assert rc == 0 and json.loads((run / "results.json").read_text())["epochs"] == 3


def test_disk_full_on_other_files_stops_cleanly(tmp_path, monkeypatch):
    for victim, after in (("best.pt", 0), ("history.json", 1), ("results.json", 0)):
        run = tmp_path / victim
        monkeypatch.setattr(ckpt, "open", _FullDisk(victim, after_calls=after), raising=False)
        with pytest.raises(WriteStopped, match=f"cannot write .*{victim}: No space left on device; the run "
                                               "stopped; "):
            train(tiny(), run)
        monkeypatch.undo()
        assert not [p for p in run.rglob("*") if ".tmp" in p.name]
        ckpt.RunLock(run).release()                                # the folder was released


# ----------------------------------------------------------------------------- 6. paths and messages

def test_paths_are_stored_absolute_eval_and_resume_work_from_elsewhere(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from celeba_fixture import write_celeba
    work, other = tmp_path / "work", tmp_path / "elsewhere"
    other.mkdir()
    write_celeba(work / "celeba", n=24)
    monkeypatch.chdir(work)
    args = ["--set", "data.image_size=32", "--set", "model.width=2", "--set", "train.batch_size=6",
            "--set", "data.backend=memory", "--set", "data.num_workers=0", "--set", "data.cache_dir=cache",
            "--set", "train.tensorboard=false", "--set", "train.init=scratch"]
    rc, _, err = cli(capsys, "train", "--out", "run", "--data-root", "celeba", "--quiet", "--set", "train.epochs=1",
                     *args)
    assert rc == 0, err
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert cfg["data"]["root"] == str(work / "celeba") and cfg["data"]["cache_dir"] == str(work / "cache")
    monkeypatch.chdir(other)
    assert cli(capsys, "eval", work / "run", "--quiet")[0] == 0
    rc, _, err = cli(capsys, "train", "--resume", work / "run", "--quiet", "--set", "train.epochs=2")
    assert rc == 0, err
    # the same relative --data-root typed from another folder is another folder: refused
    rc, _, err = cli(capsys, "train", "--resume", work / "run", "--data-root", "celeba")
    assert rc == 2 and f"data.root: \"{work / 'celeba'}\" → \"{other / 'celeba'}\"" in err


def test_invalid_json_and_corrupt_weights_name_the_file(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    good = (run / "grouped_model.json").read_text()
    (run / "grouped_model.json").write_text(good[:-20])
    rc, _, err = cli(capsys, "eval", run, "--quiet")
    assert rc == 2 and f"{run / 'grouped_model.json'}: invalid JSON at line" in one_line_error(err)
    (run / "grouped_model.json").write_text(good)
    w = run / "grouped_model.safetensors"
    data = w.read_bytes()
    for bad in (data[: len(data) // 2], b"", b"\x00" * 64):
        w.write_bytes(bad)
        rc, _, err = cli(capsys, "eval", run, "--quiet")
        assert rc == 2 and str(w) in one_line_error(err)
    (run / "config.json").write_text("{\"train\": {")
    rc, _, err = cli(capsys, "train", "--resume", run)
    assert rc == 2 and f"{run / 'config.json'}: invalid JSON at line 1" in one_line_error(err)
    (run / "config.json").write_bytes(b"\xff\xfe{}")
    rc, _, err = cli(capsys, "train", "--resume", run)
    assert rc == 2 and str(run / "config.json") in one_line_error(err)


def test_ctrl_c_during_startup_exits_130_without_traceback(tmp_path):
    """A real SIGINT while the data is being built (before the training loop's handler exists). The
    child first restores Python's own SIGINT handler, as in a terminal: a process started from a
    background job inherits SIGINT ignored, and the signal would do nothing there."""
    code = ("import os, signal, sys\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import fastdmtg.train as t\n"
            "real = t.build_source\n"
            "def build_source(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(*a, **k)\n"
            "t.build_source = build_source\n"
            "from fastdmtg.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", code, "train", "--out", str(run), *TINY_SET],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "interrupted" in p.stderr and "no checkpoint was written" in p.stderr
    ckpt.RunLock(run).release()                                    # released


def test_eval_on_a_missing_or_unfinished_folder(tmp_path, capsys):
    rc, _, err = cli(capsys, "eval", tmp_path / "nope", "--quiet")
    line = one_line_error(err)
    assert rc == 2 and "no such run folder" in line and "did training finish" not in line
    with pytest.raises(TrainingInterrupted):
        train(tiny(), tmp_path / "cut", stop_after_steps=2)
    rc, _, err = cli(capsys, "eval", tmp_path / "cut", "--quiet")
    assert rc == 2 and f"--resume {tmp_path / 'cut'}" in one_line_error(err)
    rc, _, err = cli(capsys, "train", "--resume", tmp_path / "nope")
    assert rc == 2 and "no such run folder" in one_line_error(err)


# ----------------------------------------------------------------------------- 7. SIGKILL anywhere

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """A few random SIGKILLs of a small CPU run, each in the epoch after the process's first
    checkpoint, a resume after each: the final results, history and grouped model equal an
    uninterrupted run's bit for bit (20 points, anywhere and in training: benchmarks/kill_resume.py)."""
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "benchmarks" / "kill_resume.py")
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    rep = kr.kill_resume(tmp_path, points=3, seed=1, epochs=4, when="training", log=lambda *a, **k: None)
    # each kill comes after the process's first checkpoint: the next process resumes mid-run
    assert rep["kills"] >= 1 and all(k["then"].startswith("last.pt: epoch ") for k in rep["points"] if k["killed"])
    assert rep["identical"], rep["differences"]


# ----------------------------------------------------------------------------- 8. issue 28: start-up and messages

def test_learning_rate_beyond_the_bound_is_a_one_line_error(capsys):
    """optim.lr=1e38 passed validation and ended in a traceback inside Adam (its step size overflows
    float32); the bound is config.MAX_LR, and the divergence tests' 1e4 stays accepted."""
    rc, _, err = cli(capsys, "train", "--dry-run", "--set", "optim.lr=1e38")
    line = one_line_error(err)
    assert rc == 2 and "optim.lr must be <= 1e+06" in line and "got 1e+38" in line
    assert cli(capsys, "train", "--dry-run", "--set", "optim.lr=1e6")[0] == 0
    assert cli(capsys, "train", "--dry-run", "--set", "optim.lr=1e4")[0] == 0


def test_disk_full_on_best_pt_names_the_epoch_best_pt_holds(tmp_path, monkeypatch):
    """The second write of best.pt fails: the message said best.pt held the epoch it failed to write."""
    run = tmp_path / "run"
    full = _FullDisk("best.pt", after_calls=1)
    monkeypatch.setattr(ckpt, "open", full, raising=False)
    with pytest.raises(WriteStopped) as e:
        train(tiny(["train.epochs=6", "optim.schedule=none"]), run)
    monkeypatch.undo()
    assert full.calls == 2                                        # the second write of best.pt failed
    held = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] + 1
    assert f"best.pt holds epoch {held} (train.best_rule)" in str(e.value), str(e.value)
    assert f"best.pt holds epoch {held + 1}" not in str(e.value)


def test_duplicate_key_in_a_config_file_is_an_error_naming_it(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text('{"train": {"epochs": 2, "seed": 1, "epochs": 3}}')
    rc, _, err = cli(capsys, "train", "--dry-run", "--config", f)
    line = one_line_error(err)
    assert rc == 2 and str(f) in line and "'train.epochs' given twice" in line
    f.write_text('{"train": {"epochs": 2}, "model": {"width": 2}, "train": {"seed": 1}}')
    rc, _, err = cli(capsys, "train", "--dry-run", "--config", f)
    assert rc == 2 and "'train' given twice" in one_line_error(err)
    f.write_text('{"train": {"epochs": 2}, "model": {"width": 2}}')            # the same keys once: fine
    assert cli(capsys, "train", "--dry-run", "--config", f)[0] == 0


def test_duplicate_key_in_a_yaml_config_file_is_an_error_naming_it(tmp_path, capsys):
    pytest.importorskip("yaml")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    rc, _, err = cli(capsys, "train", "--dry-run", "--config", f)
    line = one_line_error(err)
    assert rc == 2 and str(f) in line and "'epochs' given twice (lines 2 and 3)" in line


def _declared_folder(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from folder_fixture import mixed_folder
    return mixed_folder(root, tasks_json={"smile": {"type": "binary"}, "hair": {"type": "multiclass", "classes": 3},
                                          "age": {"type": "regression"}})


def test_cache_dir_that_cannot_be_created_names_the_setting_and_the_run_log_says_why(tmp_path, capsys):
    """data.cache_dir below a file: one line naming the setting and the path (was `[Errno 20] Not a
    directory: ...`); the run folder start-up left (.lock and an empty train.log) holds the error in
    train.log."""
    root = _declared_folder(tmp_path / "d")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--out", run, "--data-root", root, *TINY_SET,
                     "--set", f"data.cache_dir={blocker / 'cache'}")
    line = one_line_error(err)
    assert rc == 2 and line.startswith("error: data.cache_dir: ") and str(blocker / "cache") in line
    assert "Errno" not in line and "a file is in the way" in line
    log_text = (run / "train.log").read_text()
    assert "the run stopped during start-up, before its first step: data.cache_dir: " in log_text
    ckpt.RunLock(run).release()                                    # released
    # the folder holds no run: a new one may start there once the setting is fixed
    rc, _, err = cli(capsys, "train", "--out", run, "--data-root", root, *TINY_SET, "--quiet",
                     "--set", "train.epochs=1", "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert rc == 0, err
