"""Your own tasks: binary, multi-class and regression tasks on one image, labels possibly missing
(the folder format ``fastdmtg/data/folder.py`` and the Python API ``fastdmtg/api.py``).

A task is declared by a ``TaskDecl`` (stored resolved in the run's config, ``data.folder_tasks``, so
that a rerun, ``eval`` and ``load_grouped`` rebuild exactly the same heads and units):

    binary      2 logits, cross-entropy; ``labels`` = the two values as written in the data,
                class id j ↔ labels[j]
    multiclass  C logits (``classes`` = C), cross-entropy; values are the class ids 0..C−1
                (``labels``: optional names of the ids)
    regression  1 output, squared error on the standardised target (y − mean)/std, where mean and
                std are the training split's (``normalize: standard``, default) or given; the
                prediction in original units is mean + std·output

Batch: ``{"image": (B, 3, S, S) float32, "targets": (B, N) float32}``, targets in the data's units
(class id, or the regression value), NaN where the label is missing. A missing label counts in
neither the loss nor the metrics of its task.

Training loss of head (i, k) on a batch, over the n_i ≥ 1 labelled samples b of task i:

    L[i, k] = (1/n_i) Σ_b ℓ_i(out[k, b], y[b])          (0 when the batch has no label of task i)
    total   = Σ_i w_i Σ_k z[i, k] · L[i, k]               (w_i: the task's loss weight, default 1)

with ℓ = cross-entropy (binary, multiclass) or (out − (y − mean)/std)² (regression).

Evaluation (one head per task, accumulated over the whole split, labelled samples only):
    loss       the training loss above as a split mean (regression: MSE in standardised units)
    error      binary / multiclass: 100·(1 − accuracy); regression tasks have no error
    metrics    accuracy (classification); mae and rmse in the original units (regression); count
NormGain_L uses every task's loss; NormGain_E the tasks that have an error. The total error (sum of
errors) is reported only when every task is a classification (then the tasks share one unit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import Meter, TaskSet, TaskSpec

TYPES = ("binary", "multiclass", "regression")
DECL_KEYS = {"type", "classes", "labels", "weight", "mean", "std"}


@dataclass(frozen=True)
class TaskDecl:
    """One resolved task declaration (see the module doc)."""
    name: str
    type: str
    classes: int = 0                 # binary: 2; multiclass: C; regression: 0
    labels: tuple = ()               # binary: the two values as written; multiclass: optional id names
    weight: float = 1.0
    mean: float = 0.0                # regression: target standardisation
    std: float = 1.0

    def __post_init__(self):
        where = f"task {self.name!r}"
        if self.type not in TYPES:
            raise ValueError(f"{where}: type must be one of {'|'.join(TYPES)}, got {self.type!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"{where}: weight must be a finite number >= 0, got {self.weight!r}")
        if self.type == "binary" and (self.classes != 2 or len(self.labels) != 2):
            raise ValueError(f"{where}: a binary task has classes 2 and two labels, got {self.classes}, "
                             f"{list(self.labels)}")
        if self.type == "multiclass":
            if not (isinstance(self.classes, int) and self.classes >= 2):
                raise ValueError(f"{where}: a multiclass task needs classes >= 2, got {self.classes!r}")
            if self.labels and len(self.labels) != self.classes:
                raise ValueError(f"{where}: {len(self.labels)} labels for {self.classes} classes")
        if self.type != "regression" and (self.mean != 0.0 or self.std != 1.0):
            raise ValueError(f"{where}: mean and std apply to regression tasks only (this one is {self.type}), "
                             f"got mean {self.mean!r}, std {self.std!r}")
        if self.type == "regression":
            if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
                raise ValueError(f"{where}: regression normalisation needs a finite mean and std > 0, "
                                 f"got mean {self.mean!r}, std {self.std!r}")

    @property
    def out_channels(self) -> int:
        return 1 if self.type == "regression" else self.classes

    def to_dict(self) -> dict:
        d = {"type": self.type}
        if self.type != "regression":
            d["classes"] = self.classes
        if self.labels:
            d["labels"] = list(self.labels)
        d["weight"] = float(self.weight)
        if self.type == "regression":
            d["mean"], d["std"] = float(self.mean), float(self.std)
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict, where: str = "data.folder_tasks") -> "TaskDecl":
        """A resolved declaration as stored in the config (every field explicit)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: task {name!r}: expected an object, got {d!r}")
        unknown = set(d) - DECL_KEYS
        if unknown:
            raise ValueError(f"{where}: task {name!r}: unknown keys {sorted(unknown)}; expected {sorted(DECL_KEYS)}")
        typ = d.get("type")
        if typ in TYPES and typ != "regression" and ({"mean", "std"} & set(d)):
            raise ValueError(f"{where}: task {name!r}: mean and std apply to regression tasks only (this one is "
                             f"{typ}); remove them")
        classes = d.get("classes", 2 if typ == "binary" else 0)
        num = (int, float)
        for key in ("weight", "mean", "std"):
            if key in d and (not isinstance(d[key], num) or isinstance(d[key], bool)):
                raise ValueError(f"{where}: task {name!r}: {key} must be a number, got {d[key]!r}")
        if not isinstance(classes, int) or isinstance(classes, bool):
            raise ValueError(f"{where}: task {name!r}: classes must be an integer, got {classes!r}")
        labels = d.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{where}: task {name!r}: labels must be a list of strings, got {labels!r}")
        return cls(name, typ, classes, tuple(labels), float(d.get("weight", 1.0)), float(d.get("mean", 0.0)),
                   float(d.get("std", 1.0)))


