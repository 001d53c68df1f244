r"""TAG inter-task affinity (Fifty et al., NeurIPS 2021), first stage: train all tasks together
(naive MTL: one encoder, K = 1, every head weighted 1) and measure, every
``tag.affinity_every`` steps, the lookahead affinity of every task onto every other:

    Z_{i→j} = 1 − L_j(X, θ_s − Δ_i, θ_j) / L_j(X, θ_s, θ_j)

θ_s = the encoder (``model.shared`` + ``model.branches[0]``: every parameter but the heads), θ_j = task j's head (unchanged by
the lookahead), X = the step's batch, Δ_i = the update the configured optimizer would apply to θ_s
if the gradient were ∇_{θ_s} L_i alone, *with its current state* (Z is not divided by the learning
rate, unlike the reference code — the paper's definition). Δ_i follows torch.optim's update rules
exactly (tests/test_baselines.py checks against a real optimizer step):

    SGD   g = ±∇L_i + wd·θ;  b = μ·b_prev + (1 − dampening)·g  (b = g if no buffer yet);
          d = g + μ·b (nesterov) or b;  Δ = lr·d
    Adam  g = ±∇L_i (+ wd·θ for Adam's L2; AdamW instead decays θ by lr·wd);  t = step + 1;
          m = β1·m_prev + (1 − β1)·g;  v = β2·v_prev + (1 − β2)·g²  (amsgrad: v ← max(v_max, v));
          Δ = (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

so momentum and Adam's moments enter every Δ_i, as in the reference (whose Taskonomy patch
dropped the momentum by mistake).

Exact timing without a pre-step hook: the trainer calls ``observe_step(ctx)`` *after* the optimizer
step. To measure step s with its pre-step state, the method snapshots the model parameters and
the encoder's optimizer state at the end of step s−1 (= the state step s starts from) and, at the
end of step s, evaluates the lookahead from that snapshot on step s's batch. A snapshot is
discarded when an epoch boundary falls in between, so an interrupted-and-resumed run measures the
same steps as an uninterrupted one (except a run stopped mid-epoch, which loses one measurement).

BatchNorm: the lookahead forwards use batch statistics — the same normalisation as the training
loss whose change is measured — on cloned running buffers, so the model's running statistics are
never touched (the reference Taskonomy patch updated them during the lookahead: a bug).
Precision: the lookahead runs in fp32 (autocast off): the loss changes it measures are small.
Cost per measurement: 1 forward, N backward and N forward passes of the encoder.

The affinity is averaged over all measurements of the run (``extra_results``: ``tag_affinity``
with [i][j] = Z_{i→j}); the group selection is in fastdmtg.grouping_search.tag_select.
"""
from __future__ import annotations

from dataclasses import dataclass

import contextlib
import math

import torch
from torch.func import functional_call

from ..configcheck import check
from . import AffinityMeasured, GroupingMethod, StepContext


@dataclass
class TagConfig:
    """TAG's affinity measurement (grouping.method=tag-affinity)."""
    affinity_every: int = 10            # steps between lookahead affinity measurements

    def __post_init__(self):
        check(self.affinity_every >= 1, f"tag.affinity_every must be >= 1, got {self.affinity_every}")


def encoder_param_names(model) -> list[str]:
    """The shared parameters θ_s of a one-branch model: every parameter but the heads' (trunk +
    branch 0 of a MultiBranchNet: ``shared.*``, ``branches.0.*``; ``shared.*``, ``branch.*`` of its
    batched form)."""
    if model.num_branches != 1:
        raise ValueError(f"TAG measures affinity on a one-encoder model; got K={model.num_branches}")
    return [n for n, _ in model.named_parameters() if not n.startswith(("heads.", "head_"))]


def optimizer_kind(optimizer) -> str:
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, torch.optim.Adam):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    raise NotImplementedError(f"TAG lookahead: no update rule for {type(optimizer).__name__} "
                              "(supported: SGD, Adam, AdamW)")


