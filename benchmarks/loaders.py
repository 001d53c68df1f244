"""Benchmark the data pipelines (fastdmtg.pipelines): samples/s and CPU cores per backend, alone and
while feeding the real DMTG training step, for CelebA-64 and Taskonomy-256. Every row names the
source that ran (``Source.describe()``: the backend, its class, where the data lived / what it
decoded), not just the backend that was asked for.

    python benchmarks/loaders.py [--out FILE] [--celeba-root DIR] [--taskonomy-root DIR] [--quick]

Without a real dataset root, synthetic data of the right *format and size* is written first with
the test fixture writers (tests/celeba_fixture.py: 178×218 JPEGs + the official annotation files;
tests/taskonomy_fixture.py's PNG writer and file naming: 512×512 PNGs at the real bit depths).
Synthetic CelebA images are noise (they decode slower than real faces); synthetic Taskonomy maps
are smooth (they compress and decode about like real ones).

Per backend and dataset:
  loader alone     one warm-up epoch (decode caches, .beton writing, JIT and pipeline builds happen
                   there, untimed), then one timed epoch of the train split with nothing else to do;
                   samples/s, and CPU cores used = (CPU time of this process and of its finished
                   children: DataLoader workers) / wall time
  step alone       the training step (model.forward in bf16 autocast on CUDA, TaskSet.head_losses with
                   fastdmtg.ops, backward, fused Adam, DMTG grouping weights) on one resident batch:
                   the consumption rate the loader must sustain
  loader + step    the timed epoch again, each batch fed to the step
  fed?             loader alone >= 1.2 × step alone (the loader keeps the GPU busy with headroom)
Backends whose packages are missing are reported as skipped with the reason.

``--no-step``: loader alone only (on a CPU the Taskonomy step takes minutes per batch).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))      # the fixture writers

from fastdmtg.config import Config, DataConfig, GroupingConfig, ModelConfig  # noqa: E402
from fastdmtg import pipelines as P  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


# ------------------------------------------------------------------------------------------------
# synthetic data in the official formats
# ------------------------------------------------------------------------------------------------
def make_celeba(root: Path, n: int) -> Path:
    from celeba_fixture import write_celeba
    if not (root / "list_eval_partition.txt").exists():
        # all but 16 images in train (the benchmark reads train); val/test must not be empty
        write_celeba(root, n=n, seed=0, splits=[0] * (n - 16) + [1] * 8 + [2] * 8)
    return root


def _smooth(rng, size, lo, hi, channels=None):
    """Smooth random field (bilinear up-sampling of 16×16 noise: compresses and decodes like a real
    photo / label map rather than like noise), in [lo, hi], (H, W) or (H, W, channels)."""
    import torch.nn.functional as F
    c = channels or 1
    small = torch.from_numpy(rng.random((1, c, 16, 16), dtype=np.float32))
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    big = lo + (hi - lo) * big
    return big if channels else big[..., 0]


def _write_tx_sample(job):
    from taskonomy_fixture import path_of, write_png
    root, building, j, size, seed = job
    torch.set_num_threads(1)          # the pool is the parallelism
    rng = np.random.default_rng(seed)
    p, v = 2 * j + 1, j % 2
    maps = {
        "rgb": _smooth(rng, size, 0, 255, 3).astype(np.uint8),
        "depth_zbuffer": _smooth(rng, size, 500, 9000).astype(np.uint16),
        "normal": _smooth(rng, size, 0, 255, 3).astype(np.uint8),
        "segment_semantic": (_smooth(rng, size, 0, 17.99)).astype(np.uint8),
        "keypoints2d": _smooth(rng, size, 0, 300).astype(np.uint16),
        "edge_texture": _smooth(rng, size, 0, 4000).astype(np.uint16),
    }
    for d, a in maps.items():
        write_png(path_of(Path(root), "domain", d, building, p, v), a)


def make_taskonomy(root: Path, n: int, size: int) -> tuple[Path, Path]:
    split = {"train": ["alpha"], "val": ["charlie"], "test": ["delta"]}
    split_file = root.parent / f"{root.name}_split.json"
    if not split_file.exists():
        jobs = [(str(root), "alpha", j, size, j) for j in range(n)]
        jobs += [(str(root), b, 0, size, 10_000 + i) for i, b in enumerate(("charlie", "delta"))]
        with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
            list(ex.map(_write_tx_sample, jobs, chunksize=4))
        split_file.write_text(json.dumps(split))
    return root, split_file


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run_epoch(src, bs: int, epoch: int, max_batches: int, consume=None) -> tuple[int, float, float]:
    """(samples, wall s, cpu s) of one train epoch (at most max_batches batches)."""
    sync()
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    for i, batch in enumerate(src.batches("train", bs, shuffle=True, seed=0, epoch=epoch, device=DEV, train=True)):
        if i >= max_batches:
            break
        if consume is not None:
            consume(batch)
        n += batch["image"].shape[0]
    sync()
    return n, time.perf_counter() - t0, cpu_seconds() - c0


def make_step(taskset, image_size: int, arch: str, width: int):
    """The real DMTG training step, self-contained (no Trainer, no run directory)."""
    from fastdmtg.builder import build_method
    from fastdmtg.models import build_multibranch
    cfg = Config(model=ModelConfig(arch=arch, branches=3, width=width), grouping=GroupingConfig(method="dmtg"))
    model = build_multibranch(cfg.model, taskset.specs, image_size).to(DEV)
    method = build_method(cfg, taskset.num_tasks, taskset.names).to(DEV)
    params = list(model.parameters()) + list(method.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, **({"fused": True} if CUDA else {}))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)
    model.train()
    state = {"step": 0}

    def step(batch):
        z = method.weights()
        with amp:
            out = model(batch["image"])
        total, _ = taskset.head_losses(out, batch, z)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        state["step"] += 1
    return step


def step_rate(step, batch, iters: int) -> float:
    for _ in range(3):
        step(batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step(batch)
    sync()
    return iters * batch["image"].shape[0] / (time.perf_counter() - t0)


def bench_dataset(name: str, cfg: DataConfig, bs: int, arch: str, width: int, max_batches: int, step_iters: int,
                  backends: list[str], with_step: bool = True) -> list[dict]:
    rows, step, step_sps = [], None, None
    for be in backends:
        ok, why = P.backend_status(be)
        if not ok:
            rows.append({"dataset": name, "backend": be, "skip": why})
            print(f"[{name}] {be}: skipped ({why})", flush=True)
            continue
        cfg = dataclasses.replace(cfg, backend=be)
        try:
            t_build = time.perf_counter()
            src = P.build_source(cfg, progress=False)
            n0, w0, _ = run_epoch(src, bs, 0, max_batches)            # warm-up: caches, JIT, pipeline builds
            warm = time.perf_counter() - t_build
            n, wall, cpu = run_epoch(src, bs, 1, max_batches)
            row = {"dataset": name, "backend": be, "source": src.describe(), "source_class": type(src).__name__,
                   "ran": src.backend, "samples": n, "loader_sps": n / wall, "cores": cpu / wall, "warmup_s": warm}
            if with_step:
                if step is None:
                    step = make_step(src.taskset, src.image_size, arch, width)
                    batch = next(iter(src.batches("train", bs, shuffle=True, seed=0, epoch=9, device=DEV, train=True)))
                    step_sps = step_rate(step, batch, step_iters)
                nf, wf, cf = run_epoch(src, bs, 2, max_batches, consume=step)
                row.update(step_sps=step_sps, fed_sps=nf / wf, fed_cores=cf / wf, fed=n / wall >= 1.2 * step_sps)
            print(f"[{name}] {be}: {json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})}",
                  flush=True)
            rows.append(row)
        except Exception as e:  # report and go on with the other backends
            rows.append({"dataset": name, "backend": be, "skip": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            print(f"[{name}] {be}: FAILED {type(e).__name__}: {e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| dataset | backend | source that ran | loader alone (samples/s) | CPU cores | step alone (samples/s) "
           "| loader + step (samples/s) | CPU cores (fed) | keeps GPU fed (≥ 1.2× step) | warm-up s |",
           "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "skip" in r:
            out.append(f"| {r['dataset']} | {r['backend']} | – | – | – | – | – | – | skipped: {r['skip']} | – |")
            continue
        if "step_sps" in r:
            step = (f"{r['step_sps']:.1f} | {r['fed_sps']:.1f} | {r['fed_cores']:.2f} | {'yes' if r['fed'] else 'no'} "
                    f"({r['loader_sps'] / r['step_sps']:.2f}×)")
        else:
            step = "– | – | – | not measured (--no-step)"
        out.append(f"| {r['dataset']} | {r['backend']} | {r['source']} | {r['loader_sps']:.1f} | {r['cores']:.2f} "
                   f"| {step} | {r['warmup_s']:.1f} |")
    return "\n".join(out)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if CUDA else "none (CPU)"
    return f"GPU: {gpu}; CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}; Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the Markdown report here")
    ap.add_argument("--work", default=None, help="folder for synthetic data and caches (default: a temp folder)")
    ap.add_argument("--celeba-root", default=None)
    ap.add_argument("--taskonomy-root", default=None, help="raw Taskonomy root (tiny split) or a prepared folder")
    ap.add_argument("--taskonomy-split-file", default="")
    ap.add_argument("--datasets", default="celeba,taskonomy")
    ap.add_argument("--backends", default=",".join(P.BACKENDS))
    ap.add_argument("--celeba-n", type=int, default=8192, help="synthetic CelebA images")
    ap.add_argument("--taskonomy-n", type=int, default=256, help="synthetic Taskonomy samples")
    ap.add_argument("--celeba-batch", type=int, default=256)
    ap.add_argument("--taskonomy-batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="data.num_workers (DataLoader workers, FFCV/DALI threads)")
    ap.add_argument("--max-batches", type=int, default=40, help="timed batches per epoch at most")
    ap.add_argument("--step-iters", type=int, default=20)
    ap.add_argument("--no-step", action="store_true", help="loader alone only (no training step)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test of the script")
    a = ap.parse_args(argv)
    import tempfile
    work = Path(a.work or tempfile.mkdtemp(prefix="fastdmtg-loaders-"))
    work.mkdir(parents=True, exist_ok=True)
    backends = [b for b in a.backends.split(",") if b]
    cel_size, tx_size, tx_raw, width = 64, 256, 512, 64
    if a.quick:
        a.celeba_n, a.taskonomy_n, a.celeba_batch, a.taskonomy_batch = 96, 12, 16, 4
        a.max_batches, a.step_iters, tx_size, tx_raw, width = 4, 2, 32, 64, 8
    rows, notes = [], []
    t0 = time.perf_counter()
    if "celeba" in a.datasets:
        root = Path(a.celeba_root) if a.celeba_root else make_celeba(work / "celeba", a.celeba_n)
        notes.append(f"CelebA-{cel_size}: {'real data at ' + str(root) if a.celeba_root else f'synthetic, {a.celeba_n} noise JPEGs 178×218'}"
                     f", batch {a.celeba_batch}, resnet_celeba K=3 width {width}, 9 tasks (celeba9)")
        cfg = DataConfig(dataset="celeba", root=str(root), tasks="celeba9", image_size=cel_size, backend="torch",
                         cache_dir=str(work / "cache"), num_workers=a.workers)
        rows += bench_dataset(f"CelebA-{cel_size}", cfg, a.celeba_batch, "resnet_celeba", width, a.max_batches,
                              a.step_iters, backends, not a.no_step)
    if "taskonomy" in a.datasets:
        if a.taskonomy_root:
            root, split_file = Path(a.taskonomy_root), a.taskonomy_split_file
        else:
            root, split_file = make_taskonomy(work / "taskonomy", a.taskonomy_n, tx_raw)
        notes.append(f"Taskonomy-{tx_size}: {'real data at ' + str(root) if a.taskonomy_root else f'synthetic, {a.taskonomy_n} samples of 6 smooth {tx_raw}×{tx_raw} PNGs'}"
                     f", batch {a.taskonomy_batch}, xception K=3, 5 tasks (taskonomy5); train flips on")
        cfg = DataConfig(dataset="taskonomy", root=str(root), tasks="taskonomy5", image_size=tx_size, backend="torch",
                         cache_dir=str(work / "cache"), num_workers=a.workers, taskonomy_split_file=str(split_file))
        rows += bench_dataset(f"Taskonomy-{tx_size}", cfg, a.taskonomy_batch, "xception", width, a.max_batches,
                              a.step_iters, backends, not a.no_step)
    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, Path.cwd())] + (argv or sys.argv[1:]))
    report = "\n".join([
        f"# Data pipelines benchmark ({datetime.date.today().isoformat()})", "",
        f"- Hardware: {hardware()}",
        f"- Command: `{cmd}`",
        f"- Workers: {a.workers}; timed: one train epoch after a warm-up epoch, at most {a.max_batches} batches; "
        f"total benchmark time {time.perf_counter() - t0:.0f} s",
        *[f"- {n}" for n in notes], "",
        table(rows), "",
        "CPU cores = (CPU time of the process and its finished child processes) / wall time. "
        "'keeps GPU fed' compares the loader alone with the step alone on a resident batch.", ""])
    print(report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
