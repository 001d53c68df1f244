"""Does the precision policy (train.amp=mixed) move the results? Two measurements on CPU, where bf16
autocast runs the same layer-by-layer casts as on CUDA (docs/fidelity.md, "precision").

    .venv/bin/python benchmarks/precision.py taskonomy --out runs/precision_tx \
        [--report benchmarks/results/cpu_2026-11-30_precision_taskonomy.md]
    .venv/bin/python benchmarks/precision.py celeba --out runs/precision_celeba \
        [--report benchmarks/results/cpu_2026-11-30_precision_celeba.md]

**taskonomy — loss floors.** A small Taskonomy-format root is written in the official layout (16-bit
depth / keypoints / edges, 8-bit normal / segmentation, PNGs at 2× the training size) with the value
distribution that matters for the floors: edge and keypoint maps are background (raw 0 → normalised
−0.67103 and −0.5) except for a few soft lines and blobs, depth is a smooth field with a "no depth"
hole, normals follow its gradient, segmentation ids are bands of it; the RGB image carries the same
fields (R = depth field, G = blobs, B = lines), so the targets are learnable. ``fastdmtg.data.
taskonomy.prepare`` converts it as it converts the real data. The Xception naive-MTL network (K = 1:
no Gumbel noise, only precision differs; the trainer's model, step module and losses — rotate loss on,
as the recipes) then overfits the training images, all in one batch without flips, with Adam and a
cosine learning rate to ~0, once per precision mode with the same seed and initialisation. The floor
of a task is its lowest training loss over the run, as that mode computes it. Also reported: the
*representation floor* of a bf16 prediction, mean |t − bf16(t)| over the (masked) targets — the loss
a bf16 output layer cannot go below even when the network is otherwise perfect. Modes already in
OUT/taskonomy.json are kept (delete an entry to measure it again).

**celeba — test error over seeds.** The CelebA ResNet variant (width 64, the real network; K = 3,
2-way heads, cross-entropy, DMTG with τ 2.5) on fastdmtg's planted-group synthetic attribute data at
32×32 — chosen over a CelebA-format fixture because its labels are learnable functions of the
image, so test errors mean something (a random-image fixture sits at chance in every mode) — trained
by ``fastdmtg.train.train`` in each mode for several seeds. The analysis is a paired test: per seed
the difference of test total error between a mode and ``off`` (the same seed: the same initialisation,
data order and Gumbel noise), its mean with the two-sided 95 % confidence interval of Student's t
with n − 1 degrees of freedom (``paired_shift``). The seed-to-seed spread of one mode is not the
yardstick for a paired shift. ``--reanalyse REPORT`` recomputes that analysis from the per-seed table
of an existing report and rewrites its analysis lines (no training).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fastdmtg.config import (Config, DataConfig, GroupingConfig, ModelConfig, OptimConfig,  # noqa: E402
                             TrainConfig, apply_overrides, get_recipe)
from fastdmtg.data import taskonomy as tx  # noqa: E402
from fastdmtg.pipelines import build_source  # noqa: E402
from taskonomy_fixture import path_of, write_png  # noqa: E402

TASKS = ["segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture"]
MODES = ("off", "mixed", "bf16")
# the smallest loss the paper reports for each task (Table 2, any method; "Ours" unless noted)
PAPER_MIN = {"segment_semantic": (6.34e-2, "Ours K=5"), "depth_zbuffer": (1.19e-7, "Ours K=3/4/5"),
             "normal": (1.05e-1, "Ours K=4/5"), "keypoints2d": (1.00e-6, "Ours K=5"),
             "edge_texture": (3.58e-7, "Ours K=3")}
SPLIT = {"train": ["alpha"], "val": ["bravo"], "test": ["charlie"]}


# ----------------------------------------------------------------------------------------- data
def _smooth(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth field in [0, 1]: a tilted plane plus two Gaussian bumps."""
    y, x = np.mgrid[0:side, 0:side] / side
    f = rng.uniform(-0.5, 0.5) * x + rng.uniform(-0.5, 0.5) * y
    for _ in range(2):
        cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.3)
        f = f + rng.uniform(0.5, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return (f - f.min()) / (f.max() - f.min())


def floor_sample(rng: np.random.Generator, side: int) -> dict[str, np.ndarray]:
    """One sample's raw maps ((H, W) gray or (H, W, 3) RGB, in their file dtypes)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    f = _smooth(rng, side)
    blobs = np.zeros((side, side))
    for _ in range(3):                                          # keypoints: 3 blobs on a zero background
        cy, cx = rng.uniform(0.15, 0.85, 2) * side
        blobs += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (side / 24) ** 2))
    blobs[blobs < 0.02] = 0.0
    lines = np.zeros((side, side))
    for _ in range(2):                                          # edges: 2 soft lines on a zero background
        th, off = rng.uniform(0, np.pi), rng.uniform(0.3, 0.7) * side
        d = np.abs(x * np.cos(th) + y * np.sin(th) - off)
        lines = np.maximum(lines, np.exp(-d ** 2 / (2 * (side / 48) ** 2)))
    lines[lines < 0.02] = 0.0
    depth = np.rint(1000 + 4000 * f)
    gy, gx = np.gradient(f * side / 8)
    n = np.stack([-gx, -gy, np.ones_like(gx)], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    seg = (1 + np.clip(np.floor(f * 6), 0, 5)).astype(np.uint8)
    if rng.random() < 0.5:                                      # a "no depth" hole, ignored by every loss
        h = side // 5
        y0, x0 = rng.integers(0, side - h, 2)
        depth[y0:y0 + h, x0:x0 + h] = 65535
        seg[y0:y0 + h, x0:x0 + h] = 0
    rgb = np.stack([np.rint(20 + 215 * f), np.rint(20 + 215 * np.clip(blobs, 0, 1)),
                    np.rint(20 + 215 * lines)], -1).astype(np.uint8)
    return {"rgb": rgb, "depth_zbuffer": depth.astype(np.uint16),
            "normal": np.clip(np.rint(127.5 + 127.5 * n), 0, 255).astype(np.uint8), "segment_semantic": seg,
            "keypoints2d": np.rint(1200 * np.clip(blobs, 0, 1)).astype(np.uint16),
            "edge_texture": np.rint(3000 * lines).astype(np.uint16)}


def write_root(root: Path, n_train: int, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, (building,) in SPLIT.items():
        for j in range(n_train if split == "train" else 1):
            for domain, arr in floor_sample(rng, side).items():
                write_png(path_of(root, "domain", domain, building, 2 * j + 1, 0), arr)
    split_file = root.parent / f"{root.name}_split.json"
    split_file.write_text(json.dumps(SPLIT))
    return split_file


# ----------------------------------------------------------------------------------------- taskonomy
def taskonomy_cfg(prep: Path, size: int, amp: str, lr: float, seed: int, device: str = "cpu") -> Config:
    return Config(
        name="precision_floor",
        data=DataConfig(dataset="taskonomy", root=str(prep), image_size=size, tasks="taskonomy5", num_workers=0,
                        backend="memory", taskonomy_rotate_loss=True),
        model=ModelConfig(arch="xception", branches=1, shared_blocks=4, sync_bn=False, batched="off"),
        grouping=GroupingConfig(method="naive-mtl"),
        optim=OptimConfig(name="adam", lr=lr, schedule="none", fused="on"),
        train=TrainConfig(device=device, amp=amp, seed=seed, compile="off", cuda_graph="off", channels_last="off",
                          kernels="reference", tensorboard=False, progress=False))


def bf16_representation_floor(batch: dict) -> dict[str, float]:
    """Mean |t − bf16(t)| per L1 task, with the loss's masking (depth/normal masked, divided by all)."""
    out = {}
    mask = batch["mask"].float()
    for t in TASKS[1:]:
        tgt = batch["targets"][t].float()
        err = (tgt - tgt.to(torch.bfloat16).float()).abs()
        if t in ("depth_zbuffer", "normal"):
            err = err * mask
        out[t] = float(err.mean())
    return out


def overfit(cfg: Config, steps: int, log_every: int) -> dict:
    from fastdmtg.builder import build_training_step
    dev = torch.device(cfg.train.device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kernels="reference"))
    data = build_source(cfg.data, progress=False)
    n = data.num_samples("train")
    batch = next(data.batches("train", n, shuffle=False, device=dev, train=False))   # every image, no flips
    torch.manual_seed(cfg.train.seed)
    step = build_training_step(cfg, data.taskset, cfg.data.image_size, dev)      # the trainer's step
    model, method, opt, runner = step.model, step.method, step.optimizer, step.runner
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=cfg.optim.lr * 1e-4)
    names = data.taskset.names
    best = {t: math.inf for t in names}
    curve = []
    t0 = time.perf_counter()
    for s in range(steps):
        total, L = runner(batch)                                   # L (N, 1), as the mode computes it
        sched.step()
        for i, t in enumerate(names):
            best[t] = min(best[t], float(L[i, 0]))
        if (s + 1) % log_every == 0 or s == 0:
            curve.append({"step": s + 1, "loss": {t: float(L[i, 0]) for i, t in enumerate(names)}})
            print(f"  {cfg.train.amp:5s} step {s + 1:5d}: " + " ".join(f"{t[:5]} {float(L[i, 0]):.3g}"
                                                                      for i, t in enumerate(names)), flush=True)
    return {"floor": best, "curve": curve, "seconds": time.perf_counter() - t0, "images": n,
            "repr_floor": bf16_representation_floor(batch)}


