"""FLOP counts of the training network (all K·N heads), forward, batch 1: ``count_flops`` (any
config; ``fastdmtg bench flops``, the FLOPs column of ``fastdmtg compare``) and the Taskonomy-5 table
beside the paper's figures (``taskonomy_table``; ``fastdmtg bench flops --taskonomy``, or
``python benchmarks/flops_taskonomy.py [--size 256] [--out benchmarks/results/flops_taskonomy.md]``).

Forward pass, batch 1, S×S input, the MultiBranchNet that DMTG trains (shared trunk, K branches,
K·5 decoders). Three counts, in G:

* fvcore      ``fvcore.nn.FlopCountAnalysis``: 1 per multiply-add of convolutions (transposed
              ones at their true cost), matmuls and attention (a handle added for
              ``scaled_dot_product_attention``, which fvcore does not know); batch-norm at
              fvcore's own rule; element-wise ops (ReLU, adds) not counted.
* torch       ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add (conv, matmul,
              attention); nothing else. So torch ≈ 2 × the MAC part of fvcore.
* thop-style  the rules of ``thop.profile`` (what the DMTG release uses, reimplemented here with
              forward hooks — thop is not a dependency): per module, Conv2d and ConvTranspose2d
              out_numel × (in_channels/groups · k_h·k_w + bias), BatchNorm/LayerNorm 2 × numel,
              Linear out_numel × in_features, activations 0, functional ops (attention
              matmuls, adds) 0. Its ConvTranspose rule charges every *output* pixel with the
              full in·k² products, 4× the true cost of a 2×2 stride-2 transposed conv.

Paper columns: Table A1 (K = 3/4/5 at the default split, ViT-Base K = 3) and Table 6 (shared
blocks 0/3/6/9 at K = 3). ``shared`` is our model.shared_blocks (Xception blocks; the stem is
shared when >= 1); ``ref p`` is the reference code's split point for the same network
(p = shared + 2, or 0 when nothing is shared).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# (label, arch, K, shared_blocks, paper GFLOPs or None, paper source)
ROWS = [
    ("Xception K=1 (naive MTL)", "xception", 1, 4, None, ""),
    ("Xception K=3", "xception", 3, 4, 38.90, "A1"),
    ("Xception K=4", "xception", 4, 4, 50.68, "A1"),
    ("Xception K=5", "xception", 5, 4, 62.47, "A1"),
    ("Xception K=3 shared 0", "xception", 3, 0, 56.89, "T6: 0"),
    ("Xception K=3 shared 3", "xception", 3, 3, 49.68, "T6: 3"),
    ("Xception K=3 shared 6", "xception", 3, 6, 42.67, "T6: 6"),
    ("Xception K=3 shared 9", "xception", 3, 9, 33.36, "T6: 9"),
    ("Xception K=3 shared 1 (ref p=3)", "xception", 3, 1, 49.68, "T6: 3 (ref cfg)"),
    ("Xception K=3 shared 7 (ref p=9)", "xception", 3, 7, 33.36, "T6: 9 (ref cfg)"),
    ("ViT-Base K=1 (naive MTL)", "vit_base", 1, 4, None, ""),
    ("ViT-Base K=3 shared 0", "vit_base", 3, 0, 141.00, "A1"),
    ("ViT-Base K=3 shared 4", "vit_base", 3, 4, 141.00, "A1"),
]


def _sdpa_macs(inputs, outputs) -> int:
    """fvcore handle for scaled_dot_product_attention: QKᵀ and AV, B·H·Lq·Lk·d multiply-adds each."""
    from fvcore.nn.jit_handles import get_shape
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    n = 1
    for v in q[:-2]:
        n *= v
    return 2 * n * q[-2] * k[-2] * q[-1]


def fvcore_analysis(model: nn.Module, x: torch.Tensor, by_module: bool = False):
    """fvcore's count (1 per multiply-add, its BN rule) — the total, or with ``by_module`` fvcore's
    per-module Counter (qualified name → count, parents include their children; "" is the total) —
    or None when fvcore is not installed."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model, x)
        fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)   # ViT attention
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return fca.by_module() if by_module else fca.total()


def count_fvcore(model: nn.Module, x: torch.Tensor) -> float | None:
    """fvcore's count (1 per multiply-add, its BN rule), or None when fvcore is not installed."""
    return fvcore_analysis(model, x)


