r"""Progressive head pruning for heavy heads (issue 8; see docs/pruning.md).

DMTG trains all K·N heads although, at the end, each task keeps one. With ``dmtg.prune_eps`` = ε > 0
a head (i, k) whose assignment probability stays below ε for ``dmtg.prune_patience`` consecutive
optimizer steps is dropped from the forward and backward pass for the rest of training; a branch is
dropped once no task has an active head on it. The rule (pure, host-side, deterministic):

    after every optimizer step t (1-based count of steps done), with S the grouping logits *after* the
    step and τ the current temperature:
        p[i, k] = softmax_{m active for i}(S[i, m] / τ)[k]        (0 for dropped heads)
        below[i, k] = below[i, k] + 1  if p[i, k] < ε  else 0      (active heads only)
        drop (i, k) at step t  if below[i, k] >= patience,
        except that a task never loses its last active head: if every active head of task i qualifies,
        the one with the highest p (lowest k on ties) is kept.

Before any drop p is exactly softmax(S / τ) (the noiseless counterpart of the Gumbel-softmax weights).
The decision depends on S and τ only — no batch data, no rank-local state — and S is all-reduced
under DDP, so every rank drops the same heads at the same step.

Loss with dropped heads: z is the same Gumbel-softmax sample, restricted to the active heads and
renormalised (z'[i,k] = z[i,k]·a[i,k] / Σ_m z[i,m]·a[i,m]), which is exactly the Gumbel-softmax over
the active heads' logits with the same noise; the dropped logits get no gradient (they are detached).
Why not "drop the term, keep z over all K": a removed term acts as a zero-loss branch —
∂/∂S[i,k] = z[i,k](0 − Σ_m z[i,m]L[i,m])/τ < 0 — so the optimizer would pull a dropped head's logit *up*
(and Adam normalises away how small that gradient is), until the dropped head wins the argmax.
"""
from __future__ import annotations

import torch


def active_probabilities(S: torch.Tensor, tau: float, active: torch.Tensor) -> torch.Tensor:
    """p (N, K) float64: softmax of S/τ over each task's active heads, 0 at dropped heads."""
    x = S.detach().double().cpu() / float(tau)
    a = active.cpu().bool()
    x = x.masked_fill(~a, float("-inf"))
    return torch.softmax(x, dim=1).masked_fill(~a, 0.0)


def prune_update(probs: torch.Tensor, active: torch.Tensor, below: torch.Tensor, eps: float,
                 patience: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, float]]]:
    """One application of the rule. probs (N, K), active (N, K) bool, below (N, K) int64 counters.

    Returns (new active, new below, events [(task, branch, probability)] in (task, branch) order).
    The inputs are not modified."""
    probs = probs.detach().double().cpu()
    active = active.cpu().bool().clone()
    below = below.cpu().long().clone()
    low = (probs < eps) & active
    below = torch.where(active, torch.where(low, below + 1, torch.zeros_like(below)), below)
    cand = active & (below >= patience)
    events = []
    n, k = probs.shape
    for i in range(n):
        if not cand[i].any():
            continue
        if bool((cand[i] == active[i]).all()):              # every active head qualifies: keep the best one
            pa = probs[i].masked_fill(~active[i], float("-inf"))
            keep = int(torch.argmax(pa))                    # first maximum: lowest k on ties
            cand[i, keep] = False
        for j in range(k):
            if cand[i, j]:
                events.append((i, j, float(probs[i, j])))
    return active & ~cand, below, events


def branch_alive(active: torch.Tensor) -> torch.Tensor:
    """(K,) bool: a branch is computed while at least one task can still choose it."""
    return active.bool().any(0)


# ------------------------------------------------------------------------------ FLOPs accounting
def head_steps(drop_step: torch.Tensor, total_steps: int) -> torch.Tensor:
    """(N, K) number of training steps each head was computed: drop_step (−1 = never dropped)
    means the head ran in steps 1..drop_step (the drop happens after that step's update)."""
    d = drop_step.cpu().long()
    return torch.where(d < 0, torch.full_like(d, total_steps), d.clamp(max=total_steps))


def branch_steps(drop_step: torch.Tensor, total_steps: int) -> torch.Tensor:
    """(K,) steps each branch ran: until its last head was dropped."""
    return head_steps(drop_step, total_steps).max(0).values


def module_flops(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Forward FLOPs (torch counting, 2 per MAC) of ``module(x)`` and its output."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        y = module(x)
    return fc.get_total_flops(), y


def per_part_flops(model, image_size: int) -> dict:
    """Forward FLOPs per sample of the shared trunk, one branch, and each head (N,) of a
    MultiBranchNet (all branches and head sets are copies of one prototype)."""
    was = model.training
    model.eval()
    x = torch.rand(1, 3, image_size, image_size, device=next(model.parameters()).device)
    shared, f = module_flops(model.shared, x)
    branch, h = module_flops(model.branches[0], f)
    heads0 = model.heads[0]
    if heads0.stacked:
        total, _ = module_flops(heads0, h)
        per_head = [total / heads0.num_tasks] * heads0.num_tasks
    else:
        per_head = [module_flops(m, h)[0] for m in heads0.heads]
    model.train(was)
    return {"shared": shared, "branch": branch, "heads": per_head}


def training_flops(parts: dict, drop_step: torch.Tensor, total_steps: int, batch_size: int,
                   backward_factor: float = 3.0) -> dict:
    """Training FLOPs over the schedule (forward × ``backward_factor`` for forward + backward),
    with the active set of every step, vs the same schedule without pruning."""
    hs = head_steps(drop_step, total_steps).double()
    bs = branch_steps(drop_step, total_steps).double()
    n, k = hs.shape
    heads = torch.tensor(parts["heads"], dtype=torch.float64)[:, None]          # (N, 1)
    per_sample = parts["shared"] * total_steps + parts["branch"] * float(bs.sum()) + float((heads * hs).sum())
    full = (parts["shared"] + parts["branch"] * k + float(heads.sum()) * k) * total_steps
    f = backward_factor * batch_size
    return {"pruned": per_sample * f, "full": full * f, "ratio": per_sample / full,
            "head_share": float(heads.sum()) * k / (parts["branch"] * k + float(heads.sum()) * k + parts["shared"])}
