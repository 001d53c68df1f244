"""Architecture containers for grouping: K encoder branches feeding K·N task heads, and the pruned
grouped model. Architecture only — no losses, no training logic.

    x ──shared──▶ f ──branch_k──▶ h_k ──heads_k──▶ task outputs of branch k,  k = 1..K

* ``MultiBranchNet``: the DMTG training network. All K branches (and their head sets) start as
  identical deep copies of one prototype; the Gumbel noise of the grouping breaks the symmetry.
* ``GroupedNet``: after pruning, G ≤ K kept branches, each with only the heads of its own tasks;
  predicts all N tasks in the original task order, on its own.

Head sets come in two forms:
* stacked (``LinearHeads``): all N heads are one batched parameter, output one tensor (N, B, C).
  Used by CelebA, where N is up to 40 and looping over N tiny Linear layers would dominate.
* list (``ModuleHeads``): N independent modules, output a list of N tensors (dense decoders).

Optional gradient scaling (Taskonomy reference): identity forward, gradient × s backward, applied
to the shared features before each branch and to each branch's features before its heads.

Precision (``train.amp=mixed``, docs/fidelity.md): task heads — ``LinearHeads`` here, the dense
decoders in ``xception``, the batched heads in ``batched`` — declare ``keep_fp32``; under bf16
autocast they run in fp32 on fp32-cast features (``fp32_heads``), the encoders in bf16.
``fastdmtg.step.set_output_precision`` switches them (off for ``train.amp=bf16``).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def fp32_heads(fn, *xs: torch.Tensor):
    """``fn(*xs)`` in fp32: outside autocast, on fp32-cast inputs, when autocast is on (the task
    heads of the precision policy); a plain call otherwise."""
    dev = xs[0].device.type
    if not torch.is_autocast_enabled(dev):
        return fn(*xs)
    with torch.autocast(device_type=dev, enabled=False):
        return fn(*[x.float() for x in xs])


class FP32Output:
    """Declares a module of the precision policy: while ``keep_fp32`` its output layers run in fp32 under
    bf16 autocast (``fp32_heads``); ``fastdmtg.step.set_output_precision`` switches every such module
    (an instance attribute when switched off). A mixin: ``class Decoder(FP32Output, nn.Sequential)``."""
    keep_fp32: bool = True


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``scale`` backward (no-op when scale == 1)."""
    if scale == 1.0:
        return x
    return _GradScale.apply(x, scale)


class HeadSet(nn.Module):
    """Maps one branch's features to the outputs of a set of tasks."""

    stacked: bool = False

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def select(self, task_idx: list[int]) -> "HeadSet":
        """A new HeadSet holding (copies of) only the heads of ``task_idx``, in that order."""
        raise NotImplementedError


class LinearHeads(FP32Output, HeadSet):
    """N independent Linear(in_features, out_features) heads stored as one (N, out, in) weight.

    Numerically the same as N separate nn.Linear; each head is Xavier-uniform initialised with its
    own fan-in/fan-out and a zero bias, as the reference does."""

    stacked = True
    keep_fp32 = True         # precision policy (module doc); an instance attribute when switched off

    def __init__(self, num_tasks: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_tasks, out_features, in_features))  # (N, C, F)
        self.bias = nn.Parameter(torch.zeros(num_tasks, out_features))                  # (N, C)
        bound = math.sqrt(6.0 / (in_features + out_features))
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_tasks(self) -> int:
        return self.weight.shape[0]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return fp32_heads(self._forward, feats) if self.keep_fp32 else self._forward(feats)

    def _forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.flatten(1)                                              # (B, F)
        # (N, B, C) = (B, F) x (N, C, F)^T  + bias; one batched matmul for all N heads
        return torch.einsum("bf,ncf->nbc", feats, self.weight) + self.bias[:, None, :]

    def select(self, task_idx: list[int]) -> "LinearHeads":
        new = LinearHeads(len(task_idx), self.in_features, self.out_features)
        with torch.no_grad():
            new.weight.copy_(self.weight[task_idx])
            new.bias.copy_(self.bias[task_idx])
        return new.to(self.weight.device)


class ModuleHeads(HeadSet):
    """N independent head modules (e.g. dense decoders), one output tensor per task."""

    stacked = False

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        return [h(feats) for h in self.heads]

    def select(self, task_idx: list[int]) -> "ModuleHeads":
        return ModuleHeads([copy.deepcopy(self.heads[i]) for i in task_idx])


