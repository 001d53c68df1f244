"""ViT-Base encoder for Taskonomy (paper Table 5 / A1), with the Xception variant's dense decoders.

    patches   conv 16×16 stride 16, 3→768, + learned position embedding     → (B, L, 768), L = (S/16)²
    layers    12 × pre-norm transformer: x + MHSA(LN(x)); x + MLP(LN(x))      12 heads, MLP 3072, GELU
    end       LN → tokens reshaped to (B, 768, S/16, S/16) → conv1x1 768→512 → (B, 512, S/16, S/16)
    decoders  the Xception variant's (fastdmtg.models.xception.Decoder)      → (B, C_out, S, S)

At S = 256 the decoders see 512×16×16, exactly like the Xception variant. No class token (dense
prediction only). ``model.shared_blocks`` = s transformer layers shared (0..12); the patch
embedding goes with the shared part when s >= 1 and into every branch when s = 0 (the same rule
as the Xception stem). The DMTG release names a ViT encoder but does not contain one, so the
split convention is ours.

Weights start from scratch (truncated normal std 0.02 for linear/patch/position weights, zero
biases, LayerNorm 1/0): no pretrained ViT weights can be downloaded in this environment, and the
paper does not say whether it used any.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Parts
from .xception import FEATURES, dense_heads, reference_grad_scale

PATCH = 16
DIM = 768
DEPTH = 12
HEADS = 12
MLP = 3072


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // PATCH) ** 2, DIM))

    def forward(self, x):
        x = self.proj(x)                                   # (B, D, S/16, S/16)
        return x.flatten(2).transpose(1, 2) + self.pos      # (B, L, D)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)   # (3, B, H, L, d_h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                 # (B, H, L, d_h)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM, eps=1e-6), Attention()
        self.norm2 = nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(DIM, MLP), nn.GELU(), nn.Linear(MLP, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToMap(nn.Module):
    """Final LN, tokens → (B, 768, h, w) feature map → 1×1 conv to the decoders' 512 channels."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side                                  # tokens per row (S/16), fixed at build time
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.proj = nn.Conv2d(DIM, FEATURES, 1)

    def forward(self, x):
        b, n, d = x.shape
        x = self.norm(x).transpose(1, 2).reshape(b, d, self.side, self.side)   # (B, D, h, w)
        return self.proj(x)                                          # (B, 512, h, w)


def _init(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.trunc_normal_(m.pos, std=0.02)
    return module


def build_parts(cfg, task_specs, image_size: int) -> Parts:
    if image_size % PATCH:
        raise ValueError(f"data.image_size: vit_base uses {PATCH}x{PATCH} patches; expected a multiple of "
                         f"{PATCH}, got {image_size}")
    s = cfg.shared_blocks
    if not 0 <= s <= DEPTH:
        raise ValueError(f"model.shared_blocks: vit_base has {DEPTH} layers, expected 0..{DEPTH}, got {s}")
    layers = [Layer() for _ in range(DEPTH)]
    if s == 0:
        shared, branch = nn.Identity(), nn.Sequential(PatchEmbed(image_size), *layers, ToMap(image_size // PATCH))
    else:
        shared = nn.Sequential(PatchEmbed(image_size), *layers[:s])
        branch = nn.Sequential(*layers[s:], ToMap(image_size // PATCH))
    g = reference_grad_scale(cfg)
    return Parts(_init(shared), _init(branch), dense_heads(task_specs), branch_grad_scale=g, head_grad_scale=g)
