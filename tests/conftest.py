"""Test set-up. Triton's interpreter must be switched on before triton is first imported (torch.compile
imports it too), so this runs before any test module imports torch: on a machine without a CUDA GPU
the Triton kernels run under ``TRITON_INTERPRET=1``; on a GPU machine the same command runs them (and
the GPU-only tests) on the GPU. An explicit ``TRITON_INTERPRET`` in the environment is kept."""
import os
import shutil
import subprocess


def has_cuda_gpu() -> bool:
    """A CUDA GPU this process may use, found without importing torch (which would import triton):
    ``nvidia-smi -L`` lists one, ``CUDA_VISIBLE_DEVICES`` does not hide them all, and the installed torch
    is not a CPU-only build (the README's CPU install on a GPU machine: kernels must run interpreted)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    from importlib import metadata
    try:
        if metadata.version("torch").endswith("+cpu"):
            return False
    except metadata.PackageNotFoundError:
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in out.splitlines())


INTERPRET_SET_HERE = "TRITON_INTERPRET" not in os.environ and not has_cuda_gpu()
if INTERPRET_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fastdmtg-inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402


# 2-core CI machine: keep intra-op threads bounded so parallel test processes don't thrash.
# FASTDMTG_TEST_THREADS=N sets another count (docs/testing.md: on a loaded machine two threads of tiny
# convolutions spin-wait for each other — one thread ran a tiny training 5× faster there)
TEST_THREADS = int(os.environ.get("FASTDMTG_TEST_THREADS") or 0) or min(2, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(TEST_THREADS)
    yield


# ------------------------------------------------------------------------------------------------
# markers, hang reports, and a check that every test leaves the process as it found it
# ------------------------------------------------------------------------------------------------
import multiprocessing  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

CHECKED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# started once and kept for the life of the process: inductor's compile workers, multiprocessing's
# resource tracker and forkserver
LIBRARY_PROCESSES = ("compile_worker", "multiprocessing.resource_tracker", "multiprocessing.forkserver")
CHILD_GRACE_S = 10     # a child a test ended may take a moment to go; only one still there after this is a leak


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end test that takes more than ~20 s on an idle 2-core "
                                       "machine; still part of the README's test command (deselect with "
                                       "-m 'not slow' while working)")


def pytest_collection_modifyitems(session, config, items):
    """``FASTDMTG_TEST_SHUFFLE=SEED``: run the test files in a shuffled order and the tests of each
    file in a shuffled order (a file's tests stay together, so its module-scoped fixtures are built
    once). Finds tests that depend on state an earlier test left behind."""
    seed = os.environ.get("FASTDMTG_TEST_SHUFFLE")
    if not seed:
        return
    import random
    rng = random.Random(seed)
    by_file: dict[str, list] = {}
    for it in items:
        by_file.setdefault(it.nodeid.split("::", 1)[0], []).append(it)
    files = list(by_file)
    rng.shuffle(files)
    items[:] = [it for f in files for it in rng.sample(by_file[f], len(by_file[f]))]


def pytest_report_header(config):
    seed = os.environ.get("FASTDMTG_TEST_SHUFFLE")
    h = signal.getsignal(signal.SIGINT)
    sigint = {signal.SIG_IGN: "ignored (a background job, nohup)", signal.default_int_handler: "Python's default",
              signal.SIG_DFL: "the OS default"}.get(h, repr(h))
    return [f"SIGINT at start: {sigint}", f"torch threads per test: {TEST_THREADS}"] + ([f"test order shuffled: FASTDMTG_TEST_SHUFFLE={seed}"] if seed else [])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A wall-clock limit that fires (pytest-timeout's ``@pytest.mark.timeout``, a subprocess's
    ``timeout=``) is a hang guard, far above the test's idle time: say so, so that nobody reads it
    as a wrong result or as "too slow"."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or call.excinfo is None:
        return
    e, secs = call.excinfo.value, None
    if isinstance(e, subprocess.TimeoutExpired):
        secs = e.timeout
    elif type(e).__name__ == "Failed" and str(e).startswith("Timeout"):
        # pytest-timeout: "Timeout (>600.0s) from pytest-timeout." (older: "Timeout >600.0s")
        import re
        m = re.match(r"Timeout \(?>([0-9.]+)s", str(e))
        secs = float(m.group(1)) if m else None
    if secs is not None:
        rep.longrepr = (f"{item.nodeid} did not finish within {secs:.4g} s — a hang, not a wrong result "
                        f"(a hang guard; the limit is at least 10× the test's idle time)\n{rep.longrepr}")


def _start_method() -> str:
    # None (not chosen yet) is the platform's default: the first Process() chooses it implicitly
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def _live_children() -> dict[int, str]:
    """{pid: command line} of this process's children that are not zombies (Linux /proc; elsewhere
    multiprocessing's own children). Processes a library keeps for the life of the process
    (``LIBRARY_PROCESSES``) are not a test's leak."""
    me, out = os.getpid(), {}
    if os.path.isdir("/proc/self"):
        try:        # the kernel's list of each thread's children: no scan of every process
            pids = set()
            for t in os.listdir(f"/proc/{me}/task"):
                with open(f"/proc/{me}/task/{t}/children") as f:
                    pids.update(f.read().split())
        except OSError:
            pids = [d for d in os.listdir("/proc") if d.isdigit()]
        for d in pids:
            try:
                with open(f"/proc/{d}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[-1].split()[:2]
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, ValueError):
                continue
            if int(ppid) == me and state != "Z" and not any(k in cmd for k in LIBRARY_PROCESSES):
                out[int(d)] = cmd[:200]
    else:
        out = {p.pid: p.name for p in multiprocessing.active_children()}
    return out


