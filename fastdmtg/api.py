"""Python API for your own tasks: train on tensors, evaluate, predict per task.

    import fastdmtg.api as api
    res = api.train_tensors(
        train=(images, {"smile": y_smile, "age": y_age}),      # images (M, 3, H, W) uint8 (or float in [0, 1])
        val=(images_val, targets_val), test=(images_test, targets_test),
        tasks={"smile": "binary", "age": {"type": "regression", "weight": 0.5}},   # optional: inferred
        out="runs/mine", overrides=["train.epochs=20"])
    model, meta = fastdmtg.load_grouped("runs/mine")
    preds = api.predict("runs/mine", new_images)               # {task: {"class", "probabilities"} | {"value"}}

Targets: per task one value per image (a tensor, array or list), NaN (or None) where the label is
missing. binary: two distinct values (class ids in sorted order); multiclass: class ids 0..C−1;
regression: numbers. ``tasks`` entries are a type name or a tasks.json entry (``type``, ``classes``,
``labels``, ``weight``, ``normalize``); tasks not given are inferred from the training split with the
folder format's rule (fastdmtg/data/folder.py). The same trainer, methods and outputs as the CLI;
the resolved declarations go into the run's config (``data.folder_tasks``, ``data.dataset=tensors``).

Images of another size than ``data.image_size`` (default 64) are resized with the folder format's
decoder resize (bilinear, half-pixel centres, no antialias), float images are rounded to uint8 as
image files would be.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .config import Config, apply_overrides, evolve, get_recipe
from .data.base import SPLITS
from .data.folder import FolderFormatError, encode_cell, infer_decl
from .tasks.generic import TYPES, GenericTaskSet

__all__ = ["train_tensors", "evaluate_tensors", "predict", "prepare_images", "tensor_config"]


def prepare_images(images, size: int) -> np.ndarray:
    """(M, 3, H, W) uint8 or float in [0, 1] (tensor or array) → (M, 3, size, size) uint8, resized as
    the runs of this module's format (data.dataset=tensors) declare it: what ``predict`` applies to them
    later (fastdmtg.predict: the same decoding as a prediction's)."""
    from .predict import ImageError, images_uint8, resize_uint8
    try:
        x = images_uint8(images)
    except ImageError as e:
        raise ValueError(str(e)) from None
    out = [resize_uint8(x[i:i + 256], size, "tensors") for i in range(0, len(x), 256)]
    return torch.cat(out).numpy() if out else np.zeros((0, 3, size, size), np.uint8)


def _cell(v) -> str:
    if v is None:
        return ""
    v = float(v)
    if math.isnan(v):
        return ""
    return str(int(v)) if v.is_integer() and abs(v) < 2 ** 53 else repr(v)


class _ValueTable:
    """The training targets in the shape ``fastdmtg.data.folder.infer_decl`` reads (one inference rule)."""

    def __init__(self, targets: dict[str, list[str]]):
        self.path = Path("train targets")
        self.tasks = list(targets)
        self.col = {"split": 0, **{t: j + 1 for j, t in enumerate(targets)}}
        m = len(next(iter(targets.values())))
        self.rows = [(i, ["train"] + [targets[t][i] for t in targets]) for i in range(m)]

    def where(self, line: int, column: str) -> str:
        return f"train targets[{column!r}][{line}]"


def _split_cells(split: str, targets: dict, names: list[str], m: int) -> dict[str, list[str]]:
    if not isinstance(targets, dict):
        raise ValueError(f"{split}: targets must be a dict {{task: values}}, got {type(targets).__name__}")
    if list(targets) != names:
        raise ValueError(f"{split}: targets have tasks {list(targets)}, the training split has {names}")
    out = {}
    for t, v in targets.items():
        vals = v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else list(np.asarray(v, dtype=object).ravel())
        if len(vals) != m:
            raise ValueError(f"{split}: targets[{t!r}] has {len(vals)} values for {m} images")
        try:
            out[t] = [_cell(x) for x in vals]
        except (TypeError, ValueError):
            raise ValueError(f"{split}: targets[{t!r}] must be numbers (NaN or None = missing)") from None
    return out


def tensor_config(splits: dict, tasks: dict | None = None, recipe: str = "folder_k3",
                  overrides: list[str] = ()) -> tuple[Config, "object"]:
    """(config, dataset) for ``train_tensors``: the recipe with ``data.dataset=tensors``, the resolved
    declarations in ``data.folder_tasks`` (the recipe's model.branches=0: K = min(3, N))."""
    from .data.tensors import tensor_dataset
    # typed values inside the package; ``overrides`` are the caller's --set texts (the edge)
    cfg = apply_overrides(evolve(get_recipe(recipe), data={"dataset": "tensors"}), list(overrides))
    for s in SPLITS:
        if s not in splits:
            raise ValueError(f"{s}: missing; give train, val and test as (images, targets)")
    images = {s: prepare_images(splits[s][0], cfg.data.image_size) for s in SPLITS}
    names = list(splits["train"][1])
    if not names:
        raise ValueError("train: targets name no task")
    cells = {s: _split_cells(s, splits[s][1], names, len(images[s])) for s in SPLITS}
    table = _ValueTable(cells["train"])
    tasks = dict(tasks or {})
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not tasks of the targets ({names})")
    decls = []
    for t in names:
        entry = tasks.get(t)
        if isinstance(entry, str):
            entry = {"type": entry}
        if entry is not None and (not isinstance(entry, dict) or entry.get("type") not in TYPES):
            raise ValueError(f"tasks[{t!r}]: expected one of {'|'.join(TYPES)} or {{\"type\": ...}}, got {entry!r}")
        decls.append(infer_decl(table, t, entry)[0])
    folder_tasks = {d.name: d.to_dict() for d in decls}
    cfg = evolve(cfg, data={"folder_tasks": folder_tasks})
    data = {}
    for s in SPLITS:
        y = np.empty((len(images[s]), len(names)), np.float32)
        for j, d in enumerate(decls):
            for i, c in enumerate(cells[s][d.name]):
                y[i, j] = encode_cell(d, c, f"{s} targets[{d.name!r}][{i}]")
            if s != "train" and np.isnan(y[:, j]).all():
                raise FolderFormatError(f"{s} targets[{d.name!r}]: no label in the {s} split")
        data[s] = {"image": images[s], "targets": y}
    ds = tensor_dataset(data, GenericTaskSet(decls), cfg.data.image_size,
                        limits={"train": cfg.data.limit_train, "val": cfg.data.limit_eval, "test": cfg.data.limit_eval})
    return cfg, ds


def train_tensors(train, val, test, tasks: dict | None = None, out: str | Path | None = None,
                  recipe: str = "folder_k3", overrides: list[str] = (), progress: bool | None = None) -> dict:
    """Train on tensors through the trainer (module doc); returns results.json's dict. ``out``: the run
    folder (default runs/<recipe>-<time>)."""
    import time

    from .train import train as _train
    cfg, ds = tensor_config({"train": train, "val": val, "test": test}, tasks, recipe, list(overrides))
    run_dir = Path(out) if out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _train(cfg, run_dir, progress=progress, dataset=ds)


def evaluate_tensors(run_dir, images, targets: dict, device="cpu", batch_size: int = 512) -> dict:
    """The pruned model of ``run_dir`` on (images, targets) → the metrics dict of ``fastdmtg eval``."""
    from .data.tensors import tensor_dataset
    from .export import load_grouped
    from .pipelines import build_source
    from .train import evaluate
    model, meta = load_grouped(run_dir, device)
    cfg = Config.from_dict(meta["config"])
    ts = GenericTaskSet.from_config(cfg.data.folder_tasks, meta["tasks"])
    x = prepare_images(images, meta["image_size"])
    cells = _split_cells("eval", targets, meta["tasks"], len(x))
    y = np.empty((len(x), len(ts.decls)), np.float32)
    for j, d in enumerate(ts.decls):
        for i, c in enumerate(cells[d.name]):
            y[i, j] = encode_cell(d, c, f"eval targets[{d.name!r}][{i}]")
    arrays = {"image": x, "targets": y}
    ds = tensor_dataset({s: arrays for s in SPLITS}, ts, meta["image_size"])
    src = build_source(cfg.data, progress=False, dataset=ds)
    return evaluate(model, ts, src, "test", batch_size, torch.device(device))


def predict(run, images, device="cpu", batch_size: int = 512) -> dict:
    """Per-task predictions of a finished run's pruned model on images ((M, 3, H, W) uint8 or float in
    [0, 1], any H×W: resized as the training data; or image files / PIL images). ``run``: a run folder,
    or ``(model, meta)`` from ``load_grouped``. Returns, over all M images, per task
    ``fastdmtg.predict.predictions``' dict: {"class", "probabilities", "label"} (label: the name as written, or
    the class id when the task names none) or {"value"}."""
    from .export import load_grouped
    from .predict import predict as _predict
    model, meta = load_grouped(run, device) if isinstance(run, (str, Path)) else run
    return _predict(model, images, meta, batch_size=batch_size, details=True)
