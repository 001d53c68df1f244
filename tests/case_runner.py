"""Run test cases in child processes, each case under its own time limit (used by the FFCV tests:
FFCV's reader threads and numba-compiled code can hang a process beyond what pytest-timeout can
interrupt).

``run_cases(module, function, arg, cases, limit)`` starts a child that imports ``module`` (from
this folder) and calls ``function(arg, case)`` for each case in turn. Before a case starts, the
child records it as current, and arms ``faulthandler.dump_traceback_later(limit, exit=True)``: a
case that runs past its limit ends the child with every thread's stack on stderr. The parent then
records that case as failed — "did not finish within N s — a hang, not a wrong result", with the
stack dump — and starts a new child for the cases after it. A hang costs its own case and ``limit``
seconds, never the cases after it nor the whole module's time budget. ``limit`` is a hang guard:
at least 10× the case's time on an idle machine, never a check of speed.
"""
from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
CURRENT = "_current"


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    out = Path(spec["out"])
    fn = getattr(importlib.import_module(spec["module"]), spec["function"])
    results = json.loads(out.read_text()) if out.exists() else {}
    for case in spec["cases"]:
        results[CURRENT] = case
        out.write_text(json.dumps(results))
        faulthandler.dump_traceback_later(spec["limit"], exit=True)
        t0 = time.perf_counter()
        try:
            fn(spec["arg"], case)
            results[case] = None
        except BaseException:
            results[case] = traceback.format_exc()
        faulthandler.cancel_dump_traceback_later()
        print(f"case {case}: {time.perf_counter() - t0:.1f} s", flush=True)
        results.pop(CURRENT)
        out.write_text(json.dumps(results))          # after every case: a later hang keeps this verdict


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (its process groups too: a writer that made its own),
    found in /proc; elsewhere the group ``sid`` alone."""
    pids = []
    if os.path.isdir("/proc/self"):
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()   # state ppid pgrp session ...
                if int(fields[3]) == sid:
                    pids.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def hang_message(what: str, limit: float) -> str:
    """How every wall-clock limit of the suite reports itself: a hang guard, not a speed check."""
    return f"{what} did not finish within {limit:g} s — a hang, not a wrong result"


def run_cases(module: str, function: str, arg, cases: list[str], limit: float, out: Path,
              env: dict | None = None) -> dict[str, str | None]:
    """{case: None (passed) or the failure text}. ``out`` is the results file (a fresh path).

    Each child runs in its own session; once it has ended, whatever it left running in that
    session (a worker of a hung case, in its own process group or not) is killed. Its output goes to a file, not a
    pipe, so a leftover grandchild holding it open cannot stall the wait."""
    out = Path(out)
    remaining, results = list(cases), {}
    code = "import sys; sys.path.insert(0, sys.argv[1]); import case_runner; case_runner.child_main(sys.argv[2])"
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    log = out.with_name(out.name + ".log")
    while remaining:
        spec = json.dumps({"module": module, "function": function, "arg": arg, "cases": remaining,
                           "limit": limit, "out": str(out)})
        # start-up (imports) is not under the per-case limit: allow a minute for it
        whole = limit * len(remaining) + 60
        with open(log, "w+") as f:
            p = subprocess.Popen([sys.executable, "-c", code, str(HERE), spec], env=env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                p.wait(timeout=whole)
                late = ""
            except subprocess.TimeoutExpired:
                late = hang_message("the child process", whole) + "\n"
            finally:
                _kill_session(p.pid)                     # the child if late, and anything it left behind
                p.wait()
            f.seek(0)
            tail = late + f.read()[-4000:]
        results = json.loads(out.read_text()) if out.exists() else {}
        current = results.pop(CURRENT, None)
        done = [c for c in remaining if c in results]
        if current is not None and current not in results:
            results[current] = (hang_message(f"case {current!r}", limit) + " (or its process crashed); stacks "
                                f"and output of the child:\n{tail}")
            done.append(current)
        if not done:                                 # the child died before its first case
            for c in remaining:
                results[c] = f"the child process ended before case {c!r} started:\n{tail}"
            break
        out.write_text(json.dumps(results))
        remaining = [c for c in remaining if c not in done]
    return results


def _selftest(arg, case: str) -> None:
    """Cases for tests/test_pipelines.py::test_case_runner_isolates_a_hung_case."""
    if case == "hang":
        time.sleep(3600)
    if case == "hang_with_child":               # a leftover process holding the child's output
        p = subprocess.Popen(["sleep", "3600"])
        Path(arg, "orphan.pid").write_text(str(p.pid))
        time.sleep(3600)
    if case == "fail":
        raise ValueError("planted failure")
    Path(arg, case).write_text("ran")
