"""Taskonomy dense tasks: losses of the K·N training heads and evaluation metrics.

Targets come normalised from ``fastdmtg.data.taskonomy`` (see there); the batch carries
``targets[task]`` and ``mask`` (B, 1, H, W), True where the raw depth is < 8192.

Precision: the losses are computed outside autocast, in fp32 (the ops upcast their inputs; the
rotate loss casts to fp32), and under the precision policy the predictions themselves come from
fp32 decoders (fastdmtg.models.xception.Decoder); evaluation runs in fp32.

Training losses (per head, batch means, as the DMTG reference):

    depth_zbuffer     masked L1 = Σ |pred − t|·mask / (B·C·H·W)   (divided by ALL elements, not the mask count)
    normal            masked L1, same definition (3 channels)
    keypoints2d       plain L1 = mean |pred − t|
    edge_texture      plain L1
    segment_semantic  cross-entropy over the 18 logits, mean over pixels whose class != 0 (0 if none)

``rotate_loss=True`` (reference option, used by every shipped DMTG Taskonomy config, default OFF
here): for depth and normal, the target and mask are cropped by one pixel on every side
(H−2)×(W−2), the prediction is cropped at the 9 one-pixel shifts (dy, dx ∈ {0, 1, 2}:
pred[..., dy:dy+H−2, dx:dx+W−2]), each shift's per-sample loss is Σ |p − t|·mask / (C·(H−2)·(W−2)),
the minimum over the 9 shifts is taken per sample, then the mean over the batch. It tolerates a
one-pixel misregistration; it runs in plain PyTorch (not the fused op).

Evaluation (``TaskonomyMeter``; one head per task; the metrics accumulated over the whole set,
never averaged per batch):

    loss     the training definitions above, as dataset means (L1: mean over all elements of
             all images; CE: mean over all non-ignored pixels of the set) — ``eval_loss="set"``,
             the default; ``eval_loss="batch_mean"`` (the release's ``Averager``): the unweighted
             mean over evaluation batches of each batch's loss as training defines it (CE: over the
             batch's labelled pixels, 0 when it has none), so it depends on the evaluation batch
             size, and for segmentation differs from the set mean even with equal batches.
    depth    rmse: sqrt(Σ_valid (pred − t)² / n_valid) over mask pixels, in normalised units
             (1 unit = 1000 raw = 1000/512 m ≈ 1.95 m; rmse_m gives metres). "Aligning the
             transformation and scale" (paper Table A2) is read as: both in the normalised
             (d − 1500)/1000 space; no per-image least-squares scale fit.
    normal   acc30: % of mask pixels whose predicted and target vectors are < 30° apart
             (cosine > cos 30°; a zero-length prediction counts as a miss). Also mean_angle (°).
    segment  miou: % from a set-wide confusion matrix C (rows target, columns prediction) of the
             pixels with target != 0 (predicting 0 there is a miss); IoU_c = C_cc / (row_c + col_c − C_cc):
               reference (``miou="reference"``, default; the release's IoU meter, whose numbers the
                 paper's Table A2 reports): Σ IoU_c over the classes c ∈ 1..17 present in the
                 target, divided by 18 (class 0 counts in the divisor: at most 17/18 = 94.4 %);
               mean (``miou="mean"``): the mean of IoU_c over classes 1..17 present in the target or
                 the prediction (NaN if none).
             Both are reported (miou_reference, miou_mean); ``miou`` and the error use the chosen one.
    kp/edge  f1: % F1 of the binarised maps, positive = raw value > threshold in raw 16-bit
             units — by default the normalisation offset (keypoints2d 50, edge_texture 718),
             i.e. normalised value > 0; F1 = 2TP/(2TP+FP+FN), 100 when there is nothing to
             find and nothing is found.

Error (lower is better; the per-task table of ``fastdmtg compare``): depth rmse; normal 100 − acc30;
segmentation 100 − miou; keypoints/edges 100 − f1. The errors are in different units, so
``unified_error`` is False (no single "total error").

NormGain_E (fastdmtg.metrics.normgain_error) uses each task's own metric, as the paper's Table A2:
the relative change (m − m_ref)/m_ref of acc30, miou (of the chosen definition: ``miou_reference`` or
``miou_mean``) and f1, and (m_ref − m)/m_ref of the depth rmse — named per task under
``"gain_metric"`` in the meter's output (``TaskonomyTaskSet.gain_metric``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Meter, TaskSet, TaskSpec

#: task → (kind, output channels)
TASKS = {
    "segment_semantic": ("segment", 18),
    "depth_zbuffer": ("depth", 1),
    "normal": ("normal", 3),
    "keypoints2d": ("keypoints", 1),
    "edge_texture": ("edges", 1),
}
#: (offset, scale) of the normalisation of the 16-bit maps; F1 thresholds are given in raw units
_NORM = {"keypoints2d": (50.0, 100.0), "edge_texture": (718.0, 1070.0)}
DEFAULT_F1_THRESHOLDS = {"keypoints2d": 50.0, "edge_texture": 718.0}
IGNORE_CLASS = 0
NUM_SEG_CLASSES = 18
MIOU_DEFINITIONS = ("reference", "mean")
EVAL_LOSSES = ("set", "batch_mean")
_COS30 = math.cos(math.radians(30.0))
_DEPTH_UNIT_M = 1000.0 / 512.0           # one normalised depth unit in metres (raw unit = 1/512 m)


def miou_from_confusion(conf: torch.Tensor, definition: str = "reference") -> tuple[float, int]:
    """(mIoU in %, number of classes it averages) from a (C, C) confusion matrix (rows target, columns
    prediction) of the pixels whose target is not the ignore class 0 (see the module doc)."""
    if definition not in MIOU_DEFINITIONS:
        raise ValueError(f"data.taskonomy_miou: expected {'|'.join(MIOU_DEFINITIONS)}, got {definition!r}")
    conf = conf.to(torch.float64)
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    cls = torch.arange(conf.shape[0]) != IGNORE_CLASS
    if definition == "reference":
        present = cls & (conf.sum(1) > 0)                                   # in the target
        return 100.0 * float((inter[present] / union[present]).sum()) / conf.shape[0], int(present.sum())
    present = cls & (union > 0)                                             # in target or prediction
    if not bool(present.any()):
        return float("nan"), 0
    return 100.0 * float((inter[present] / union[present]).mean()), int(present.sum())


def rotate_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample shift-tolerant masked L1 (see module doc). pred (K, B, C, H, W) or (B, C, H, W);
    returns (K, B) or (B,)."""
    squeeze = pred.dim() == 4
    if squeeze:
        pred = pred[None]
    h, w = pred.shape[-2:]
    t = target[..., 1:-1, 1:-1].float()                                   # (B, C, H-2, W-2)
    m = mask[..., 1:-1, 1:-1].float() if mask is not None else None       # (B, 1, H-2, W-2)
    best = None
    for dy in range(3):
        for dx in range(3):
            d = (pred[..., dy:dy + h - 2, dx:dx + w - 2].float() - t).abs()   # (K, B, C, H-2, W-2)
            if m is not None:
                d = d * m
            per = d.mean(dim=(2, 3, 4))                                   # (K, B)
            best = per if best is None else torch.minimum(best, per)
    return best[0] if squeeze else best


