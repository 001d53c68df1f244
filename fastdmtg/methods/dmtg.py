r"""DMTG: one-shot differentiable multi-task grouping (Gao et al., ICML 2024).

Grouping logits S ∈ R^{N×K} (initialised to 1.0 everywhere, trained by the same optimizer and
learning rate as the network). Every training step draws ONE Gumbel-softmax sample shared by the
whole batch:

    U ~ Uniform(0, 1)^{N×K},   g = −log(−log U)                      (Gumbel(0, 1) noise)
    Z̃[i, k] = exp((S[i,k] + g[i,k]) / τ) / Σ_m exp((S[i,m] + g[i,m]) / τ)   (softmax over K)

and the training loss is  Σ_{i,k} Z̃[i,k] · L[i,k]  with L[i,k] the batch-mean loss of task i's head
on branch k (no 1/N or 1/K factor). Gradient w.r.t. S:

    ∂loss/∂S[i,k] = Z̃[i,k] (L[i,k] − Σ_m Z̃[i,m] L[i,m]) / τ

so each task's logits move towards the branch where its loss is below its current weighted average.
τ is constant by default (CelebA 2.5, Taskonomy 4) or annealed per epoch:
τ_e = max(τ_end, τ_start · decay^e) (the paper's Table A3 schedules).

Evaluation and the final grouping use the one-hot argmax of S (no noise); the noise is drawn from a
device-side seed tensor incremented in place every step, so CUDA-graph replays get fresh noise and a
resumed run continues the exact noise sequence. Under DDP every rank draws the same sample by default
(``dmtg.ddp_noise=shared``, the release), or its own (``per_rank``): ``set_rank``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configcheck import check
from . import GroupingMethod, HeadsPruned, RunTotals, StepContext


@dataclass
class DMTGConfig:
    """DMTG (grouping.method=dmtg): the Gumbel-softmax relaxation of the N×K logits S and head pruning."""
    tau: float = 2.5                    # constant Gumbel-softmax temperature
    tau_schedule: str = "constant"      # constant | anneal  (tau_e = max(tau_end, tau_start * tau_decay**epoch))
    tau_start: float = 100.0
    tau_end: float = 4.0
    tau_decay: float = 0.5
    init_logit: float = 1.0             # S initial value (reference: exactly 1.0 everywhere)
    hard: bool = False                  # straight-through one-hot samples (reference: soft)
    prune_eps: float = 0.0              # head pruning (docs/pruning.md): drop head (i,k) once its
    prune_patience: int = 100           # probability stayed < prune_eps for prune_patience steps; 0 = off
    # DDP: shared = every rank draws the same Gumbel sample (one draw per global step, the release: all
    # ranks seeded alike); per_rank = rank r draws its own (seed offset r·2^40)
    ddp_noise: str = "shared"           # shared | per_rank

    def __post_init__(self):
        check(0.0 <= self.prune_eps < 1.0, f"dmtg.prune_eps must be in [0, 1), got {self.prune_eps}")
        check(self.prune_patience >= 1, f"dmtg.prune_patience must be >= 1, got {self.prune_patience}")
        if self.prune_eps > 0:
            check(not self.hard, "dmtg.prune_eps > 0 is not supported with dmtg.hard=true")
        check(self.tau > 0, f"dmtg.tau must be > 0, got {self.tau}")
        check(self.ddp_noise in ("shared", "per_rank"),
               f"dmtg.ddp_noise: expected shared|per_rank, got {self.ddp_noise!r}")
        check(self.tau_schedule in ("constant", "anneal"),
               f"dmtg.tau_schedule: expected constant|anneal, got {self.tau_schedule!r}")
        if self.tau_schedule == "anneal":
            check(self.tau_start > 0 and self.tau_end > 0, "dmtg.tau_start/tau_end must be > 0")
            check(0 < self.tau_decay <= 1, f"dmtg.tau_decay must be in (0, 1], got {self.tau_decay}")

    def check_config(self, cfg) -> None:
        """The rule across sections: head pruning is DMTG's."""
        method = cfg.grouping.method
        if self.prune_eps > 0:
            check(method == "dmtg", f"dmtg.prune_eps > 0 (head pruning) needs grouping.method=dmtg, got {method}")

