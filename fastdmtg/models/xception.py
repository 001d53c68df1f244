"""The Taskonomy "Xception variant" (Standley et al. / TAG / DMTG reference) and its dense decoders.

Encoder, for an S×S input (S a multiple of 16; shapes at S = 256):

    stem      conv3x3 3→32 stride 2 + BN + ReLU, conv3x3 32→64 + BN + ReLU       → (B, 64, 128, 128)
    block 1   64→128   2 × [ReLU, SepConv, BN], learned conv2x2 s2 (bias); skip conv1x1 s2 + BN → 64²
    block 2   128→256  same                                                         → (B, 256, 32, 32)
    block 3   256→728  same                                                         → (B, 728, 16, 16)
    block 4-11 728→728 3 × [ReLU, SepConv, BN], identity skip                       → (B, 728, 16, 16)
    end       ReLU → SepConv 728→512 → BN                                           → (B, 512, 16, 16)

SepConv = depthwise 3×3 + pointwise 1×1, no bias. Block 1 has no leading ReLU (its input is the
stem's ReLU output: the reference drops it; it would be a no-op).

Sharing (``model.shared_blocks`` = s, 0..11, counted in Xception blocks):
    s = 0   nothing shared: every branch is the whole encoder, stem included (the reference's
            "share 0" ablation config, which builds K complete encoders);
    s >= 1  the stem and blocks 1..s are shared, blocks s+1..11 + end form each branch.
The reference counts its split point p in entries of its width list (conv1, conv2, block 1, ...),
so its p ↔ our s = p − 2 for p ≥ 3: default p = 6 ↔ s = 4 (split after block 4, recipe
default); its Table 6 ablation configs p = 3/6/9 ↔ s = 1/4/7 (p = 0 ↔ s = 0). Stem-only sharing
(p = 2) is not expressible; nobody used it.

Decoder per task (reference "small" decoder, ≈0.52 M parameters):

    ConvT2x2 s2 512→128 + BN + ReLU, conv3x3 128→128 + BN + ReLU                    → 32²
    ConvT2x2 s2 128→64  + BN + ReLU, conv3x3 64→64   + BN + ReLU                    → 64²
    ConvT2x2 s2 64→48   + BN + ReLU, conv3x3 48→48   + BN + ReLU                    → 128²
    ConvT2x2 s2 48→32   + BN + ReLU, conv3x3 32→C_out (the output layer, no activation) → 256²

(The 4th stage has no intermediate 32→32 conv in the reference: its 4th 3×3 conv *is* the output
layer. With one the count would be 0.53 M, not the reference's 0.52 M.) Convolutions and
transposed convolutions have biases (PyTorch default).

Precision (``train.amp=mixed``, the CUDA default; docs/fidelity.md): under bf16 autocast each
decoder runs in fp32 on its fp32-cast input (``Decoder.keep_fp32``, multibranch.fp32_heads); the
encoder runs in bf16. Measured (benchmarks/results/cpu_2026-11-30_precision_taskonomy.md): with
bf16 decoders, or with only their output layer in fp32, the smallest reachable losses stall near
bf16's resolution (~1e−3: its spacing is 2^−8 in [0.5, 1), the edge target's background −0.671 is
stored as −0.671875, and the decoders' weights are rounded to 8 significand bits in every forward);
with fp32 decoders they follow fp32 training. ``train.amp=bf16`` switches this off
(``keep_fp32 = False``, set by ``fastdmtg.step.set_output_precision``).

Init: encoder Conv2d weights N(0, √(2 / (k_h·k_w·out_channels))), BatchNorm weight 1 / bias 0,
conv biases (the learned down-sampling convs) PyTorch default; decoders keep PyTorch's default
init — the reference applies its N(0, ·) init to the encoders only.

Parameters (exact): stem 19,488; blocks 1/2/3: 100,928 / 398,464 / 3,036,608; each of blocks 4-11
1,613,976; end 380,312 → shared at s = 4: 5,169,464; branch at s = 4: 11,678,144; decoder
520,225 + 289·(C_out − 1) (C_out = 1: 520,225; 3: 520,803; 18: 525,138).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import Parts
from .backbone import Backbone
from .multibranch import FP32Output, ModuleHeads, fp32_heads

WIDTHS = (128, 256, 728) + (728,) * 8     # output channels of blocks 1..11
NUM_BLOCKS = len(WIDTHS)
FEATURES = 512
DECODER_WIDTHS = (128, 64, 48, 32)


class SeparableConv2d(nn.Sequential):
    batchable = True     # channel-layout agnostic: batched child by child (models/batched.py)

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),   # depthwise
                         nn.Conv2d(cin, cout, 1, bias=False))                          # pointwise


class XceptionBlock(nn.Module):
    """reps × [ReLU, SepConv, BN] (+ learned 2×2 stride-2 conv) + skip."""

    batchable = True     # channel-layout agnostic: batched child by child (models/batched.py)

    def __init__(self, cin: int, cout: int, reps: int, downsample: bool, start_with_relu: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for r in range(reps):
            if r > 0 or start_with_relu:
                # the first ReLU must not be in-place: the block input also feeds the skip
                layers.append(nn.ReLU(inplace=r > 0))
            layers += [SeparableConv2d(c, cout), nn.BatchNorm2d(cout)]
            c = cout
        if downsample:
            layers.append(nn.Conv2d(cout, cout, 2, stride=2))    # learned pooling, with bias
        self.rep = nn.Sequential(*layers)
        if downsample or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2 if downsample else 1, bias=False),
                                      nn.BatchNorm2d(cout))
        else:
            self.skip = nn.Identity()

    def forward(self, x):
        return self.rep(x) + self.skip(x)


def stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))


def block(i: int) -> XceptionBlock:
    """Block i, 1-based (1..11)."""
    cin = 64 if i == 1 else WIDTHS[i - 2]
    cout = WIDTHS[i - 1]
    if i <= 3:
        return XceptionBlock(cin, cout, reps=2, downsample=True, start_with_relu=i > 1)
    return XceptionBlock(cin, cout, reps=3, downsample=False)


def end() -> nn.Sequential:
    return nn.Sequential(nn.ReLU(inplace=False), SeparableConv2d(WIDTHS[-1], FEATURES), nn.BatchNorm2d(FEATURES))


def init_encoder(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def split_encoder(shared_blocks: int) -> tuple[nn.Module, nn.Module]:
    """(shared trunk, branch prototype) for ``shared_blocks`` shared Xception blocks."""
    if not 0 <= shared_blocks <= NUM_BLOCKS:
        raise ValueError(f"model.shared_blocks: xception has {NUM_BLOCKS} blocks, expected 0..{NUM_BLOCKS}, "
                         f"got {shared_blocks}")
    blocks = [block(i) for i in range(1, NUM_BLOCKS + 1)]
    if shared_blocks == 0:
        shared, branch = nn.Identity(), nn.Sequential(stem(), *blocks, end())
    else:
        shared = nn.Sequential(stem(), *blocks[:shared_blocks])
        branch = nn.Sequential(*blocks[shared_blocks:], end())
    return init_encoder(shared), init_encoder(branch)


class Decoder(FP32Output, nn.Sequential):
    """(B, 512, s, s) → (B, C_out, 16s, 16s); no final activation. In fp32 under autocast unless
    switched off (the precision policy, see the module doc)."""

    keep_fp32 = True         # an instance attribute when switched off (fastdmtg.step.set_output_precision)

    def __init__(self, out_channels: int, in_channels: int = FEATURES, widths=DECODER_WIDTHS):
        layers: list[nn.Module] = []
        c = in_channels
        for j, w in enumerate(widths):
            layers += [nn.ConvTranspose2d(c, w, 2, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if j < len(widths) - 1:
                layers += [nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.Conv2d(c, out_channels, 3, padding=1))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_heads(super().forward, x) if self.keep_fp32 else super().forward(x)   # (B, C_out, H, W)


def dense_heads(task_specs) -> ModuleHeads:
    for t in task_specs:
        if t.kind == "class":
            raise ValueError(f"the Taskonomy decoders are dense; task {t.name!r} is a classification task")
    return ModuleHeads([Decoder(t.out_channels) for t in task_specs])


def reference_grad_scale(cfg) -> float:
    """1/√K into each branch and (the reference's class-attribute bug) 1/√K into each head too."""
    return 1.0 / math.sqrt(cfg.branches)


def build_parts(cfg, task_specs, image_size: int) -> Parts:
    if image_size % 16:
        raise ValueError(f"data.image_size: xception down-samples 16x and its decoders up-sample 16x; "
                         f"expected a multiple of 16, got {image_size}")
    shared, branch = split_encoder(cfg.shared_blocks)
    s = reference_grad_scale(cfg)
    return Parts(shared, branch, dense_heads(task_specs), branch_grad_scale=s, head_grad_scale=s)


# batched_auto stays False: xception can be batched (model.batched=on) but has not been timed on a GPU
# yet, so model.batched=auto leaves it off
BACKBONE = Backbone("xception", build_parts, nothing_shared={"shared_blocks": 0}, batched_auto=False,
                    order=1)
