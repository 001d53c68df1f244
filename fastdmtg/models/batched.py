"""K identical branches computed as ONE network: the batched-branch form of ``MultiBranchNet``.

The K branches are architecturally identical, so layer by layer they can run as one wider layer:

* every Conv2d (groups g, C_in → C_out) becomes one Conv2d (K·C_in → K·C_out, groups K·g): branch k
  owns input/output channel block k — numerically the same convolutions, one kernel launch;
* every BatchNorm2d(C) becomes BatchNorm2d(K·C): BN is per channel, so each branch keeps its own
  batch statistics and running estimates;
* ReLU / pooling are channel-wise and stay as they are, and so does the residual ``out + x`` of a
  block (channel blocks line up);
* the branch input (the shared features, (B, C, H, W)) is replicated to (B, K·C, H, W) — except when
  the branch starts with a dense convolution, which then becomes one dense Conv2d(C → K·C_out) on the
  shared input (no copy);
* the output (B, K·C, H, W) is viewed as (B, K, C·H·W) and all K·N linear heads run as one einsum.

Parameters are the K branches' parameters concatenated along the output-channel axis, so
``from_multibranch`` / ``to_multibranch`` convert exactly both ways (pruning, export and init-from
use the per-branch form). Supported: branches made of Conv2d, BatchNorm2d, ReLU, MaxPool2d,
AvgPool2d, Flatten, Sequential and containers whose forward is channel-layout agnostic (the ResNet
variant's BasicBlock), with stacked linear heads (``LinearHeads``). Whether this is faster than K
separate branches depends on the GPU and the layer sizes: see docs/LOG.md for the measurement.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .multibranch import LinearHeads, MultiBranchNet

_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


def supports_batching(model: MultiBranchNet) -> bool:
    if not isinstance(model.heads[0], LinearHeads) or model.branch_grad_scale != 1.0 or model.head_grad_scale != 1.0:
        return False
    for m in model.branches[0].modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Flatten, nn.Sequential) + _CHANNELWISE):
            continue
        if type(m).__name__ in ("BasicBlock", "Stem", "Tail"):
            continue
        return False
    return True


def _first_leaf(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return module


def _batch_module(protos: list[nn.Module], k: int, dense_first: nn.Module | None) -> nn.Module:
    """Batched copy of one module, given its K per-branch instances."""
    p0 = protos[0]
    if isinstance(p0, nn.Conv2d):
        dense = p0 is dense_first
        conv = nn.Conv2d(p0.in_channels if dense else k * p0.in_channels, k * p0.out_channels, p0.kernel_size,
                         stride=p0.stride, padding=p0.padding, dilation=p0.dilation,
                         groups=p0.groups if dense else k * p0.groups, bias=p0.bias is not None,
                         padding_mode=p0.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([p.weight for p in protos], 0))
            if p0.bias is not None:
                conv.bias.copy_(torch.cat([p.bias for p in protos], 0))
        return conv
    if isinstance(p0, nn.BatchNorm2d):
        bn = nn.BatchNorm2d(k * p0.num_features, eps=p0.eps, momentum=p0.momentum, affine=p0.affine,
                            track_running_stats=p0.track_running_stats)
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(p0, name) is not None:
                    getattr(bn, name).copy_(torch.cat([getattr(p, name) for p in protos], 0))
            if p0.track_running_stats:
                bn.running_mean.copy_(torch.cat([p.running_mean for p in protos], 0))
                bn.running_var.copy_(torch.cat([p.running_var for p in protos], 0))
                bn.num_batches_tracked.copy_(p0.num_batches_tracked)
        return bn
    if isinstance(p0, nn.Flatten):
        return nn.Identity()          # the batched net flattens per branch at the end
    if isinstance(p0, _CHANNELWISE):
        return copy.deepcopy(p0)
    new = copy.copy(p0)               # a container: same forward, batched children
    new._modules = {name: _batch_module([getattr(p, name) for p in protos], k, dense_first)
                    for name in p0._modules}
    new._parameters, new._buffers = {}, {}
    return new


def _unbatch_module(batched: nn.Module, protos: list[nn.Module], k: int) -> None:
    """Copy a batched module's values back into the K per-branch modules (in place)."""
    if isinstance(batched, nn.Conv2d):
        for i, p in enumerate(protos):
            n = p.out_channels
            p.weight.data.copy_(batched.weight.data[i * n:(i + 1) * n])
            if p.bias is not None:
                p.bias.data.copy_(batched.bias.data[i * n:(i + 1) * n])
    elif isinstance(batched, nn.BatchNorm2d):
        for i, p in enumerate(protos):
            n = p.num_features
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(batched, name)
                if t is not None:
                    getattr(p, name).data.copy_(t.data[i * n:(i + 1) * n])
            if p.track_running_stats:
                p.num_batches_tracked.copy_(batched.num_batches_tracked)
    else:
        for name, child in batched._modules.items():
            _unbatch_module(child, [getattr(p, name) for p in protos], k)