def run_taskonomy(args) -> dict:
    out = Path(args.out)
    raw, prep = out / "raw", out / "prep"
    if not (prep / "index.json").exists():
        split_file = write_root(raw, args.images, 2 * args.size, args.seed)
        tx.prepare(raw, prep, args.size, split_file=split_file, workers=1, progress=False)
    path = out / "taskonomy.json"
    res = json.loads(path.read_text()) if path.exists() else {}     # modes already measured are kept
    for mode in args.modes.split(","):
        if mode in res:
            continue
        print(f"mode {mode}", flush=True)
        res[mode] = overfit(taskonomy_cfg(prep, args.size, mode, args.lr, args.seed, args.device), args.steps,
                            args.log_every)
        path.write_text(json.dumps(res, indent=1))
    return res


def _machine(args) -> str:
    if getattr(args, "device", "cpu").startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return "2-core CPU (shared)"


def taskonomy_report(args, res: dict, cmd: str) -> str:
    modes = [m for m in MODES if m in res]
    any_run = res[modes[0]]
    rep = any_run["repr_floor"]
    lines = [
        "# Precision policy: Taskonomy loss floors (CPU)",
        "",
        f"Machine: {_machine(args)}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Command:",
        "",
        f"    {cmd}",
        "",
        f"Xception naive MTL (K = 1), rotate loss on, {any_run['images']} training images at {args.size}×{args.size} "
        f"(official-format PNGs at {2 * args.size}², prepared by `fastdmtg.data.taskonomy.prepare`), one full batch "
        f"without flips, Adam lr {args.lr:g} → cosine to {args.lr * 1e-4:g} over {args.steps} steps, seed {args.seed}; "
        "the same initialisation in every mode. Floor = the lowest training loss of the run, as the mode computes "
        "it (off = fp32; mixed = the policy: bf16 encoder, fp32 decoders and losses; bf16 = plain autocast, "
        "decoders included). bf16 repr. = mean |t − bf16(t)| of the targets "
        "(masked like the loss): what a bf16 output cannot go below.",
        "",
        "| task | off (fp32) | mixed (policy) | bf16 | bf16 repr. | paper's smallest (Table 2) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in TASKS:
        cells = [f"{res[m]['floor'][t]:.3g}" if m in res else "–" for m in MODES]
        r = f"{rep[t]:.3g}" if t in rep else "–"
        p, who = PAPER_MIN[t]
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {r} | {p:.3g} ({who}) |")
    lines += ["", "Training loss of the overfit runs every few steps (mode: per task):", ""]
    for m in modes:
        for c in res[m]["curve"]:
            lines.append(f"- {m} step {c['step']}: " + ", ".join(f"{t} {c['loss'][t]:.3g}" for t in TASKS))
    lines += ["", "Wall time per mode (s): " + ", ".join(f"{m} {res[m]['seconds']:.0f}" for m in modes), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- celeba
def run_celeba(args) -> dict:
    from fastdmtg.train import train
    out = Path(args.out)
    path = out / "celeba.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    base = apply_overrides(get_recipe("synthetic_k3"), [
        "train.tensorboard=false", "train.progress=false", "train.device=cpu", f"train.epochs={args.epochs}",
        "model.width=64", f"optim.lr={args.lr}", "optim.fused=on", f"data.image_size={args.size}",
        f"data.synthetic_train={args.train_images}"])
    for seed in range(args.seeds):
        for mode in args.modes.split(","):
            key = f"{mode}/{seed}"
            if key in res:
                continue
            cfg = apply_overrides(base, [f"train.amp={mode}", f"train.seed={seed}"])
            t0 = time.perf_counter()
            run = out / mode / str(seed)
            r = train(cfg, run, resume=(run / "checkpoints" / "last.pt").exists(), progress=False)
            res[key] = {"total_error": r["total_error"], "total_loss": r["total_loss"], "groups": r["groups"],
                        "best_epoch": r["best_epoch"], "seconds": time.perf_counter() - t0}
            print(f"  {key}: total error {r['total_error']:.3f}, loss {r['total_loss']:.4f}", flush=True)
            path.write_text(json.dumps(res, indent=1))
    return res


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p in (0.5, 1)) by bisection on the CDF, the CDF by Simpson's rule on the
    density (no scipy in the core install): ~1e-9 accurate, plenty for a confidence interval."""
    def cdf_above_zero(x: float) -> float:                     # ∫_0^x density
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        f = lambda u: c * (1 + u * u / df) ** (-(df + 1) / 2)  # noqa: E731
        n = 4000
        h = x / n
        return h / 3 * (f(0) + f(x) + 4 * sum(f((2 * i - 1) * h) for i in range(1, n // 2 + 1))
                        + 2 * sum(f(2 * i * h) for i in range(1, n // 2)))
    lo, hi = 0.0, 1.0
    while 0.5 + cdf_above_zero(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + cdf_above_zero(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_shift(a, b, level: float = 0.95) -> dict:
    """Paired test of b − a over matched pairs (seeds): n, the mean shift, the sample std of the
    differences, the t-based ``level`` confidence interval of the mean [lo, hi] and t = mean / se."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 pairs, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    tq = t_quantile(0.5 + level / 2, n - 1)
    return {"n": n, "mean": mean, "sd": sd, "se": se, "t_quantile": tq, "lo": mean - tq * se,
            "hi": mean + tq * se, "t": mean / se if se > 0 else float("inf")}


