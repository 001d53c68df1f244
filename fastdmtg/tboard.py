"""TensorBoard records beyond the per-step scalars (RUN/tb; train.tensorboard).

Per epoch (x-axis: the global step, like the training scalars; ``train/epoch`` maps it to the
1-based epoch), all from the epoch's history.json record (so a tracker can log the same):
``val/loss/<task>``, ``val/error/<task>`` and every per-task validation metric ``val/<metric>/<task>``
(accuracy; regression ``mae`` / ``rmse`` in the data's units; ``miou``, …);
``train/task_loss/<task>`` — the task's training loss at its assigned head (batch-weighted mean over
the epoch; under DDP rank 0's shard); ``grouping/p/<task>/branch<k>`` — the probability that a task
uses branch k (1..K). At the end: the selected epoch's grouping figure (``grouping/selected_epoch``)
and an hparams record: the config's fields → the test totals, NormGain, every per-task test error
and metric (``test/<metric>/<task>``), the grouping's lowest margin and whether it is settled
(fastdmtg.report), the number of groups, the training time and the best epoch.
"""
from __future__ import annotations

import math


def log_epoch(writer, rec: dict, names: list[str], step: int) -> None:
    """One history.json record → scalars."""
    writer.add_scalar("train/epoch", rec["epoch"], step)
    val = rec.get("val") or {}
    for metric, per_task in val.items():
        if metric == "metrics":
            continue
        if isinstance(per_task, dict):
            for task, v in per_task.items():
                if _number(v):
                    writer.add_scalar(f"val/{metric}/{task}", v, step)
    for task, ms in (val.get("metrics") or {}).items():          # accuracy, mae / rmse (data units), miou, …
        for metric, v in ms.items():
            if metric != "count" and _number(v):
                writer.add_scalar(f"val/{metric}/{task}", v, step)
    for task, v in (rec.get("train_task_loss") or {}).items():
        if _number(v):
            writer.add_scalar(f"train/task_loss/{task}", v, step)
    probs = rec.get("probabilities")
    if probs is not None:
        for i, row in enumerate(probs):
            for k, p in enumerate(row):
                writer.add_scalar(f"grouping/p/{names[i]}/branch{k + 1}", p, step)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    HPARAMS tab (and, through the trackers, MLflow's params/metrics and W&B's config/summary)."""
    writer.add_hparams(_flat(cfg_dict), hparam_metrics(res), run_name="hparams")


def hparam_metrics(res: dict) -> dict[str, float]:
    """The final metrics recorded next to the hparams, from a results.json dict."""
    metrics = {"test/total_loss": res.get("total_loss")}
    if res.get("total_error") is not None:
        metrics["test/total_error"] = res["total_error"]
    for name in ("normgain_loss", "normgain_error"):
        if isinstance(res.get(name), dict) and res[name].get("value") is not None:
            metrics[f"test/{name}"] = res[name]["value"]
    test = res.get("test") or {}
    for task, v in (test.get("error") or {}).items():
        metrics[f"test/error/{task}"] = v
    for task, ms in (test.get("metrics") or {}).items():       # accuracy, mae / rmse in data units, miou, …
        for metric, v in ms.items():
            if metric != "count" and _number(v):
                metrics[f"test/{metric}/{task}"] = v
    conf = res.get("grouping_confidence")
    if conf:
        metrics["grouping/min_margin"] = conf["min_margin"]
        metrics["grouping/settled"] = float(conf["settled"])
    metrics["grouping/groups"] = len(res.get("groups") or [])
    if res.get("train_time_s") is not None:
        metrics["train_time_s"] = res["train_time_s"]
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and _number(v)}
    metrics["best_epoch"] = float(res["best_epoch"])
    return metrics