class BatchedMultiBranchNet(nn.Module):
    """Same function and outputs as the ``MultiBranchNet`` it was made from: (K, N, B, C)."""

    stacked = True

    def __init__(self, model: MultiBranchNet):
        super().__init__()
        if not supports_batching(model):
            raise ValueError("batched branches support Conv/BN/ReLU/pool branches with linear heads and no "
                             "gradient scaling (model.batched=off for this architecture)")
        k = model.num_branches
        self.k = k
        self.shared = copy.deepcopy(model.shared)
        first = _first_leaf(model.branches[0])
        dense_first = first if isinstance(first, nn.Conv2d) and first.groups == 1 else None
        self.replicate = dense_first is None
        self.branch = _batch_module(list(model.branches), k, dense_first)
        proto = copy.deepcopy(model)              # structure for to_multibranch (weights refreshed there)
        for p in proto.parameters():
            p.requires_grad_(False)
        # a list hides it from .modules()/.parameters()/state_dict (object.__setattr__: not a submodule)
        object.__setattr__(self, "_proto", [proto])
        h0 = model.heads[0]
        self.in_features, self.out_features = h0.in_features, h0.out_features
        self.head_weight = nn.Parameter(torch.stack([h.weight.detach() for h in model.heads]).clone())  # (K, N, C, F)
        self.head_bias = nn.Parameter(torch.stack([h.bias.detach() for h in model.heads]).clone())      # (K, N, C)
        self.to(self.head_weight.device)   # the new batched layers were created on the CPU

    @property
    def num_branches(self) -> int:
        return self.k

    @property
    def num_tasks(self) -> int:
        return self.head_weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.shared(x)
        if self.replicate:
            f = f.repeat(1, self.k, *([1] * (f.dim() - 2)))                  # (B, K·C, H, W)
        h = self.branch(f)                                                    # (B, K·C', H', W')
        h = h.reshape(h.shape[0], self.k, -1)                                  # (B, K, F)
        # all K·N heads in one batched matmul: (K, N, B, C)
        out = torch.einsum("bkf,kncf->knbc", h, self.head_weight) + self.head_bias[:, :, None, :]
        # a contiguous (K, N, B, C) layout: inductor may pick other strides for the einsum output,
        # and the fused loss op is traced with the contiguous layout
        return out.contiguous()

    @staticmethod
    def from_multibranch(model: MultiBranchNet) -> "BatchedMultiBranchNet":
        return BatchedMultiBranchNet(model)

    def to_multibranch(self) -> MultiBranchNet:
        """The equivalent per-branch MultiBranchNet with the current values (a copy)."""
        mb = copy.deepcopy(self._proto[0]).to(self.head_weight.device)
        mb.shared.load_state_dict(self.shared.state_dict())
        _unbatch_module(self.branch, list(mb.branches), self.k)
        with torch.no_grad():
            for i, h in enumerate(mb.heads):
                h.weight.copy_(self.head_weight[i])
                h.bias.copy_(self.head_bias[i])
        for p in mb.parameters():
            p.requires_grad_(True)
        return mb

    def load_single_branch(self, state: dict) -> None:
        mb = self.to_multibranch()
        mb.load_single_branch(state)
        self.load_state_dict(BatchedMultiBranchNet(mb).state_dict())
