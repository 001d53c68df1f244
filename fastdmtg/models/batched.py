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
``BatchedMultiBranchNet(model)`` / ``to_multibranch`` convert exactly both ways (export and init-from use the
per-branch form).

Head pruning (docs/pruning.md) — computing only the *live* branches (those some task can still
choose): every batched tensor (conv weight/bias, BN weight/bias/running stats, head weights) is K
blocks along dim 0, one per branch. ``set_active`` moves the live branches' blocks to the front
(an in-place permutation of the parameters, buffers and the optimizer's per-element state, done once
per branch drop, ≤ K−1 times a run); then a training forward runs every layer on the first K' blocks
only — *views* (``weight[:K'·C]``), so gradients and BN running-stat updates land in the full tensors
and parameter identity is kept (the optimizer, DDP and checkpoints see the same tensors). The
``branch_slot`` buffer (K,) maps logical branch k to its physical block; outputs are always returned
in logical branch order, zeros in dead branches' slots (their Gumbel weight is 0). Evaluation mode
computes all K blocks.

Supported: branches made of Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, Flatten, Sequential
and containers whose forward is channel-layout agnostic (the ResNet variant's BasicBlock, the
Xception blocks and separable convolutions). Heads:

* stacked linear heads (``LinearHeads``, CelebA): all K·N heads as one einsum (above);
* list heads (``ModuleHeads``, the Taskonomy decoders): kept as K·N separate modules (the same
  parameters as the per-branch net), each fed its branch's channel block of the batched output
  ``h[:, k·C:(k+1)·C]``; outputs N tensors (K, B, ...) as ``MultiBranchNet``. With head pruning only
  the active heads run (N tensors (K_i, B, ...), ``task_branches`` order), as in the per-branch net.

Gradient scaling (the Taskonomy reference's 1/√K) is the same for every branch, so it is applied
once to the shared features before they are replicated, and to each block of the branch output
before its heads — the same gradients as per branch.

Whether this is faster than K separate branches depends on the GPU and the layer sizes: see
docs/LOG.md for the measurement (``model.batched=auto`` turns it on only for the backbones that
declare ``batched_auto`` (``models.backbone.Backbone``), where it was measured faster).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .multibranch import BranchedNet, FP32Output, LinearHeads, ModuleHeads, MultiBranchNet, fp32_heads, grad_scale

_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)


def supports_batching(model: MultiBranchNet) -> bool:
    """Whether every module of a branch can be batched: the layers above, and containers that declare
    ``batchable = True`` (a class attribute: their forward only routes tensors through their children
    and adds/concatenates along nothing but the channel-blocked layout, so they are batched child by
    child — the ResNet variant's Stem/BasicBlock/Tail, Xception's blocks and separable convolutions)."""
    if not isinstance(model.heads[0], (LinearHeads, ModuleHeads)):
        return False
    for m in model.branches[0].modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Flatten, nn.Sequential) + _CHANNELWISE):
            continue
        if getattr(type(m), "batchable", False):
            continue
        return False
    return True


