"""The CelebA "ResNet variant" shared by the TAG and DMTG reference code.

    x (B, 3, 64, 64) in [0, 1]
    Conv3x3 3→w (stride 1, pad 1, no bias) → BN → ReLU → MaxPool(3, stride 2, no pad)  → (B, w, 31, 31)
    BasicBlock(w): conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU                          → (B, w, 31, 31)
    AvgPool(2)                                                                          → (B, w, 15, 15)
    flatten → w·15·15 (= 14400 at w = 64) → per task Linear(14400, 2)

Parameters at w = 64: trunk 75,840; each head 28,802. Xavier-uniform conv/linear weights, zero
linear bias, BN weight 1 / bias 0. The "shared stem" option shares conv+BN+ReLU+maxpool and
branches at the residual block.

Fused stem (``model.fused_stem``, docs/kernels.md): in training mode BN → ReLU → MaxPool runs as the
one op ``fastdmtg.ops.bn_relu_maxpool`` (no index tensor, no full-size ReLU output or gradient in
memory). Same parameters, buffers and state dict as the unfused modules; evaluation mode is unchanged.
"""
from __future__ import annotations

from torch import nn

from .backbone import Backbone, RSALocations
from .batched import BlockBatchNorm2d, batch_norm_train_args
from .multibranch import HeadSet, LinearHeads


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=False)


class Stem(nn.Sequential):
    """conv3x3 → BN → ReLU → MaxPool(3, 2). With ``fused`` set (``set_fused_stem``), training mode
    runs BN → ReLU → MaxPool as one fused op on the ``kernels`` backend."""

    batchable = True     # channel-layout agnostic: batched child by child (models/batched.py)

    def __init__(self, width: int):
        super().__init__(_conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=0))
        self.fused, self.kernels = False, "auto"

    def forward(self, x):
        if not (self.fused and self.training):
            return super().forward(x)
        from .. import ops
        bn = self[1]
        return ops.bn_relu_maxpool(self[0](x), *batch_norm_train_args(bn), bn.eps, backend=self.kernels)


def set_fused_stem(model: nn.Module, kernels: str) -> int:
    """Run every ResNet-variant stem of ``model`` (per-branch or batched) through the fused op on the
    ``kernels`` backend (train.kernels); returns how many stems there are (0: not this architecture)."""
    stems = [m for m in model.modules() if isinstance(m, Stem)]
    for m in stems:
        if type(m[1]) not in (nn.BatchNorm2d, BlockBatchNorm2d):
            raise ValueError(f"model.fused_stem=on: the stem's BatchNorm is a {type(m[1]).__name__} (e.g. after "
                             "model.sync_bn under DDP), which the fused op cannot replace; use model.fused_stem=off")
        m.fused, m.kernels = True, kernels
    return len(stems)


class BasicBlock(nn.Module):
    batchable = True     # channel-layout agnostic: batched child by child (models/batched.py)

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(width, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Tail(nn.Sequential):
    """Residual block + AvgPool(2) + flatten: the part after the stem."""

    batchable = True     # channel-layout agnostic: batched child by child (models/batched.py)

    def __init__(self, width: int):
        super().__init__(BasicBlock(width), nn.AvgPool2d(2), nn.Flatten(1))


def feature_dim(width: int, image_size: int) -> int:
    side = (image_size - 3) // 2 + 1          # MaxPool(3, 2), no padding
    return width * (side // 2) ** 2           # AvgPool(2)


def _xavier(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def build(width: int, image_size: int, num_tasks: int, num_classes: int, shared: str
          ) -> tuple[nn.Module, nn.Module, HeadSet]:
    """Return (shared trunk, branch prototype, head-set prototype)."""
    if shared == "stem":
        trunk, branch = _xavier(Stem(width)), _xavier(Tail(width))
    else:
        trunk, branch = nn.Identity(), _xavier(nn.Sequential(Stem(width), Tail(width)))
    heads = LinearHeads(num_tasks, feature_dim(width, image_size), num_classes)
    return trunk, branch, heads


def build_parts(cfg, task_specs, image_size: int):
    """The backbone's parts (models.Parts): your own tasks get per-task heads of each task's own size
    (binary 2, multiclass C, regression 1); CelebA's attributes the grouped linear heads."""
    from . import GENERIC_KINDS, Parts
    if task_specs and all(t.kind in GENERIC_KINDS for t in task_specs):
        from .task_heads import task_heads
        shared, branch, _ = build(cfg.width, image_size, len(task_specs), cfg.num_classes, cfg.shared)
        return Parts(shared, branch, task_heads(task_specs, feature_dim(cfg.width, image_size)))
    for t in task_specs:
        if t.kind != "class":
            raise ValueError(f"resnet_celeba has classification heads only; task {t.name!r} is {t.kind!r}")
    shared, branch, heads = build(cfg.width, image_size, len(task_specs), cfg.num_classes, cfg.shared)
    return Parts(shared, branch, heads)


def rsa_features(branch: nn.Module, images) -> list:
    """BMTN's features of one unshared encoder (Sequential(Stem, Tail)) at its RSA locations: after
    the stem (w × 15 × 15 at 32 px, w × 31 × 31 at 64 px), after the residual block, after AvgPool(2)
    (the encoder output the heads read)."""
    stem, tail = branch[0], branch[1]
    f_stem = stem(images)
    f_block = tail[0](f_stem)
    f_pool = tail[1](f_block)
    return [f_stem, f_block, f_pool]


# BMTN's split points: model.shared = none (branch at the input: nothing shared) or stem (share the
# stem, branch at the residual block: the ``stem`` location lies in the trunk)
RSA = RSALocations(locations=("stem", "block", "pool"), split_field="shared", splits={"none": 0, "stem": 1},
                   features=rsa_features)

# batched_auto: measured faster batched on a GPU (docs/LOG.md)
BACKBONE = Backbone("resnet_celeba", build_parts, nothing_shared={"shared": "none"}, batched_auto=True,
                    set_fused_stem=set_fused_stem, rsa=RSA, order=0)
