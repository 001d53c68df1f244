"""Save / load the pruned grouped model so it predicts on its own; `fastdmtg predict` and `fastdmtg
export` (both read a finished run's grouped model).

Files in the run folder:
    grouped_model.json         {"format": 1, "config": <resolved config>, "tasks": [...], "groups": [[task idx]],
                                "image_size": S}
    grouped_model.safetensors  the GroupedNet state dict (no pickle)

``load_grouped(run_dir)`` rebuilds the architecture from the JSON and loads the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config
from .data import taskset_for
from .models import GroupedNet, build_grouped
from .predict import attach, output_plan, postprocess

FORMAT = 1


def save_grouped(run_dir: str | Path, model: GroupedNet, cfg: Config, task_names: list[str], image_size: int) -> None:
    run_dir = Path(run_dir)
    meta = {"format": FORMAT, "config": cfg.to_dict(), "tasks": task_names, "groups": model.groups,
            "image_size": image_size}
    # weights first, then the JSON that points at them: a reader never sees JSON without weights
    ckpt.save_safetensors(run_dir / "grouped_model.safetensors", model.state_dict())
    ckpt.atomic_write_json(run_dir / "grouped_model.json", meta)


def load_grouped(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GroupedNet, dict]:
    """Load a pruned model → (GroupedNet in eval mode, metadata). A missing folder or file, invalid
    JSON, a corrupt or mismatched weights file: one-line errors naming the file."""
    from .config import ConfigError
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    meta_path = run_dir / "grouped_model.json"
    if not meta_path.exists():
        if ckpt.has_checkpoint(run_dir):
            raise FileNotFoundError(f"{run_dir}: the run has not finished (no grouped_model.json yet); "
                                    f"continue it with: fastdmtg train --resume {run_dir}")
        raise FileNotFoundError(f"{meta_path}: no pruned model in this run folder (it is written when a run "
                                "finishes)")
    meta = ckpt.read_json(meta_path)
    if not isinstance(meta, dict):
        raise ckpt.RunFileError(f"{meta_path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    missing = [k for k in ("config", "tasks", "groups", "image_size") if k not in meta]
    if missing:
        raise ckpt.RunFileError(f"{meta_path}: missing {', '.join(missing)}")
    try:
        cfg = Config.from_dict(meta["config"])
        specs = task_specs_for(cfg, meta["tasks"])
        model = build_grouped(cfg.model, specs, meta["image_size"], meta["groups"])
    except ConfigError as e:
        raise ConfigError(f"{meta_path}: {e}") from None
    except (TypeError, KeyError, IndexError, ValueError) as e:      # hand-edited tasks/groups
        raise ckpt.RunFileError(f"{meta_path}: tasks/groups/image_size do not describe a model "
                                f"({ckpt._reason(e)})") from None
    weights = run_dir / "grouped_model.safetensors"
    state = ckpt.load_safetensors(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ckpt.RunFileError(f"{weights}: does not fit the model of {meta_path} "
                                f"({ckpt._reason(e).split('. ')[0]})") from None
    return attach(model.to(device).eval(), meta), meta       # model.predict(images) → {task: prediction}


def task_specs_for(cfg: Config, names: list[str]):
    """Task specs of a saved run (the dataset format's task set decides the head shapes)."""
    return taskset_for(cfg, names).specs


# ------------------------------------------------------------------ ONNX / TorchScript
# `fastdmtg export RUN --format onnx|torchscript [--out FILE]`: the grouped model with each task's
# post-processing, as `fastdmtg predict` applies it (one rule: fastdmtg.predict.output_plan and
# postprocess, applied by both fastdmtg.predict.predictions and Exportable):
#   classification (CelebA attributes, your own binary / multiclass tasks)  softmax → (B, C) probabilities
#   regression (your own tasks)           the head's output de-standardised: y · std + mean → (B,) in data units
#   segmentation (Taskonomy)              softmax over the classes → (B, C, S, S) probabilities
#   other dense tasks (depth, normal, …)  the map as the model outputs it (B, C, S, S)
# Input: ``image`` (B, 3, S, S) float32 RGB in [0, 1] (NCHW), S = the run's image_size: each image
# resized to S × S as the dataset's decoder does (fastdmtg.predict.prepare_images), then / 255; no
# mean/std normalisation (the model was trained on x / 255). The batch axis is dynamic.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 18


class Exportable(torch.nn.Module):
    """The grouped model + each task's post-processing: image (B, 3, S, S) float in [0, 1] → one tensor
    per task (``output_plan``): a tuple in task order, or with ``as_dict`` {task: tensor}."""

    def __init__(self, model: GroupedNet, plan: list[dict], as_dict: bool = False):
        super().__init__()
        self.model, self.plan, self.as_dict = model, plan, as_dict

    def forward(self, image: torch.Tensor):
        out = self.model(image)                      # (N, B, C) stacked, or a list of N tensors
        res = [postprocess(out[i], p) for i, p in enumerate(self.plan)]
        if self.as_dict:
            return {p["name"]: o for p, o in zip(self.plan, res)}
        return tuple(res)


def export_metadata(meta: dict, plan: list[dict], fmt: str) -> dict:
    """What a consumer of the file needs, stored inside it (ONNX metadata_props / a TorchScript extra
    file ``fastdmtg.json``)."""
    from ._version import __version__
    s = int(meta["image_size"])
    return {"format": 1, "exporter": f"fastdmtg {__version__}", "kind": fmt,
            "input": {"name": "image", "shape": ["batch", 3, s, s], "dtype": "float32", "layout": "NCHW, RGB",
                      "range": [0.0, 1.0], "preprocessing": f"resize to {s}x{s} as fastdmtg.predict.prepare_images "
                      "does (dataset " + str(meta["config"]["data"]["dataset"]) + "), then divide by 255; "
                      "no mean/std normalisation"},
            "outputs": plan, "tasks": meta["tasks"], "groups": [[meta["tasks"][i] for i in g] for g in meta["groups"]]}


def export_model(run_dir: str | Path, fmt: str, out: str | Path | None = None, batch: int = 2) -> tuple[Path, dict]:
    """Write RUN's grouped model with its post-processing as ONNX or TorchScript → (file, metadata).
    Default file: RUN/grouped_model.onnx | RUN/grouped_model.pt. Needs a finished run."""
    import json
    from .config import Config
    from .data import taskset_for
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected {'|'.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    model, meta = load_grouped(run_dir, "cpu")       # on the CPU: the PyTorch paths, traceable everywhere
    taskset = taskset_for(Config.from_dict(meta["config"]), meta["tasks"])
    plan = output_plan(taskset)
    info = export_metadata(meta, plan, fmt)
    path = Path(out) if out else run_dir / f"grouped_model{FORMATS[fmt]}"
    s = int(meta["image_size"])
    example = torch.rand(batch, 3, s, s)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "torchscript":
            import warnings
            with torch.no_grad(), warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.export (the ONNX path), still supported; the
                # graph has no data-dependent control flow, so the trace holds for any batch size
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(Exportable(model, plan, as_dict=True).eval(), example, strict=False)
                torch.jit.save(traced, str(tmp), _extra_files={"fastdmtg.json": json.dumps(info)})
        else:
            _export_onnx(Exportable(model, plan).eval(), example, tmp, [p["name"] for p in plan], info)
        tmp.replace(path)                            # complete or absent: never a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return path, info


def _export_onnx(module, example, path: Path, names: list[str], info: dict) -> None:
    import json
    import warnings
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter writes the graph with it)
    except ImportError:
        raise ImportError("--format onnx: the onnx package is not installed; install with: "
                          "pip install 'fastdmtg[export]'") from None
    import logging
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")          # "torchvision is not installed. Skipping ..." notes
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the exporter's deprecation notes
        try:
            prog = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=names,
                                     dynamic_shapes=({0: batch},), opset_version=OPSET, verbose=False,
                                     optimize=True)
        finally:
            quiet.setLevel(level)
    proto = prog.model_proto
    proto.metadata_props.add(key="fastdmtg", value=json.dumps(info))
    onnx.save(proto, str(path))


