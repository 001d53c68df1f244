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
resumed run continues the exact noise sequence.
"""
from __future__ import annotations

import torch
from torch import nn

from . import GroupingMethod


class DMTG(GroupingMethod):
    name = "dmtg"

    def __init__(self, num_tasks: int, num_branches: int, gcfg, seed: int = 0):
        super().__init__(num_tasks, num_branches)
        self.gcfg = gcfg
        self.logits = nn.Parameter(torch.full((num_tasks, num_branches), float(gcfg.init_logit)))  # S (N, K)
        self.register_buffer("seed", torch.tensor(int(seed) * 7_919 + 17, dtype=torch.long))
        self.register_buffer("tau", torch.tensor(self.tau_at(0), dtype=torch.float32))
        self.seed_offset = 0   # DDP: rank r draws from seed + r·2^40 (its own noise, one shared seed state)

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "DMTG":
        return cls(num_tasks, cfg.model.branches, cfg.grouping, seed=cfg.train.seed)

    def tau_at(self, epoch: int) -> float:
        g = self.gcfg
        if g.tau_schedule == "anneal":
            return max(g.tau_end, g.tau_start * g.tau_decay ** epoch)
        return g.tau

    def on_epoch_start(self, epoch: int) -> None:
        self.tau.fill_(self.tau_at(epoch))

    def weights(self, step: int) -> torch.Tensor:
        from .. import ops
        seed = self.seed + self.seed_offset if self.seed_offset else self.seed
        z = ops.gumbel_softmax_mask(self.logits, self.tau, seed, hard=self.gcfg.hard)        # (N, K)
        self.seed.add_(1)   # in place, on device: the next step (or graph replay) draws new noise
        return z

    def assignment(self) -> torch.Tensor:
        return self.logits.detach().argmax(dim=1)                             # (N,)

    def probabilities(self) -> torch.Tensor:
        """softmax(S) over K (N, K), the noiseless assignment probabilities that are logged."""
        return torch.softmax(self.logits.detach().float(), dim=1)

    def log_scalars(self) -> dict[str, float]:
        return {"grouping/tau": float(self.tau)}
