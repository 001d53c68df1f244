"""Weights & Biases: one W&B run per fastdmtg run, its files in RUN/wandb/.

Online (``wandb login`` once) or offline, without a network: ``WANDB_MODE=offline`` writes
RUN/wandb/offline-run-*/ and ``wandb sync RUN/wandb/offline-run-*`` uploads it later. Project:
``train.experiment``, else the project the run started in (on ``--resume``), else ``WANDB_PROJECT``,
else ``fastdmtg``; entity: ``WANDB_ENTITY`` (W&B's default otherwise). Run name: the run folder's name;
the W&B run id is stored in RUN/trackers.json, and ``--resume`` continues that W&B run
(``resume="allow"``; offline, a new offline-run-* folder of the same run id). Config: the resolved
config, flattened (section.key); the final test metrics go to the run's summary. Every scalar is
logged against ``global_step`` (W&B's own step counter only increases; a resumed run may repeat a step
of the interrupted one). The console is not captured (fastdmtg writes RUN/train.log itself).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from . import Tracker

STEP = "global_step"


class WandbTracker(Tracker):
    name = "wandb"
    order = 2
    modules = ("wandb",)
    extra = "wandb"

    def __init__(self, run_dir: Path, cfg, state: dict):
        import wandb
        from ..tboard import _flat
        self.wandb = wandb
        self.project = cfg.train.experiment or state.get("project") or os.environ.get("WANDB_PROJECT") or "fastdmtg"
        self.id = state.get("id") or uuid.uuid4().hex[:12]      # W&B run ids: [a-z0-9], unique per project
        self.run = wandb.init(project=self.project, id=self.id, name=Path(run_dir).name, resume="allow",
                              dir=str(run_dir), config=_flat(cfg.to_dict()), allow_val_change=True,
                              reinit="create_new",
                              settings=wandb.Settings(console="off", quiet=True, save_code=False, disable_git=True,
                                                      disable_job_creation=True))
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        self.pending: dict = {}             # the scalars of one step, logged as one row
        self.pending_step: int | None = None

    def state(self) -> dict:
        return {"id": self.id, "project": self.project}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.pending_step is not None and step != self.pending_step:
            self.flush()
        self.pending[tag] = value
        self.pending_step = step

    def flush(self) -> None:
        if self.pending:
            self.run.log({**self.pending, STEP: self.pending_step})
            self.pending, self.pending_step = {}, None

    def add_figure(self, tag: str, figure, step: int) -> None:
        self.flush()
        self.run.log({tag: self.wandb.Image(figure), STEP: step})

    def add_hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        self.flush()
        self.run.config.update(hparams, allow_val_change=True)
        self.run.summary.update(metrics)

    def close(self, status: str) -> None:
        self.flush()
        # W&B's state from the exit code: 0 finished, else failed (130: interrupted, as the CLI's exit)
        self.run.finish(exit_code={"finished": 0, "killed": 130}.get(status, 1))
        # stop W&B's service process (wandb-core) now: it would otherwise outlive the run in a Python
        # session, and its token stays in os.environ (WANDB_SERVICE), so that a child started later
        # (torchrun, a compare run) would connect to a socket that no longer answers
        self.wandb.teardown()


TRACKER = WandbTracker
