"""Predict with a finished run's pruned model, from your own images.

    model, meta = fastdmtg.load_grouped("runs/my-run")
    preds = model.predict(["face1.jpg", "face2.png"])      # {task: (B,) class index} (any image size)
    probs = model.predict(images, probabilities=True)      # {task: (B, C) class probabilities}

    fastdmtg predict RUN_DIR IMAGE_OR_FOLDER... [--out preds.csv]   (a folder: the image files in it)

Images: file paths, PIL images, or (H, W, 3) uint8 numpy arrays, of any size; or one (M, 3, H, W)
batch, uint8 or float in [0, 1]. Files and PIL images go through the one reader of the package
(``fastdmtg.data.images``: 16-bit reduced to the top 8 bits, 32-bit and decompression bombs refused).
Each is turned into
the training input exactly as the dataset's decoder does it: RGB, resized to the run's
``image_size`` with the same resampling (CelebA and the synthetic data: bilinear, half-pixel
centres, no antialias, rounded to uint8 — ``fastdmtg.data.celeba.resize_like_reference``;
Taskonomy: its rgb resize), then x / 255. A file that is missing or not an image is a one-line
error naming it.

Outputs → predictions (``predictions``): a classification task (kind ``class``) gives the arg-max
class index per image and the softmax probabilities (your own tasks: also the label as written; a
regression task its value in the data's units); a dense task gives its map as the model outputs it
(segmentation: the arg-max class per pixel). This is the only place that knows task kinds here:
another task type plugs in by adding its case. ``fastdmtg.api.predict`` is this function on a run
folder with ``details=True``.
"""
from __future__ import annotations

import csv
import io
import types
from pathlib import Path

import numpy as np
import torch


class ImageError(ValueError):
    """An input that is not a readable image (the message names it)."""


def _decode(item, i: int) -> torch.Tensor:
    """One image → (3, H, W) uint8."""
    from PIL import Image

    from .data.images import ImageReadError, read_rgb, to_rgb8
    try:
        if isinstance(item, (str, Path)):
            arr = read_rgb(item)                   # the one reader (fastdmtg/data/images.py)
        elif isinstance(item, Image.Image):
            arr = to_rgb8(item, f"image {i}")
        elif isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise ImageError(f"image {i}: expected an (H, W, 3) uint8 array, got {item.dtype} "
                                 f"{tuple(item.shape)}")
            arr = item
        else:
            raise ImageError(f"image {i}: expected a file path, a PIL image or an (H, W, 3) uint8 array, "
                             f"got {type(item).__name__}")
    except ImageReadError as e:
        raise ImageError(str(e)) from None
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"image {i}: empty image")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)   # (3, H, W)


def images_uint8(images) -> torch.Tensor:
    """A batch given as one (M, 3, H, W) tensor or array, uint8 or float in [0, 1] → uint8 (M, 3, H, W)
    (the Python API's input; a float image is rounded to uint8 as a decoded file would be)."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.dim() != 4 or x.shape[1] != 3:
        raise ImageError(f"images: expected (M, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ImageError(f"images: expected uint8 or float in [0, 1], got {x.dtype}")
        if not bool(torch.isfinite(x).all()) or (x.numel() and (float(x.min()) < 0 or float(x.max()) > 1)):
            raise ImageError("images: float images must be finite and in [0, 1]")
        x = (x.float() * 255).round().to(torch.uint8)
    return x


def resize_uint8(x: torch.Tensor, image_size: int, dataset: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 → (B, 3, S, S) uint8, resized as the dataset's decoder does."""
    from .data import get_format
    resize = get_format(dataset).resize
    if resize is None:
        raise ValueError(f"data.dataset={dataset}: this dataset format declares no resize for predict")
    return resize(x, image_size)


def prepare_images(images, image_size: int, dataset: str) -> torch.Tensor:
    """Images of any size → (B, 3, S, S) float32 in [0, 1], resized as the dataset's decoder does.
    ``images``: file paths, PIL images or (H, W, 3) uint8 arrays (one or a list), or one (M, 3, H, W)
    batch (uint8 or float in [0, 1])."""
    if (isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4):
        x = images_uint8(images)
        batches = [resize_uint8(x[i:i + 256], image_size, dataset) for i in range(0, len(x), 256)]
    else:
        if isinstance(images, (str, Path)) or not hasattr(images, "__len__"):
            images = [images]
        batches = [resize_uint8(_decode(item, i)[None], image_size, dataset) for i, item in enumerate(images)]
    if not batches:
        raise ImageError("no images given")
    return torch.cat(batches).to(torch.float32).div_(255.0)                      # (B, 3, S, S)


def output_plan(taskset) -> list[dict]:
    """Per task (in task order) its post-processing, as data: {"name", "output": probabilities (softmax
    over ``dim``; "classes", your own tasks' "labels") | value (``o[:, 0] * std + mean``: a regression in
    the data's units) | map (the output as it is; "channels")}. ``predictions`` and the exported graph
    (fastdmtg.export.Exportable) both apply it: one rule for what a task's output means."""
    from .tasks.generic import GenericTaskSet
    plan = []
    for i, spec in enumerate(taskset.specs):
        if isinstance(taskset, GenericTaskSet):     # your own tasks (fastdmtg.tasks.generic): their declarations
            d = taskset.decls[i]
            if d.type == "regression":
                plan.append({"name": spec.name, "output": "value", "std": float(d.std), "mean": float(d.mean)})
                continue
            entry = {"name": spec.name, "output": "probabilities", "dim": -1, "classes": spec.out_channels}
            if getattr(d, "labels", None):
                entry["labels"] = list(d.labels)
            plan.append(entry)
        elif spec.kind in ("class", "segment"):
            plan.append({"name": spec.name, "output": "probabilities", "dim": -1 if spec.kind == "class" else 1,
                         "classes": spec.out_channels})
        else:
            plan.append({"name": spec.name, "output": "map", "channels": spec.out_channels})
    return plan


