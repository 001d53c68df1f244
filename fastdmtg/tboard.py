"""TensorBoard records beyond the per-step scalars (RUN/tb; train.tensorboard).

Per epoch (x-axis: the global step, like the training scalars; ``train/epoch`` maps it to the
1-based epoch): ``val/loss/<task>``, ``val/error/<task>`` and any other per-task validation metric
``val/<metric>/<task>``; ``grouping/p/<task>/branch<k>`` — the probability that a task uses branch
k (1..K). At the end: the selected epoch's grouping figure (``grouping/selected_epoch``) and an
hparams record (the config's fields → the final test metrics).
"""
from __future__ import annotations

import math


def log_epoch(writer, rec: dict, names: list[str], step: int) -> None:
    """One history.json record → scalars."""
    writer.add_scalar("train/epoch", rec["epoch"], step)
    val = rec.get("val") or {}
    for metric, per_task in val.items():
        if isinstance(per_task, dict):
            for task, v in per_task.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    writer.add_scalar(f"val/{metric}/{task}", v, step)
    probs = rec.get("probabilities")
    if probs is not None:
        for i, row in enumerate(probs):
            for k, p in enumerate(row):
                writer.add_scalar(f"grouping/p/{names[i]}/branch{k + 1}", p, step)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif v is None:
            out[key] = "none"
        else:
            out[key] = str(v)
    return out


def log_hparams(writer, cfg_dict: dict, res: dict) -> None:
    """The run's config (flattened, section.key) with its final test metrics, in TensorBoard's
    HPARAMS tab."""
    metrics = {"test/total_loss": res.get("total_loss")}
    if res.get("total_error") is not None:
        metrics["test/total_error"] = res["total_error"]
    for name in ("normgain_loss", "normgain_error"):
        if isinstance(res.get(name), dict) and res[name].get("value") is not None:
            metrics[f"test/{name}"] = res[name]["value"]
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    metrics["best_epoch"] = float(res["best_epoch"])
    writer.add_hparams(_flat(cfg_dict), metrics, run_name="hparams")
