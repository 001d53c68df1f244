"""SIGKILL a small CPU run at random moments, resume after each kill, compare with an uninterrupted run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kill_resume.py --points 20 --seed 0 --work runs/kill \
        [--report benchmarks/results/cpu_2026-11-30_kill_resume.md]

1. An uninterrupted reference run: ``fastdmtg train`` (a subprocess, one thread) on a small synthetic
   problem (the embedded recipe at 16×16, 2-channel branches, 512/64/64 images, batch 32: 16 steps per
   epoch, ``--epochs`` epochs). T = its working life: from the moment it holds the run folder's lock
   (RUN/.lock names its pid) to the moment results.json appears.
2. The same command into another folder, SIGKILLed at a uniformly random moment in (0, T) after it
   claimed the folder; then ``fastdmtg train --resume`` of the folder (or the command again, when the
   kill came before the first checkpoint), killed the same way; ``--points`` kills in all. A kill can
   land anywhere: building data, mid-epoch, while a checkpoint, history.json or results.json is
   written, during the final evaluation — or after the run finished (the process had exited: counted,
   reported as such). Then one last ``--resume`` to the end.
3. The final outputs must equal the reference's bit for bit: results.json and history.json
   (without the wall-clock field ``train_time_s``), config.json, grouped_model.json and the bytes of
   grouped_model.safetensors; and no temporary file may be left in the folder.

The test suite runs this with 3 kill points and 3 epochs (tests/test_faults.py); the recorded
20-point result is benchmarks/results/cpu_2026-11-30_kill_resume.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["--quiet", "--set", "train.tensorboard=false", "--set", "data.synthetic_train=512",
        "--set", "data.synthetic_val=64", "--set", "data.synthetic_test=64", "--set", "train.batch_size=32",
        "--set", "model.width=2", "--set", "data.image_size=16"]
TIMING = ("train_time_s",)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _claimed(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / ".lock").read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def _start(args: list[str], run: Path) -> tuple[subprocess.Popen, float]:
    """Start `fastdmtg ARGS`; return it once it holds the run folder's lock (RUN/.lock names its
    pid: the folder is claimed, the run's work begins), with that moment."""
    p = subprocess.Popen([sys.executable, "-m", "fastdmtg", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=_env())
    while p.poll() is None and not _claimed(run, p.pid):
        time.sleep(0.005)
    return p, time.perf_counter()


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate()
    return p.returncode, err


def _state(run: Path) -> str:
    """What the folder holds after a kill (for the report)."""
    if (run / "results.json").exists():
        return "finished"
    ck = run / "checkpoints"
    for name in ("last.pt", "last.prev.pt"):
        if (ck / name).exists():
            import torch
            try:
                st = torch.load(ck / name, weights_only=True)
                return f"{name}: epoch {st['epoch']} step {st['step_in_epoch']}"
            except Exception as e:  # noqa: BLE001 — reported, the resume must cope with it
                return f"{name}: unreadable ({type(e).__name__})"
    return "no checkpoint"


def outputs(run: Path) -> dict:
    """The final outputs compared bit for bit (wall-clock fields removed)."""
    res = json.loads((run / "results.json").read_text())
    hist = json.loads((run / "history.json").read_text())
    for k in TIMING:
        res.pop(k, None)
        for h in hist:
            h.pop(k, None)
    cfg = json.loads((run / "config.json").read_text())
    return {"results.json": res, "history.json": hist, "config.json": cfg,
            "grouped_model.json": json.loads((run / "grouped_model.json").read_text()),
            "grouped_model.safetensors": (run / "grouped_model.safetensors").read_bytes()}


def kill_resume(work: str | Path, points: int = 20, seed: int = 0, epochs: int = 6, log=print) -> dict:
    work = Path(work)
    run_args = [*ARGS, "--set", f"train.epochs={epochs}"]
    work.mkdir(parents=True, exist_ok=True)
    ref, run = work / "reference", work / "killed"
    for d in (ref, run):
        if d.exists():
            import shutil
            shutil.rmtree(d)
    p, t0 = _start(["train", "--out", str(ref), *run_args], ref)
    while p.poll() is None and not (ref / "results.json").exists():
        time.sleep(0.005)
    T = time.perf_counter() - t0                 # the run's working life: folder claimed → results.json
    rc, err = _finish(p)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}): {err[-2000:]}")
    log(f"reference run: {T:.1f} s from claiming its folder to results.json", flush=True)
    rng = random.Random(seed)
    kills = []
    for i in range(points):
        # a folder killed before its first checkpoint has nothing to resume: start it again
        resumable = (run / "checkpoints" / "last.pt").exists() or (run / "checkpoints" / "last.prev.pt").exists()
        args = ["train", "--resume", str(run), "--quiet"] if resumable else ["train", "--out", str(run), *run_args]
        delay = rng.uniform(0, T)
        p, t0 = _start(args, run)
        time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
        alive = p.poll() is None
        p.send_signal(signal.SIGKILL)
        rc, err = _finish(p)
        state = _state(run)
        kills.append({"n": i + 1, "delay_s": round(delay, 2), "killed": alive, "rc": rc, "then": state})
        log(f"kill {i + 1}/{points}: {delay:.2f} s, {'killed' if alive else f'had exited ({rc})'}, folder: {state}",
            flush=True)
        if alive is False and rc not in (0,):
            raise RuntimeError(f"run exited with {rc} before its kill: {err[-2000:]}")
    resumable = (run / "checkpoints" / "last.pt").exists() or (run / "checkpoints" / "last.prev.pt").exists()
    p, _ = _start(["train", "--resume", str(run), "--quiet"] if resumable else ["train", "--out", str(run), *run_args], run)
    rc, err = _finish(p)
    if rc != 0:
        raise RuntimeError(f"final resume failed ({rc}): {err[-2000:]}")
    a, b = outputs(ref), outputs(run)
    diffs = [k for k in a if a[k] != b[k]]
    # tmp files of killed writers must be gone (removed when the folder is claimed again)
    left = [str(x) for x in run.rglob("*") if ".tmp" in x.name]
    return {"kills": len(kills), "identical": not diffs and not left, "differences": diffs + left,
            "reference_s": T, "epochs": epochs, "points": kills,
            "reference_train_s": json.loads((ref / "results.json").read_text())["train_time_s"]}