class TaskonomyTaskSet(TaskSet):
    unified_error = False

    def __init__(self, names: list[str], rotate_loss: bool = False,
                 f1_thresholds: dict[str, float] | None = None, miou: str = "reference", eval_loss: str = "set"):
        if miou not in MIOU_DEFINITIONS:
            raise ValueError(f"data.taskonomy_miou: expected {'|'.join(MIOU_DEFINITIONS)}, got {miou!r}")
        if eval_loss not in EVAL_LOSSES:
            raise ValueError(f"data.taskonomy_eval_loss: expected {'|'.join(EVAL_LOSSES)}, got {eval_loss!r}")
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"data.tasks: unknown Taskonomy task(s) {unknown}; known: {', '.join(TASKS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks: duplicate task names in {names}")
        self.specs = [TaskSpec(n, TASKS[n][0], TASKS[n][1]) for n in names]
        self.rotate_loss = rotate_loss
        self.miou = miou
        self.eval_loss = eval_loss
        self.f1_thresholds = dict(DEFAULT_F1_THRESHOLDS, **(f1_thresholds or {}))

    @classmethod
    def from_config(cls, names: list[str], dcfg) -> "TaskonomyTaskSet":
        """The task set a ``DataConfig`` asks for (rotate loss, mIoU definition, evaluation loss): the one
        place data sources build it from a config."""
        return cls(names, rotate_loss=bool(getattr(dcfg, "taskonomy_rotate_loss", False)),
                   miou=getattr(dcfg, "taskonomy_miou", "reference"),
                   eval_loss=getattr(dcfg, "taskonomy_eval_loss", "set"))

    def gain_metric(self) -> dict:
        """Per task, the metric NormGain_E compares and its direction (paper Table A2; module doc):
        {task: {"metric": name in the meter's metrics[task], "higher_is_better": bool}}."""
        name = {"depth": "rmse", "normal": "acc30", "segment": f"miou_{self.miou}", "keypoints": "f1", "edges": "f1"}
        return {s.name: {"metric": name[s.kind], "higher_is_better": s.kind != "depth"} for s in self.specs}

    def head_losses(self, outputs: list[torch.Tensor], batch: dict, z: torch.Tensor, active=None,
                    kernels: str = "auto"):
        """outputs: N tensors (K, B, C, H, W); z (N, K) → (Σ_{i,k} z·L, L (N, K) detached).

        ``active`` (head pruning): per task, the branch indices its output holds, outputs[i] being
        (K_i, B, ...); the loss is taken over those heads with z[i, active[i]] and L is 0 elsewhere.
        ``kernels``: the fused ops' backend (train.kernels: auto | triton | reference)."""
        from .. import ops
        targets, mask = batch["targets"], batch.get("mask")
        totals, rows = [], []
        for i, spec in enumerate(self.specs):
            pred, t = outputs[i], targets[spec.name]                       # (K, B, C, H, W), target
            if active is not None:
                idx = torch.tensor(active[i], device=z.device, dtype=torch.long)
                total, L_sub = self._task_loss(spec, pred, t, mask, z[i].index_select(0, idx), kernels)
                totals.append(total)
                rows.append(torch.zeros(z.shape[1], device=L_sub.device, dtype=L_sub.dtype).index_copy(0, idx, L_sub))
                continue
            if spec.kind == "segment":
                total, L = ops.ce_ignore_loss(pred, t, z[i], ignore_index=IGNORE_CLASS, backend=kernels)
            elif spec.kind in ("depth", "normal"):
                if self.rotate_loss:
                    L_grad = rotate_l1(pred, t, mask).mean(dim=1)          # (K,) differentiable
                    total, L = (z[i].float() * L_grad).sum(), L_grad.detach()
                else:
                    total, L = ops.masked_l1_loss(pred, t, mask, z[i], backend=kernels)
            else:
                total, L = ops.masked_l1_loss(pred, t, None, z[i], backend=kernels)
            totals.append(total)
            rows.append(L)
        return torch.stack(totals).sum(), torch.stack(rows)               # 0-d, (N, K)

    def _task_loss(self, spec, pred, t, mask, zi, kernels: str = "auto"):
        """One task over a (K', B, ...) stack of heads with weights zi (K',): (Σ zi·L, L (K',))."""
        from .. import ops
        if spec.kind == "segment":
            return ops.ce_ignore_loss(pred, t, zi, ignore_index=IGNORE_CLASS, backend=kernels)
        if spec.kind in ("depth", "normal"):
            if self.rotate_loss:
                L_grad = rotate_l1(pred, t, mask).mean(dim=1)
                return (zi.float() * L_grad).sum(), L_grad.detach()
            return ops.masked_l1_loss(pred, t, mask, zi, backend=kernels)
        return ops.masked_l1_loss(pred, t, None, zi, backend=kernels)

    def meter(self) -> "TaskonomyMeter":
        return TaskonomyMeter(self)


