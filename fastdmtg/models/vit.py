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
biases, LayerNorm 1/0), or with ``model.pretrained=FILE`` from a ViT-B/16 state dict on disk
(nothing is downloaded): timm's ``vit_base_patch16_224`` layout (the encoder the release's configs
name) or torchvision's ``vit_b_16`` (``load_pretrained``). Mapped: the patch projection, the position
embedding (the class token's entry dropped — this encoder has no class token — and the grid resampled
bicubically when the file's grid is not S/16 × S/16, as timm does for another image size), the 12
layers and the final LayerNorm; the class token and the classifier head of the file are not used; the
1×1 projection to 512 channels and the decoders keep their initialisation. The paper does not say
whether it started from pretrained weights, and the release cannot tell (the encoder is not in it;
timm's ``create_model`` loads no weights unless asked).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Parts
from .backbone import Backbone
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


# ----------------------------------------------------------------------------- pretrained weights
#: layer i's parameters: fastdmtg name → (timm name, torchvision name), "{i}" = the layer index
_LAYER_KEYS = {
    "norm1.weight": ("blocks.{i}.norm1.weight", "encoder.layers.encoder_layer_{i}.ln_1.weight"),
    "norm1.bias": ("blocks.{i}.norm1.bias", "encoder.layers.encoder_layer_{i}.ln_1.bias"),
    "attn.qkv.weight": ("blocks.{i}.attn.qkv.weight", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight"),
    "attn.qkv.bias": ("blocks.{i}.attn.qkv.bias", "encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias"),
    "attn.proj.weight": ("blocks.{i}.attn.proj.weight", "encoder.layers.encoder_layer_{i}.self_attention.out_proj.weight"),
    "attn.proj.bias": ("blocks.{i}.attn.proj.bias", "encoder.layers.encoder_layer_{i}.self_attention.out_proj.bias"),
    "norm2.weight": ("blocks.{i}.norm2.weight", "encoder.layers.encoder_layer_{i}.ln_2.weight"),
    "norm2.bias": ("blocks.{i}.norm2.bias", "encoder.layers.encoder_layer_{i}.ln_2.bias"),
    "mlp.0.weight": ("blocks.{i}.mlp.fc1.weight", "encoder.layers.encoder_layer_{i}.mlp.0.weight"),
    "mlp.0.bias": ("blocks.{i}.mlp.fc1.bias", "encoder.layers.encoder_layer_{i}.mlp.0.bias"),
    "mlp.2.weight": ("blocks.{i}.mlp.fc2.weight", "encoder.layers.encoder_layer_{i}.mlp.3.weight"),
    "mlp.2.bias": ("blocks.{i}.mlp.fc2.bias", "encoder.layers.encoder_layer_{i}.mlp.3.bias"),
}
#: the patch embedding and the final LayerNorm: (module role, fastdmtg name) → (timm, torchvision)
_OTHER_KEYS = {
    ("patch", "proj.weight"): ("patch_embed.proj.weight", "conv_proj.weight"),
    ("patch", "proj.bias"): ("patch_embed.proj.bias", "conv_proj.bias"),
    ("patch", "pos"): ("pos_embed", "encoder.pos_embedding"),
    ("end", "norm.weight"): ("norm.weight", "encoder.ln.weight"),
    ("end", "norm.bias"): ("norm.bias", "encoder.ln.bias"),
}
#: keys of the files that this encoder has no use for (class token, classifier head)
_UNUSED = {"timm": ("cls_token", "head.weight", "head.bias"),
           "torchvision": ("class_token", "heads.head.weight", "heads.head.bias")}


def _read_state_dict(path: str) -> dict:
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: {p}: no such file (a timm or torchvision ViT-B/16 state dict)")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:                      # noqa: BLE001 — any unreadable file is the user's to fix
        raise ValueError(f"model.pretrained: {p}: not a readable torch state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for wrap in ("state_dict", "model"):        # {"model": sd} / {"state_dict": sd} as training scripts save them
        if isinstance(sd, dict) and set(sd) == {wrap} and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.pretrained: {p}: expected a dict of tensors (a state dict)")
    # torchvision before 0.13 named the MLP's linears linear_1 / linear_2 (now mlp.0 / mlp.3)
    return {k.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3."): v for k, v in sd.items()}


def _resample_pos(pos: torch.Tensor, tokens: int, path: str, key: str) -> torch.Tensor:
    """(1, n, D) position embedding of the file → (1, tokens, D) of this encoder: the class token's entry
    (n = g² + 1) dropped, a g×g grid resampled bicubically to √tokens × √tokens."""
    n = pos.shape[1]
    g = math.isqrt(n)
    if g * g != n:                                  # a class token's entry first
        pos, n = pos[:, 1:], n - 1
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"model.pretrained: {path}: key {key!r} has {n + 1} positions, neither a square grid "
                             "nor one plus a square grid")
    side = math.isqrt(tokens)
    if g == side:
        return pos
    grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()          # (1, D, g, g)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, -1).to(pos.dtype)


def load_pretrained(shared: nn.Module, branch: nn.Module, path: str) -> None:
    """Copy a timm (``vit_base_patch16_224``) or torchvision (``vit_b_16``) state dict file into the
    encoder parts built by ``build_parts`` (module doc). Every mismatch is an error naming the file and
    the first key concerned: a missing key, a shape that differs from this encoder's, or a key this
    encoder cannot take (e.g. LayerScale gammas, a distillation token)."""
    sd = _read_state_dict(path)
    if "patch_embed.proj.weight" in sd:
        layout = 0
    elif "conv_proj.weight" in sd:
        layout = 1
    else:
        raise ValueError(f"model.pretrained: {path}: neither a timm nor a torchvision ViT state dict: no key "
                         f"'patch_embed.proj.weight' (timm) or 'conv_proj.weight' (torchvision); first key "
                         f"{next(iter(sd), None)!r}")
    modules = list(shared) + list(branch) if isinstance(shared, nn.Sequential) else list(branch)
    patch = next(m for m in modules if isinstance(m, PatchEmbed))
    layers = [m for m in modules if isinstance(m, Layer)]                 # in depth order
    end = next(m for m in modules if isinstance(m, ToMap))
    targets = []                                                          # (file key, parameter)
    for (role, name), keys in _OTHER_KEYS.items():
        targets.append((keys[layout], (patch if role == "patch" else end).get_parameter(name)))
    for i, layer in enumerate(layers):
        for name, keys in _LAYER_KEYS.items():
            targets.append((keys[layout].format(i=i), layer.get_parameter(name)))
    used = {k for k, _ in targets} | set(_UNUSED[("timm", "torchvision")[layout]])
    with torch.no_grad():
        for key, param in targets:
            if key not in sd:
                raise ValueError(f"model.pretrained: {path}: key {key!r} missing (expected a ViT-B/16 state dict in "
                                 f"{('timm', 'torchvision')[layout]}'s layout)")
            val = sd[key]
            if param is patch.pos:
                val = _resample_pos(val, param.shape[1], path, key) if val.dim() == 3 else val
            if tuple(val.shape) != tuple(param.shape):
                raise ValueError(f"model.pretrained: {path}: key {key!r} has shape {tuple(val.shape)}, this vit_base "
                                 f"expects {tuple(param.shape)}")
            param.copy_(val.to(param.dtype))
    extra = [k for k in sd if k not in used]
    if extra:
        raise ValueError(f"model.pretrained: {path}: key {extra[0]!r} has no place in this ViT-B/16 encoder "
                         f"({len(extra)} such key(s))")


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
    _init(shared), _init(branch)
    if getattr(cfg, "pretrained", ""):
        load_pretrained(shared, branch, cfg.pretrained)         # before MultiBranchNet copies the branch K times
    g = reference_grad_scale(cfg)
    return Parts(shared, branch, dense_heads(task_specs), branch_grad_scale=g, head_grad_scale=g)


BACKBONE = Backbone("vit_base", build_parts, loads_pretrained=True, nothing_shared={"shared_blocks": 0},
                    order=2)
