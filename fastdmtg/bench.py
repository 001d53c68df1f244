"""Benchmarks: FLOPs per sample, training-step throughput, and a profiler summary.

    fastdmtg bench flops [--taskonomy] [--out FILE]
    fastdmtg bench step  [--recipe celeba9_k3] [--set KEY=VALUE ...] [--steps 50] [--out FILE] [--scaling]
    fastdmtg profile     [--recipe celeba9_k3] [--set KEY=VALUE ...] [--steps 10] [--out DIR]
    fastdmtg bench kernels-aot [--out FILE]     every fused kernel compiled for sm_80/89/90 (fastdmtg.aot)
    fastdmtg bench roofline --recipe R --gpu h100|a100|4090   step lower bound (fastdmtg.roofline)

``bench step`` and ``profile`` take any recipe: CelebA-shaped ones (celeba*, synthetic*) and the
Taskonomy ones (taskonomy5_k3/k4/k5, taskonomy5_vit_k3, taskonomy5_naive). ``--set`` (repeatable)
applies ``fastdmtg.config.apply_overrides`` to the recipe first, e.g. to shrink it
(``--set data.image_size=32 --set train.batch_size=4 --set model.branches=2``); ``bench step``'s rows
then set the speed switches (train.amp/kernels/cuda_graph/compile/channels_last, model.batched,
model.fused_stem) themselves.

FLOP conventions: fvcore counts 1 FLOP per multiply-add (and also counts BN/pooling);
torch.utils.flop_counter counts 2 per multiply-add for conv/linear/matmul only. Both are reported;
counts are of the eager training network (all K·N heads), batch 1, forward only (fvcore gets a
handle for scaled_dot_product_attention, which it does not know: the ViT's attention matmuls). A
training step costs about 3× the forward (backward ≈ 2× forward); MFU below uses 3 × 2 × fvcore-MACs
per sample (torch.utils.flop_counter / 2 when fvcore is not installed) against the GPU's dense bf16
peak (989 TFLOP/s for H100 SXM and H200; H100 PCIe 756, NVL parts 835, A100 312; the H100 SXM
figure when the GPU is not recognised, and on CPU).

Timing (``bench step``): synthetic data in memory — the speed of a step does not depend on the
values, only on shapes, dtypes and layout, which are exactly those of the real sources:

* CelebA-shaped recipes: uint8 S×S images and random 0/1 labels (``synthetic_celeba``; batches
  {"image": (B, 3, S, S) float32, "labels": (B, N) int64}).
* Taskonomy: random raw maps in the prepared format's dtypes (rgb/normal uint8, segmentation uint8
  ids 0..17, depth/keypoints/edges uint16 with plausible ranges and "no depth" pixels;
  ``synthetic_taskonomy``): batches {"image": (B, 3, S, S) float32, "targets": {task: (B, C, S, S)
  float32 | segmentation (B, S, S) int64}, "mask": (B, 1, S, S) bool}, normalised and flipped on
  the device by ``data.taskonomy.make_batch``.

Both are served by the trainer's default source (``fastdmtg.pipelines.build_source``, backend
gpu-cache: resident on the device, gathered there). Every row names the source that ran (its
backend, and where the data lived) in its "data" column.

Warm-up steps first (they pay compile and graph capture), then CUDA events (on CPU: the wall
clock; no MFU is reported there) around ``--steps`` steps, median of ``--repeats`` repeats — every
row, the reference-style one included. A row that fails is a "failed" row of the table and makes
the command exit 1 (``--log-level DEBUG`` prints its traceback). The "reference style" row is eager fp32 fed by a torch
DataLoader over raw files written to a temporary folder, as the reference pipeline does: CelebA
JPEGs of the official 178×218 format; for Taskonomy an official-format root
(ROOT/<domain>/<building>/point_<p>_view_<v>_domain_<suffix>.png with the real PNG bit depths, at
2× the training size as the official 512² → 256²; ``write_taskonomy_raw``) read by the torch
backend (``pipelines.torch_files.TorchSource``: JPEG/PNG decode + resize in the workers, every
batch). The files sit in the page cache, so this row does not pay disk reads.

Projected hours = epochs × training-set size / throughput (steps only): CelebA 162,770, the
synthetic set its ``data.synthetic_train``; for Taskonomy the tiny split's training size is not
recorded in this repository (the papers' figures disagree), so the hours are left out unless
``--train-images N`` gives it (e.g. the train count of a prepared folder's index.json).

``--scaling`` (CUDA only): CelebA recipes K=2..5 and N=9 vs 40; for a Taskonomy recipe, the same
recipe at K=3/4/5 with the reference per-GPU batch of taskonomy5_k3/k4/k5 (24/16/12).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from .config import Config, apply_overrides, evolve, get_recipe
from .data import task_specs as _task_specs
from .flops import count_flops, taskonomy_table
from .registry import BACKBONES
from .testing import bench_data, train_images

# DMTG paper Table A1 (one RTX 4090): (GFLOPs, hours) — see ../shared/reference-notes.md
PAPER_A1 = {"celeba9_k2": (0.15, 0.99), "celeba9_k3": (0.22, 1.27), "celeba9_k4": (0.29, 1.55),
            "celeba40_k5": (None, 2.9), "celeba9_k5": (None, 1.7),
            "taskonomy5_k3": (38.90, 158.56), "taskonomy5_k4": (50.68, 243.50), "taskonomy5_k5": (62.47, 328.67),
            "taskonomy5_vit_k3": (141.00, 220.00)}
H100_BF16_DENSE_TFLOPS = 989.0   # datasheet (SXM); the device notes measured ~798 on 8192³ bf16 GEMM
# dense bf16 peaks (datasheets), matched on the device name in order; first match wins
_BF16_PEAKS = (("H100 PCIe", 756.0, "H100 PCIe datasheet"), ("NVL", 835.0, "NVL datasheet"),
               ("H200", 989.0, "H200 datasheet"), ("H100", H100_BF16_DENSE_TFLOPS, "H100 SXM datasheet"),
               ("A100", 312.0, "A100 datasheet"))


def peak_bf16_tflops(gpu_name: str) -> tuple[float, str]:
    """(dense bf16 TFLOP/s, where the figure comes from) for a device name; the H100 SXM figure
    when the name is not recognised (and for "cpu")."""
    for key, tflops, label in _BF16_PEAKS:
        if key.lower() in gpu_name.lower():
            return tflops, label
    return H100_BF16_DENSE_TFLOPS, "H100 SXM datasheet" + ("" if gpu_name == "cpu" else "; GPU not recognised")


def flops_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fastdmtg bench flops")
    ap.add_argument("--recipes", default="celeba9_k2,celeba9_k3,celeba9_k4,celeba9_k5,celeba40_k5",
                    help="comma-separated recipes, one table row each (default: the CelebA ones)")
    ap.add_argument("--taskonomy", action="store_true", help="also the Taskonomy rows (slow on CPU: minutes)")
    ap.add_argument("--out", help="write the Markdown table here too")
    _output_flags(ap)
    args = ap.parse_args(argv)
    _setup_logging(args)
    rows = ["| recipe | K | N | params | fvcore GFLOPs (1/MAC) | torch GFLOPs (2/MAC) | paper GFLOPs (Table A1) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.recipes.split(","):
        cfg = get_recipe(name)
        f = count_flops(cfg)
        paper = PAPER_A1.get(name, (None, None))[0]
        rows.append(f"| {name} | {cfg.num_branches} | {len(_task_specs(cfg))} | {f['params']:,} | "
                    f"{(f['fvcore_1_per_mac'] or float('nan')) / 1e9:.3f} | {f['torch_2_per_mac'] / 1e9:.3f} | "
                    f"{paper if paper is not None else '—'} |")
        print(f"counted {name}", file=sys.stderr, flush=True)       # progress; the table prints once, below
    text = "\n".join(rows)
    if args.taskonomy:
        taskonomy_table()
    header = (f"FLOPs per sample, forward, batch 1, training network (all K·N heads); "
              f"torch {torch.__version__}; command: fastdmtg bench flops {' '.join(argv)}\n\n")
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(header + text + "\n")
    return 0


# ------------------------------------------------------------------------------------------ timing
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


def _source(cfg: Config, loader: str, raw_root: Path | None, num_workers: int, n_batches: int | None):
    """The training source of a bench run, built by ``fastdmtg.pipelines.build_source`` as the
    trainer builds it: ``loader`` is the backend (gpu-cache | memory over random arrays in memory;
    torch over the raw files under ``raw_root``). The dataset format's ``BenchData`` makes the data."""
    from .pipelines import build_source
    bd = bench_data(cfg)
    if loader == "torch":
        if raw_root is None:
            raise ValueError("loader='torch' needs raw_root (a folder written by testing.write_taskonomy_raw / "
                             "testing.write_celeba_raw)")
        data = replace(cfg.data, root=str(raw_root), backend="torch", num_workers=num_workers, limit_train=0,
                       limit_eval=0, **bd.raw_data(raw_root))
        return build_source(data, progress=False)
    if loader not in ("gpu-cache", "memory"):
        raise ValueError(f"loader: expected gpu-cache|memory|torch, got {loader!r}")
    ds = bd.synthetic(cfg, cfg.train.batch_size * (n_batches or bd.batches))
    return build_source(replace(cfg.data, backend=loader), progress=False, dataset=ds)


