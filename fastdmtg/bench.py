"""Benchmarks: FLOPs per sample, training-step throughput, and a profiler summary.

    fastdmtg bench flops [--taskonomy] [--out FILE]
    fastdmtg bench step  [--recipe celeba9_k3] [--steps 50] [--out FILE] [--scaling]
    fastdmtg profile     [--recipe celeba9_k3] [--steps 10] [--out DIR]

FLOP conventions: fvcore counts 1 FLOP per multiply-add (and also counts BN/pooling);
torch.utils.flop_counter counts 2 per multiply-add for conv/linear/matmul only. Both are reported;
counts are of the eager training network (all K·N heads), batch 1, forward only. A training step
costs about 3× the forward (backward ≈ 2× forward); MFU below uses 3 × 2 × fvcore-MACs per sample
against the GPU's dense bf16 peak.

Timing (``bench step``): synthetic CelebA-shaped data (uint8 64×64 images, random ±1 labels) —
the speed of a step does not depend on the pixel values. Warm-up steps first (they pay compile and
graph capture), then CUDA events around ``--steps`` steps, median of ``--repeats`` repeats.
The "reference style" row is eager fp32 fed by a torch DataLoader decoding JPEG files of the
official 178×218 format (written to a temporary folder), as the reference pipeline does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import Config, apply_overrides, get_recipe

# DMTG paper Table A1 (one RTX 4090): (GFLOPs, hours) — see ../shared/reference-notes.md
PAPER_A1 = {"celeba9_k2": (0.15, 0.99), "celeba9_k3": (0.22, 1.27), "celeba9_k4": (0.29, 1.55),
            "celeba40_k5": (None, 2.9), "celeba9_k5": (None, 1.7)}
H100_BF16_DENSE_TFLOPS = 989.0   # datasheet (SXM); the device notes measured ~798 on 8192³ bf16 GEMM


def _task_specs(cfg: Config):
    from .config import CELEBA_40, TASK_PRESETS
    from .tasks.attributes import AttributeTaskSet
    if cfg.data.dataset == "taskonomy":
        from .tasks.taskonomy import taskonomy_specs
        return taskonomy_specs(cfg.data.task_names() or TASK_PRESETS["taskonomy5"])
    if cfg.data.dataset == "synthetic":
        from .data.synthetic import task_names
        return AttributeTaskSet(task_names(cfg.data.synthetic_groups, cfg.data.synthetic_tasks_per_group)).specs
    return AttributeTaskSet(cfg.data.task_names() or CELEBA_40).specs


def count_flops(cfg: Config) -> dict:
    """Forward FLOPs per sample of the training network: fvcore (1/MAC) and torch (2/MAC)."""
    import warnings

    from torch.utils.flop_counter import FlopCounterMode

    from .models import build_multibranch
    model = build_multibranch(cfg.model, _task_specs(cfg), cfg.data.image_size).eval()
    x = torch.rand(1, 3, cfg.data.image_size, cfg.data.image_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    out = {"torch_2_per_mac": fc.get_total_flops(), "params": sum(p.numel() for p in model.parameters())}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis
            fa = FlopCountAnalysis(model, x)
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            out["fvcore_1_per_mac"] = fa.total()
    except ImportError:
        out["fvcore_1_per_mac"] = None
    return out


def flops_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fastdmtg bench flops")
    ap.add_argument("--recipes", default="celeba9_k2,celeba9_k3,celeba9_k4,celeba9_k5,celeba40_k5")
    ap.add_argument("--taskonomy", action="store_true", help="also the Taskonomy rows (slow on CPU: minutes)")
    ap.add_argument("--out", help="write the Markdown table here too")
    args = ap.parse_args(argv)
    rows = ["| recipe | K | N | params | fvcore GFLOPs (1/MAC) | torch GFLOPs (2/MAC) | paper GFLOPs (Table A1) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.recipes.split(","):
        cfg = get_recipe(name)
        f = count_flops(cfg)
        paper = PAPER_A1.get(name, (None, None))[0]
        rows.append(f"| {name} | {cfg.model.branches} | {len(_task_specs(cfg))} | {f['params']:,} | "
                    f"{(f['fvcore_1_per_mac'] or float('nan')) / 1e9:.3f} | {f['torch_2_per_mac'] / 1e9:.3f} | "
                    f"{paper if paper is not None else '—'} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows)
    if args.taskonomy:
        import runpy
        bench = Path(__file__).resolve().parents[1] / "benchmarks" / "flops_taskonomy.py"
        if bench.exists():
            sys.argv = [str(bench)]
            runpy.run_path(str(bench), run_name="__main__")
        else:
            print("benchmarks/flops_taskonomy.py not found (run from a source checkout)", file=sys.stderr)
    header = (f"FLOPs per sample, forward, batch 1, training network (all K·N heads); "
              f"torch {torch.__version__}; command: fastdmtg bench flops {' '.join(argv)}\n\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(header + text + "\n")
    return 0


# ----------------------------------------------------------------------------------------- step
def _synthetic_celeba(n: int, n_tasks: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n, n_tasks), generator=g)
    return images, labels


def _write_jpegs(root: Path, n: int, n_tasks_total: int = 40):
    """A CelebA folder in the official format with n random 178×218 JPEGs (for the DataLoader row)."""
    import numpy as np
    from PIL import Image

    from .config import CELEBA_40
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    base = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        Image.fromarray(np.roll(base, i, axis=1)).save(root / "img_align_celeba" / f, quality=90)
    lab = rng.choice([-1, 1], size=(n, 40))
    (root / "list_attr_celeba.txt").write_text(
        f"{n}\n{' '.join(CELEBA_40)}\n" + "".join(f + "".join(f"{v:>3d}" for v in r) + "\n" for f, r in zip(files, lab)))
    (root / "list_eval_partition.txt").write_text("".join(f"{f} 0\n" for f in files))


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


def build_stepper(cfg: Config, device: torch.device, *, loader: str = "memory", jpeg_root: Path | None = None,
                  num_workers: int = 8, n_batches: int = 64):
    """Build model, method, optimizer and step runner for a config; returns (step_fn, info) where
    step_fn() runs one full-batch training step."""
    from . import ops
    from .data import LoaderSource, MemorySource
    from .methods import build_method
    from .models import build_multibranch
    from .step import StepRunner
    from .tasks.attributes import AttributeTaskSet
    from .train import build_optimizer, build_step_module, prepare_model, resolve_speed, step_mode
    torch.manual_seed(0)
    ops.set_backend(cfg.train.kernels)
    specs = _task_specs(cfg)
    names = [s.name for s in specs]
    taskset = AttributeTaskSet(names)
    bs = cfg.train.batch_size
    if loader == "torch":
        from .data.celeba import CelebAFiles, CelebAIndex
        index = CelebAIndex(jpeg_root, names)
        src = LoaderSource({"train": CelebAFiles(index, "train", cfg.data.image_size)}, taskset,
                           cfg.data.image_size, num_workers)
    else:
        src = MemorySource({"train": _synthetic_celeba(bs * n_batches, len(names), cfg.data.image_size)}, taskset,
                           cfg.data.image_size)
    speed = resolve_speed(cfg, device, 1)
    # the same model preparation and step construction as the Trainer (fastdmtg.train)
    model = prepare_model(build_multibranch(cfg.model, specs, cfg.data.image_size).to(device), cfg, speed)
    method = build_method(cfg, len(names), names).to(device)
    opt = build_optimizer(cfg, list(model.parameters()) + list(method.parameters()), device,
                          capturable=speed["cuda_graph"])
    mode = step_mode(speed)
    runner = StepRunner(build_step_module(model, method, taskset, cfg, device, speed), opt, mode)

    def batches():
        epoch = 0
        while True:
            for b in src.batches("train", bs, shuffle=True, seed=0, epoch=epoch, device=device, train=True):
                if b["image"].shape[0] == bs:     # time full batches only
                    yield b
            epoch += 1
    it = batches()

    def step():
        return runner(next(it))
    return step, {"mode": mode, "kernels": ops.get_backend(device), "runner": runner, "batch": bs}


def measure_step(cfg: Config, device: torch.device, *, steps: int, repeats: int, warmup: int,
                 loader: str = "memory", jpeg_root: Path | None = None, num_workers: int = 8) -> dict:
    """Median time of `steps` training steps (after warm-up) for a config; returns ms/step and img/s."""
    step, info = build_stepper(cfg, device, loader=loader, jpeg_root=jpeg_root, num_workers=num_workers)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        with _Timer(device) as tm:
            for _ in range(steps):
                step()
        times.append(tm.ms / steps)
    ms = statistics.median(times)
    return {"ms_per_step": ms, "img_per_s": info["batch"] * 1e3 / ms, "spread_ms": (min(times), max(times)),
            "warmup_s": warm_s, "mode": info["mode"], "kernels": info["kernels"], "captures": info["runner"].captures}


def _variant(cfg: Config, over: list[str]) -> Config:
    return apply_overrides(cfg, over)


def step_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fastdmtg bench step")
    ap.add_argument("--recipe", default="celeba9_k3")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--jpegs", type=int, default=8192, help="JPEG files for the DataLoader row (0: skip the row)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--scaling", action="store_true", help="also step time vs K (2..5) and N (9 vs 40)")
    ap.add_argument("--only", default="", help="comma-separated row indices to run")
    ap.add_argument("--scaling-set", action="append", default=[], help="extra overrides for the scaling table")
    ap.add_argument("--out", help="write the Markdown report here too")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    from .train import resolve_device
    device = resolve_device(args.device)
    base = get_recipe(args.recipe)
    base = apply_overrides(base, ["train.cuda_graph=off", "train.compile=off", "train.kernels=reference",
                                  "train.amp=off", "train.channels_last=off", "model.batched=off"])
    flops = count_flops(base)
    fwd_macs = flops["fvcore_1_per_mac"] or flops["torch_2_per_mac"] / 2
    train_flops_per_sample = 3 * 2 * fwd_macs
    rows = [
        ("reference style: eager fp32 + torch DataLoader (JPEG decode)", [], "torch"),
        ("eager fp32, GPU-resident uint8 cache", [], "memory"),
        ("+ bf16 autocast", ["train.amp=bf16"], "memory"),
        ("+ Triton kernels", ["train.amp=bf16", "train.kernels=triton"], "memory"),
        ("+ CUDA graph (whole step)", ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on"], "memory"),
        ("+ torch.compile", ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on", "train.compile=on"], "memory"),
        ("+ channels_last", ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on", "train.compile=on",
                             "train.channels_last=on"], "memory"),
        ("+ batched branches (grouped conv)", ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on",
                                               "train.compile=on", "train.channels_last=on", "model.batched=on"], "memory"),
        ("batched, no compile (bf16 + Triton + graph)", ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on",
                                                         "model.batched=on"], "memory"),
        ("batched + compile, no channels_last", ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on",
                                                 "train.compile=on", "model.batched=on"], "memory"),
        ("bf16 + CUDA graph, reference losses (no Triton)", ["train.amp=bf16", "train.cuda_graph=on"], "memory"),
        ("bf16 + compile (no graph)", ["train.amp=bf16", "train.kernels=triton", "train.compile=on"], "memory"),
    ]
    if device.type != "cuda":
        rows = [r for r in rows if not any("cuda_graph=on" in o or "kernels=triton" in o for o in r[1])]
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for i, r in enumerate(rows) if str(i) in keep]
    jpeg_dir = None
    out = []
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_train = 162_770
    lines = [f"## bench step — {args.recipe}", "",
             f"- device: {gpu}; torch {torch.__version__}; python {sys.version.split()[0]}",
             f"- command: `fastdmtg bench step {' '.join(argv)}`",
             f"- batch {base.train.batch_size}, {args.steps} timed steps × {args.repeats} repeats (median), "
             f"{args.warmup} warm-up steps; CUDA events",
             f"- training FLOPs/sample = 3 × 2 × fvcore MACs = {train_flops_per_sample / 1e9:.3f} GFLOP; "
             f"MFU against {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s dense bf16 (H100 SXM datasheet)",
             f"- projected hours: 100 epochs × {n_train:,} CelebA train images / throughput (training steps only)",
             "", "| configuration | mode | kernels | ms/step | img/s | speed-up | MFU % | 100-epoch hours |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    ref_ips = None
    for name, over, loader in rows:
        cfg = _variant(base, over)
        if loader == "torch":
            if args.jpegs <= 0:
                continue
            if jpeg_dir is None:
                jpeg_dir = Path(tempfile.mkdtemp(prefix="fastdmtg-jpegs-"))
                _write_jpegs(jpeg_dir, args.jpegs)
            try:
                r = measure_step(cfg, device, steps=max(5, args.steps // 5), repeats=3, warmup=3, loader="torch",
                                 jpeg_root=jpeg_dir, num_workers=args.workers)
            except Exception as e:  # report, don't hide
                print(f"{name}: failed: {e}", file=sys.stderr)
                continue
        else:
            try:
                r = measure_step(cfg, device, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
            except Exception as e:
                print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                lines.append(f"| {name} | — | — | failed: {type(e).__name__} | | | | |")
                continue
        ref_ips = ref_ips or r["img_per_s"]
        mfu = 100 * r["img_per_s"] * train_flops_per_sample / (H100_BF16_DENSE_TFLOPS * 1e12)
        hours = 100 * n_train / r["img_per_s"] / 3600
        lines.append(f"| {name} | {r['mode']} | {r['kernels']} | {r['ms_per_step']:.3f} | {r['img_per_s']:,.0f} | "
                     f"{r['img_per_s'] / ref_ips:.1f}× | {mfu:.2f} | {hours:.3f} |")
        out.append({"name": name, **r})
        print(lines[-1], flush=True)
    if args.scaling and device.type == "cuda":
        best = ["train.amp=bf16", "train.kernels=triton", "train.cuda_graph=on", "train.compile=on",
                "train.channels_last=on"] + args.scaling_set
        lines += ["", f"### scaling ({' '.join(best)})", "",
                  "| recipe | K | N | ms/step | img/s |", "|---|---:|---:|---:|---:|"]
        for name in ("celeba9_k2", "celeba9_k3", "celeba9_k4", "celeba9_k5", "celeba40_k5"):
            cfg = apply_overrides(get_recipe(name), best)
            r = measure_step(cfg, device, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
            lines.append(f"| {name} | {cfg.model.branches} | {len(_task_specs(cfg))} | {r['ms_per_step']:.3f} | "
                         f"{r['img_per_s']:,.0f} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=2))
    return 0


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("flops", "step"):
        print("usage: fastdmtg bench flops|step [options]", file=sys.stderr)
        return 2
    return {"flops": flops_main, "step": step_main}[argv[0]](argv[1:])


# ------------------------------------------------------------------------------------- profile
def profile_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fastdmtg profile")
    ap.add_argument("--recipe", default="celeba9_k3")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--out", default="profile_out")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from .train import resolve_device
    device = resolve_device(args.device)
    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    step, info = build_stepper(cfg, device)
    for _ in range(args.warmup):          # pays compile / graph capture outside the profiled window
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=False) as prof:
        with _Timer(device) as tm:
            for _ in range(args.steps):
                step()
    r = {"ms_per_step": tm.ms / args.steps, "mode": info["mode"], "kernels": info["kernels"]}
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:15]
    wall_ms = tm.ms
    busy_us = 0.0
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        ivals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        cur_s = cur_e = None
        for s, e in ivals:   # union of kernel intervals = GPU busy time
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    busy_us += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            busy_us += cur_e - cur_s
    lines = [f"## profile — {args.recipe} {' '.join(args.overrides)}", "",
             f"- device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}",
             f"- mode {r['mode']}, kernels {r['kernels']}; {r['ms_per_step']:.3f} ms/step over {args.steps} steps",
             f"- trace: {trace}"]
    if device.type == "cuda":
        lines.append(f"- GPU busy (union of kernel intervals): {busy_us / 1e3:.2f} ms of {wall_ms:.2f} ms wall "
                     f"({100 * busy_us / 1e3 / wall_ms:.1f}%); launch gaps / idle: {wall_ms - busy_us / 1e3:.2f} ms")
    lines += ["", "| op / kernel | calls | total ms |", "|---|---:|---:|"]
    for e in top:
        lines.append(f"| {e.key[:90]} | {e.count} | {getattr(e, key, 0) / 1e3:.3f} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    print(text)
    return 0


__all__ = ["bench_main", "profile_main", "count_flops", "measure_step", "build_stepper"]