def _first_leaf(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return module


class BlockConv2d(nn.Conv2d):
    """A batched convolution: output channels (and, unless ``dense``, input channels and groups) are
    ``blocks`` per-branch blocks. In training mode only the first ``live`` blocks are computed."""

    def __init__(self, *args, blocks: int, dense: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks, self.dense, self.live = blocks, dense, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.live == self.blocks:
            return super().forward(x)
        n = self.out_channels // self.blocks * self.live
        w = self.weight[:n]                                          # a view: grads land in the full weight
        b = self.bias[:n] if self.bias is not None else None
        groups = self.groups if self.dense else self.groups // self.blocks * self.live
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


class BlockBatchNorm2d(nn.BatchNorm2d):
    """A batched BatchNorm (per channel, so per branch); in training mode only the first ``live``
    blocks of channels are normalised. The running statistics are updated through views."""

    def __init__(self, *args, blocks: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks, self.live = blocks, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.live == self.blocks:
            return super().forward(x)
        return F.batch_norm(x, *batch_norm_train_args(self), self.eps)


def batch_norm_train_args(bn: nn.BatchNorm2d) -> tuple:
    """(running_mean, running_var, weight, bias, True, momentum): what a BatchNorm2d in training mode
    passes to F.batch_norm, with its bookkeeping done (num_batches_tracked counted, momentum None →
    cumulative average), restricted to the live blocks of a BlockBatchNorm2d (views: updates land in
    the full tensors). For code that runs the normalisation itself (the fused CelebA stem)."""
    n = bn.num_features // bn.blocks * bn.live if isinstance(bn, BlockBatchNorm2d) else bn.num_features
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    track = bn.track_running_stats
    rm = bn.running_mean[:n] if track and bn.running_mean is not None else None
    rv = bn.running_var[:n] if track and bn.running_var is not None else None
    w = bn.weight[:n] if bn.weight is not None else None
    b = bn.bias[:n] if bn.bias is not None else None
    return rm, rv, w, b, True, momentum


def _batch_module(protos: list[nn.Module], k: int, dense_first: nn.Module | None) -> nn.Module:
    """Batched copy of one module, given its K per-branch instances."""
    p0 = protos[0]
    if isinstance(p0, nn.Conv2d):
        dense = p0 is dense_first
        conv = BlockConv2d(p0.in_channels if dense else k * p0.in_channels, k * p0.out_channels, p0.kernel_size,
                           stride=p0.stride, padding=p0.padding, dilation=p0.dilation,
                           groups=p0.groups if dense else k * p0.groups, bias=p0.bias is not None,
                           padding_mode=p0.padding_mode, blocks=k, dense=dense)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([p.weight for p in protos], 0))
            if p0.bias is not None:
                conv.bias.copy_(torch.cat([p.bias for p in protos], 0))
        return conv
    if isinstance(p0, nn.BatchNorm2d):
        bn = BlockBatchNorm2d(k * p0.num_features, eps=p0.eps, momentum=p0.momentum, affine=p0.affine,
                              track_running_stats=p0.track_running_stats, blocks=k)
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


def _permute_blocks(t: torch.Tensor, perm: torch.Tensor, k: int) -> None:
    """In place: block j of t (K equal blocks along dim 0) becomes old block perm[j] (any strides)."""
    blocks = t.unflatten(0, (k, -1))
    blocks.copy_(blocks[perm].clone())


class BatchedMultiBranchNet(FP32Output, BranchedNet):
    """Same function and outputs as the ``MultiBranchNet`` it was made from: (K, N, B, C) for
    stacked heads, N tensors (K, B, ...) for list heads."""

    keep_fp32 = True     # the stacked heads' einsum in fp32 under autocast (multibranch.fp32_heads)

    def __init__(self, model: MultiBranchNet):
        super().__init__()
        if not supports_batching(model):
            raise ValueError("batched branches support Conv/BN/ReLU/pool branches (model.batched=off for "
                             "this architecture)")
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
        self.stacked = model.stacked
        self.branch_grad_scale, self.head_grad_scale = model.branch_grad_scale, model.head_grad_scale
        if self.stacked:
            h0 = model.heads[0]
            self.in_features, self.out_features = h0.in_features, h0.out_features
            self.head_weight = nn.Parameter(torch.stack([h.weight.detach() for h in model.heads]).clone())  # (K, N, C, F)
            self.head_bias = nn.Parameter(torch.stack([h.bias.detach() for h in model.heads]).clone())      # (K, N, C)
        else:
            self.heads = copy.deepcopy(model.heads)       # K ModuleHeads, logical branch order
        self._slots = list(range(k))  # host copy of branch_slot (no device sync in the forward)
        # head pruning: logical branch k lives in physical block branch_slot[k] (identity until a drop)
        self.register_buffer("branch_slot", torch.arange(k))
        self.live = k                 # physical blocks 0..live-1 are computed in training mode
        self._permuted = False
        self.task_branches = None     # not None while some head is inactive (StepModule masks L then)
        self.to(next(model.parameters()).device)   # the new batched layers were created on the CPU

    @property
    def num_branches(self) -> int:
        return self.k

    @property
    def num_tasks(self) -> int:
        return self.head_weight.shape[1] if self.stacked else self.heads[0].num_tasks

    def _device(self) -> torch.device:
        return self.branch_slot.device

    def forward(self, x: torch.Tensor):
        kl = self.live if self.training else self.k                           # physical blocks computed
        f = grad_scale(self.shared(x), self.branch_grad_scale)
        if self.replicate:
            f = f.repeat(1, kl, *([1] * (f.dim() - 2)))                       # (B, K'·C, H, W)
        h = self.branch(f)                                                    # (B, K'·C', H', W')
        if not self.stacked:
            return self._list_heads(h, kl)
        h = h.reshape(h.shape[0], kl, -1)                                      # (B, K', F)
        hw, hb = (self.head_weight, self.head_bias) if kl == self.k else (self.head_weight[:kl], self.head_bias[:kl])
        # all K'·N heads in one batched matmul: (K', N, B, C)
        heads = lambda h, hw, hb: torch.einsum("bkf,kncf->knbc", h, hw) + hb[:, :, None, :]  # noqa: E731
        out = fp32_heads(heads, h, hw, hb) if self.keep_fp32 else heads(h, hw, hb)
        if kl < self.k or self._permuted:
            # physical blocks -> logical branch order; a dead branch's slot gets zeros (z = 0 there)
            out = torch.cat([out, out.new_zeros((1,) + out.shape[1:])]) if kl < self.k else out
            out = out[torch.where(self.branch_slot < kl, self.branch_slot, kl)]
        # a contiguous (K, N, B, C) layout: inductor may pick other strides for the einsum output,
        # and the fused loss op is traced with the contiguous layout
        return out.contiguous()

    def predict(self, x: torch.Tensor, assignment: list[int]):
        """As ``MultiBranchNet.predict``: stacked heads compute every block (one batched network)
        and select; list heads run only each task's assigned decoder."""
        if self.training:
            raise RuntimeError("predict() is for evaluation mode (model.eval())")
        if self.stacked:
            return MultiBranchNet.select_outputs(self(x), torch.as_tensor(assignment))
        f = grad_scale(self.shared(x), self.branch_grad_scale)
        if self.replicate:
            f = f.repeat(1, self.k, *([1] * (f.dim() - 2)))
        h = self.branch(f)
        c = h.shape[1] // self.k
        return [self.heads[k].heads[i](h[:, self._slots[k] * c:(self._slots[k] + 1) * c])
                for i, k in enumerate(assignment)]

    def _list_heads(self, h: torch.Tensor, kl: int) -> list[torch.Tensor]:
        """Branch k's heads read its channel block of h; N outputs (K, B, ...), or (K_i, B, ...)
        over task i's active heads while pruning (training mode)."""
        c = h.shape[1] // kl
        feats: dict[int, torch.Tensor] = {}

        def feat(k: int) -> torch.Tensor:                                      # logical branch k
            if k not in feats:
                j = self._slots[k]
                feats[k] = grad_scale(h[:, j * c:(j + 1) * c], self.head_grad_scale)
            return feats[k]
        pruned = self.training and self.task_branches is not None
        out = []
        for i in range(self.num_tasks):
            ks = self.task_branches[i] if pruned else range(self.k)
            out.append(torch.stack([self.heads[k].heads[i](feat(k)) for k in ks], 0))
        return out

    # ------------------------------------------------------------------ head pruning
    def _blocked(self) -> list[torch.Tensor]:
        """Every tensor made of K per-branch blocks along dim 0 (parameters and buffers)."""
        out = [self.head_weight, self.head_bias] if self.stacked else []
        for m in self.branch.modules():
            if isinstance(m, (BlockConv2d, BlockBatchNorm2d)):
                for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    if t.dim() > 0:
                        out.append(t)
        return out

    def set_active(self, mask: torch.Tensor | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Compute only live branches (some task has an active head there) in training mode.

        ``mask`` (N, K) bool of active heads, or None (all). Live branches are moved to the front
        blocks in logical order (dead ones after them, also in logical order), permuting the
        optimizer's per-element state with the parameters when ``optimizer`` is given. Stacked heads:
        every head of a live branch is computed (they are cheap) and the loss masks dropped ones;
        list heads (decoders): only the active heads run."""
        k = self.k
        if mask is None or bool(mask.all()):
            live = list(range(k))
            self.task_branches = None
        else:
            m = mask.detach().cpu().bool()
            if tuple(m.shape) != (self.num_tasks, k):
                raise ValueError(f"active mask must be (N, K)=({self.num_tasks}, {k}), got {tuple(m.shape)}")
            if not bool(m.any(1).all()):
                raise ValueError("every task needs at least one active head")
            live = [b for b in range(k) if bool(m[:, b].any())]
            self.task_branches = tuple(tuple(b for b in range(k) if m[i, b]) for i in range(self.num_tasks))
        for mod in self.branch.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not isinstance(mod, BlockBatchNorm2d) \
                    and len(live) < k:
                raise ValueError("computing only live branches needs the batched BatchNorm layers "
                                 f"(found {type(mod).__name__}, e.g. after SyncBatchNorm conversion)")
        order = live + [b for b in range(k) if b not in live]                  # logical branch per block
        slot = self.branch_slot.tolist()
        src = [slot[b] for b in order]                                         # new block j <- old block src[j]
        if src != list(range(k)):
            perm = torch.tensor(src, device=self._device())
            states = optimizer.state if optimizer is not None else {}
            with torch.no_grad():
                for t in self._blocked():
                    _permute_blocks(t, perm, k)
                    for v in (states.get(t, {}) if isinstance(t, nn.Parameter) else {}).values():
                        if torch.is_tensor(v) and v.shape == t.shape:
                            _permute_blocks(v, perm, k)
                new_slot = torch.empty_like(self.branch_slot)
                new_slot[torch.tensor(order, device=new_slot.device)] = torch.arange(k, device=new_slot.device)
                self.branch_slot.copy_(new_slot)
        self._set_live(len(live))

    def _set_live(self, live: int) -> None:
        self.live = live
        for m in self.branch.modules():
            if isinstance(m, (BlockConv2d, BlockBatchNorm2d)):
                m.live = live
        self._sync_slots()

    def _sync_slots(self) -> None:
        self._slots = self.branch_slot.tolist()
        self._permuted = self._slots != list(range(self.k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_slots()
        return out

    def to_multibranch(self) -> MultiBranchNet:
        """The equivalent per-branch MultiBranchNet with the current values (a copy)."""
        mb = copy.deepcopy(self._proto[0]).to(self._device())
        mb.shared.load_state_dict(self.shared.state_dict())
        slot = self.branch_slot.tolist()
        logical_at = [slot.index(j) for j in range(self.k)]                     # block j holds branch logical_at[j]
        _unbatch_module(self.branch, [mb.branches[b] for b in logical_at], self.k)
        with torch.no_grad():
            for i, h in enumerate(mb.heads):
                if self.stacked:
                    h.weight.copy_(self.head_weight[slot[i]])
                    h.bias.copy_(self.head_bias[slot[i]])
                else:
                    h.load_state_dict(self.heads[i].state_dict())
        for p in mb.parameters():
            p.requires_grad_(True)
        return mb

    def load_single_branch(self, state: dict) -> None:
        mb = self.to_multibranch()
        mb.load_single_branch(state)
        self.load_state_dict(BatchedMultiBranchNet(mb).state_dict())
