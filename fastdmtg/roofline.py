"""Roofline lower bound of a training step on a named GPU: the "limit" every speed claim is held against.

    fastdmtg bench roofline --recipe celeba9_k3[,celeba40_k5,...] --gpu h100|a100|4090[,...]
                            [--set KEY=VALUE ...] [--train-images N] [--out FILE]

Per op group of one training step (batch B of the recipe) it estimates FLOPs and bytes moved, and
bounds the group's time by max(FLOPs / peak, bytes / bandwidth); the step's bound is the sum over
groups (each group is assumed to run at whichever roof limits it, and groups do not overlap), the
100-epoch bound that × ceil(training images / B) × 100. Where a measured step exists in
benchmarks/results (``MEASURED``; only for the recipe as it is, no ``--set`` changing it) the table
gives measured / bound. ``--set`` applies to every recipe (e.g. ``--set model.branches=3`` for
CelebA-40 at K = 3).

Assumptions (also printed under the table):

* FLOPs: fvcore's count of the eval-mode training network at batch 1 (``fastdmtg.flops``: 1 per
  multiply-add, its BN rule), × 2 (FLOPs per multiply-add) × 3 (forward + backward; the backward
  ≈ 2× the forward: the gradients of the input and of the weights each cost one forward) × B.
  fvcore attributes each op to the innermost module running it; ops in a parent's own forward
  (stacking the branch outputs, attention matmuls of the ViT) form the group "other (functional)".
  Losses, optimizer, ReLU and element-wise ops: 0 FLOPs (fvcore counts none; they are memory-bound).
* Bytes, per leaf module of the unfused network: its inputs read and its output written once in
  the forward, at the precision policy of the CUDA default (train.amp=auto → mixed: trunk
  activations bf16, 2 B; task heads fp32, 4 B); the backward moves 2× the forward's activation
  bytes (reads the saved input and the output gradient, writes the input gradient); weights are
  fp32 (4 B): read in the forward, read again in the backward, their gradient written: 12 B per
  parameter. Views (flatten, identity) move nothing. Fusion (torch.compile, the fused stem) can move
  fewer bytes than this, so the memory side is an estimate of the unfused step, not a strict bound.
* Losses (the fused kernels): the forward reads the head outputs and targets, the backward reads
  both again and writes the outputs' gradient.
* Optimizer: Adam/AdamW in fp32 reads parameter, gradient and both moments (16 B) and writes
  parameter and moments (12 B): 28 B per parameter; SGD with momentum 20 B. The grouping logits
  (N × K) are negligible and left out.

Peaks (dense, no sparsity; bf16 tensor cores with fp32 accumulate) and memory bandwidths: ``GPUS``.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float        # dense, fp32 accumulate
    tb_per_s: float           # DRAM bandwidth, 1e12 B/s
    source: str


GPUS = {
    "h100": GPU("H100 SXM5 80GB", 989.0, 3.35, "NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOPS BF16 dense "
                "(1,979 with sparsity), 3.35 TB/s HBM3 (SXM5)"),
    "a100": GPU("A100 SXM4 80GB", 312.0, 2.039, "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense "
                "(624 with sparsity), 2,039 GB/s HBM2e (80GB SXM)"),
    "4090": GPU("GeForce RTX 4090", 165.2, 1.008, "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 165.2 "
                "TFLOPS BF16 tensor with FP32 accumulate, dense (330.4 with sparsity); 1,008 GB/s GDDR6X"),
}

# measured steps in benchmarks/results: (recipe, gpu) -> (ms/step, what ran, file)
MEASURED = {("celeba9_k3", "h100"): (6.908, "batched branches, bf16 + Triton + CUDA graph + compile + channels_last",
                                      "benchmarks/results/h100_2026-11-23_step.md (run 4)")}

GROUPS = ("encoder convs", "BN/ReLU/pool", "heads", "other (functional)", "losses", "optimizer")
_VIEWS = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.MultiheadAttention)
OPTIMIZER_BYTES = {"adam": 28, "adamw": 28, "sgd": 20}    # per fp32 parameter and step (module doc)
TRAIN_FACTOR = 3             # forward + backward (≈ 2× forward), FLOPs and activation bytes alike


@dataclass
class Group:
    name: str
    flops: float = 0.0       # per step
    bytes: float = 0.0       # per step

    def bound_s(self, gpu: GPU) -> tuple[float, float]:
        """(compute bound, memory bound) in seconds."""
        return self.flops / (gpu.bf16_tflops * 1e12), self.bytes / (gpu.tb_per_s * 1e12)


def _group_of(name: str, m: nn.Module, heads_prefix: str) -> str:
    if name == heads_prefix or name.startswith(heads_prefix + "."):
        return "heads"
    return "encoder convs" if isinstance(m, _COMPUTE) else "BN/ReLU/pool"


def network_groups(model: nn.Module, x: torch.Tensor, batch: int, act_bytes: int = 2, head_bytes: int = 4,
                   heads_prefix: str = "heads") -> dict[str, Group]:
    """FLOPs and bytes per step of the network's op groups (module doc) for a batch of ``batch``,
    from one batch-1 forward of ``model`` on ``x``: fvcore per leaf module (``flops.fvcore_analysis``),
    activation bytes from forward hooks. Modules under ``heads_prefix`` are the heads (``head_bytes``
    per activation), the rest the trunk (``act_bytes``)."""
    from .flops import forward_with_hooks, fvcore_analysis
    by_module = fvcore_analysis(model, x, by_module=True)
    if by_module is None:
        raise RuntimeError("the roofline needs fvcore (pip install fvcore): its FLOP count per module")
    groups = {g: Group(g) for g in GROUPS}
    leaves = {n: m for n, m in model.named_modules() if not any(True for _ in m.children())}
    act = {}                                              # leaf name -> activation elements read + written

    def hook(name):
        def f(m, inp, out):
            n_in = sum(t.numel() for t in inp if isinstance(t, torch.Tensor))
            n_out = sum(t.numel() for t in (out if isinstance(out, (list, tuple)) else [out])
                        if isinstance(t, torch.Tensor))
            act[name] = act.get(name, 0) + n_in + n_out
        return f
    forward_with_hooks(model, x, [(m, hook(n)) for n, m in leaves.items() if not isinstance(m, _VIEWS)])
    leaf_macs = 0.0
    for n, m in leaves.items():
        g = groups[_group_of(n, m, heads_prefix)]
        macs = float(by_module.get(n, 0))
        leaf_macs += macs
        g.flops += TRAIN_FACTOR * 2 * macs * batch
        per_act = head_bytes if g.name == "heads" else act_bytes
        g.bytes += TRAIN_FACTOR * act.get(n, 0) * per_act * batch
        g.bytes += 12 * sum(p.numel() for p in m.parameters(recurse=False))     # fp32 weights: 3 × 4 B
    groups["other (functional)"].flops += TRAIN_FACTOR * 2 * (float(by_module[""]) - leaf_macs) * batch
    return groups


def loss_bytes(model: nn.Module, x: torch.Tensor, target_bytes_per_sample: int, batch: int,
               head_bytes: int = 4) -> float:
    """Bytes per step of the fused losses: outputs and targets read forward and backward, the
    outputs' gradient written (module doc)."""
    with torch.no_grad():
        out = model(x)
    n_out = sum(t.numel() for t in (out if isinstance(out, (list, tuple)) else [out]))
    return batch * (3 * n_out * head_bytes + 2 * target_bytes_per_sample)


