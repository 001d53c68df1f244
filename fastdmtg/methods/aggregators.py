r"""Gradient aggregation: PCGrad, MGDA, CAGrad, Nash-MTL, IMTL-G, Aligned-MTL, UPGrad — the
aggregators of torchjd (``pip install 'fastdmtg[aggregators]'``) applied to the per-task gradients of
the shared parameters.

One step: one forward; the heads' losses L_m (m = the active heads (task, branch)); per shared block
(``augment.shared_blocks``: the trunk, each branch) the Jacobian J_b (M_b, P_b) whose row m is
∇_{θ_b} L_m (one backward pass per head, over all shared parameters at once); the block's gradient is
A(J_b) for the aggregator A (a block reached by one head only: that head's gradient, nothing to
aggregate); the task heads get ∂ Σ z·L / ∂ head (their own gradients). Cost: M + 1
backward passes (M = N for naive MTL) and a J of M × (shared parameters) floats.

torchjd's own ``autojac.mtl_backward`` was evaluated and not used: it needs the last shared
representation as a tensor (our models do not expose it) and handles one level of sharing, not a
trunk shared by K branches; ``torchjd.aggregation`` is used as it is, on our Jacobians.

The aggregators (torchjd 0.18, each the algorithm of its paper; docs/baselines.md):
    pcgrad      PCGrad (Yu et al. 2020): each g_i projected off every g_j it conflicts with (g_i·g_j < 0),
                j in a random order per i; the sum of the projected gradients
    mgda        MGDA-UB's min-norm point of the gradients' convex hull (Sener and Koltun 2018), Frank-Wolfe
    cagrad      CAGrad (Liu et al. 2021), c = aggregation.cagrad_c; cvxpy + clarabel
    nash-mtl    Nash-MTL (Navon et al. 2022); cvxpy + ecos; its solver warm start is not checkpointed
    imtl        IMTL-G (Liu et al. 2021)
    aligned-mtl Aligned-MTL (Senushkin et al. 2023), scale "min"
    upgrad      UPGrad (Quinton and Rey 2024); qpsolvers + quadprog
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configcheck import check
from . import StepBackward
from .augment import head_params, per_head_losses, shared_blocks

INSTALL = "pip install 'fastdmtg[aggregators]'"
# the torchjd aggregators, in the order of listings (train.aggregator / grouping.method names)
NAMES = ("pcgrad", "mgda", "cagrad", "nash-mtl", "imtl", "aligned-mtl", "upgrad")


@dataclass
class AggregationConfig:
    """The torchjd aggregators' hyper-parameters (grouping.method=cagrad | nash-mtl, or train.aggregator)."""
    cagrad_c: float = 0.4               # CAGrad's ball radius scale c (the CAGrad paper's image-MTL value)
    nash_max_norm: float = 1.0          # Nash-MTL: clip ‖Jᵀw‖ to this (0: off); the paper's code default
    nash_update_every: int = 1          # Nash-MTL: solve for new weights every this many steps

    def __post_init__(self):
        check(self.cagrad_c >= 0, f"aggregation.cagrad_c must be >= 0, got {self.cagrad_c}")
        check(self.nash_max_norm >= 0, f"aggregation.nash_max_norm must be >= 0, got {self.nash_max_norm}")
        check(self.nash_update_every >= 1, f"aggregation.nash_update_every must be >= 1, got {self.nash_update_every}")


def make_aggregator(name: str, cfg, num_rows: int):
    """The torchjd aggregator ``name`` for Jacobians of ``num_rows`` rows; a missing torchjd (or one of
    an aggregator's solver packages) is a ValueError naming the install command (the CLI: one line,
    exit 2)."""
    try:
        from torchjd import aggregation as A
    except ImportError:
        raise ValueError(f"{name} needs torchjd, which is not installed: {INSTALL}") from None
    a = cfg.aggregation
    build = {"pcgrad": lambda: A.PCGrad(), "mgda": lambda: A.MGDA(), "cagrad": lambda: A.CAGrad(c=a.cagrad_c),
             "nash-mtl": lambda: A.NashMTL(n_tasks=num_rows, max_norm=a.nash_max_norm,
                                           update_weights_every=a.nash_update_every),
             "imtl": lambda: A.IMTLG(), "aligned-mtl": lambda: A.AlignedMTL(), "upgrad": lambda: A.UPGrad()}
    try:
        return build[name]()
    except ImportError as e:          # a solver package (cvxpy, quadprog, …) missing
        raise ValueError(f"{name}: {e} (or {INSTALL})") from None


class JacobianAggregation(StepBackward):
    """The per-task gradients of each shared block, aggregated by a torchjd aggregator."""
    order = 2
    config_section = ("aggregation", AggregationConfig)   # its own section of the config (fastdmtg.config gathers it)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return NAMES

    def __init__(self, name: str, cfg):
        super().__init__()
        self.name = name
        self._cfg = cfg
        make_aggregator(name, cfg, 2)         # fail now (missing torchjd / solver), not at the first step
        self.blocks: list = []
        self.aggregators: list = []           # one per block (Nash-MTL keeps per-block solver state)
        self.last = None                      # the most recent [(J_b, aggregated)] (tests, debugging)

    @classmethod
    def from_config(cls, name, cfg, num_tasks: int, num_branches: int) -> "JacobianAggregation":
        return cls(name, cfg)

    def bind(self, model, taskset, z: torch.Tensor) -> None:
        self.blocks = shared_blocks(model, z)
        self.heads = sorted({h for b in self.blocks for h in b.heads})
        self.head_params = head_params(model)
        # a block reached by one head has nothing to aggregate: it keeps that head's gradient (and
        # torchjd's Nash-MTL cannot solve a one-task problem)
        self.aggregators = [make_aggregator(self.name, self._cfg, len(b.heads)) if len(b.heads) > 1 else None
                            for b in self.blocks]

    def forward(self, step, batch: dict):
        z = step.method.weights()                                              # (N, K) 0/1
        outputs = step.outputs(batch)
        total, L = step.losses(outputs, batch, z)
        # the heads: their own gradients, from the weighted total (only the heads' part of the graph)
        grads = torch.autograd.grad(total, self.head_params, retain_graph=True, allow_unused=True)
        for p, g in zip(self.head_params, grads):
            p.grad = g
        losses = per_head_losses(step, outputs, batch, self.heads, z.shape)
        shared = [p for b in self.blocks for p in b.params]
        rows = {}
        for h, loss in zip(self.heads, losses):
            # the graph is kept for the next head's pass and freed by the last one (not held while the
            # aggregator solves)
            g = torch.autograd.grad(loss, shared, retain_graph=loss is not losses[-1], allow_unused=True)
            rows[h] = {id(p): (torch.zeros_like(p) if gi is None else gi) for p, gi in zip(shared, g)}
        record = []
        for block, agg in zip(self.blocks, self.aggregators):
            J = torch.stack([torch.cat([rows[h][id(p)].reshape(-1) for p in block.params])
                             for h in block.heads])                           # (M_b, P_b)
            v = agg(J) if agg is not None else J[0]                            # (P_b,)
            record.append((J, v))
            off = 0
            for p in block.params:
                n = p.numel()
                p.grad = v[off:off + n].view_as(p).to(p.dtype)
                off += n
        self.last = record
        return total.detach(), L


AUGMENTATION = JacobianAggregation
