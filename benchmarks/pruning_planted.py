"""Progressive head pruning (issue 8, docs/pruning.md) on Taskonomy-format data with PLANTED task groups (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pruning_planted.py --out runs/pruning_planted \
        [--report benchmarks/results/cpu_2026-11-23_pruning_planted.md]

1. Data. A raw root in the official Taskonomy format (``ROOT/<domain>/<building>/point_<p>_view_0_domain_
   <suffix>.png``; rgb/normal 8-bit RGB, segmentation 8-bit grayscale ids, depth/keypoints/edges 16-bit
   grayscale; depth 65535 = "no depth"), stored at 2× the training size (64×64 for 32×32), whose five
   Taskonomy-5 targets are deterministic functions of the RGB image, in two planted groups:

   * geometry {depth_zbuffer, normal, segment_semantic}: the RED channel carries a smooth field
     f = (R − 20)/215 ∈ [0, 1] (tilted plane + 2–3 Gaussian bumps) as its value. depth raw = 1000 + 3000·f
     (1/512 m, normalised (d − 1500)/1000 ∈ [−0.5, 2.5]); normal = normalize(−a·∂f/∂x, −a·∂f/∂y, 1) of the
     (σ = 1 px) smoothed field, encoded 127.5 + 127.5·n; segmentation id = 1 + ⌊8f⌋ (ids 1..8).
     About half of the images have one rectangular "no depth" hole (depth 65535, segmentation 0 =
     ignore there, normal still defined but masked by the loader's depth mask).
   * texture {edge_texture, keypoints2d}: the GREEN channel is a dot lattice (period 7–10 px, random
     orientation and phase) whose local contrast is a second, independent smooth field A ∈ [0, 1]:
     G = 128 + 110·A·lattice. edge_texture = local edge energy (gradient magnitude of G, σ = 0.7 px, averaged
     over a σ = 3 px window; ∝ A; raw 718 = the F1 threshold at A ≈ 0.5); keypoints2d = local blob energy
     (positive part of det Hessian of G, σ = 1 px — SURF's detector —, same window; ∝ A²; raw 50 at A ≈ 0.5).
     Both are computed from the stored 8-bit G channel.
   * the BLUE channel is an unrelated smooth random field (a distractor no target depends on).

   (A first design with sparse targets — outlines and blob peaks of a few flat shapes — was not learnable
   at 32×32 in 640 steps: kp/edge test L1 stayed at the constant predictor's and F1 at 0; see docs/LOG.md.)

   The two groups share no information: geometry depends only on R, texture only on G.
   ``fastdmtg.data.taskonomy.prepare`` then converts it to the trainer's format at 32×32 (antialiased
   bilinear 2× down-sampling, nearest for segmentation), exactly as for the real data.

2. Runs (``fastdmtg.train.train``, CPU, one thread): naive MTL (K = 1, the NormGain reference), DMTG K = 3
   without pruning, DMTG K = 3 with pruning at each (ε, P) of ``--prune``; same seed, data order, model
   (Xception, ``--shared-blocks``), optimizer (Adam, constant lr) and τ for all of them.

3. Report: training FLOPs over the whole schedule (``fastdmtg.methods.dmtg_pruning.per_part_flops`` +
   ``training_flops``, 3 × forward × batch per step, with the active heads/branches of every step), wall-clock
   training time (``train_time_s``: optimizer steps only) and whole-run wall time (with validation/test),
   NormGain_L and NormGain_E vs the naive run, groups, whether the planted partition {geometry} / {texture}
   was found, drop events. Written to ``OUT/summary.json`` and, with ``--report``, a Markdown file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdmtg.config import Config, DataConfig, GroupingConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from fastdmtg.data import taskonomy as tx  # noqa: E402
from fastdmtg.methods.dmtg import DMTG, DMTGConfig  # noqa: E402
from fastdmtg.methods.dmtg_pruning import per_part_flops, training_flops  # noqa: E402
from fastdmtg.models import build_multibranch  # noqa: E402
from fastdmtg.tasks.taskonomy import TaskonomyTaskSet  # noqa: E402
from fastdmtg.train import train  # noqa: E402

TASKS = ["segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture"]   # taskonomy5 order
GEOMETRY = ("depth_zbuffer", "normal", "segment_semantic")
TEXTURE = ("edge_texture", "keypoints2d")
PLANTED = [sorted(GEOMETRY), sorted(TEXTURE)]
SHORT = {"segment_semantic": "seg", "depth_zbuffer": "depth", "normal": "normal", "keypoints2d": "kp",
         "edge_texture": "edge"}
NO_DEPTH = 65535
BUILDINGS = {"train": "plantedtrain", "val": "plantedval", "test": "plantedtest"}


# ---------------------------------------------------------------------------------------------- data
def _gauss_kernel(sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter of a 2-D array, reflected borders."""
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    p = np.pad(a.astype(np.float64), r, mode="reflect")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def smooth_field(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """A smooth random field in [0, 1] on the grid u × u: tilted plane + 2–3 Gaussian bumps."""
    yy, xx = np.meshgrid(u, u, indexing="ij")
    f = rng.uniform(-0.4, 0.4) * (xx - 0.5) + rng.uniform(-0.4, 0.4) * (yy - 0.5)
    for _ in range(int(rng.integers(2, 4))):
        cx, cy = rng.uniform(0.1, 0.9, 2)
        s = rng.uniform(0.12, 0.25)
        f = f + rng.uniform(-0.6, 0.6) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return np.clip(0.5 + f, 0.0, 1.0)


def texture_energies(G: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(edge energy, blob energy) of the 8-bit G channel: the gradient magnitude of G (σ = 0.7 px) and the
    positive part of the determinant of the Hessian (σ = 1 px; SURF's blob detector), each averaged over a
    σ = 3 px Gaussian window (pixels of the 64×64 file; ``scale`` = side / 64)."""
    g = G.astype(np.float64)
    ey, ex = np.gradient(blur(g, 0.7 * scale))
    g1 = blur(g, 1.0 * scale)
    gyy = np.gradient(np.gradient(g1, axis=0), axis=0)
    gxx = np.gradient(np.gradient(g1, axis=1), axis=1)
    gxy = np.gradient(np.gradient(g1, axis=0), axis=1)
    det = np.maximum(0.0, gxx * gyy - gxy ** 2) * scale ** 4
    return blur(np.hypot(ex, ey) * scale, 3 * scale), blur(det, 3 * scale)


# gains: at lattice contrast A = 0.5 the edge energy is ≈ 718 raw (the edge F1 threshold) and the blob energy
# ≈ 50 raw (the keypoint F1 threshold); measured once on full-contrast lattices (mean edge energy 36.6, blob
# energy 140 at 64×64), edge ∝ A, blob ∝ A²
EDGE_GAIN = 718 / (0.5 * 36.6)
KP_GAIN = 50 / (0.25 * 140.0)


def planted_sample(rng: np.random.Generator, side: int) -> dict[str, np.ndarray]:
    """One sample's raw maps ((H, W) gray or (H, W, 3) RGB, file dtypes). Every target is computed from
    the quantised 8-bit RGB image (R → geometry, G → texture), except where the depth hole is."""
    u = np.arange(side, dtype=np.float64) / side
    scale = side / 64.0
    # geometry latent f ∈ [0, 1], carried by R as its value
    f = smooth_field(rng, u)
    R = np.rint(20 + 215 * f).astype(np.uint8)
    # texture latent A ∈ [0, 1] (independent of f), carried by G as the local contrast of a dot lattice
    A = smooth_field(rng, u)
    Y, X = np.mgrid[0:side, 0:side].astype(np.float64)
    period = rng.uniform(7, 10) * scale
    th = rng.uniform(0, np.pi)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    uu, vv = X * np.cos(th) + Y * np.sin(th), -X * np.sin(th) + Y * np.cos(th)
    lattice = np.cos(2 * np.pi * uu / period + p1) * np.cos(2 * np.pi * vv / period + p2)
    G = np.rint(128 + 110 * A * lattice).astype(np.uint8)
    # distractor: an unrelated smooth field
    B = np.rint(255 * np.clip(0.5 + 3.0 * blur(rng.normal(0, 1, (side, side)), 6 * scale), 0, 1)).astype(np.uint8)
    rgb = np.stack([R, G, B], -1)

    # geometry targets, from R only
    fr = (R.astype(np.float64) - 20) / 215
    depth = np.rint(1000 + 3000 * fr)
    gy, gx = np.gradient(blur(fr, 1.0 * scale))
    a = 60.0 * scale
    n = np.stack([-a * gx, -a * gy, np.ones_like(gx)], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    normal = np.clip(np.rint(127.5 + 127.5 * n), 0, 255).astype(np.uint8)
    seg = (1 + np.clip(np.floor(fr * 8), 0, 7)).astype(np.uint8)
    if rng.random() < 0.5:                                     # one "no depth" hole (window, sky, ...)
        h, w = rng.integers(int(6 * scale), int(13 * scale), 2)
        y0, x0 = rng.integers(0, side - h), rng.integers(0, side - w)
        depth[y0:y0 + h, x0:x0 + w] = NO_DEPTH
        seg[y0:y0 + h, x0:x0 + w] = 0
    depth = depth.astype(np.uint16)

    # texture targets, from G only: local edge energy and local blob energy of the pattern
    edge_e, blob_e = texture_energies(G, scale)
    edge = np.clip(np.rint(EDGE_GAIN * edge_e), 0, 65535).astype(np.uint16)
    kp = np.clip(np.rint(KP_GAIN * blob_e), 0, 65535).astype(np.uint16)
    return {"rgb": rgb, "depth_zbuffer": depth, "normal": normal, "segment_semantic": seg,
            "keypoints2d": kp, "edge_texture": edge}


def write_planted_raw(root: Path, counts: dict[str, int], side: int, seed: int) -> Path:
    """Write the planted dataset in the official layout (domain/building); returns the split file."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        b = BUILDINGS[split]
        for p in range(counts[split]):
            for domain, arr in planted_sample(rng, side).items():
                folder = tx.domain_dir(root, tx.LAYOUT_DOMAIN_FIRST, domain, b)
                folder.mkdir(parents=True, exist_ok=True)
                # uint16 2-D -> 16-bit gray, uint8 2-D -> 8-bit gray, (H, W, 3) uint8 -> RGB
                Image.fromarray(np.ascontiguousarray(arr)).save(folder / tx.file_name(domain, p, 0))
    split_file = root.parent / f"{root.name}_split.json"
    split_file.write_text(json.dumps({s: [b] for s, b in BUILDINGS.items()}))
    return split_file


def data_stats(prep: Path) -> dict:
    """Target statistics of the prepared training split (what the loader will feed)."""
    d = {dom: np.load(prep / "train" / f"{dom}.npy", mmap_mode="r") for dom in tx.DOMAINS}
    depth = np.asarray(d["depth_zbuffer"])
    valid = depth < tx.DEPTH_VALID_BELOW
    nrm = np.asarray(d["normal"]).astype(np.float64) / 255 * 2 - 1
    nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
    ang = np.degrees(np.arccos(np.clip(nrm[:, 2:3], -1, 1)))[valid]
    seg = np.asarray(d["segment_semantic"])
    return {"train_samples": int(depth.shape[0]), "depth_valid_fraction": float(valid.mean()),
            "normal_angle_from_z_mean_deg": float(ang.mean()),
            "normal_angle_gt30_fraction": float((ang > 30).mean()),
            "seg_classes_present": int((np.bincount(seg.ravel(), minlength=tx.NUM_SEG_CLASSES)[1:] > 0).sum()),
            "edge_positive_fraction": float((np.asarray(d["edge_texture"]) > 718).mean()),
            "keypoints_positive_fraction": float((np.asarray(d["keypoints2d"]) > 50).mean())}


def constant_baseline(prep: Path) -> dict:
    """Test loss of the best input-independent predictor, in the trainer's loss definitions: the training
    median of each normalised map (L1; depth/normal masked, divided by all elements) and the training class
    frequencies for segmentation (cross-entropy over labelled pixels). A task whose test loss is not below
    this has learnt nothing from the image."""
    def norm(split):
        a = {dom: np.asarray(np.load(prep / split / f"{dom}.npy", mmap_mode="r")) for dom in tx.DOMAINS}
        m = a["depth_zbuffer"] < tx.DEPTH_VALID_BELOW
        t = {k: (a[k].astype(np.float64) - o) / sc for k, (o, sc) in tx.NORM_16BIT.items()}
        t["normal"] = (a["normal"].astype(np.float64) / 255 - 0.5) * 2
        return t, m, a["segment_semantic"][:, 0]
    tr, mtr, str_ = norm("train")
    te, mte, ste = norm("test")
    out = {}
    for k in ("depth_zbuffer", "normal"):
        med = np.array([np.median(tr[k][:, c][mtr[:, 0]]) for c in range(tr[k].shape[1])])[None, :, None, None]
        out[k] = float((np.abs(te[k] - med) * mte).mean())
    for k in ("keypoints2d", "edge_texture"):
        out[k] = float(np.abs(te[k] - np.median(tr[k])).mean())
    freq = np.bincount(str_[str_ > 0].ravel(), minlength=tx.NUM_SEG_CLASSES)[1:].astype(np.float64) + 1.0
    logp = np.log(freq / freq.sum())
    lab = ste[ste > 0].ravel()
    out["segment_semantic"] = float(-logp[lab - 1].mean())
    return out


# ---------------------------------------------------------------------------------------------- runs
def make_cfg(a, prep: Path, method: str, k: int, eps: float = 0.0, patience: int = 100, ref: str = "") -> Config:
    return Config(
        name="planted",
        data=DataConfig(dataset="taskonomy", root=str(prep), image_size=a.size, tasks="taskonomy5", num_workers=0),
        model=ModelConfig(arch="xception", branches=k, shared_blocks=a.shared_blocks, grad_scale="reference"),
        grouping=GroupingConfig(method=method),
        dmtg=DMTGConfig(tau=a.tau, tau_schedule=a.tau_schedule, tau_start=a.tau_start, tau_end=a.tau_end,
                        tau_decay=a.tau_decay, prune_eps=eps, prune_patience=patience),
        optim=OptimConfig(name="adam", lr=a.lr, schedule="none"),
        train=TrainConfig(epochs=a.epochs, batch_size=a.batch, eval_batch_size=64, device="cpu", progress=False,
                          tensorboard=False, seed=a.seed, reference=ref, log_every=10_000))


# S/τ after every optimizer step, recorded by wrapping DMTG.observe_step (the trainer's per-step hook; the
# original runs unchanged first, so the pruning decisions are exactly those of the package)
_TRAJECTORY: list = []
_observe_step = DMTG.observe_step


def _recording_observe_step(self, ctx):
    decisions = _observe_step(self, ctx)
    _TRAJECTORY.append((self.logits.detach().double().cpu() / float(self.tau)).tolist())
    return decisions


DMTG.observe_step = _recording_observe_step


def trajectory_facts(traj: list, final_assignment: list[int]) -> dict:
    """From S/τ per step: the last step at which the noiseless argmax changed, and the first step from
    which every task's final head has p = softmax(S/τ) ≥ 0.99 for good."""
    x = torch.tensor(traj, dtype=torch.float64)                     # (T, N, K)
    am = x.argmax(-1)                                               # (T, N)
    changed = (am[1:] != am[:-1]).any(-1).nonzero().flatten()
    last_change = int(changed[-1]) + 2 if len(changed) else 1       # 1-based step of the last argmax change
    p = torch.softmax(x, -1)
    fin = torch.tensor(final_assignment)
    sure = (p.gather(-1, fin.view(1, -1, 1).expand(len(x), -1, 1)).squeeze(-1) >= 0.99).all(-1)   # (T,)
    bad = (~sure).nonzero().flatten()
    sure_from = None if bool(~sure[-1]) else (int(bad[-1]) + 2 if len(bad) else 1)
    return {"argmax_last_change_step": last_change, "final_heads_p99_from_step": sure_from}


def partition(groups: list[list[str]]) -> list[list[str]]:
    return sorted(sorted(g) for g in groups)


def converged_epoch(history: list[dict]) -> int | None:
    """1-based first epoch from which the argmax assignment never changes again."""
    asg = [h["assignment"] for h in history]
    for e in range(len(asg)):
        if all(x == asg[-1] for x in asg[e:]):
            return e + 1
    return None


def run_one(a, prep: Path, out: Path, name: str, method: str, k: int, eps: float = 0.0, patience: int = 100,
            ref: str = "") -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = make_cfg(a, prep, method, k, eps, patience, ref)
    _TRAJECTORY.clear()
    t = time.perf_counter()
    res = train(cfg, run_dir)
    wall = time.perf_counter() - t
    traj = list(_TRAJECTORY)
    if traj:
        (run_dir / "s_over_tau.json").write_text(json.dumps(traj))
    hist = json.loads((run_dir / "history.json").read_text())
    row = {"name": name, "method": method, "K": k, "eps": eps, "patience": patience if eps > 0 else None,
           "wall_s": wall, "train_time_s": res["train_time_s"], "groups": res["groups"],
           "planted_recovered": partition(res["groups"]) == partition(PLANTED),
           "best_epoch": res["best_epoch"], "test_loss": res["test"]["loss"], "test_error": res["test"]["error"],
           "test_metrics": res["test"].get("metrics"),
           "softmax_S_final": hist[-1].get("probabilities"),
           "assignment_per_epoch": [h["assignment"] for h in hist],
           "converged_epoch": converged_epoch(hist) if method == "dmtg" else None,
           "total_steps": hist[-1]["global_step"]}
    if traj:
        row.update(trajectory_facts(traj, res["assignment"]))
        row["p_final"] = torch.softmax(torch.tensor(traj[-1], dtype=torch.float64), -1).tolist()
    if "normgain_loss" in res:
        row["normgain_loss"] = res["normgain_loss"]["value"]
        row["normgain_loss_per_task"] = res["normgain_loss"]["per_task"]
    if "normgain_error" in res:
        row["normgain_error"] = res["normgain_error"]["value"]
        row["normgain_error_per_task"] = res["normgain_error"]["per_task"]
    n = len(TASKS)
    st = torch.full((n, k), -1, dtype=torch.long)
    if res.get("pruning"):
        pr = res["pruning"]
        row["events"] = [{"task": e["task_name"], "branch": e["branch"], "step": e["step"],
                          "p": e["probability"]} for e in pr["events"]]
        row["head_step_fraction"] = pr["head_step_fraction"]
        row["branch_steps"] = pr["branch_steps"]
        assert pr["total_steps"] == row["total_steps"], (pr["total_steps"], row["total_steps"])
        for e in pr["events"]:
            st[e["task"], e["branch"]] = e["step"]
    row["drop_step"] = st.tolist()
    print(f"[{name}] {wall:.0f} s, groups {res['groups']}, NormGain_L {row.get('normgain_loss')}, "
          f"drops {len(row.get('events', []))}", flush=True)
    return row


def hardware() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


# ---------------------------------------------------------------------------------------------- report
def tau_text(a: dict) -> str:
    if a["tau_schedule"] == "anneal":
        taus = [max(a["tau_end"], a["tau_start"] * a["tau_decay"] ** e) for e in range(a["epochs"])]
        return (f"τ annealed per epoch, τ_e = max({a['tau_end']:g}, {a['tau_start']:g}·{a['tau_decay']:g}^e): "
                + ", ".join(f"{t:.3g}" for t in taus))
    return f"τ = {a['tau']:g} constant"


def _g(groups) -> str:
    return " / ".join("{" + ", ".join(SHORT[t] for t in g) + "}" for g in groups)


def _f(x, fmt="{:+.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(summary: dict) -> str:
    a, hw, rows = summary["args"], summary["hardware"], summary["runs"]
    parts = summary["parts_fwd_flops_per_sample"]
    full = next(r for r in rows if r["name"] == "dmtg_full")
    L = [f"# Progressive head pruning on planted-group Taskonomy-format data (CPU, {summary['date']})", "",
         "Script: `benchmarks/pruning_planted.py` (data design, run set and FLOPs accounting in its docstring; "
         "summary: docs/pruning.md, \"Planted dense data (CPU)\"). All numbers below were produced by the "
         "command shown, in one invocation; nothing is extrapolated. "
         f"**Single seed** (train seed {a['seed']}, data seed {a['data_seed']}).", "",
         "## Setup", "",
         f"* Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} (CPU build), Python {hw['python']}, "
         f"torch threads {hw['torch_threads']}; load average at start {', '.join(f'{x:.2f}' for x in hw['load_avg_at_start'])} "
         "(the machine was shared with other work: times are indicative, FLOPs are exact counts).",
         f"* Command (repository root): `{summary['command']}`",
         f"* Data: {a['train']} train / {a['val']} val / {a['test']} test samples, official Taskonomy PNG layout at "
         f"{2 * a['size']}×{2 * a['size']}, prepared by `fastdmtg.data.taskonomy.prepare` to {a['size']}×{a['size']}; "
         "geometry group {depth, normal, seg} from the red channel's value (a smooth field), texture group "
         "{edge, kp} from the local contrast of a dot lattice in the green channel (a second, independent smooth "
         "field), blue = unrelated distractor field (details: the script's docstring).",
         "* Prepared training targets: " + ", ".join(
             f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["data_stats"].items()) + ".",
         f"* Model: Xception, `shared_blocks={a['shared_blocks']}`, grad_scale reference; Adam lr {a['lr']} constant; "
         f"batch {a['batch']}; {a['epochs']} epochs = {full['total_steps']} optimizer steps; {tau_text(a)}; "
         "plain masked L1 (rotate loss off); validation every epoch, test on the best-validation checkpoint.",
         f"* Forward FLOPs per sample at {a['size']}² (torch counting, 2/MAC): shared trunk "
         f"{parts['shared'] / 1e6:.1f} M, one branch {parts['branch'] / 1e6:.1f} M, heads "
         + ", ".join(f"{SHORT[t]} {h / 1e6:.1f} M" for t, h in zip(TASKS, parts["heads"]))
         + f"; the 15 heads are {100 * summary['head_share_k3']:.1f} % of the K=3 training network. "
         "Training FLOPs = 3 × forward × batch, summed over every step with that step's active heads and branches "
         "(`fastdmtg.methods.dmtg_pruning.training_flops`).", "",
         "## Results", "",
         "| run | training FLOPs | vs DMTG K=3 full | train time (s) | run wall (s) | NormGain_L (%) | NormGain_E (%) "
         "| Δ NormGain_L vs full (points) | Δ NormGain_E vs full (points) | groups | planted groups recovered "
         "| last argmax change (step) | all chosen heads p ≥ 0.99 from step | drops |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = (r["normgain_loss"] - full["normgain_loss"]) if r["method"] == "dmtg" and "normgain_loss" in r else None
        de = (r["normgain_error"] - full["normgain_error"]) if r["method"] == "dmtg" and "normgain_error" in r else None
        dmtg = r["method"] == "dmtg"
        name = {"naive": "naive MTL (K=1, reference)", "dmtg_full": "DMTG K=3, no pruning"}.get(
            r["name"], f"DMTG K=3, ε={r['eps']:g}, P={r['patience']}")
        L.append(f"| {name} | {r['flops']['pruned']:.3e} | {r['flops_vs_full']:.3f} | {r['train_time_s']:.0f} | "
                 f"{r['wall_s']:.0f} | {_f(r.get('normgain_loss'))} | {_f(r.get('normgain_error'))} | "
                 f"{_f(d)} | {_f(de)} | {_g(r['groups'])} | {('yes' if r['planted_recovered'] else 'no') if dmtg else '—'} | "
                 f"{_f(r.get('argmax_last_change_step'), '{}')} | {_f(r.get('final_heads_p99_from_step'), '{}')} | "
                 f"{len(r.get('events', [])) if dmtg else '—'} |")
    L += ["", "Per-task test metrics (best-validation checkpoint; errors are depth RMSE, 100 − normal acc30, "
          "100 − seg mIoU, 100 − kp F1, 100 − edge F1):", "",
          "| run | " + " | ".join(f"{SHORT[t]} loss" for t in TASKS) + " | " + " | ".join(f"{SHORT[t]} err" for t in TASKS) + " |",
          "|---|" + "---|" * (2 * len(TASKS))]
    cb = summary["constant_baseline_test_loss"]
    L.append("| constant predictor (no image) | " + " | ".join(f"{cb[t]:.4f}" for t in TASKS) + " |" + " |" * len(TASKS))
    for r in rows:
        L.append(f"| {r['name']} | " + " | ".join(f"{r['test_loss'][t]:.4f}" for t in TASKS) + " | "
                 + " | ".join(f"{r['test_error'][t]:.3f}" for t in TASKS) + " |")
    L += ["", "Drop events (task, branch, step, p = softmax(S/τ) over active heads at the drop):", ""]
    for r in rows:
        if r["method"] == "dmtg" and r["eps"] > 0:
            ev = ", ".join(f"({SHORT[e['task']]}, {e['branch']}, {e['step']}, {e['p']:.3g})" for e in r["events"]) or "none"
            L.append(f"* ε={r['eps']:g}, P={r['patience']}: {ev}; head-steps {100 * r['head_step_fraction']:.1f} % "
                     f"of full; branch steps {r['branch_steps']}.")
    L += ["", "p = softmax(S/τ) after the last step, over all K heads (rows " + ", ".join(SHORT[t] for t in TASKS)
          + "; columns branches 0, 1, 2):", ""]
    for r in rows:
        if r["method"] == "dmtg":
            L.append(f"* {r['name']}: " + "; ".join("(" + ", ".join(f"{p:.3g}" for p in row) + ")"
                                                    for row in r["p_final"]))
    L += ["", "Columns: training FLOPs over the whole schedule (forward + backward = 3 × forward, × batch, every "
          "step with its active heads/branches); train time = `train_time_s` (optimizer steps only); run wall = "
          "`train()` including validation every epoch and the test; NormGain against the naive run (paper eq. 7/8, "
          "percent; NormGain_E from the per-task errors); groups = the assignment of the best-validation checkpoint "
          "that is tested (results.json); last argmax change = the last optimizer step at which "
          "argmax_k S[i, k] changed for some task (a measure of when the grouping settled); p ≥ 0.99 = first step from "
          "which every task's final head kept p = softmax(S/τ) ≥ 0.99 (— = never). Branches are numbered 0..K−1."]
    L += ["", "## Verdict", ""] + [f"* {v}" for v in summary["verdict"]] + [""]
    return "\n".join(L)


def verdict(rows: list[dict]) -> list[str]:
    full = next(r for r in rows if r["name"] == "dmtg_full")
    out = [f"DMTG K=3 without pruning: planted groups {'recovered' if full['planted_recovered'] else 'NOT recovered'} "
           f"(groups {_g(full['groups'])}), NormGain_L {full['normgain_loss']:+.2f} %."]
    for r in rows:
        if r["method"] != "dmtg" or r["eps"] <= 0:
            continue
        d = r["normgain_loss"] - full["normgain_loss"]
        saved = 1 - r["flops_vs_full"]
        de = r["normgain_error"] - full["normgain_error"]
        ok = saved >= 0.30 and abs(d) <= 1.0
        out.append(f"ε={r['eps']:g}, P={r['patience']}: {100 * saved:.1f} % fewer training FLOPs, NormGain_L "
                   f"{d:+.2f} points (NormGain_E {de:+.2f}) vs no pruning, planted groups {'recovered' if r['planted_recovered'] else 'NOT recovered'}"
                   f" → issue-8 criterion (≥ 30 % fewer FLOPs at NormGain ±1 point) {'MET' if ok else 'NOT met'} "
                   "on this data (single seed).")
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/pruning_planted")
    p.add_argument("--report", default="", help="write the Markdown report here")
    p.add_argument("--size", type=int, default=32, help="training image size (raw files are stored at 2x)")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--val", type=int, default=64)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--tau-schedule", default="constant", choices=("constant", "anneal"))
    p.add_argument("--tau-start", type=float, default=1.0, help="anneal: tau_e = max(tau_end, tau_start * tau_decay**e)")
    p.add_argument("--tau-end", type=float, default=0.1)
    p.add_argument("--tau-decay", type=float, default=0.5)
    p.add_argument("--shared-blocks", type=int, default=7)
    p.add_argument("--prune", default="0.01:20", help="comma-separated eps:patience settings")
    p.add_argument("--skip", default="", help="comma-separated run names not to run (naive, dmtg_full)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    t0 = time.perf_counter()

    raw = out / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out / "prep", ignore_errors=True)
    split_file = write_planted_raw(raw, {"train": a.train, "val": a.val, "test": a.test}, 2 * a.size, a.data_seed)
    prep = tx.prepare(raw, out / "prep", a.size, split_file=split_file, workers=0, progress=False)
    stats = data_stats(prep)
    const = constant_baseline(prep)
    print("data:", json.dumps(stats), flush=True)
    data_s = time.perf_counter() - t0

    skip = set(filter(None, a.skip.split(",")))
    settings = [(float(s.split(":")[0]), int(s.split(":")[1])) for s in a.prune.split(",") if s]
    rows = []
    if "naive" not in skip:
        rows.append(run_one(a, prep, out, "naive", "naive-mtl", 1))
    ref = str(out / "naive") if (out / "naive" / "results.json").is_file() else ""
    if "dmtg_full" not in skip:
        rows.append(run_one(a, prep, out, "dmtg_full", "dmtg", 3, ref=ref))
    for eps, pat in settings:
        rows.append(run_one(a, prep, out, f"dmtg_eps{eps:g}_P{pat}", "dmtg", 3, eps, pat, ref=ref))

    ts = TaskonomyTaskSet(TASKS)
    model = build_multibranch(ModelConfig(arch="xception", branches=3, shared_blocks=a.shared_blocks), ts.specs, a.size)
    parts = per_part_flops(model, a.size)
    ref_full = None
    for r in rows:
        fl = training_flops(parts, torch.tensor(r["drop_step"]), r["total_steps"], a.batch)
        r["flops"] = fl
        if r["name"] == "dmtg_full":
            ref_full = fl["full"]
    for r in rows:
        r["flops_vs_full"] = r["flops"]["pruned"] / ref_full if ref_full else float("nan")
    heads = sum(parts["heads"])
    summary = {"date": "2026-11-23", "args": vars(a), "hardware": hw,
               "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " .venv/bin/python "
               + " ".join(shlex.quote(x) for x in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
               "data_stats": stats, "constant_baseline_test_loss": const, "data_time_s": data_s, "parts_fwd_flops_per_sample": parts,
               "head_share_k3": 3 * heads / (parts["shared"] + 3 * parts["branch"] + 3 * heads),
               "runs": rows, "total_wall_s": time.perf_counter() - t0}
    if any(r["name"] == "dmtg_full" for r in rows) and all("normgain_loss" in r for r in rows if r["method"] == "dmtg"):
        summary["verdict"] = verdict(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if a.report and "verdict" in summary:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(markdown(summary))
    for v in summary.get("verdict", []):
        print(v)
    print(f"total wall {summary['total_wall_s']:.0f} s; summary {out / 'summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