def _scalar(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def snapshot(model, optimizer, names: list[str]) -> dict:
    """Everything the lookahead of the next step needs: all parameters (θ_s and the heads), the
    encoder's optimizer state and hyper-parameters."""
    kind = optimizer_kind(optimizer)
    params = dict(model.named_parameters())
    group_of = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            group_of[id(p)] = g
    hyper, state = {}, {}
    for n in names:
        p = params[n]
        g = group_of[id(p)]
        h = {k: g[k] for k in ("momentum", "dampening", "nesterov", "betas", "eps", "amsgrad",
                               "maximize", "decoupled_weight_decay") if k in g}
        h["lr"], h["weight_decay"] = _scalar(g["lr"]), _scalar(g["weight_decay"])
        hyper[n] = h
        st = optimizer.state.get(p, {})
        state[n] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return {"kind": kind, "names": list(names), "hyper": hyper, "state": state,
            "params": {n: p.detach().clone() for n, p in params.items()}}


def update_direction(kind: str, theta: torch.Tensor, grad: torch.Tensor, state: dict, h: dict) -> torch.Tensor:
    """θ' = θ − Δ for one tensor: the step the optimizer would take with gradient ``grad`` from
    ``state`` (not modified). Mirrors torch.optim's single-tensor implementations."""
    g = -grad if h.get("maximize", False) else grad
    lr, wd = h["lr"], h["weight_decay"]
    if kind == "sgd":
        if wd:
            g = g + wd * theta
        mu = h.get("momentum", 0.0)
        if mu:
            buf = state.get("momentum_buffer")
            b = g if buf is None else mu * buf + (1.0 - h.get("dampening", 0.0)) * g
            g = g + mu * b if h.get("nesterov", False) else b
        return theta - lr * g
    # adam / adamw
    beta1, beta2 = h["betas"]
    decoupled = kind == "adamw" or h.get("decoupled_weight_decay", False)
    if wd:
        if decoupled:
            theta = theta * (1.0 - lr * wd)
        else:
            g = g + wd * theta
    step = _scalar(state["step"]) + 1 if "step" in state else 1.0
    m_prev = state.get("exp_avg", torch.zeros_like(theta))
    v_prev = state.get("exp_avg_sq", torch.zeros_like(theta))
    m = beta1 * m_prev + (1.0 - beta1) * g
    v = beta2 * v_prev + (1.0 - beta2) * g * g
    if h.get("amsgrad", False):
        v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(theta)), v)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    return theta - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + h["eps"])


@contextlib.contextmanager
def measurement_model(model, snap: dict):
    """The set-up of every measurement at a snapshot (TAG's lookahead, CS's gradients): fp32 (autocast
    off), batch-statistics BatchNorm on copies of the running buffers (the model is not changed), the
    heads at the snapshot's values → ``forward(encoder, image)``: the model's outputs with the encoder
    parameters ``encoder`` (name → tensor, the names of ``snap["names"]``)."""
    names, params = snap["names"], snap["params"]
    device = next(iter(params.values())).device
    buffers = {n: b.clone() for n, b in model.named_buffers()}   # BN running stats: copies, discarded
    heads = {n: p for n, p in params.items() if n not in set(names)}
    was_training = model.training
    model.train()                                                 # batch statistics, as in training
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield lambda encoder, image: functional_call(model, {**heads, **encoder, **buffers}, (image,))
    finally:
        model.train(was_training)


def task_gradients(model, snap: dict, batch: dict, taskset, kernels: str = "auto"):
    """∇_{θ_s} L_i of every task i at the snapshot's parameters on ``batch`` (measurement_model) →
    (L (N,) float64 losses, per task the gradients aligned with ``snap["names"]``). Shared by TAG's
    lookahead and CS's gradient cosines (fastdmtg/methods/cs.py)."""
    names, params = snap["names"], snap["params"]
    n_tasks = taskset.num_tasks
    with measurement_model(model, snap) as forward:
        enc = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        out = forward(enc, batch["image"])
        eye = torch.eye(n_tasks, device=next(iter(params.values())).device)
        before, grads = None, []
        enc_list = [enc[n] for n in names]
        for i in range(n_tasks):
            total_i, L = taskset.head_losses(out, batch, eye[:, i:i + 1].contiguous(), kernels=kernels)  # = L_i
            if before is None:
                before = L[:, 0].detach().double()
            g = torch.autograd.grad(total_i, enc_list, retain_graph=i < n_tasks - 1, allow_unused=True)
            grads.append([torch.zeros_like(p) if gi is None else gi for p, gi in zip(enc_list, g)])
    return before, grads