def report(rep: dict, args) -> str:
    import platform

    import torch
    rows = "\n".join(f"| {k['n']} | {k['delay_s']:.2f} | {'yes' if k['killed'] else 'no (had finished)'} | {k['then']} |"
                     for k in rep["points"])
    return (f"# SIGKILL at random moments → resume → bit-identical results\n\n"
            f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kill_resume.py --points {args.points} "
            f"--seed {args.seed} --epochs {args.epochs} --work runs/kill`\n\n"
            f"Machine: {os.cpu_count()}-core CPU (shared, loaded), torch {torch.__version__}, "
            f"Python {platform.python_version()}.\n\n"
            f"Run: the embedded synthetic recipe at 16×16, width 2, 512/64/64 images, batch 32, {rep['epochs']} "
            f"epochs of 16 steps, one thread. Reference run: {rep['reference_s']:.1f} s from claiming its folder "
            f"to results.json ({rep['reference_train_s']:.1f} s of it in optimizer steps); kill moments uniform "
            f"in (0, that) after each process claimed the folder.\n\n"
            f"Result: **{'bit-identical' if rep['identical'] else 'DIFFERENT: ' + ', '.join(rep['differences'])}** "
            f"(results.json and history.json without train_time_s, config.json, grouped_model.json, "
            f"grouped_model.safetensors bytes; no temporary file left) after {rep['kills']} kills and a final "
            f"resume.\n\n"
            f"| kill | moment (s) | process still running | what the folder held after the kill |\n"
            f"|---|---|---|---|\n{rows}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--work", default="runs/kill")
    ap.add_argument("--report", help="write a Markdown report here")
    args = ap.parse_args(argv)
    rep = kill_resume(args.work, args.points, args.seed, args.epochs)
    print(f"{'bit-identical' if rep['identical'] else 'DIFFERENT'} after {rep['kills']} kills: {rep['differences']}")
    if args.report:
        Path(args.report).write_text(report(rep, args))
    return 0 if rep["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