def celeba_analysis(err: dict) -> list[str]:
    """The paired-test lines of the report: each mode against off, over the seeds of the table."""
    lines = []
    for m in err:
        if m == "off" or "off" not in err:
            continue
        r = paired_shift(err["off"], err[m])
        lines.append(f"- {m} − off, paired by seed (n = {r['n']}): mean shift {r['mean']:+.2f} total-error points, "
                     f"95 % CI [{r['lo']:+.2f}, {r['hi']:+.2f}] (sd of the differences {r['sd']:.2f}, "
                     f"t({r['n'] - 1}) = {r['t']:.2f}, t quantile {r['t_quantile']:.3f})")
    return lines


def parse_seed_table(text: str) -> dict:
    """{mode: array over seeds} from a report's "| seed | off | mixed | bf16 |" table."""
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    if head[0] != "seed":
        raise ValueError(f"no per-seed table (first table's header {head})")
    vals = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[2:]]
    vals = [v for v in vals if v[0].isdigit()]
    return {m: np.array([float(v[j + 1]) for v in vals]) for j, m in enumerate(head[1:])}


def reanalyse(path: str) -> str:
    """A report with its analysis lines (those after the table) replaced by ``celeba_analysis`` of its
    own per-seed numbers, and a line saying so."""
    text = Path(path).read_text()
    lines = text.splitlines()
    last = max(i for i, ln in enumerate(lines) if ln.startswith("|"))
    out = lines[:last + 1] + ["", *celeba_analysis(parse_seed_table(text)), "",
                              f"(Analysis recomputed from the table above on {time.strftime('%Y-%m-%d')}: "
                              f"`.venv/bin/python benchmarks/precision.py celeba --reanalyse {path}`.)", ""]
    return "\n".join(out)