def count_torch(model: nn.Module, x: torch.Tensor) -> float:
    """torch.utils.flop_counter's count (2 per multiply-add of conv/linear/matmul)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def training_network(cfg) -> tuple[nn.Module, torch.Tensor]:
    """(the training network of a config in eval mode, a batch-1 input): what every count here measures."""
    from .config import resolved_branches
    from .data import task_specs
    from .models import build_multibranch
    specs = task_specs(cfg)
    model = build_multibranch(resolved_branches(cfg, len(specs)).model, specs, cfg.data.image_size).eval()
    return model, torch.rand(1, 3, cfg.data.image_size, cfg.data.image_size)


def count_flops(cfg) -> dict:
    """Forward FLOPs per sample of the training network of a config: fvcore (1/MAC; None without
    fvcore) and torch (2/MAC), and the parameter count."""
    model, x = training_network(cfg)
    return {"torch_2_per_mac": count_torch(model, x), "params": sum(p.numel() for p in model.parameters()),
            "fvcore_1_per_mac": count_fvcore(model, x)}


def forward_with_hooks(model: nn.Module, x: torch.Tensor, hooks: list[tuple[nn.Module, Callable]]) -> None:
    """One no-grad forward of ``model`` on ``x`` with each (module, forward hook) registered, the hooks
    removed afterwards whatever happens (the per-module counts here and in fastdmtg.roofline)."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def count_thop_style(model: nn.Module, x: torch.Tensor) -> float:
    """thop.profile's rules (module docstring), in G."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            k = m.kernel_size[0] * m.kernel_size[1]
            total[0] += out.numel() * (m.in_channels // m.groups * k + (1 if m.bias is not None else 0))
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            total[0] += 2 * inp[0].numel()
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features

    forward_with_hooks(model, x, [(m, hook) for m in model.modules()
                                  if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.LayerNorm, nn.Linear))])
    return total[0] / 1e9


def heads_share(model, x) -> float:
    """thop-style FLOPs of the decoders / whole network (the paper's "Heads FLOPs Portion")."""
    t_all = count_thop_style(model, x)
    with torch.no_grad():
        feats = model.branches[0](model.shared(x))
    return count_thop_style(model.heads[0], feats) / t_all


def taskonomy_table(argv: list[str] | None = None) -> int:
    """The Taskonomy-5 table (ROWS): params, fvcore, torch and thop-style GFLOPs beside the paper's."""
    from .config import ModelConfig
    from .data.taskonomy import TASKONOMY_5
    from .models import build_multibranch
    from .tasks.taskonomy import TaskonomyTaskSet
    ap = argparse.ArgumentParser(prog="fastdmtg bench flops --taskonomy", description="Taskonomy-5 FLOPs table")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default="", help="also write the markdown table here")
    ap.add_argument("--only", default="", help="comma-separated substrings of row labels to run")
    a = ap.parse_args(argv)
    specs = TaskonomyTaskSet(TASKONOMY_5).specs
    x = torch.rand(1, 3, a.size, a.size)
    lines = [f"Taskonomy-5 training network (all K·N heads), forward, batch 1, {a.size}×{a.size}; G = 1e9\n",
             "| configuration | shared | ref p | params (M) | fvcore GFLOPs (1/MAC) | torch GFLOPs (2/MAC) "
             "| thop-style G | paper G | paper source |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, arch, k, s, paper, src in ROWS:
        if a.only and not any(o in label for o in a.only.split(",")):
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build_multibranch(ModelConfig(arch=arch, branches=k, shared_blocks=s), specs, a.size).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        fv, tc, th = count_fvcore(model, x), count_torch(model, x) / 1e9, count_thop_style(model, x)
        fv = float("nan") if fv is None else fv / 1e9
        refp = ("-" if arch != "xception" else (0 if s == 0 else s + 2))
        extra = f" (heads {100 * heads_share(model, x):.2f}% thop-style)" if k == 1 else ""
        row = (f"| {label}{extra} | {s} | {refp} | {params:.2f} | {fv:.2f} | {tc:.2f} | {th:.2f} | "
               f"{'' if paper is None else f'{paper:.2f}'} | {src} |")
        lines.append(row)
        print(row, f"  [{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
        print(row, flush=True)
        del model
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0