class DMTG(GroupingMethod):
    name = "dmtg"
    order = 0
    config_section = ("dmtg", DMTGConfig)   # its own section of the config (fastdmtg.config gathers it)

    pruning_switch = "dmtg.prune_eps > 0"

    def __init__(self, num_tasks: int, num_branches: int, dcfg: DMTGConfig, seed: int = 0, kernels: str = "auto",
                 task_names: list[str] | None = None):
        super().__init__(num_tasks, num_branches)
        self.dcfg = dcfg
        self.task_names = list(task_names) if task_names else [str(i) for i in range(num_tasks)]  # (records)
        self.kernels = kernels  # the Gumbel mask's backend (train.kernels: auto | triton | reference)
        self.logits = nn.Parameter(torch.full((num_tasks, num_branches), float(dcfg.init_logit)))  # S (N, K)
        self.register_buffer("seed", torch.tensor(int(seed) * 7_919 + 17, dtype=torch.long))
        self.register_buffer("tau", torch.tensor(self.tau_at(0), dtype=torch.float32))
        self.seed_offset = 0   # DDP, dmtg.ddp_noise=per_rank: rank r draws from seed + r·2^40 (set_rank)
        # head pruning (fastdmtg/methods/dmtg_pruning.py, docs/pruning.md): state buffers exist only when it is on,
        # so runs without it keep the same state dict as before
        self.pruning = dcfg.prune_eps > 0
        self._all_active = True
        if self.pruning:
            n, k = num_tasks, num_branches
            self.register_buffer("prune_active", torch.ones(n, k, dtype=torch.bool))
            self.register_buffer("prune_below", torch.zeros(n, k, dtype=torch.long))
            self.register_buffer("prune_step", torch.full((n, k), -1, dtype=torch.long))
            self.register_buffer("prune_prob", torch.full((n, k), float("nan"), dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "DMTG":
        return cls(num_tasks, cfg.model.branches, cfg.dmtg, seed=cfg.train.seed, kernels=cfg.train.kernels,
                   task_names=task_names)

    @classmethod
    def auto_branches(cls, cfg, num_tasks: int | None) -> int | None:
        """min(3, N): the paper's CelebA-9 / Taskonomy K = 3; fewer tasks get one branch per task at most."""
        return None if num_tasks is None else min(3, num_tasks)

    @classmethod
    def prunes_heads(cls, cfg) -> bool:
        return cfg.dmtg.prune_eps > 0

    def set_rank(self, rank: int) -> None:
        """DDP (dmtg.ddp_noise): ``shared`` — every rank keeps the same seed, so all ranks draw the same
        sample each step (one draw per global step, as the release, whose ranks are all seeded alike);
        ``per_rank`` — rank r offsets the seed by r·2^40 and draws its own sample."""
        per_rank = self.dcfg.ddp_noise == "per_rank"
        self.seed_offset = (int(rank) << 40) if per_rank else 0

    def tau_at(self, epoch: int) -> float:
        g = self.dcfg
        if g.tau_schedule == "anneal":
            return max(g.tau_end, g.tau_start * g.tau_decay ** epoch)
        return g.tau

    def on_epoch_start(self, epoch: int) -> None:
        self.tau.fill_(self.tau_at(epoch))

    def weights(self) -> torch.Tensor:
        from .. import ops
        seed = self.seed + self.seed_offset if self.seed_offset else self.seed
        if self._all_active:
            z = ops.gumbel_softmax_mask(self.logits, self.tau, seed, hard=self.dcfg.hard, backend=self.kernels)  # (N, K)
        else:
            # the same sample restricted to the active heads and renormalised; dropped logits get
            # no gradient (docs/pruning.md for why not "z over all K, term removed")
            a = self.prune_active
            S = torch.where(a, self.logits, self.logits.detach())
            z = ops.gumbel_softmax_mask(S, self.tau, seed, hard=False, backend=self.kernels) * a
            z = z / z.sum(dim=1, keepdim=True).clamp_min(1e-30)
        self.seed.add_(1)   # in place, on device: the next step (or graph replay) draws new noise
        return z

    def assignment(self) -> torch.Tensor:
        if self.pruning and not self._all_active:                             # argmax over active heads
            return self.logits.detach().masked_fill(~self.prune_active, float("-inf")).argmax(dim=1)
        return self.logits.detach().argmax(dim=1)                             # (N,)

    # ------------------------------------------------------------------ head pruning
    def head_mask(self) -> torch.Tensor | None:
        """(N, K) bool of the heads still computed, or None when all are (pruning off or nothing dropped)."""
        return None if self._all_active else self.prune_active

    def _refresh(self) -> None:
        self._all_active = (not self.pruning) or bool(self.prune_active.all())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._refresh()
        return out

    def observe_step(self, ctx: StepContext) -> list:
        """The pruning rule, after every optimizer step, from S and τ only (identical on all DDP ranks)
        → [HeadsPruned] when heads were dropped at this step, else []."""
        if not self.pruning:
            return []
        from .dmtg_pruning import active_probabilities, prune_update
        g = self.dcfg
        probs = active_probabilities(self.logits, float(self.tau), self.prune_active)
        active, below, events = prune_update(probs, self.prune_active, self.prune_below, g.prune_eps,
                                             g.prune_patience)
        self.prune_below.copy_(below.to(self.prune_below.device))
        if not events:
            return []
        step = int(ctx.global_step) + 1                                      # optimizer steps done
        self.prune_active.copy_(active.to(self.prune_active.device))
        for i, k, p in events:
            self.prune_step[i, k] = step
            self.prune_prob[i, k] = p
        self._refresh()
        return [HeadsPruned(step, tuple({"task": i, "branch": k, "step": step, "probability": p}
                                        for i, k, p in events), self.prune_active.clone(),
                            f"< eps={g.prune_eps:g} for {g.prune_patience} steps")]

    def prune_events(self) -> list[dict]:
        if not self.pruning:
            return []
        st, pr = self.prune_step.cpu(), self.prune_prob.cpu()
        ev = [{"task": i, "branch": k, "step": int(st[i, k]), "probability": float(pr[i, k])}
              for i in range(st.shape[0]) for k in range(st.shape[1]) if int(st[i, k]) >= 0]
        return sorted(ev, key=lambda e: (e["step"], e["task"], e["branch"]))

    def _named_events(self) -> list[dict]:
        return [dict(e, task_name=self.task_names[e["task"]]) for e in self.prune_events()]

    def epoch_record(self, first_step: int, last_step: int) -> dict:
        """With pruning: the heads dropped in the epoch (from the checkpointed state: exact across a
        resume) and the number of heads still computed."""
        if not self.pruning:
            return {}
        return {"pruned": [e for e in self._named_events() if first_step < e["step"] <= last_step],
                "active_heads": int(self.prune_active.sum())}

    def extra_results(self, totals: RunTotals | None = None) -> dict:
        """With pruning: results.json's ``pruning`` — the rule, every drop, the final mask, and the
        steps each head and branch was computed (docs/pruning.md)."""
        if not self.pruning:
            return {}
        from .dmtg_pruning import branch_steps, head_steps
        total = totals.total_steps if totals is not None else 0
        hs = head_steps(self.prune_step, total)
        return {"pruning": {
            "eps": self.dcfg.prune_eps, "patience": self.dcfg.prune_patience, "events": self._named_events(),
            "ddp_checked_drop_steps": totals.ddp_checked_decisions if totals is not None else 0,
            "active": self.prune_active.cpu().tolist(), "total_steps": total, "head_steps": hs.tolist(),
            "branch_steps": branch_steps(self.prune_step, total).tolist(),
            "head_step_fraction": float(hs.sum()) / max(hs.numel() * total, 1)}}

    def probabilities(self) -> torch.Tensor:
        """softmax(S) over K (N, K), the noiseless assignment probabilities that are logged."""
        return torch.softmax(self.logits.detach().float(), dim=1)

    def log_scalars(self) -> dict[str, float]:
        return {"grouping/tau": float(self.tau)}


METHOD = DMTG
