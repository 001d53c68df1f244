"""The run folder of one run: its lock, the resume checks, the checkpoints written and read, the
migrations of files written by older versions, the results of a finished run kept in previous/<n>/,
and the data-fingerprint check.

Rank 0 alone writes the folder; every outcome that decides whether the run goes on (a lock refused,
a checkpoint unreadable, a write failed) goes to every rank so that all stop together (no rank left
waiting at a collective). The file-level mechanics (atomic writes, the lock itself, strict JSON) are
fastdmtg.checkpoint's; this module decides what a run does with them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import fingerprint
from .config import Config, ConfigError, resume_changes
from .log import RunLog, get_logger

log = get_logger("fastdmtg.train")       # the trainer's logger: the run's messages keep their source
# Epoch numbering: every file and message a person reads counts epochs from 1 (history.json "epoch",
# results.json "best_epoch", divergence/config_changes "epoch", plots, TensorBoard "train/epoch");
# the checkpoints' counters (last.pt "epoch" = epochs completed, best.pt "epoch" = 0-based index) are
# internal and stay as they were. Checkpoints written before this convention carry no "epoch_base".
EPOCH_BASE = 1

# entries a checkpoint must hold to be resumed from
RESUME_KEYS = ("model", "method", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "best_val",
               "best_epoch", "best_train", "epoch_loss_sum", "epoch_samples", "train_time", "rng", "config")

#: the files of a finished run that a resume (e.g. more epochs) would replace
RESULT_FILES = ("results.json", "grouped_model.json", "grouped_model.safetensors", "grouping.png",
                "eval_train.json", "eval_val.json", "eval_test.json")


def _warn(msg: str) -> None:
    log.warning(msg)


def _renumber_record(rec: dict) -> dict:
    """A history.json record written before epochs were numbered from 1, renumbered."""
    rec = dict(rec, epoch=rec["epoch"] + 1)
    if "config_changes" in rec:
        rec["config_changes"] = [dict(c, epoch=c["epoch"] + 1) for c in rec["config_changes"]]
    return rec


def keep_previous_results(run_dir: Path) -> Path | None:
    """Before a finished run is trained on (``--resume`` with more epochs), move its results
    (RESULT_FILES) to RUN/previous/<n>/ (n = 1, 2, … per continuation) and say so → that folder, or
    None when the run had not finished. Moved, not copied: results.json in RUN marks a finished run."""
    if not (run_dir / "results.json").exists():
        return None
    n = 1
    while (run_dir / "previous" / str(n)).exists():
        n += 1
    dest = run_dir / "previous" / str(n)
    dest.mkdir(parents=True)
    moved = []
    for name in RESULT_FILES:
        if (run_dir / name).exists():
            (run_dir / name).replace(dest / name)
            moved.append(name)
    log.info(f"resume: the finished run's results ({', '.join(moved)}) moved to {dest}; "
             "the continued run writes new ones")
    return dest


def migrate_state(st: dict) -> tuple[dict | None, list[dict]]:
    """The divergence record and the pending config changes of a resume checkpoint, numbered as
    today (a checkpoint written before epochs were numbered from 1 in what people read)."""
    divergence, config_changes = st.get("divergence"), list(st.get("config_changes", []))
    if st.get("epoch_base") != EPOCH_BASE:
        if divergence is not None:
            divergence = dict(divergence, epoch=divergence["epoch"] + 1)
        config_changes = [dict(c, epoch=c["epoch"] + 1) for c in config_changes]
    return divergence, config_changes


def read_history(run_dir: Path, completed: int) -> list[dict]:
    """history.json's records of epochs 1..``completed`` (renumbered when written before epochs were
    numbered from 1); [] when there is none."""
    hist = run_dir / "history.json"
    if not hist.exists():
        return []
    h = ckpt.read_json(hist)
    if not (isinstance(h, list) and all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in h)):
        raise ckpt.RunFileError(f"{hist}: expected a list of per-epoch records with an integer \"epoch\"")
    if h and h[0]["epoch"] == 0:      # written before epochs were numbered from 1
        h = [_renumber_record(r) for r in h]
    return [r for r in h if r["epoch"] <= completed]     # epochs 1..completed


class RunFolder:
    """RUN as one run holds it: locked by rank 0 from ``claim`` to ``close``; train.log; last.pt and
    best.pt; what the folder holds to go back to (``kept``)."""

    def __init__(self, run_dir: str | Path, is_main: bool):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock: ckpt.RunLock | None = None
        self.runlog: RunLog | None = None
        self.saved_last: tuple | None = None   # (file, epoch, step_in_epoch, global_step): the state to go back to

    # ------------------------------------------------------------------ start
    def claim(self, cfg: Config, resume: bool) -> tuple[dict | None, list]:
        """Rank 0 locks RUN (one writer at a time), removes a killed writer's temporary files and
        checks that the folder may be written; on resume it picks the checkpoint (last.pt, else
        last.prev.pt). The outcome goes to every rank so that all stop together (no rank left waiting
        at a collective). Then every rank reads that checkpoint and checks the config against the one
        stored in it → (state or None, the resume-safe changes to apply)."""
        err, path, st = None, None, None
        if self.is_main:
            try:
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ckpt.WriteFailed(f"cannot create {self.run_dir}: {e.strerror or e}") from None
                self.lock = ckpt.RunLock(self.run_dir)
                if self.lock.reclaimed is not None:
                    log.info(f"{self.lock.path}: the lock of a run that is gone (pid {self.lock.reclaimed['pid']}, "
                             f"started {self.lock.reclaimed.get('started', '?')}) was taken over")
                ckpt.remove_temp_files(self.run_dir)
                if resume:
                    path, st = ckpt.load_resume_checkpoint(self.ckpt_dir, "cpu", RESUME_KEYS, warn=_warn)
                else:
                    ckpt.check_new_run_folder(self.run_dir)
            except (OSError, ValueError) as e:
                err = e
        err, path = dist_utils.broadcast_from_main((err, path))
        if err is not None:
            raise err
        if not resume:
            return None, []
        if st is None:
            st = ckpt.load_checkpoint(path, "cpu", RESUME_KEYS)
        st["_path"] = path
        return st, self._config_changes(cfg, st)

    def _config_changes(self, cfg: Config, st: dict) -> list:
        """The resume-safe changes of ``cfg`` against the config stored in the checkpoint (anything
        else refused, naming the field)."""
        path = st["_path"]
        try:
            old = Config.from_dict(st["config"])
        except ConfigError as e:
            raise ConfigError(f"{path}: the run's stored config: {e}") from None
        if not cfg.data.folder_tasks and old.data.folder_tasks:
            # the command line leaves your own tasks' declarations to inference (e.g. `--resume RUN --recipe
            # folder_k3`): the run keeps the declarations it was trained with, not a new inference
            cfg.data.folder_tasks = dict(old.data.folder_tasks)
        try:
            return resume_changes(old, cfg, st["epoch"])
        except ConfigError as e:
            raise ConfigError(f"{self.run_dir}: {e}") from None

    def open_log(self) -> None:
        if self.is_main:
            self.runlog = RunLog(self.run_dir)      # RUN/train.log: this run's messages, appended

    def finished_results(self, resume_state: dict | None, config_changes: list, epochs: int) -> dict | None:
        """A finished run resumed without changes: its results.json (rank 0; {} elsewhere), which stays
        as it is — nothing to do. Else None."""
        if resume_state is not None and not config_changes and resume_state["epoch"] >= epochs \
                and (self.run_dir / "results.json").exists():
            return ckpt.read_json(self.run_dir / "results.json") if self.is_main else {}
        return None

    def data_changes(self, resume_state: dict, data_fingerprint, accept_data_change: bool) -> list:
        """The data the resume trains on against the run's recorded fingerprint → the changes to record
        (refused unless ``accept_data_change``; fastdmtg.fingerprint)."""
        data_changes = fingerprint.check(resume_state.get("data_fingerprint"), data_fingerprint,
                                         str(self.run_dir), accept_data_change,
                                         f"fastdmtg train --resume {self.run_dir}")
        return [(f"data: {k}", o, n) for k, o, n in data_changes]

    def record_changes(self, cfg: Config, changes: list, at: dict) -> list[dict]:
        """The resume-safe changes as config_changes records taking effect ``at`` (epoch, step); the
        config in force written to config.json and each change logged (rank 0)."""
        if not changes:
            return []
        if self.is_main:
            cfg.save(self.run_dir / "config.json")
            for k, o, n in changes:
                log.info(f"resume: {k}: {json.dumps(o)} → {json.dumps(n)}")
        return [dict(field=k, old=o, new=n, **at) for k, o, n in changes]

    def log_startup_failure(self, e: BaseException) -> None:
        """A start-up that fails once the folder is ours (bad data, a config the data refuses, Ctrl-C)
        says why in RUN/train.log, so the folder it leaves (train.log, maybe config.json) explains
        itself; the folder is kept, never deleted (a resume's folder holds a run). Written to the file
        only: the command line prints the error itself."""
        h = self.runlog.handler if self.runlog is not None else None
        if h is not None:
            what = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else (str(e) or type(e).__name__)
            h.handle(logging.LogRecord(log.name, logging.ERROR, __file__, 0,
                                       f"the run stopped during start-up, before its first step: {what}", None, None))

    def close(self) -> None:
        """Release the lock and close train.log (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.runlog is not None:
            self.runlog.close()
            self.runlog = None

    # ------------------------------------------------------------------ checkpoints
    def write_last(self, state, position: tuple) -> None:
        """Rank 0 writes last.pt (``state()``; its predecessor kept as last.prev.pt); every rank waits
        for the write and raises its failure. ``position``: (epoch, step_in_epoch, global_step)."""
        err = None
        if self.is_main:
            try:
                ckpt.save_checkpoint(self.ckpt_dir / ckpt.LAST, state(), keep_previous=True)
            except ckpt.WriteFailed as e:
                err = e
        err = dist_utils.broadcast_from_main(err)          # also the barrier: every rank waits for the write
        if err is not None:
            raise err
        self.saved_last = (self.ckpt_dir / ckpt.LAST, *position)

    def write_best(self, state: dict) -> BaseException | None:
        """Write best.pt → the write's failure (to raise on every rank), or None."""
        try:
            ckpt.save_checkpoint(self.ckpt_dir / ckpt.BEST, state)
        except ckpt.WriteFailed as e:
            return e
        return None

    def kept(self, best_epoch: int) -> str:
        """What the run folder holds to go back to, for the messages of a stopped run."""
        if self.saved_last is None:
            kept = "no checkpoint was written (the run stopped before the end of its first epoch)"
        else:
            path, e, s, g = self.saved_last
            where = f"the end of epoch {e}" if s == 0 else f"epoch {e + 1}, step {g}"
            kept = f"{path} holds the state at {where} (step {g})"
        if best_epoch >= 0 and (self.ckpt_dir / ckpt.BEST).exists():
            kept += f"; {self.ckpt_dir / ckpt.BEST} holds epoch {best_epoch + 1} (train.best_rule)"
        return kept