def build_stepper(cfg: Config, device: torch.device, *, loader: str = "gpu-cache", num_workers: int = 8,
                  n_batches: int | None = None, raw_root: Path | None = None):
    """The trainer's training step (``fastdmtg.builder.build_training_step``) on a bench source;
    returns (step_fn, info) where step_fn() runs one full-batch training step and returns (total
    loss, L (N, K)).

    ``loader``: the backend — "gpu-cache" or "memory" (random data in memory, ``n_batches`` batches:
    default 64 CelebA-shaped, 16 Taskonomy) or "torch" (a DataLoader decoding the raw files under
    ``raw_root`` — CelebA JPEGs (``testing.write_celeba_raw``) or a Taskonomy root
    (``testing.write_taskonomy_raw``)). ``info``: mode, kernels, runner, batch (size), taskset, source
    (the ``fastdmtg.pipelines.Source`` that runs), and last_batch (the batch dict the latest step
    consumed)."""
    from .builder import build_training_step
    torch.manual_seed(0)
    bs = cfg.train.batch_size
    src = _source(cfg, loader, raw_root, num_workers, n_batches)
    taskset = src.taskset
    built = build_training_step(cfg, taskset, src.image_size, device)
    runner = built.runner

    def batches():
        epoch = 0
        while True:
            for b in src.batches("train", bs, shuffle=True, seed=0, epoch=epoch, device=device, train=True):
                if b["image"].shape[0] == bs:     # time full batches only
                    yield b
            epoch += 1
    it = batches()
    info = {"mode": built.mode, "kernels": built.kernels, "runner": runner, "batch": bs, "taskset": taskset,
            "source": src, "last_batch": None}

    def step():
        batch = next(it)
        info["last_batch"] = batch
        return runner(batch)
    return step, info