def decls_from_config(folder_tasks: dict, names: list[str] | None = None) -> list[TaskDecl]:
    """The declarations of ``names`` (default: all, in stored order) from ``data.folder_tasks``."""
    names = list(folder_tasks) if names is None else names
    missing = [n for n in names if n not in folder_tasks]
    if missing:
        raise ValueError(f"data.folder_tasks: no declaration of task(s) {missing}; it declares {list(folder_tasks)}")
    return [TaskDecl.from_dict(n, folder_tasks[n]) for n in names]


class GenericTaskSet(TaskSet):
    """N tasks of any of the three types (module doc). Heads: one per task, list form."""

    def __init__(self, decls: list[TaskDecl]):
        if not decls:
            raise ValueError("a task set needs at least one task")
        names = [d.name for d in decls]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        self.decls = list(decls)
        self.specs = [TaskSpec(d.name, d.type, d.out_channels) for d in decls]
        self.unified_error = all(d.type != "regression" for d in decls)
        self._weights = torch.tensor([d.weight for d in decls], dtype=torch.float32)   # (N,)

    @classmethod
    def from_config(cls, folder_tasks: dict, names: list[str] | None = None) -> "GenericTaskSet":
        return cls(decls_from_config(folder_tasks, names))

    def head_loss(self, i: int, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-head batch loss of task i: pred (K, B, C_i), y (B,) with NaN = missing → (K,)."""
        d = self.decls[i]
        valid = ~torch.isnan(y)                                               # (B,)
        vf = valid.to(torch.float32)
        n = vf.sum().clamp_min(1.0)
        pred = pred.float()
        k, b = pred.shape[0], pred.shape[1]
        if d.type == "regression":
            t = torch.where(valid, (y - d.mean) / d.std, torch.zeros_like(y))
            per = (pred[..., 0] - t[None]) ** 2                               # (K, B)
        else:
            t = torch.where(valid, y, torch.zeros_like(y)).long()
            per = F.cross_entropy(pred.reshape(k * b, -1), t.repeat(k), reduction="none").view(k, b)
        return (per * vf[None]).sum(1) / n                                    # (K,)

    def head_losses(self, outputs: list[torch.Tensor], batch: dict, z: torch.Tensor, active=None,
                    kernels: str = "auto"):
        """outputs: N tensors (K, B, C_i) — (K_i, B, C_i) over ``active[i]`` while pruning; z (N, K)
        → (Σ_i w_i Σ_k z[i, k]·L[i, k], L (N, K) detached, 0 at pruned heads)."""
        y = batch["targets"]                                                  # (B, N)
        totals, rows = [], []
        for i in range(len(self.decls)):
            L_i = self.head_loss(i, outputs[i], y[:, i])
            w = self.decls[i].weight
            if active is not None:
                idx = torch.tensor(active[i], device=z.device, dtype=torch.long)
                totals.append(w * (z[i].index_select(0, idx).float() * L_i).sum())
                rows.append(torch.zeros(z.shape[1], device=L_i.device, dtype=L_i.dtype).index_copy(0, idx, L_i.detach()))
            else:
                totals.append(w * (z[i].float() * L_i).sum())
                rows.append(L_i.detach())
        return torch.stack(totals).sum(), torch.stack(rows, 0)

    def meter(self) -> "GenericMeter":
        return GenericMeter(self)

    def predictions(self, outputs) -> dict:
        """Per-task predictions from one-head-per-task outputs (a ``GroupedNet``'s, or ``evaluate``'s):
        ``outputs`` = N tensors (B, C_i) → {task: {"class": (B,) int64, "probabilities": (B, C) float32,
        "label": [the value as written, or the class id when the task names none]} for binary / multiclass, {"value": (B,) float32 in the data's
        units} for regression}. This is what a predict command writes."""
        out = {}
        for d, o in zip(self.decls, outputs):
            o = o.detach().float()
            if d.type == "regression":
                out[d.name] = {"value": (o[:, 0] * d.std + d.mean).cpu()}
            else:
                p = o.softmax(-1).cpu()
                cls = p.argmax(-1)
                # the label as written in the data (labels.csv / tasks.json names), else the class id
                rec = {"class": cls, "probabilities": p,
                       "label": [d.labels[int(c)] if d.labels else int(c) for c in cls]}
                out[d.name] = rec
        return out


class GenericMeter(Meter):
    def __init__(self, taskset: GenericTaskSet):
        self.ts = taskset
        n = len(taskset.decls)
        self.loss_sum = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)
        self.correct = torch.zeros(n, dtype=torch.float64)
        self.abs_sum = torch.zeros(n, dtype=torch.float64)
        self.sq_sum = torch.zeros(n, dtype=torch.float64)
        self.samples = 0

    @torch.no_grad()
    def update(self, outputs, batch) -> None:
        y = batch["targets"].double()                                         # (B, N)
        for i, d in enumerate(self.ts.decls):
            o = outputs[i].float()                                            # (B, C_i)
            yi = y[:, i]
            valid = ~torch.isnan(yi)
            vf = valid.double()
            self.count[i] += float(vf.sum())
            per = self.ts.head_loss(i, o[None], yi.float())[0] * valid.float().sum().clamp_min(1.0)
            self.loss_sum[i] += float(per)
            if d.type == "regression":
                value = o[:, 0].double() * d.std + d.mean                    # original units
                err = torch.where(valid, value - yi, torch.zeros_like(yi))
                self.abs_sum[i] += float(err.abs().sum())
                self.sq_sum[i] += float((err ** 2).sum())
            else:
                hit = (o.argmax(-1).double() == yi) & valid
                self.correct[i] += float(hit.sum())
        self.samples += int(y.shape[0])

    def compute(self) -> dict:
        if self.samples == 0:
            raise ValueError("no samples were evaluated")
        loss, error, metrics = {}, {}, {}
        for i, d in enumerate(self.ts.decls):
            c = float(self.count[i])
            if c == 0:
                raise ValueError(f"task {d.name!r}: no labelled sample in the evaluated split (every cell of "
                                 "its column is empty there)")
            loss[d.name] = float(self.loss_sum[i]) / c
            if d.type == "regression":
                metrics[d.name] = {"mae": float(self.abs_sum[i]) / c, "rmse": math.sqrt(float(self.sq_sum[i]) / c),
                                   "count": int(c)}
            else:
                acc = float(self.correct[i]) / c
                error[d.name] = 100.0 * (1.0 - acc)
                metrics[d.name] = {"accuracy": acc, "count": int(c)}
        return {"loss": loss, "error": error or None, "metrics": metrics, "count": self.samples}