def celeba_report(args, res: dict, cmd: str) -> str:
    modes = [m for m in MODES if any(k.startswith(m + "/") for k in res)]
    seeds = sorted({int(k.split("/")[1]) for k in res})
    err = {m: np.array([res[f"{m}/{s}"]["total_error"] for s in seeds]) for m in modes}
    lines = [
        "# Precision policy: CelebA-network test error over seeds (CPU)",
        "",
        f"Machine: 2-core CPU (shared), torch {torch.__version__}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Command:",
        "",
        f"    {cmd}",
        "",
        f"CelebA ResNet variant at width 64 (the real network), K = 3, DMTG τ 2.5, Adam lr {args.lr:g}, "
        f"{args.epochs} epochs, batch 128, on the planted-group synthetic attribute data (9 tasks, {args.train_images}/1000/1000 "
        f"images at {args.size}×{args.size}), `fastdmtg.train.train` per mode and seed (seeds {seeds[0]}–{seeds[-1]}: "
        "initialisation, data order, Gumbel noise). Test total error = Σ over tasks of 100·(1 − accuracy).",
        "",
        "| seed | " + " | ".join(modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]
    for i, s in enumerate(seeds):
        lines.append(f"| {s} | " + " | ".join(f"{err[m][i]:.2f}" for m in modes) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{err[m].mean():.2f} ± {err[m].std(ddof=1):.2f}" for m in modes) + " |")
    lines += ["", *celeba_analysis(err), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["taskonomy", "celeba"])
    ap.add_argument("--out", help="work folder (required unless --reanalyse)")
    ap.add_argument("--report")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=4, help="taskonomy: training images")
    ap.add_argument("--steps", type=int, default=1500, help="taskonomy: optimizer steps per mode")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5, help="celeba: seeds 0..n-1")
    ap.add_argument("--epochs", type=int, default=8, help="celeba: epochs per run")
    ap.add_argument("--train-images", type=int, default=6000, help="celeba: synthetic training images")
    ap.add_argument("--lr", type=float, default=None, help="default: taskonomy 1e-3, celeba 8e-4")
    ap.add_argument("--seed", type=int, default=0, help="taskonomy: data and initialisation seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="taskonomy: cpu or cuda (bf16 autocast on either)")
    ap.add_argument("--reanalyse", metavar="REPORT", help="celeba: recompute the paired analysis of REPORT's "
                                                          "per-seed table and rewrite REPORT (no training)")
    args = ap.parse_args(argv)
    if args.reanalyse:
        text = reanalyse(args.reanalyse)
        Path(args.reanalyse).write_text(text)
        print(text)
        return 0
    if not args.out:
        ap.error("--out is required")
    torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = 1e-3 if args.what == "taskonomy" else 8e-4
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cmd = ".venv/bin/python benchmarks/precision.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.what == "taskonomy":
        text = taskonomy_report(args, run_taskonomy(args), cmd)
    else:
        text = celeba_report(args, run_celeba(args), cmd)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