class TaskonomyMeter(Meter):
    """Set-wide accumulators (float64, on the outputs' device: no host sync per batch)."""

    def __init__(self, taskset: TaskonomyTaskSet):
        self.ts = taskset
        self.count = 0
        self.batches = 0
        self.acc: dict[str, dict[str, torch.Tensor]] = {}

    def _add(self, task: str, key: str, value: torch.Tensor) -> None:
        d = self.acc.setdefault(task, {})
        v = value.detach().to(torch.float64)
        d[key] = d[key] + v if key in d else v

    def _add_loss(self, task: str, total: torch.Tensor, n: torch.Tensor) -> None:
        """One batch's loss: its sum over n terms (pixels or samples), for the set mean and the mean of
        batch means (a batch with n = 0 — no labelled pixel — has loss 0, as in training)."""
        self._add(task, "loss_sum", total)
        self._add(task, "loss_n", n)
        self._add(task, "batch_mean_sum", total.to(torch.float64) / n.to(torch.float64).clamp_min(1.0))

    @torch.no_grad()
    def update(self, outputs: list[torch.Tensor], batch: dict) -> None:
        targets = batch["targets"]
        first = outputs[0]
        b = first.shape[0]
        mask = batch.get("mask")
        if mask is None:
            mask = torch.ones(b, 1, *first.shape[-2:], dtype=torch.bool, device=first.device)
        mf = mask.float()                                                   # (B, 1, H, W)
        for spec, out in zip(self.ts.specs, outputs):
            name, p, t = spec.name, out.float(), targets[spec.name]
            if spec.kind == "segment":
                t = t.long()                                                # (B, H, W)
                valid = t != IGNORE_CLASS
                ce = F.cross_entropy(p, t, ignore_index=IGNORE_CLASS, reduction="sum")
                self._add_loss(name, ce, valid.sum())
                c = spec.out_channels
                pred = p.argmax(1)                                          # (B, H, W)
                conf = torch.bincount((t[valid] * c + pred[valid]).flatten(), minlength=c * c)
                self._add(name, "confusion", conf.view(c, c))               # rows target, cols prediction
                continue
            t = t.float()
            if spec.kind in ("depth", "normal"):
                if self.ts.rotate_loss:
                    per = rotate_l1(p, t, mask)                             # (B,)
                else:
                    per = ((p - t).abs() * mf).mean(dim=(1, 2, 3))          # (B,)
                self._add_loss(name, per.sum(), torch.tensor(b, device=p.device))
                self._add(name, "valid", mf.sum())
                if spec.kind == "depth":
                    self._add(name, "sq_err", ((p - t) ** 2 * mf).sum())
                else:
                    cos = (p * t).sum(1, keepdim=True) / (
                        p.norm(dim=1, keepdim=True).clamp_min(1e-12) * t.norm(dim=1, keepdim=True).clamp_min(1e-12))
                    self._add(name, "hit30", ((cos > _COS30).float() * mf).sum())
                    ang = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
                    self._add(name, "angle_sum", (ang * mf).sum())
            else:
                self._add_loss(name, (p - t).abs().mean(dim=(1, 2, 3)).sum(), torch.tensor(b, device=p.device))
                off, sc = _NORM[name]
                thr = (self.ts.f1_thresholds[name] - off) / sc              # raw threshold → normalised
                pp, tp = p > thr, t > thr
                self._add(name, "tp", (pp & tp).sum())
                self._add(name, "fp", (pp & ~tp).sum())
                self._add(name, "fn", (~pp & tp).sum())
        self.count += b
        self.batches += 1

    def compute(self) -> dict:
        if self.count == 0:
            raise ValueError("no samples were evaluated")
        loss, error, metrics = {}, {}, {}
        for spec in self.ts.specs:
            a = {k: v.cpu() for k, v in self.acc[spec.name].items()}
            name = spec.name
            if self.ts.eval_loss == "batch_mean":
                loss[name] = float(a["batch_mean_sum"]) / self.batches
            else:
                loss[name] = float(a["loss_sum"] / a["loss_n"]) if float(a["loss_n"]) > 0 else 0.0
            if spec.kind == "depth":
                rmse = math.sqrt(float(a["sq_err"] / a["valid"])) if float(a["valid"]) > 0 else float("nan")
                metrics[name] = {"rmse": rmse, "rmse_m": rmse * _DEPTH_UNIT_M}
                error[name] = rmse
            elif spec.kind == "normal":
                v = float(a["valid"])
                acc = 100.0 * float(a["hit30"]) / v if v > 0 else float("nan")
                metrics[name] = {"acc30": acc, "mean_angle": float(a["angle_sum"]) / v if v > 0 else float("nan")}
                error[name] = 100.0 - acc
            elif spec.kind == "segment":
                conf = a["confusion"]
                both = {d: miou_from_confusion(conf, d) for d in MIOU_DEFINITIONS}
                miou, classes = both[self.ts.miou]
                metrics[name] = {"miou": miou, "miou_definition": self.ts.miou, "classes": classes,
                                 **{f"miou_{d}": v[0] for d, v in both.items()}}
                error[name] = 100.0 - miou
            else:
                tp, fp, fn = float(a["tp"]), float(a["fp"]), float(a["fn"])
                f1 = 100.0 if tp + fp + fn == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)
                metrics[name] = {"f1": f1, "threshold_raw": self.ts.f1_thresholds[name]}
                error[name] = 100.0 - f1
        return {"loss": loss, "error": error, "metrics": metrics, "gain_metric": self.ts.gain_metric(),
                "count": self.count}