def postprocess(o: torch.Tensor, entry: dict) -> torch.Tensor:
    """One task's raw output → what it means (``output_plan``'s ``entry``): class probabilities
    ((B, C) or (B, C, S, S)), a regression value (B,) in the data's units, or the map as it is."""
    o = o.float()
    if entry["output"] == "probabilities":
        return o.softmax(entry["dim"])
    if entry["output"] == "value":
        return o[:, 0] * entry["std"] + entry["mean"]
    return o


def predictions(outputs, taskset) -> dict[str, dict]:
    """The model's outputs ((N, B, C) for attribute tasks, else a per-task list) → per task a dict:
    classification {"class": (B,) int64, "probabilities": (B, C), "label": the class as written in your
    own tasks' data, else its id}, segmentation the same per pixel ((B, S, S), (B, C, S, S); no label),
    a regression {"value": (B,)} in the data's units, other dense maps {"value": the map as the model
    outputs it}. ``output_plan`` says which task is which: the only place here that knows task kinds."""
    out = {}
    for i, entry in enumerate(output_plan(taskset)):
        o = postprocess(outputs[i].detach(), entry)
        if entry["output"] != "probabilities":
            out[entry["name"]] = {"value": o}
            continue
        cls = o.argmax(entry["dim"])
        out[entry["name"]] = rec = {"class": cls, "probabilities": o}
        if entry["dim"] == -1:                       # classification: the label as written, else the class id
            labels = entry.get("labels")
            rec["label"] = [labels[c] for c in cls.tolist()] if labels else cls.tolist()
    return out


@torch.no_grad()
def predict(model, images, meta: dict | None = None, probabilities: bool = False, batch_size: int = 64,
            details: bool = False) -> dict:
    """Predictions for every image from a loaded grouped model (``load_grouped``). Per task: the class
    index (or with ``probabilities`` the class probabilities; a regression task its value) as one
    tensor; with ``details`` the whole ``predictions`` dict (class, probabilities, label / value)."""
    from .config import Config
    from .data import taskset_for
    meta = meta if meta is not None else getattr(model, "meta", None)
    if meta is None:
        raise ValueError("predict: the model's metadata is missing; load it with fastdmtg.load_grouped(RUN_DIR)")
    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
    cfg = Config.from_dict(meta["config"])
    taskset = taskset_for(cfg, meta["tasks"])
    x = prepare_images(images, int(meta["image_size"]), cfg.data.dataset)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    parts = [predictions(model(x[s:s + batch_size].to(device)), taskset) for s in range(0, x.shape[0], batch_size)]
    model.train(was)
    out = {t: {k: (torch.cat([p[t][k] for p in parts]).cpu() if isinstance(v, torch.Tensor)
                   else [e for p in parts for e in p[t][k]])
               for k, v in d.items()} for t, d in parts[0].items()}
    if details:
        return out
    return {t: d["value"] if "value" in d else d["probabilities" if probabilities else "class"] for t, d in out.items()}


def attach(model, meta: dict):
    """Give a loaded model its ``predict(images, probabilities=False)`` method (export.load_grouped)."""
    model.meta = meta
    model.predict = types.MethodType(lambda self, images, **kw: predict(self, images, self.meta, **kw), model)
    return model


def predictions_csv(names: list[str], preds: dict[str, torch.Tensor], probs: dict[str, torch.Tensor],
                    labels: dict[str, list] | None = None) -> str:
    """One row per image: the image, then per classification task its class — the label as written in
    the data (``labels[task][i]``, from ``predictions``' "label") where the task has one, else the
    class id — and its probability, per regression task its value (in the data's units)."""
    labels = labels or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    tasks = [t for t in preds if preds[t].dim() == 1]
    w.writerow(["image"] + [c for t in tasks for c in ((t, f"{t}:p") if probs[t].dim() == 2 else (t,))])
    for i, name in enumerate(names):
        row = [name]
        for t in tasks:
            if probs[t].dim() == 1:                                    # a regression value
                row.append(f"{float(probs[t][i]):.6g}")
                continue
            k = int(preds[t][i])
            row += [labels[t][i] if t in labels else k, f"{float(probs[t][i, k]):.4f}"]
        w.writerow(row)
    return buf.getvalue()


def check_out(out: str | None) -> None:
    """``--out``: a CSV file path whose folder exists (an existing folder is not a file name)."""
    if not out:
        return
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"--out {p}: is a folder; expected a CSV file path (e.g. {p / 'predictions.csv'})")
    if not p.parent.is_dir():
        raise ValueError(f"--out {p}: its folder {p.parent} does not exist")


def expand_folders(paths: list[str]) -> list[str]:
    """The command line's images: a folder stands for the image files in it (not recursive, sorted by
    name; files whose extension Pillow does not know are skipped); files stay as given."""
    from PIL import Image
    known = set(Image.registered_extensions())
    out = []
    for a in paths:
        p = Path(a)
        if not p.is_dir():
            out.append(a)
            continue
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in known and f.is_file())
        if not files:
            raise ImageError(f"{p}: a folder without image files (none with an extension Pillow reads: .png, "
                             ".jpg, ...)")
        out += [str(f) for f in files]
    return out