class BranchedNet(nn.Module):
    """The interface of a K-branch training network, whatever its form (``MultiBranchNet``: one
    module per branch; ``BatchedMultiBranchNet``: the K branches as one wider network). The step,
    the trainer and evaluation use only this.

    forward(x) → stacked heads (K, N, B, C) | list heads N × (K, B, ...) (N × (K_i, B, ...) over the
    active heads while pruning, in ``task_branches`` order)."""

    task_branches: tuple | None = None   # per task, its active branches; None while every head is active

    @property
    def num_branches(self) -> int:
        raise NotImplementedError

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def set_active(self, mask: torch.Tensor | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Compute only the heads (i, k) with mask[i, k] (N, K) bool in training mode (None: all).
        ``optimizer``: the optimizer of the parameters, for a form that moves them (its state moves too)."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, assignment: list[int]):
        """The argmax model's predictions in evaluation mode: task i from branch assignment[i]."""
        raise NotImplementedError

    def to_multibranch(self) -> "MultiBranchNet":
        """The per-branch form with the current values (export, GroupedNet)."""
        raise NotImplementedError

    def load_single_branch(self, state: dict) -> None:
        """Initialise every branch (and head set) from a K=1 model's state dict (naive-MTL init)."""
        raise NotImplementedError


class MultiBranchNet(BranchedNet):
    """Optional shared trunk → K identical branches → K head sets of N heads each.

    forward(x) returns, for stacked heads, one tensor (K, N, B, C); for list heads, a list of N
    tensors, each (K, B, ...) — task i's prediction from every branch."""

    def __init__(self, shared: nn.Module, branch: nn.Module, heads: HeadSet, num_branches: int,
                 branch_grad_scale: float = 1.0, head_grad_scale: float = 1.0):
        super().__init__()
        if num_branches < 1:
            raise ValueError(f"num_branches (K) must be >= 1, got {num_branches}")
        self.shared = shared
        # deep copies: identical at initialisation, as in the reference
        self.branches = nn.ModuleList([copy.deepcopy(branch) for _ in range(num_branches)])
        self.heads = nn.ModuleList([copy.deepcopy(heads) for _ in range(num_branches)])
        self.branch_grad_scale = branch_grad_scale
        self.head_grad_scale = head_grad_scale
        self._active = None         # head pruning: None = all heads; else per branch, its active task indices
        self.task_branches = None   # ... and per task, its active branch indices (the order of its outputs)

    def set_active(self, mask: torch.Tensor | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Compute only the heads (i, k) with mask[i, k] (N, K) in *training* mode; a branch with no
        active head is skipped. Evaluation mode always computes every head (same layout as before).
        ``optimizer`` is not needed: the parameters stay where they are.

        Training outputs with some head inactive: stacked heads → (K, N, B, C) as before, every head
        of an active branch computed (they are cheap) and zeros for skipped branches; list heads →
        N tensors (K_i, B, ...) holding only task i's active heads, in ``task_branches[i]`` order."""
        if mask is None or bool(mask.all()):
            self._active = self.task_branches = None
            return
        m = mask.detach().cpu().bool()
        n, k = self.num_tasks, self.num_branches
        if tuple(m.shape) != (n, k):
            raise ValueError(f"active mask must be (N, K)=({n}, {k}), got {tuple(m.shape)}")
        if not bool(m.any(1).all()):
            raise ValueError("every task needs at least one active head")
        self._active = tuple(tuple(i for i in range(n) if m[i, b]) for b in range(k))
        self.task_branches = tuple(tuple(b for b in range(k) if m[i, b]) for i in range(n))

    def _forward_active(self, x: torch.Tensor):
        f = self.shared(x)
        act = self._active
        if self.stacked:
            outs = [None] * self.num_branches
            for b, (branch, heads) in enumerate(zip(self.branches, self.heads)):
                if act[b]:
                    h = branch(grad_scale(f, self.branch_grad_scale))
                    outs[b] = heads(grad_scale(h, self.head_grad_scale))
            ref = next(o for o in outs if o is not None)
            return torch.stack([o if o is not None else torch.zeros_like(ref) for o in outs], 0)
        per_task = [[] for _ in range(self.num_tasks)]
        for b, (branch, heads) in enumerate(zip(self.branches, self.heads)):
            if not act[b]:
                continue
            h = grad_scale(branch(grad_scale(f, self.branch_grad_scale)), self.head_grad_scale)
            for i in act[b]:
                per_task[i].append(heads.heads[i](h))
        return [torch.stack(p, 0) for p in per_task]                        # N x (K_i, B, ...)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def num_tasks(self) -> int:
        return self.heads[0].num_tasks

    @property
    def stacked(self) -> bool:
        return self.heads[0].stacked

    def branch_outputs(self, x: torch.Tensor) -> list:
        f = self.shared(x)
        outs = []
        for branch, heads in zip(self.branches, self.heads):
            h = branch(grad_scale(f, self.branch_grad_scale))
            outs.append(heads(grad_scale(h, self.head_grad_scale)))
        return outs

    def forward(self, x: torch.Tensor):
        if self._active is not None and self.training:
            return self._forward_active(x)
        outs = self.branch_outputs(x)
        if self.stacked:
            return torch.stack(outs, 0)                                       # (K, N, B, C)
        return [torch.stack([o[i] for o in outs], 0) for i in range(self.num_tasks)]  # N x (K, B, ...)

    def predict(self, x: torch.Tensor, assignment: list[int]):
        """The argmax model's predictions — the same as ``select_outputs(forward(x), assignment)``
        (evaluation mode), computing only what they need: the branches some task is assigned to,
        and for list heads only each task's assigned head (N decoders instead of K·N)."""
        if self.training:
            raise RuntimeError("predict() is for evaluation mode (model.eval())")
        f = self.shared(x)
        feats = {k: self.branches[k](f) for k in sorted(set(assignment))}
        if self.stacked:
            outs = {k: self.heads[k](h) for k, h in feats.items()}               # (N, B, C) per used branch
            return torch.stack([outs[k][i] for i, k in enumerate(assignment)], 0)  # (N, B, C)
        return [self.heads[k].heads[i](feats[k]) for i, k in enumerate(assignment)]

    def to_multibranch(self) -> "MultiBranchNet":
        return self

    @staticmethod
    def select_outputs(outputs, assignment: torch.Tensor):
        """Pick, for each task i, the prediction of branch assignment[i] (the argmax model)."""
        if isinstance(outputs, torch.Tensor):                                 # (K, N, B, C) -> (N, B, C)
            n = outputs.shape[1]
            return outputs[assignment.to(outputs.device), torch.arange(n, device=outputs.device)]
        return [o[int(assignment[i])] for i, o in enumerate(outputs)]

    def load_single_branch(self, state: dict) -> None:
        """Initialise every branch (and head set) from a K=1 model's state dict (naive-MTL init)."""
        mapped = {}
        for key, val in state.items():
            if key.startswith("branches.0.") or key.startswith("heads.0."):
                top, _, rest = key.split(".", 2)
                for k in range(self.num_branches):
                    mapped[f"{top}.{k}.{rest}"] = val
            elif key.startswith("branches.") or key.startswith("heads."):
                raise ValueError(f"init-from checkpoint has more than one branch (key {key!r}); "
                                 "expected a naive-MTL (K=1) model")
            else:
                mapped[key] = val
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError("init-from checkpoint does not match this architecture: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class GroupedNet(nn.Module):
    """The pruned model: shared trunk → G branches, branch g holding only the heads of its tasks.

    ``groups[g]`` lists the task indices of group g. Outputs are in the original task order: one
    tensor (N, B, C) for stacked heads, else a list of N tensors."""

    def __init__(self, shared: nn.Module, branches: list[nn.Module], heads: list[HeadSet],
                 groups: list[list[int]], num_tasks: int):
        super().__init__()
        covered = sorted(i for g in groups for i in g)
        if covered != list(range(num_tasks)):
            raise ValueError(f"groups must partition tasks 0..{num_tasks - 1} exactly once, got {groups}")
        if not (len(branches) == len(heads) == len(groups)):
            raise ValueError("one branch and one head set per group")
        self.shared = shared
        self.branches = nn.ModuleList(branches)
        self.heads = nn.ModuleList(heads)
        self.groups = [list(g) for g in groups]
        self.num_tasks = num_tasks
        self.stacked = heads[0].stacked
        order = [i for g in groups for i in g]
        # position of task i in the concatenation of group outputs
        self.register_buffer("_inverse", torch.argsort(torch.tensor(order)), persistent=False)
        # the same permutation as Python ints for the list form: no device sync per task, and a graph
        # export (torch.export / ONNX) sees a fixed order instead of values read from a tensor
        self._inverse_list = self._inverse.tolist()

    def forward(self, x: torch.Tensor):
        f = self.shared(x)
        per_group = [heads(branch(f)) for branch, heads in zip(self.branches, self.heads)]
        if self.stacked:
            return torch.cat(per_group, 0)[self._inverse]                    # (N, B, C)
        flat = [o for outs in per_group for o in outs]
        return [flat[j] for j in self._inverse_list]

    @classmethod
    def from_multibranch(cls, model: MultiBranchNet, assignment: list[int]) -> "GroupedNet":
        """Prune: keep each task's argmax head, drop empty branches (copies the weights)."""
        n = model.num_tasks
        if len(assignment) != n:
            raise ValueError(f"assignment has {len(assignment)} entries for {n} tasks")
        used = sorted(set(int(a) for a in assignment))
        groups = [[i for i in range(n) if int(assignment[i]) == k] for k in used]
        return cls(copy.deepcopy(model.shared),
                   [copy.deepcopy(model.branches[k]) for k in used],
                   [model.heads[k].select(g) for k, g in zip(used, groups)],
                   groups, n)