def step_groups(cfg, head_bytes: int = 4) -> tuple[dict[str, Group], int]:
    """(op groups of one training step of ``cfg``, parameter count); ``head_bytes`` per head
    activation (4: train.amp=mixed keeps the heads fp32; 2: train.amp=bf16)."""
    from .aot import step_batch
    from .data import task_specs
    from .flops import training_network
    model, x = training_network(cfg)
    B = cfg.train.batch_size
    groups = network_groups(model, x, B, head_bytes=head_bytes)
    specs = task_specs(cfg)
    tb = sum(t.numel() * t.element_size() for t in _flat(step_batch(specs, 1, cfg.data.image_size, "meta")))
    groups["losses"].bytes = loss_bytes(model, x, tb, B, head_bytes)
    params = sum(p.numel() for p in model.parameters())
    name = cfg.optim.name
    if name not in OPTIMIZER_BYTES:
        raise ValueError(f"optim.name={name!r}: the roofline knows {', '.join(OPTIMIZER_BYTES)}")
    groups["optimizer"].bytes = OPTIMIZER_BYTES[name] * params
    return groups, params


def _flat(batch: dict) -> list:
    out = []
    for v in batch.values():
        out += _flat(v) if isinstance(v, dict) else [v]
    return out


def bound_rows(groups: dict[str, Group], gpu: GPU) -> tuple[list[tuple], float]:
    """[(group, GFLOP, MB, compute ms, memory ms, bound ms, limit)], step bound in seconds."""
    rows, total = [], 0.0
    for g in groups.values():
        c, m = g.bound_s(gpu)
        b = max(c, m)
        total += b
        rows.append((g.name, g.flops / 1e9, g.bytes / 1e6, c * 1e3, m * 1e3, b * 1e3,
                     "—" if b == 0 else ("compute" if c >= m else "memory")))
    return rows, total