def measure_step(cfg: Config, device: torch.device, *, steps: int, repeats: int, warmup: int,
                 loader: str = "gpu-cache", num_workers: int = 8,
                 raw_root: Path | None = None, n_batches: int | None = None) -> dict:
    """Median time of `steps` training steps (after warm-up) for a config; returns ms/step and img/s
    (and the last step's loss, ``loss``)."""
    step, info = build_stepper(cfg, device, loader=loader, num_workers=num_workers, raw_root=raw_root,
                               n_batches=n_batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    total = None
    for _ in range(repeats):
        with _Timer(device) as tm:
            for _ in range(steps):
                total, _L = step()
        times.append(tm.ms / steps)
    ms = statistics.median(times)
    return {"ms_per_step": ms, "img_per_s": info["batch"] * 1e3 / ms, "spread_ms": (min(times), max(times)),
            "data": info["source"].describe(),
            "warmup_s": warm_s, "mode": info["mode"], "kernels": info["kernels"], "captures": info["runner"].captures,
            "loss": float(total) if total is not None else None}


# the switches each bench step row sets itself (a --set of one of them is replaced by the row's value)
_SPEED_KEYS = ("train.cuda_graph", "train.compile", "train.kernels", "train.amp", "train.channels_last",
               "model.batched", "model.fused_stem")
# a row's switch name → (section, field, value when on, value when off); every switch a row does not
# name is off
_SWITCHES = {"bf16": ("train", "amp", "bf16", "off"), "triton": ("train", "kernels", "triton", "reference"),
             "graph": ("train", "cuda_graph", "on", "off"), "compile": ("train", "compile", "on", "off"),
             "channels_last": ("train", "channels_last", "on", "off"), "batched": ("model", "batched", "on", "off"),
             "fused_stem": ("model", "fused_stem", "on", "off")}
#: the fastest measured combination without batching (the scaling table's and the fused-stem rows' base)
_BEST = ("bf16", "triton", "graph", "compile", "channels_last")


def with_switches(cfg: Config, on: tuple[str, ...] = ()) -> Config:
    """``cfg`` with the speed switches named in ``on`` (keys of _SWITCHES) on and every other one off."""
    unknown = set(on) - set(_SWITCHES)
    if unknown:
        raise ValueError(f"speed switches {sorted(unknown)}: expected some of {', '.join(_SWITCHES)}")
    sections: dict[str, dict] = {"train": {}, "model": {}}
    for name, (sec, key, value_on, value_off) in _SWITCHES.items():
        sections[sec][key] = value_on if name in on else value_off
    return evolve(cfg, **sections)


def _batching_support(cfg: Config) -> tuple[bool, str]:
    """Whether model.batched=on can run for this architecture (built on the meta device: no memory)."""
    from .config import resolved_branches
    from .models import build_multibranch
    from .models.batched import supports_batching
    specs = _task_specs(cfg)
    mcfg = resolved_branches(cfg, len(specs)).model          # model.branches=0 (auto) → K
    try:
        with torch.device("meta"):
            model = build_multibranch(mcfg, specs, cfg.data.image_size)
    except Exception:          # a builder that cannot run on meta tensors: build it for real
        model = build_multibranch(mcfg, specs, cfg.data.image_size)
    if supports_batching(model):
        return True, ""
    return False, f"model.batched=on is not supported for model.arch={cfg.model.arch}"


def _scaling_configs(base_recipe: Config, recipe: str, overrides: list[str], best: list[str] = (),
                     names: tuple[str, ...] | None = None) -> list[tuple[str, Config]]:
    """(label, config) of the scaling table's rows, as the recipe's dataset format lists them (its
    ``BenchData.scaling``: CelebA K=2..5 and N=40, or ``names``; Taskonomy the given recipe at K=3/4/5
    with the reference per-GPU batch of taskonomy5_k<K>). ``overrides`` (--set) apply to every row,
    then the _BEST switches, then ``best`` (--scaling-set)."""
    out = []
    for label, cfg in bench_data(base_recipe).scaling(recipe, names):
        cfg = apply_overrides(with_switches(apply_overrides(cfg, overrides), _BEST), best)
        out.append((label.format(batch=cfg.train.batch_size), cfg))
    return out


def _step_parser(prog: str, what: str, set_help: str, steps: int, steps_help: str) -> argparse.ArgumentParser:
    """The options ``bench step`` and ``profile`` share: the recipe, --set, steps, warm-up, device, output."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--recipe", default="celeba9_k3", help=f"recipe to {what} (fastdmtg recipes; default celeba9_k3)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    ap.add_argument("--steps", type=int, default=steps, help=f"{steps_help} (default {steps})")
    ap.add_argument("--warmup", type=int, default=15,
                    help="untimed steps first, every row (compile, graph capture; default 15)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    _output_flags(ap)
    return ap


def _step_args(argv: list[str]):
    ap = _step_parser("fastdmtg bench step", "time", "override a recipe field before the rows (repeatable), e.g. "
                      "--set data.image_size=32", 50, "timed steps per repeat, every row")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per row; the median is reported (default 5)")
    ap.add_argument("--jpegs", type=int, default=8192, help="JPEG files for the CelebA DataLoader row (0: skip the row)")
    ap.add_argument("--raw-samples", type=int, default=-1,
                    help="Taskonomy samples (6 PNGs each) for the DataLoader row (default: enough for the row's "
                         "steps in one epoch; 0: skip the row)")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers of the reference-style row (default 8)")
    ap.add_argument("--scaling", action="store_true",
                    help="also step time vs K (2..5) and N (9 vs 40); Taskonomy: K=3/4/5 (CUDA only)")
    ap.add_argument("--only", default="", help="comma-separated row indices to run (none: no rows)")
    ap.add_argument("--scaling-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides for the scaling table (repeatable)")
    ap.add_argument("--scaling-recipes", default="",
                    help="CelebA recipes of the scaling table (comma-separated; default K=2..5 and celeba40_k5)")
    ap.add_argument("--train-images", type=int, default=0,
                    help="training-set size for the projected hours (default: CelebA 162,770; Taskonomy: none)")
    ap.add_argument("--out", help="write the Markdown report here too (and the rows as JSON beside it)")
    return ap.parse_args(argv)


def _step_rows(base: Config, device: torch.device, only: str) -> tuple[list[tuple], list[str]]:
    """The rows of ``bench step`` (label, the switches on, the loader) this device and --only run, and
    the notes on rows not run."""
    bd = bench_data(base)
    where = "GPU-resident" if device.type == "cuda" else "host-memory (CPU)"
    rows = [
        (f"reference style: eager fp32 + torch DataLoader ({bd.decode})", (), "torch"),
        (f"eager fp32, {where} {bd.cache} cache", (), "gpu-cache"),
        ("+ bf16 autocast", ("bf16",), "gpu-cache"),
        ("+ Triton kernels", ("bf16", "triton"), "gpu-cache"),
        ("+ CUDA graph (whole step)", ("bf16", "triton", "graph"), "gpu-cache"),
        ("+ torch.compile", ("bf16", "triton", "graph", "compile"), "gpu-cache"),
        ("+ channels_last", _BEST, "gpu-cache"),
        ("+ batched branches (grouped conv)", _BEST + ("batched",), "gpu-cache"),
        ("batched, no compile (bf16 + Triton + graph)", ("bf16", "triton", "graph", "batched"), "gpu-cache"),
        ("batched + compile, no channels_last", ("bf16", "triton", "graph", "compile", "batched"), "gpu-cache"),
        ("bf16 + CUDA graph, reference losses (no Triton)", ("bf16", "graph"), "gpu-cache"),
        ("bf16 + compile (no graph)", ("bf16", "triton", "compile"), "gpu-cache"),
    ]
    if BACKBONES.load(base.model.arch).set_fused_stem is not None:   # its fused BN-ReLU-maxpool stem op
        rows += [("+ fused stem op (batched branches)", _BEST + ("batched", "fused_stem"), "memory"),
                 ("+ fused stem op (separate branches)", _BEST + ("fused_stem",), "memory")]
    if device.type != "cuda":
        rows = [r for r in rows if "graph" not in r[1] and "triton" not in r[1]]
    if only:
        keep = set(only.split(","))          # "none": no rows (e.g. only the --scaling table)
        rows = [r for i, r in enumerate(rows) if str(i) in keep]
    notes = []
    if any("batched" in r[1] for r in rows):
        ok, why = _batching_support(base)
        if not ok:
            skipped = [r[0] for r in rows if "batched" in r[1]]
            rows = [r for r in rows if "batched" not in r[1]]
            notes.append(f"- not run: {'; '.join(skipped)} — {why}")
            print(notes[-1], file=sys.stderr)
    return rows, notes


class _StepReport:
    """The state of one ``bench step`` run: the rows' table lines, their JSON, failures, the raw files of
    the DataLoader row (written once, removed at the end)."""

    def __init__(self, args, argv: list[str], base: Config, device: torch.device):
        self.args, self.base, self.device = args, base, device
        self.cuda = device.type == "cuda"
        flops = count_flops(base)
        fwd_macs = flops["fvcore_1_per_mac"] or flops["torch_2_per_mac"] / 2
        self.train_flops = 3 * 2 * fwd_macs
        fvcore_note = "" if flops["fvcore_1_per_mac"] else " (fvcore not installed: MACs = torch.utils.flop_counter / 2)"
        gpu = torch.cuda.get_device_name(device) if self.cuda else "cpu"
        self.peak, peak_label = peak_bf16_tflops(gpu)
        self.n_train, hours_text = train_images(base, args.train_images)
        self.raw_dir, self.out, self.failed, self.ref_ips = None, [], 0, None
        self.lines = [
            f"## bench step — {args.recipe}", "",
            f"- device: {gpu}; torch {torch.__version__}; python {sys.version.split()[0]}",
            f"- command: `fastdmtg bench step {' '.join(argv)}`",
            f"- batch {base.train.batch_size}, {args.steps} timed steps × {args.repeats} repeats (median), "
            f"{args.warmup} warm-up steps; " + ("CUDA events" if self.cuda else "CPU wall clock (perf_counter)"),
            f"- training FLOPs/sample = 3 × 2 × fvcore MACs = {self.train_flops / 1e9:.3f} GFLOP{fvcore_note}; " +
            (f"MFU against {self.peak:.0f} TFLOP/s dense bf16 ({peak_label})" if self.cuda
             else "no MFU on CPU (it is defined against a GPU's peak)"),
            f"- projected hours: {hours_text}"]
        bd = bench_data(base)
        if bd.describe is not None:
            self.lines.append(f"- data: {bd.describe(base, [s.name for s in _task_specs(base)])}")
        paper = PAPER_A1.get(args.recipe, (None, None))
        if bd.paper_line and paper[1] is not None and not args.overrides:
            self.lines.append(f"- paper Table A1: {paper[0]} GFLOPs (thop-style count), {paper[1]} h on one RTX 4090")
        self.lines += ["", f"| configuration | mode | kernels | ms/step | img/s | speed-up | MFU % | "
                           f"{base.train.epochs}-epoch hours | data (source that ran) |",
                       "|---|---|---|---:|---:|---:|---:|---:|---|"]

    def raw_loader(self, name: str) -> dict | None:
        """The measure_step arguments of the reference-style row (a DataLoader over raw files written
        once, as the dataset format writes them); None: the row is skipped (--jpegs 0 / --raw-samples 0)."""
        a, base, bd = self.args, self.base, bench_data(self.base)
        if bd.raw_per_step:
            n = a.raw_samples if a.raw_samples >= 0 else base.train.batch_size * (a.warmup + a.repeats * a.steps + 2)
            if n <= 0:
                print(f"{name}: skipped (--raw-samples 0)", file=sys.stderr)
                return None
        elif a.jpegs <= 0:
            return None
        else:
            n = a.jpegs
        if self.raw_dir is None:
            self.raw_dir = Path(tempfile.mkdtemp(prefix="fastdmtg-raw-"))
            t0 = time.perf_counter()
            bd.write_raw(self.raw_dir, n, base.data.image_size)
            print(f"wrote {n} raw samples to {self.raw_dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
        return dict(loader="torch", raw_root=self.raw_dir, num_workers=a.workers)

    def run_row(self, name: str, on: tuple, loader: str) -> None:
        a = self.args
        how = {}
        if loader == "torch":
            how = self.raw_loader(name)
            if how is None:
                return
        try:
            r = measure_step(with_switches(self.base, on), self.device, steps=a.steps, repeats=a.repeats,
                             warmup=a.warmup, **how)
        except Exception as e:  # report, don't hide: a row of the table and a non-zero exit
            self.failed += 1
            _row_failed(name, e)
            self.lines.append(f"| {name} | — | — | failed: {type(e).__name__}: {_one_line(e)} | | | | | |")
            return
        self.ref_ips = self.ref_ips or r["img_per_s"]
        mfu = 100 * r["img_per_s"] * self.train_flops / (self.peak * 1e12) if self.cuda else None
        hours = f"{self.base.train.epochs * self.n_train / r['img_per_s'] / 3600:.3f}" if self.n_train else "—"
        self.lines.append(f"| {name} | {r['mode']} | {r['kernels']} | {r['ms_per_step']:.3f} | {r['img_per_s']:,.0f} | "
                          f"{r['img_per_s'] / self.ref_ips:.1f}× | {'—' if mfu is None else f'{mfu:.2f}'} | {hours} | "
                          f"{r['data']} |")
        self.out.append({"name": name, **r, "mfu_percent": mfu, "train_flops_per_sample": self.train_flops,
                         "peak_tflops": self.peak if self.cuda else None})
        print(self.lines[-1], file=sys.stderr, flush=True)       # progress; the report prints once, below

    def scaling(self) -> None:
        """The --scaling table (CUDA only: its rows use CUDA graphs and Triton kernels)."""
        a = self.args
        if not self.cuda:
            print("--scaling: skipped (its rows use CUDA graphs and Triton kernels)", file=sys.stderr)
            return
        self.lines += ["", f"### scaling ({' + '.join(_BEST + tuple(a.scaling_set))})", "",
                       "| recipe | K | N | ms/step | img/s |", "|---|---:|---:|---:|---:|"]
        names = tuple(r for r in a.scaling_recipes.split(",") if r) or None
        for name, cfg in _scaling_configs(self.base, a.recipe, a.overrides, a.scaling_set, names):
            n_tasks = len(_task_specs(cfg))
            try:
                r = measure_step(cfg, self.device, steps=a.steps, repeats=a.repeats, warmup=a.warmup)
            except Exception as e:
                self.failed += 1
                _row_failed(name, e)
                self.lines.append(f"| {name} | {cfg.num_branches} | {n_tasks} | failed: {type(e).__name__} | |")
                continue
            self.lines.append(f"| {name} | {cfg.num_branches} | {n_tasks} | {r['ms_per_step']:.3f} | "
                              f"{r['img_per_s']:,.0f} |")
            print(self.lines[-1], file=sys.stderr, flush=True)

    def finish(self, notes: list[str]) -> int:
        if notes:
            self.lines += [""] + notes
        if self.raw_dir is not None:
            import shutil
            shutil.rmtree(self.raw_dir, ignore_errors=True)
        report = "\n".join(self.lines) + "\n"
        print("\n" + report)
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(report)
            out.with_suffix(".json").write_text(json.dumps(self.out, indent=2))
        if self.failed:
            print(f"error: {self.failed} row(s) failed (see the table; --log-level DEBUG for the tracebacks)",
                  file=sys.stderr)
            return 1
        return 0


def step_main(argv: list[str]) -> int:
    args = _step_args(argv)
    _setup_logging(args)
    from .builder import resolve_device
    device = resolve_device(args.device)
    replaced = [o for o in args.overrides if o.split("=", 1)[0].strip() in _SPEED_KEYS]
    if replaced:
        print(f"note: {' '.join(replaced)}: each row sets the speed switches itself; use --only to pick rows",
              file=sys.stderr)
    base = with_switches(apply_overrides(get_recipe(args.recipe), args.overrides))
    rows, notes = _step_rows(base, device, args.only)
    report = _StepReport(args, argv, base, device)
    for row in rows:
        report.run_row(*row)
    if args.scaling:
        report.scaling()
    return report.finish(notes)


def _output_flags(ap) -> None:
    """The flags every command has (--progress/--no-progress, --quiet, --log-level); benchmarks draw no bars."""
    from .log import add_output_flags
    add_output_flags(ap, "progress bars (benchmarks draw none; accepted for the same command lines)")


def _setup_logging(args) -> None:
    from .log import setup
    setup(args.log_level)


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e) else ""


def _row_failed(name: str, e: BaseException) -> None:
    """A failed benchmark row: one line on stderr (the traceback at --log-level DEBUG)."""
    from .log import get_logger
    lg = get_logger("fastdmtg.bench")
    lg.debug(f"{name}: failed", exc_info=e)
    lg.error(f"{name}: failed: {type(e).__name__}: {_one_line(e)}")


def kernels_aot_main(argv: list[str]) -> int:
    """``fastdmtg bench kernels-aot``: fastdmtg.aot in a child process without TRITON_INTERPRET."""
    from .aot import run_clean
    return run_clean(argv)


def roofline_main(argv: list[str]) -> int:
    from .roofline import main
    return main(argv)


_BENCH = {"flops": flops_main, "step": step_main, "kernels-aot": kernels_aot_main, "roofline": roofline_main}


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] not in _BENCH:
        print(f"usage: fastdmtg bench {'|'.join(_BENCH)} [options]", file=sys.stderr)
        return 2
    return _BENCH[argv[0]](argv[1:])


# ------------------------------------------------------------------------------------- profile
def profile_main(argv: list[str]) -> int:
    ap = _step_parser("fastdmtg profile", "profile", "override a recipe field (repeatable), e.g. --set train.batch_size=8",
                      10, "profiled steps")
    ap.add_argument("--out", default="profile_out", help="folder for trace.json and summary.md (default profile_out)")
    args = ap.parse_args(argv)
    _setup_logging(args)
    from torch.profiler import ProfilerActivity, profile

    from .builder import resolve_device
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
    about = bench_data(cfg).describe
    if about is not None:
        lines.append(f"- batch {info['batch']}; data: {about(cfg, info['taskset'].names)}")
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


__all__ = ["bench_main", "profile_main", "measure_step", "build_stepper", "peak_bf16_tflops"]