def export_main(argv: list[str]) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="fastdmtg export",
                                 description="write a finished run's grouped model, with each task's "
                                             "post-processing, as ONNX or TorchScript (README: Export)")
    ap.add_argument("run_dir", help="a finished run folder (holds grouped_model.json)")
    ap.add_argument("--format", required=True, choices=sorted(FORMATS), help="onnx | torchscript")
    ap.add_argument("--out", help="the file to write (default RUN_DIR/grouped_model.onnx | .pt)")
    args = ap.parse_args(argv)
    try:
        path, info = export_model(args.run_dir, args.format, args.out)
    except ImportError as e:                         # onnx / onnxscript missing: what to install
        print(f"error: {e}", file=sys.stderr)
        return 2
    i = info["input"]
    print(f"{args.format}: {path}")
    print(f"input {i['name']}: {' x '.join(map(str, i['shape']))} {i['dtype']} {i['layout']} in [0, 1] "
          f"({i['preprocessing']})")
    for o in info["outputs"]:
        if o["output"] == "probabilities":
            what = f"class probabilities ({o['classes']} classes, softmax over dim {o['dim']})"
        elif o["output"] == "value":
            what = f"value in the data's units (head output x {o['std']:.6g} + {o['mean']:.6g})"
        else:
            what = "the map as the model outputs it"
        print(f"output {o['name']}: {what}")
    return 0


def predict_main(argv: list[str]) -> int:
    import argparse
    import sys

    from .builder import resolve_device
    from .predict import check_out, expand_folders, predictions_csv
    ap = argparse.ArgumentParser(prog="fastdmtg predict",
                                 description="predict every task of a finished run for your own images "
                                             "(any size; resized as in training)")
    ap.add_argument("run_dir", help="a finished run folder (holds grouped_model.json)")
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...), or folders: every image file in "
                                              "them (not recursive, sorted by name)")
    ap.add_argument("--out", help="write the predictions to this CSV file (default: print them)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    args = ap.parse_args(argv)
    check_out(args.out)                    # before the model runs: a bad --out would lose its work
    images = expand_folders(args.images)
    model, meta = load_grouped(args.run_dir, resolve_device(args.device))
    det = model.predict(images, batch_size=args.batch_size, details=True)
    probs = {t: d.get("probabilities", d.get("value")) for t, d in det.items()}
    preds = {t: (p.argmax(-1) if p.dim() == 2 else p) for t, p in probs.items()}
    labels = {t: d["label"] for t, d in det.items() if "label" in d}
    dense = [t for t, p in preds.items() if p.dim() != 1]
    if dense:
        print(f"note: dense tasks {', '.join(dense)} are not written to CSV; use model.predict() in Python",
              file=sys.stderr)
    text = predictions_csv(images, preds, probs, labels)
    if args.out:
        from .checkpoint import WriteFailed, atomic_write_text
        try:
            atomic_write_text(args.out, text)
        except WriteFailed as e:           # disk full, permissions: the message names the file
            print(f"error: {e}", file=sys.stderr)
            return 5
        print(f"predictions for {len(images)} images: {args.out}")
    else:
        sys.stdout.write(text)
    return 0