def _gpu_rows(recipe: str, cfg, key: str, groups: dict[str, Group], params: int, n_train: int | None,
              as_is: bool) -> tuple[str, list[str]]:
    """One recipe on one GPU: its summary row and its detail table (with the measured step, when
    ``MEASURED`` has one for the recipe as it is)."""
    gpu = GPUS[key]
    B = cfg.train.batch_size
    rows, total = bound_rows(groups, gpu)
    flops = sum(g.flops for g in groups.values())
    byts = sum(g.bytes for g in groups.values())
    epochs = f"{100 * math.ceil(n_train / B) * total / 60:.3f}" if n_train else "— (give --train-images)"
    meas = MEASURED.get((recipe, key)) if as_is else None
    mtxt = f"{meas[0]:.3f}" if meas else "—"
    ratio = f"{meas[0] / (total * 1e3):.1f}×" if meas else "—"
    summary = (f"| {recipe} | {cfg.num_branches} | {gpu.name} | {B} | {flops / 1e9:,.1f} | {byts / 1e6:,.1f} | "
               f"{total * 1e3:.3f} | {epochs} | {mtxt} | {ratio} | "
               f"{100 * flops / (gpu.bf16_tflops * 1e12) / total:.1f} |")
    detail = [f"### {recipe} (K = {cfg.num_branches}) on {gpu.name} (batch {B}, {params:,} parameters)", "",
              "| op group | GFLOP | MB | compute ms | memory ms | bound ms | limit |",
              "|---|---:|---:|---:|---:|---:|---|"]
    detail += [f"| {n} | {f:,.2f} | {b:,.1f} | {c:.4f} | {m:.4f} | {t:.4f} | {lim} |" for n, f, b, c, m, t, lim in rows]
    detail += [f"| **step** | {flops / 1e9:,.2f} | {byts / 1e6:,.1f} | | | **{total * 1e3:.4f}** | |", ""]
    if meas:
        detail += [f"Measured: {meas[0]:.3f} ms/step ({meas[1]}; {meas[2]}) = {meas[0] / (total * 1e3):.1f}× the bound.",
                   ""]
    return summary, detail


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fastdmtg bench roofline",
                                 description="lower bound of a training step from FLOPs, bytes and a GPU's peaks")
    ap.add_argument("--recipe", default="celeba9_k3", help="recipe(s), comma-separated (default celeba9_k3)")
    ap.add_argument("--gpu", default="h100", help=f"GPU(s), comma-separated: {' | '.join(GPUS)} (default h100)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of every recipe (repeatable), e.g. --set model.branches=3")
    ap.add_argument("--amp", default="mixed", choices=("mixed", "bf16"),
                    help="precision policy of the byte count: mixed (the CUDA default: heads fp32) or bf16 "
                         "(heads bf16 too); the trunk is bf16 in both (default mixed)")
    ap.add_argument("--train-images", type=int, default=0,
                    help="training-set size for the 100-epoch bound (default: CelebA 162,770; Taskonomy: none)")
    ap.add_argument("--out", help="write the Markdown report here too")
    args = ap.parse_args(argv)
    from .testing import train_images
    from .config import ConfigError, apply_overrides, get_recipe
    from .data import task_specs
    gpus = [g for g in args.gpu.split(",") if g]
    bad = [g for g in gpus if g not in GPUS]
    if bad or not gpus:
        print(f"error: --gpu {args.gpu!r}: expected some of {', '.join(GPUS)}", file=sys.stderr)
        return 2
    try:
        cfgs = [(r, apply_overrides(get_recipe(r), args.overrides)) for r in args.recipe.split(",") if r]
        for _, cfg in cfgs:      # a recipe whose tasks only its data knows (folder_*) has no network here
            task_specs(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: --recipe/--set: {e}", file=sys.stderr)
        return 2
    lines = [f"# Roofline lower bound per training step — {', '.join(r for r, _ in cfgs)}", "",
             f"- command: `fastdmtg bench roofline {' '.join(argv)}`",
             f"- torch {torch.__version__}; FLOPs from fvcore (fastdmtg.flops), bytes from tensor sizes; "
             "assumptions below the tables", ""]
    summary = ["| recipe | K | GPU | batch | GFLOP/step | MB/step | step bound ms | 100-epoch bound min | measured ms | "
               "measured / bound | MFU at the bound % |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    detail = []
    for recipe, cfg in cfgs:
        print(f"counting {recipe} ...", file=sys.stderr, flush=True)
        groups, params = step_groups(cfg, head_bytes=4 if args.amp == "mixed" else 2)
        n_train, _ = train_images(cfg, args.train_images)
        as_is = cfg.to_dict() == get_recipe(recipe).to_dict()       # a measured step is of the recipe as is
        for key in gpus:
            row, more = _gpu_rows(recipe, cfg, key, groups, params, n_train, as_is)
            summary.append(row)
            detail += more
    notes = ["## Assumptions", "",
             "- Peaks (dense bf16 with fp32 accumulate; DRAM bandwidth): " +
             "; ".join(f"{g.name}: {g.bf16_tflops:g} TFLOP/s, {g.tb_per_s:g} TB/s — {g.source}"
                       for k, g in GPUS.items() if k in gpus) + ".",
             "- FLOPs = 3 (forward + backward, backward ≈ 2× forward) × 2 (per multiply-add) × fvcore's count of the "
             "batch-1 forward × batch; losses, optimizer and element-wise ops count 0 FLOPs.",
             "- Bytes: each leaf module reads its inputs and writes its output once forward (trunk activations bf16, "
             "heads fp32 under train.amp=mixed, the CUDA default, bf16 with --amp bf16); backward 2× the forward's activation bytes; fp32 "
             "weights 12 B/parameter (read forward, read backward, gradient written); losses read outputs + targets "
             "twice and write the outputs' gradient; Adam/AdamW 28 B/parameter (SGD 20). Unfused: fusion moves "
             "fewer bytes, so the memory side is an estimate, not a strict bound.",
             "- MFU at the bound = (step FLOPs / peak) / step bound: the highest MFU this step could reach "
             "if it moved no fewer bytes than estimated. The heads' FLOPs are held against the bf16 peak even "
             "where train.amp=mixed runs them in fp32/TF32 (an optimistic, so still lower, bound).",
             "- Bound per group = max(compute, memory); step bound = sum over groups (no overlap between groups); "
             "100-epoch bound = 100 × ceil(training images / batch) × step bound (CelebA 162,770 training images).",
             ""]
    text = "\n".join(lines + ["## Summary", ""] + summary + [""] + detail + notes)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0