@pytest.fixture(autouse=True)
def _process_state_unchanged(request):
    """Fail a test that leaves the process changed: SIGINT / SIGTERM handlers, the multiprocessing
    start method, or child processes still running. (A changed SIGINT disposition changed what a
    later test saw; each is restored here so that one leak does not spread.)"""
    handlers = {s: signal.getsignal(s) for s in CHECKED_SIGNALS}
    method = _start_method()
    children = set(_live_children())
    yield
    changed = []
    for s, h in handlers.items():
        now = signal.getsignal(s)
        if now != h:
            changed.append(f"the {signal.Signals(s).name} handler ({h!r} → {now!r})")
            signal.signal(s, h)
    if _start_method() != method:
        changed.append(f"the multiprocessing start method ({method!r} → {_start_method()!r})")
        multiprocessing.set_start_method(method, force=True)
    end = time.monotonic() + CHILD_GRACE_S
    while True:
        left = {p: c for p, c in _live_children().items() if p not in children}
        if not left or time.monotonic() > end:
            break
        time.sleep(0.1)
    if left:
        changed.append("child processes still running " + "; ".join(f"{p}: {c}" for p, c in left.items()))
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
                os.waitpid(p, 0)
            except (OSError, ChildProcessError):
                pass
    if changed:
        pytest.fail(f"{request.node.nodeid} left the process changed: " + "; ".join(changed), pytrace=False)


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    """``add(table, stem, text)``: a throwaway plugin as one file, ``stem``.py in a folder put on the
    search path of the table's package (``fastdmtg.registry.Plugins``: the package is listed on the
    table's next read). Undone after the test: the module forgotten, the table read again."""
    import importlib
    import sys
    import textwrap
    added = []

    def add(table, stem: str, text: str):
        pkg = importlib.import_module(table.package)
        folder = tmp_path / ("plugins_" + table.package.replace(".", "_"))
        folder.mkdir(exist_ok=True)
        path = folder / f"{stem}.py"
        path.write_text(textwrap.dedent(text))
        if str(folder) not in pkg.__path__:
            monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(folder)])
        added.append((table, f"{table.package}.{stem}"))
        table.clear()
        return path

    yield add
    for table, module in added:
        sys.modules.pop(module, None)
        table.clear()
