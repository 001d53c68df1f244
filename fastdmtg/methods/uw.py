r"""Uncertainty weighting (UW; Kendall, Gal and Cipolla, CVPR 2018), a loss weighting.

Each head (task i on branch k) has a learned log-variance s_ik = log σ²_ik (init 0: σ = 1), trained by
the run's optimizer with the network. The step minimises

    uw.form=paper    Σ_ik z_ik · ( c_i · exp(−s_ik) · L_ik + s_ik / 2 ),
                     c_i = 1 for a classification loss (the paper's eq. 10: 1/σ² · L + log σ),
                     c_i = ½ for a regression loss (eq. 7: 1/(2σ²) · L + log σ)
    uw.form=uniform  Σ_ik z_ik · ( exp(−s_ik) · L_ik + s_ik )     (what most implementations write)

Gradients: ∂/∂s = z·(−c·exp(−s)·L + ½) (paper) — the optimum exp(s) = 2c·L tracks the loss scale;
the network gets Σ z·c·exp(−s)·L. The logged training loss stays Σ z·L (unweighted).
One forward and one backward per step, as naive MTL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configcheck import check
from . import StepBackward
from .augment import CLASSIFICATION_KINDS, active_heads, task_kinds


@dataclass
class UWConfig:
    """Uncertainty weighting (Kendall et al. 2018; grouping.method=uw or train.aggregator=uw)."""
    # paper = eq. (7)/(10) with s = log σ²: classification exp(−s)·L + s/2, regression ½·exp(−s)·L + s/2;
    # uniform = exp(−s)·L + s for every task (the form most implementations use)
    form: str = "paper"                 # paper | uniform

    def __post_init__(self):
        check(self.form in ("paper", "uniform"), f"uw.form: expected paper|uniform, got {self.form!r}")


class UncertaintyWeighting(StepBackward):
    name = "uw"
    order = 0
    config_section = ("uw", UWConfig)   # its own section of the config (fastdmtg.config gathers it)

    def __init__(self, num_tasks: int, num_branches: int, form: str = "paper"):
        super().__init__()
        self.form = form
        self.log_var = nn.Parameter(torch.zeros(num_tasks, num_branches))      # s (N, K)
        self.register_buffer("factor", torch.ones(num_tasks, 1))               # c (N, 1)

    @classmethod
    def from_config(cls, name, cfg, num_tasks: int, num_branches: int) -> "UncertaintyWeighting":
        return cls(num_tasks, num_branches, cfg.uw.form)

    def bind(self, model, taskset, z: torch.Tensor) -> None:
        active_heads(z)                                   # 0/1 weights, else a clear error
        if self.form == "paper":
            c = [1.0 if k in CLASSIFICATION_KINDS else 0.5 for k in task_kinds(taskset)]
            self.factor.copy_(torch.tensor(c, dtype=self.factor.dtype).view(-1, 1))

    def forward(self, step, batch: dict):
        z = step.method.weights()                                              # (N, K) 0/1
        outputs = step.outputs(batch)
        s = self.log_var
        scale = self.factor * torch.exp(-s) if self.form == "paper" else torch.exp(-s)   # (N, K)
        reg = 0.5 * s if self.form == "paper" else s
        # Σ z·scale·L through the tasks' own (fused) losses, + the log-variance term
        weighted, L = step.losses(outputs, batch, z * scale)
        (weighted + (z * reg).sum()).backward()
        return (z * L).sum(), L

    def results(self) -> dict:
        return {"name": self.name, "form": self.form, "log_var": self.log_var.detach().cpu().tolist()}


AUGMENTATION = UncertaintyWeighting
