"""Save / load the pruned grouped model so it predicts on its own.

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
    from .predict import attach
    return attach(model.to(device).eval(), meta), meta       # model.predict(images) → {task: prediction}


def task_specs_for(cfg: Config, names: list[str]):
    """Task specs of a saved run (the dataset format's task set decides the head shapes)."""
    return taskset_for(cfg, names).specs
