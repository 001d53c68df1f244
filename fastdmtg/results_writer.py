"""What a run leaves for people and tools (rank 0): history.json after every epoch, the epoch lines,
and at the end results.json (written last: the mark of a finished run) with the grouping figure and
the trackers' summary (hyperparameters → results).

The trainer hands over its state once it has evaluated the kept (best) model; nothing here trains or
changes the model.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt
from . import ops
from .builder import use_bf16
from .log import EPOCHS, get_logger
from .metrics import normgain, normgain_error

if TYPE_CHECKING:
    from .train import Trainer

log = get_logger("fastdmtg.train")    # the trainer's logger: the run's messages keep their source
epoch_log = get_logger(EPOCHS)        # the per-epoch lines (a logger of their own: can be muted alone)


def groups_of(assignment: list[int], names: list[str]) -> list[list[str]]:
    used = sorted(set(assignment))
    return [[names[i] for i, a in enumerate(assignment) if a == k] for k in used]


def divergence_text(d: dict) -> str:
    return (f"epoch {d['epoch']} training loss {d['train_loss']:.4g} > {d['factor']:g} × the first step's "
            f"loss {d['initial_loss']:.4g} (train.divergence_factor)")


def write_history(run_dir: Path, history: list[dict]) -> None:
    from .report import round_floats
    ckpt.atomic_write_json(run_dir / "history.json", round_floats(history))


def print_epoch(rec: dict, epochs: int, names: list[str]) -> None:
    """The epoch's line (loss, validation, groups) and, after a validation, its per-task lines."""
    msg = f"epoch {rec['epoch']}/{epochs}: train loss {rec['train_loss']:.4f}"
    if "val" in rec:
        msg += f", val loss {rec['val']['total_loss']:.4f}"
        if "total_error" in rec["val"]:
            msg += f", val total error {rec['val']['total_error']:.2f}"
    msg += f", groups {groups_of(rec['assignment'], names)}"
    if "val" in rec:
        from .report import epoch_task_lines
        msg = "\n".join([msg] + epoch_task_lines(rec["val"], names))
    epoch_log.info(msg)


def compare_to_reference(reference_path: str, test: dict) -> dict:
    p = Path(reference_path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: naive-MTL reference results not found (train.reference)")
    ref = ckpt.read_json(p)
    if not (isinstance(ref, dict) and isinstance(ref.get("test"), dict) and isinstance(ref["test"].get("loss"), dict)):
        raise ckpt.RunFileError(f"{p}: not a fastdmtg results.json (no test.loss) (train.reference)")
    out = {"reference": str(p), "normgain_loss": normgain(ref["test"]["loss"], test["loss"])}
    nge = normgain_error(ref["test"], test)
    if nge is not None:
        out["normgain_error"] = nge
    return out


def _grouping_confidence(res: dict) -> None:
    """results.json "grouping_confidence" (fastdmtg.report), and a warning when not settled."""
    from .report import grouping_confidence, unsettled_warning
    conf = grouping_confidence(res.get("probabilities"), res["assignment"], res["tasks"])
    if conf is not None:
        res["grouping_confidence"] = conf
        if not conf["settled"]:
            log.warning(unsettled_warning(conf))


def _env(t: Trainer) -> dict:
    return {"device": str(t.device), "gpu": torch.cuda.get_device_name(t.device)
            if t.device.type == "cuda" else None, "torch": torch.__version__,
            "python": platform.python_version(), "kernels": ops.resolve_backend(t.cfg.train.kernels, t.device)}


def run_results(t: Trainer, test: dict, assignment: list[int], extra: dict) -> dict:
    """results.json's content for the kept model (``test``: its test evaluation, ``assignment``: its
    head per task, ``extra``: the method's results over the whole run), from the trainer's state at
    the end of the run."""
    cfg, names = t.cfg, t.taskset.names
    res = {
        "name": cfg.name, "method": cfg.grouping.method, "dataset": cfg.data.dataset, "tasks": names,
        "num_branches": t.method.num_branches, "assignment": assignment, "groups": groups_of(assignment, names),
        "best_epoch": t.best_epoch + 1, "best_rule": cfg.train.best_rule, "epochs": cfg.train.epochs,
        "batch": {"per_rank": cfg.train.batch_size, "world_size": t.world_size, "global": t.global_batch},
        "precision": {"amp": cfg.train.amp, "training_bf16": use_bf16(cfg, t.device),
                      "evaluation_bf16": cfg.train.amp == "bf16"},
        "test": test, "total_loss": test["total_loss"], "total_error": test.get("total_error"),
        "train_time_s": t.train_time,
        "speed": dict(t.speed, world_size=t.world_size, graph_captures=t.runner.captures),
        "env": _env(t),
    }
    probs = t.method.probabilities()
    if probs is not None:
        res["probabilities"] = probs.cpu().tolist()
    _grouping_confidence(res)
    res.update(extra)
    if t.method.step_backward() is not None:           # a training augmentation: its learned state
        res["augmentation"] = t.method.step_backward().results()
    if cfg.train.reference:
        res.update(compare_to_reference(cfg.train.reference, test))
    res["diverged"] = t.divergence is not None
    if t.divergence is not None:
        res["divergence"] = dict(t.divergence, rule=divergence_text(t.divergence))
    res["config_changes"] = [c for h in t.history for c in h.get("config_changes", [])] + t.config_changes
    res["data_fingerprint"] = t.data_fingerprint
    return res


def _figure(t: Trainer, res: dict) -> None:
    """grouping.png (fastdmtg.plots, when matplotlib is installed), also sent to the trackers."""
    try:
        from .plots import grouping_heatmap
        # the figure of the model that was kept: the selected (best) epoch's probabilities
        fig = grouping_heatmap(t.history, t.taskset.names, t.run_dir / "grouping.png", selected_epoch=t.best_epoch + 1,
                               rule=t.cfg.train.best_rule, keep_figure=t.writer is not None,
                               confidence=res.get("grouping_confidence"))
        if fig is not None and t.writer is not None:
            t.writer.add_figure("grouping/selected_epoch", fig, t.global_step)
            t.writer.flush()
    except ImportError:
        pass


def write_results(t: Trainer, res: dict) -> dict:
    """The end of a run's files: the figure, the trackers' hyperparameters → results, then
    results.json (rounded: no float noise in what people read; last, the mark of a finished run)."""
    _figure(t, res)
    if t.writer is not None:
        from .tboard import log_hparams
        log_hparams(t.writer, t.cfg.to_dict(), res)
        t.writer.flush()
    from .report import round_floats
    res = round_floats(res)                                          # no float noise in what people read
    ckpt.atomic_write_json(t.run_dir / "results.json", res)         # last: the mark of a finished run
    return res
