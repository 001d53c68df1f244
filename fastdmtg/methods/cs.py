r"""CS: the TAG paper's cosine-similarity grouping baseline (Fifty et al. 2021, §5: "grouping tasks by
maximizing inter-task cosine similarity between pairs of gradients"), first stage.

Train all tasks together (naive MTL: one encoder, K = 1, every head weighted 1) and measure, every
``cs.every`` steps, the cosine similarity of the tasks' gradients on the shared parameters θ_s (the
encoder: every parameter but the heads, as TAG's θ_s):

    C[i, j] = g_i · g_j / (‖g_i‖ ‖g_j‖),   g_i = ∇_{θ_s} L_i(X, θ_s, θ_i)   (all of θ_s flattened)

at the parameters the measured step starts from, on that step's batch — TAG's measurement path
(``tag.task_gradients`` on TAG's pre-step snapshot; fp32, batch-statistics BN on copies of the running
buffers), without the lookahead. A task with a zero gradient has similarity 0 to every other.
C is averaged over the run's measurements (``extra_results``: ``cs_similarity``) and the groups are
chosen by TAG's selection (fastdmtg.grouping_search.tag_select) with C in place of TAG's affinity.
Cost per measurement: 1 forward and N backward passes of the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configcheck import check
from .tag import TagAffinity, task_gradients


@dataclass
class CSConfig:
    """The TAG paper's cosine-similarity grouping baseline (grouping.method=cs-affinity): the
    measurement run (fastdmtg/methods/cs.py)."""
    every: int = 10                     # steps between measurements of the task gradients' cosines

    def __post_init__(self):
        check(self.every >= 1, f"cs.every must be >= 1, got {self.every}")


def gradient_cosine(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    """C (N, N) float64 from per-task gradient lists (task i: the tensors of θ_s)."""
    G = torch.stack([torch.cat([g.reshape(-1) for g in gi]).double() for gi in grads])   # (N, P)
    norms = G.norm(dim=1)
    unit = G / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return unit @ unit.T


class GradientCosine(TagAffinity):
    name = "cs-affinity"
    order = 5
    config_section = ("cs", CSConfig)   # its own section of the config (fastdmtg.config gathers it)

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "GradientCosine":
        return cls(num_tasks, cfg.cs.every, kernels=cfg.train.kernels)

    def measure(self, model, snap: dict, batch: dict, taskset) -> torch.Tensor:
        _, grads = task_gradients(model, snap, batch, taskset, kernels=self.kernels)
        return gradient_cosine(grads)

    def extra_results(self, totals=None) -> dict:
        C = self.affinity()
        count = int((self._latest or (None, self.affinity_count))[1])
        return {"cs_similarity": None if C is None else C.cpu().tolist(),
                "cs_measurements": count, "cs_every": self.every}


METHOD = GradientCosine
