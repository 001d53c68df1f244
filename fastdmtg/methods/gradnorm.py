r"""GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018), a loss weighting.

Per branch k (its tasks T_k: the heads with z_ik = 1; K = 1: all N tasks), weights w_ik (init 1) and W
= the branch's last shared layer of weights (``augment.last_layer``). One step t:

    L(t)       = Σ_i w_i · L_i                          (the network's loss; w enters as a constant)
    G_i        = ‖∇_W w_i L_i‖₂ = w_i · ‖∇_W L_i‖₂,     Ḡ = mean_{T_k} G_i
    L̃_i        = L_i(t) / L_i(0),                       r_i = L̃_i / mean_{T_k} L̃_j
    L_grad     = Σ_i | G_i − Ḡ · r_i^α |                (the target Ḡ·r_i^α held constant)
    ∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) · ‖∇_W L_i‖₂     → w's gradient (the run's optimizer steps it)

and before each step the weights are renormalised so that Σ_{T_k} w_ik = |T_k| (the paper renormalises
after the update: the same values, since nothing reads w in between). L_i(0) is the loss of the
run's first step (checkpointed). α = gradnorm.alpha (the paper: 0.12–3; the TAG paper searches
{0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0}). Cost: one forward, N backward passes down to W only (through
the heads and W's layer), one full backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configcheck import check
from . import StepBackward
from .augment import active_heads, last_layer, per_head_losses, shared_blocks


@dataclass
class GradNormConfig:
    """GradNorm (Chen et al. 2018; grouping.method=gradnorm or train.aggregator=gradnorm)."""
    # the restoring-force asymmetry α; the TAG paper searches {0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0}
    alpha: float = 1.5

    def __post_init__(self):
        check(self.alpha >= 0, f"gradnorm.alpha must be >= 0, got {self.alpha}")


class GradNorm(StepBackward):
    name = "gradnorm"
    order = 1
    config_section = ("gradnorm", GradNormConfig)   # its own section of the config (fastdmtg.config gathers it)

    def __init__(self, num_tasks: int, num_branches: int, alpha: float = 1.5):
        super().__init__()
        self.alpha = float(alpha)
        self.weight = nn.Parameter(torch.ones(num_tasks, num_branches))        # w (N, K)
        self.register_buffer("initial_loss", torch.zeros(num_tasks, num_branches))   # L(0) (N, K)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.layers: list = []           # per branch: (W, heads) — set by bind (not state)
        self._mask = None                # the method's (N, K) 0/1 weights — set by bind
        self.last = None                 # the most recent {G, target, r} (tests, debugging)

    @classmethod
    def from_config(cls, name, cfg, num_tasks: int, num_branches: int) -> "GradNorm":
        return cls(num_tasks, num_branches, cfg.gradnorm.alpha)

    def bind(self, model, taskset, z: torch.Tensor) -> None:
        heads = active_heads(z)
        # W per branch: the branch's last layer; with a trunk and K = 1 the branch is still the last
        # shared part. A branch with no parameters of its own uses the trunk's last layer.
        self.layers = []
        for b in range(z.shape[1]):
            on = [h for h in heads if h[1] == b]
            if not on:
                continue
            params = [p for p in model.branches[b].parameters() if p.requires_grad] or \
                     [p for p in model.shared.parameters() if p.requires_grad]
            self.layers.append((last_layer(params), on))
        self._mask = z.detach().clone()
        shared_blocks(model, z)          # the same model checks as the aggregators

    @torch.no_grad()
    def renormalise(self) -> None:
        """Σ over each branch's tasks of w = the number of its tasks."""
        w, m = self.weight, self._mask.to(self.weight.device)
        count = m.sum(0, keepdim=True)                                         # (1, K)
        total = (w * m).sum(0, keepdim=True)
        w.copy_(torch.where(m > 0, w * count / total.clamp_min(1e-12), w))

    def weight_gradient(self, losses: torch.Tensor, norms: torch.Tensor, heads) -> torch.Tensor:
        """∂L_grad/∂w (N, K) from the heads' losses L_i(t) and ‖∇_W L_i‖ (both (M,), ``heads`` order),
        per branch; also records G, the targets and r in ``self.last``."""
        grad = torch.zeros_like(self.weight)
        rec = {"G": {}, "target": {}, "r": {}}
        for _, on in self.layers:
            idx = [heads.index(h) for h in on]
            ii = torch.tensor([h[0] for h in on]); kk = torch.tensor([h[1] for h in on])
            w = self.weight.detach()[ii, kk]
            g = w * norms[idx]                                                 # G_i
            ratio = losses[idx] / self.initial_loss[ii, kk]                    # L̃_i
            r = ratio / ratio.mean()
            target = g.mean() * r ** self.alpha
            grad[ii, kk] = torch.sign(g - target) * norms[idx]
            for j, h in enumerate(on):
                rec["G"][h], rec["target"][h], rec["r"][h] = float(g[j]), float(target[j]), float(r[j])
        self.last = rec
        return grad

    def forward(self, step, batch: dict):
        z = step.method.weights()                                              # (N, K) 0/1
        self.renormalise()
        outputs = step.outputs(batch)
        heads = [h for _, on in self.layers for h in on]
        losses = per_head_losses(step, outputs, batch, heads, z.shape)        # M differentiable L_i
        norms = []
        for (W, on) in self.layers:
            for h in on:
                g, = torch.autograd.grad(losses[heads.index(h)], W, retain_graph=True)
                norms.append(g.norm())
        norms = torch.stack(norms).detach()                                    # ‖∇_W L_i‖ (M,)
        values = torch.stack(losses).detach()                                  # L_i(t) (M,)
        if not bool(self.started):
            with torch.no_grad():
                for j, (i, b) in enumerate(heads):
                    self.initial_loss[i, b] = values[j]
                self.started.fill_(True)
        self.weight.grad = self.weight_gradient(values, norms, heads)
        w = self.weight.detach()
        weighted, L = step.losses(outputs, batch, z * w)                      # Σ z·w·L, w constant
        weighted.backward()
        return (z * L).sum(), L

    def results(self) -> dict:
        self.renormalise()                       # the weights the next step would use
        return {"name": self.name, "alpha": self.alpha, "weight": self.weight.detach().cpu().tolist(),
                "initial_loss": self.initial_loss.cpu().tolist()}


AUGMENTATION = GradNorm