def lookahead_affinity(model, snap: dict, batch: dict, taskset, kernels: str = "auto") -> torch.Tensor:
    """Z (N, N) float64, Z[i, j] = Z_{i→j}, at the snapshot's parameters on ``batch``; the head losses
    on the ``kernels`` backend (train.kernels, as the training step)."""
    names, params = snap["names"], snap["params"]
    n_tasks = taskset.num_tasks
    before, grads = task_gradients(model, snap, batch, taskset, kernels)
    with measurement_model(model, snap) as forward, torch.no_grad():
        device = next(iter(params.values())).device
        ones = torch.ones(n_tasks, 1, device=device)
        Z = torch.empty(n_tasks, n_tasks, dtype=torch.float64, device=device)
        for i in range(n_tasks):
            new = {n: update_direction(snap["kind"], params[n], gi, snap["state"][n], snap["hyper"][n])
                   for n, gi in zip(names, grads[i])}
            _, L_after = taskset.head_losses(forward(new, batch["image"]), batch, ones, kernels=kernels)
            Z[i] = 1.0 - L_after[:, 0].double() / before
    return Z


class TagAffinity(GroupingMethod):
    name = "tag-affinity"
    order = 3
    config_section = ("tag", TagConfig)   # its own section of the config (fastdmtg.config gathers it)

    def __init__(self, num_tasks: int, every: int = 10, kernels: str = "auto"):
        super().__init__(num_tasks, 1)
        self.every = int(every)
        self.kernels = kernels        # the lookahead's loss backend (train.kernels, as the training step)
        self.register_buffer("_ones", torch.ones(num_tasks, 1))
        # running sums (resume-safe: part of the method's state)
        self.register_buffer("affinity_sum", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))
        self.register_buffer("affinity_count", torch.zeros((), dtype=torch.long))
        self._pending = None          # snapshot for the next step's measurement
        self._latest = None           # full-run totals (the trainer reloads best.pt before results)
        self.last = None              # the most recent per-step Z (tests, debugging)

    @classmethod
    def from_config(cls, cfg, num_tasks: int, task_names=None) -> "TagAffinity":
        # (one encoder, K = 1: checked by the config, model.branches=0 resolves to it)
        return cls(num_tasks, cfg.tag.affinity_every, kernels=cfg.train.kernels)

    def weights(self) -> torch.Tensor:
        return self._ones                                                    # (N, 1): naive MTL

    def assignment(self) -> torch.Tensor:
        return torch.zeros(self.num_tasks, dtype=torch.long, device=self._ones.device)

    def on_epoch_start(self, epoch: int) -> None:
        self._latest = (self.affinity_sum.clone(), self.affinity_count.clone())

    def observe_step(self, ctx: StepContext) -> list:
        """Measure (this step was announced by the previous one's snapshot) and snapshot (the next
        step will be measured) — reading the model and optimizer only. The measurement goes into the
        method's running mean and out as an ``AffinityMeasured`` decision for the trainer to record."""
        step = ctx.global_step                         # index of the step that just ran
        pending, self._pending = self._pending, None
        out = []
        if pending is not None and pending["step"] == step and pending["epoch"] == ctx.epoch:
            Z = self.measure(ctx.model, pending, ctx.batch, ctx.taskset)
            self.affinity_sum += Z.to(self.affinity_sum.device)
            self.affinity_count += 1
            self.last = Z
            self._latest = (self.affinity_sum.clone(), self.affinity_count.clone())
            out.append(AffinityMeasured(step + 1, Z.detach().cpu(), int(self.affinity_count)))
        if (step + 2) % self.every == 0:
            # the next step (step + 1) is a measured one: keep the state it starts from
            snap = snapshot(ctx.model, ctx.optimizer, encoder_param_names(ctx.model))
            snap.update(step=step + 1, epoch=ctx.epoch)
            self._pending = snap
        return out

    def measure(self, model, snap: dict, batch: dict, taskset) -> torch.Tensor:
        """One (N, N) measurement at the snapshot's parameters on the step's batch (TAG: the lookahead
        affinity; fastdmtg.methods.cs: the gradients' cosine similarity)."""
        return lookahead_affinity(model, snap, batch, taskset, kernels=self.kernels)

    def affinity(self) -> torch.Tensor | None:
        total, count = self._latest if self._latest is not None else (self.affinity_sum, self.affinity_count)
        if int(count) == 0:
            return None
        return total / int(count)

    def extra_results(self, totals=None) -> dict:
        Z = self.affinity()
        count = int((self._latest or (None, self.affinity_count))[1])
        return {"tag_affinity": None if Z is None else Z.cpu().tolist(),
                "tag_affinity_measurements": count,
                "tag_affinity_every": self.every,
                "tag_lookahead": "optimizer update rule with its current state; batch-statistics BN "
                                 "without running-stat updates; fp32"}


METHOD = TagAffinity
