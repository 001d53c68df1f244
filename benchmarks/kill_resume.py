"""SIGKILL a small CPU run at random moments, resume after each kill, compare with an uninterrupted run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kill_resume.py --points 20 --when anywhere --seed 0 \
        --work runs/kill [--report benchmarks/results/cpu_2026-11-30_kill_resume.md]

1. An uninterrupted reference run: ``fastdmtg train`` (a subprocess, one thread) on a small synthetic
   problem (the embedded recipe at 32×32, 4-channel branches, 512/64/64 images, batch 32: 16 steps
   per epoch, ``--epochs`` epochs). Measured on it: T, its working life (from the moment it holds
   the run folder's lock — RUN/.lock names its pid — to the moment results.json appears), and E, the
   time between two checkpoints (an epoch with its validation).
2. Kills, ``--points`` of them, then resumes (``fastdmtg train --resume``; or the command again when the
   kill came before the first checkpoint):

   * ``--when anywhere``: independent trials until ``--points`` processes were killed. Each starts
     the command into a fresh folder and SIGKILLs it at a moment uniform in (0, T) after it claimed
     the folder — building data, mid-epoch, while a checkpoint, history.json or results.json is
     written, during the final evaluation, while exiting — then resumes it to the end and compares.
     A trial whose process had already exited at its moment is reported and not counted.
   * ``--when training``: one run, a chain of kills. Each process is SIGKILLed at a moment uniform
     in (0, E) after it wrote its first checkpoint, i.e. in the middle of the next epoch or its
     checkpoint write (or, on a machine running faster than measured, right when the next checkpoint
     appears), so every kill is followed by a resume from a mid-run checkpoint (epochs =
     max(--epochs, points + 2)). One final resume to the end, then the comparison.
3. The final outputs must equal the reference's bit for bit: results.json and history.json
   (without the wall-clock field ``train_time_s``), config.json, grouped_model.json and the bytes of
   grouped_model.safetensors; and no temporary file may be left in the folder.

``--data folder``: your own tasks instead (``fastdmtg.data.folder.write_demo``: 256/64/64 16×16 PNGs,
6 tasks of the three types, written under WORK/data; the folder_k3 recipe at width 4, batch 32, the
decode cache under WORK/cache). ``--schedule step``: StepLR ×0.5 every 2 epochs (the LR changes during
the run, so a resume must restore the scheduler's count too); ``plateau``: the recipe's plateau rule
on the training loss; ``recipe`` (default): the recipe's own schedule.

The test suite runs ``--when training`` with 3 kills and 4 epochs (tests/test_faults.py); the
recorded 20-point results are in benchmarks/results/cpu_2026-11-30_kill_resume.md, the folder +
stepping-scheduler run in benchmarks/results/cpu_2026-12-07_kill_resume.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["--quiet", "--set", "train.tensorboard=false", "--set", "data.synthetic_train=512",
        "--set", "data.synthetic_val=64", "--set", "data.synthetic_test=64", "--set", "train.batch_size=32",
        "--set", "model.width=4", "--set", "data.image_size=32"]
TIMING = ("train_time_s",)
SCHEDULES = {"recipe": [], "step": ["optim.schedule=step", "optim.step_epochs=2", "optim.gamma=0.5"],
             "plateau": ["optim.schedule=plateau", "optim.plateau_on=train", "optim.plateau_patience=0",
                         "optim.plateau_threshold=0.5"]}


def run_arguments(work: Path, data: str, schedule: str, epochs: int) -> list[str]:
    """The training command's arguments for ``--data`` and ``--schedule`` (writes the folder dataset)."""
    if data == "synthetic":
        args = list(ARGS)
    elif data == "folder":
        from fastdmtg.data.folder import write_demo
        root = work / "data"
        if not (root / "labels.csv").exists():
            write_demo(root, n_train=256, n_eval=64, size=16, seed=1)
        args = ["--quiet", "--data-root", str(root), "--set", "train.tensorboard=false", "--set", "data.image_size=16",
                "--set", "model.width=4", "--set", "train.batch_size=32", "--set", "train.eval_batch_size=64",
                "--set", f"data.cache_dir={work / 'cache'}", "--set", "data.num_workers=0"]
    else:
        raise ValueError(f"data: expected synthetic|folder, got {data!r}")
    return [*args, *[a for x in SCHEDULES[schedule] for a in ("--set", x)], "--set", f"train.epochs={epochs}"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _claimed(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / ".lock").read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def _ckpt_mtime(run: Path) -> int:
    try:
        return (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    except OSError:
        return 0


def _start(args: list[str], run: Path) -> tuple[subprocess.Popen, float]:
    """Start `fastdmtg ARGS`; return it once it holds the run folder's lock (RUN/.lock names its
    pid: the folder is claimed, the run's work begins), with that moment."""
    p = subprocess.Popen([sys.executable, "-m", "fastdmtg", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=_env())
    while p.poll() is None and not _claimed(run, p.pid):
        time.sleep(0.002)
    return p, time.perf_counter()


def _wait_new_checkpoint(p: subprocess.Popen, run: Path, before: int) -> float:
    """Wait until ``p`` wrote last.pt (its mtime moved past ``before``) or exited; → that moment."""
    while p.poll() is None and _ckpt_mtime(run) == before:
        time.sleep(0.002)
    return time.perf_counter()


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate()
    return p.returncode, err


def _state(run: Path) -> str:
    """What the folder holds after a kill (for the report)."""
    if (run / "results.json").exists():
        return "finished (results.json)"
    ck = run / "checkpoints"
    for name in ("last.pt", "last.prev.pt"):
        if (ck / name).exists():
            import torch
            try:
                st = torch.load(ck / name, weights_only=True)
                return f"{name}: epoch {st['epoch']}, step {st['step_in_epoch']}"
            except Exception as e:  # noqa: BLE001 — reported; the resume must cope with it
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
    return {"results.json": res, "history.json": hist, "config.json": json.loads((run / "config.json").read_text()),
            "grouped_model.json": json.loads((run / "grouped_model.json").read_text()),
            "grouped_model.safetensors": (run / "grouped_model.safetensors").read_bytes()}


def _resumable(run: Path) -> bool:
    return (run / "checkpoints" / "last.pt").exists() or (run / "checkpoints" / "last.prev.pt").exists()


def kill_resume(work: str | Path, points: int = 20, seed: int = 0, epochs: int = 6, when: str = "anywhere",
                log=print, data: str = "synthetic", schedule: str = "recipe") -> dict:
    if when not in ("anywhere", "training"):
        raise ValueError(f"when: expected anywhere|training, got {when!r}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    run_args = run_arguments(work, data, schedule, epochs)
    ref, run = work / "reference", work / "killed"
    for d in (ref, run, *work.glob("killed*")):          # the folders of an earlier invocation
        if d.exists():
            shutil.rmtree(d)
    # reference: working life T and checkpoint interval E
    p, t0 = _start(["train", "--out", str(ref), *run_args], ref)
    marks, last = [], 0
    while p.poll() is None and not (ref / "results.json").exists():
        m = _ckpt_mtime(ref)
        if m != last:
            marks.append(time.perf_counter())
            last = m
        time.sleep(0.002)
    T = time.perf_counter() - t0
    rc, err = _finish(p)
    if rc != 0:
        raise RuntimeError(f"reference run failed ({rc}): {err[-2000:]}")
    E = (marks[-1] - marks[0]) / max(len(marks) - 1, 1) if len(marks) > 1 else T / epochs
    log(f"reference run: {T:.1f} s from claiming its folder to results.json, {E:.2f} s between checkpoints",
        flush=True)

    rng = random.Random(seed)
    if when == "anywhere":
        # independent trials (a run killed anywhere once per trial; killed late, a chain would be done)
        kills, diffs, i = [], [], 0
        while sum(k["killed"] for k in kills) < points and i < 3 * points:
            # a trial whose process had already exited is reported and does not count: draw again
            trial = work / f"killed{i + 1}"
            p, t0 = _start(["train", "--out", str(trial), *run_args], trial)
            delay = rng.uniform(0, T)
            time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
            alive = p.poll() is None
            p.send_signal(signal.SIGKILL)
            rc, err = _finish(p)
            if not alive and rc != 0:
                raise RuntimeError(f"run exited with {rc} before its kill: {err[-2000:]}")
            state = _state(trial)
            _complete(trial, run_args)
            same = _differences(ref, trial)
            diffs += [f"trial {i + 1}: {d}" for d in same]
            kills.append({"n": i + 1, "delay_s": round(delay, 2), "killed": alive, "then": state,
                          "identical": not same})
            log(f"trial {i + 1}: killed at {delay:.2f} s ({'running' if alive else 'had exited'}), "
                f"folder: {state}; after resume: {'identical' if not same else same}", flush=True)
            i += 1
    else:
        kills = []
        for i in range(points):
            args = (["train", "--resume", str(run), "--quiet"] if _resumable(run) else
                    ["train", "--out", str(run), *run_args])
            before = _ckpt_mtime(run)
            p, _ = _start(args, run)
            t0 = _wait_new_checkpoint(p, run, before)
            delay = rng.uniform(0, E)
            first = _ckpt_mtime(run)
            # until the moment — or the next checkpoint, if the machine runs faster than measured: one
            # epoch per process at most, so that every kill point is used
            while p.poll() is None and time.perf_counter() - t0 < delay and _ckpt_mtime(run) == first:
                time.sleep(0.002)
            delay = min(delay, time.perf_counter() - t0)
            alive = p.poll() is None
            p.send_signal(signal.SIGKILL)
            rc, err = _finish(p)
            if not alive and rc != 0:
                raise RuntimeError(f"run exited with {rc} before its kill: {err[-2000:]}")
            state = _state(run)
            kills.append({"n": i + 1, "delay_s": round(delay, 2), "killed": alive, "then": state})
            log(f"kill {i + 1}/{points}: {delay:.2f} s after a checkpoint, {'killed' if alive else 'had exited'}, "
                f"folder: {state}", flush=True)
            if not alive:
                break                              # the run finished before a further kill point
        _complete(run, run_args)
        diffs = _differences(ref, run)
    return {"kills": sum(k["killed"] for k in kills), "identical": not diffs, "differences": diffs,
            "reference_s": T, "epoch_s": E, "epochs": epochs, "when": when, "points": kills,
            "data": data, "schedule": schedule, "lrs": [h["lr"] for h in json.loads((ref / "history.json").read_text())],
            "reference_train_s": json.loads((ref / "results.json").read_text())["train_time_s"]}


def _complete(run: Path, run_args: list[str]) -> None:
    """Resume the killed run to its end (start it again when it had no checkpoint yet)."""
    p, _ = _start(["train", "--resume", str(run), "--quiet"] if _resumable(run) else
                  ["train", "--out", str(run), *run_args], run)
    rc, err = _finish(p)
    if rc != 0:
        raise RuntimeError(f"resuming {run} failed ({rc}): {err[-2000:]}")


def _differences(ref: Path, run: Path) -> list[str]:
    a, b = outputs(ref), outputs(run)
    left = [str(x) for x in run.rglob("*") if ".tmp" in x.name]   # a killed writer's temp files: removed
    return [k for k in a if a[k] != b[k]] + left


def report(reps: list[dict], args) -> str:
    import platform

    import torch
    out = [f"# SIGKILL at random moments → resume → bit-identical results\n",
           f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kill_resume.py --points {args.points} "
           f"--when {args.when} --seed {args.seed} --epochs {args.epochs} --data {args.data} --schedule {args.schedule} "
           "--work runs/kill --report FILE`\n",
           f"Machine: {os.cpu_count()}-core CPU (shared with other jobs), torch {torch.__version__}, "
           f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.\n",
           ("Run: the embedded synthetic recipe at 32×32, width 4, 512/64/64 images, batch 32 (16 steps per "
            "epoch), one thread." if args.data == "synthetic" else
            "Run: your own tasks (write_demo: 256/64/64 16×16 PNGs, 6 tasks of three types), folder_k3 at width 4, "
            "batch 32 (8 steps per epoch), through the decode cache, one thread.") +
           f" Schedule: {args.schedule} ({', '.join(SCHEDULES[args.schedule]) or 'the recipe'}); the reference's "
           f"LR per epoch: {reps[0]['lrs']}. Compared: results.json and history.json without `train_time_s`, config.json, "
           "grouped_model.json, the bytes of grouped_model.safetensors; no temporary file may be left.\n"]
    for rep in reps:
        rows = "\n".join(f"| {k['n']} | {k['delay_s']:.2f} | {'yes' if k['killed'] else 'no: the run had finished'} "
                         f"| {k['then']} |" + ("" if "identical" not in k else
                                               f" {'yes' if k['identical'] else 'NO'} |") for k in rep["points"])
        start = ("after the process claimed the folder, uniform in (0, T); independent trials (fresh run, one "
                 "kill, resumed to the end, compared) until that many processes were killed" if rep["when"] == "anywhere" else
                 "after the process wrote its first checkpoint, uniform in (0, E); one run, a chain of kills "
                 "and resumes")
        head = ("| trial | moment (s) | process still running | what the folder held after the kill | identical |\n"
                "|---|---|---|---|---|" if rep["when"] == "anywhere" else
                "| kill | moment (s) | process still running | what the folder held after the kill |\n|---|---|---|---|")
        out.append(f"## --when {rep['when']}, {rep['epochs']} epochs\n\n"
                   f"Reference: T = {rep['reference_s']:.1f} s from claiming its folder to results.json "
                   f"({rep['reference_train_s']:.1f} s of it in optimizer steps), E = {rep['epoch_s']:.2f} s between "
                   f"checkpoints. Kill moment {start}.\n\n"
                   f"Result: **{'bit-identical' if rep['identical'] else 'DIFFERENT: ' + ', '.join(rep['differences'])}**"
                   f" after {rep['kills']} kills (each followed by a resume).\n\n{head}\n{rows}\n")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--when", choices=["anywhere", "training", "both"], default="anywhere")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--work", default="runs/kill")
    ap.add_argument("--report", help="write a Markdown report here")
    ap.add_argument("--data", choices=["synthetic", "folder"], default="synthetic")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="recipe")
    args = ap.parse_args(argv)
    reps = []
    for when in (("anywhere", "training") if args.when == "both" else (args.when,)):
        epochs = max(args.epochs, args.points + 2) if when == "training" else args.epochs
        reps.append(kill_resume(Path(args.work) / when, args.points, args.seed, epochs, when, data=args.data,
                                schedule=args.schedule))
        r = reps[-1]
        print(f"{when}: {'bit-identical' if r['identical'] else 'DIFFERENT'} after {r['kills']} kills "
              f"{r['differences'] or ''}", flush=True)
    if args.report:
        Path(args.report).write_text(report(reps, args))
    return 0 if all(r["identical"] for r in reps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
