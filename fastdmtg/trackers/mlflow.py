"""MLflow: one MLflow run per fastdmtg run, through ``MlflowClient`` (no global "active run": several
runs in one process, e.g. ``fastdmtg compare``, each keep their own).

Store (the tracking URI), first that is set: ``train.mlflow_uri``; on ``--resume`` the store the run
started in (RUN/trackers.json); ``MLFLOW_TRACKING_URI``; else MLflow's own default — for MLflow >= 3.7
``sqlite:///mlflow.db`` in the current directory, with artifacts in ``./mlruns`` (an existing
``./mlruns`` file store is used instead; MLflow 3.x refuses new file stores unless
``MLFLOW_ALLOW_FILE_STORE=true``). A relative local URI is made absolute when stored, so a resume from
another directory finds the same store.

Experiment: ``train.experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``fastdmtg``. Run name: the run
folder's name. Params: the resolved config, flattened (section.key) as TensorBoard's hparams; the full
config.json as an artifact (an MLflow param value is cut at 6000 characters; the artifact is not).
Metrics: every scalar with its step, in batches (``log_batch``). The grouping figure: the artifact
``grouping/selected_epoch.png``. A resumed run continues the same MLflow run (its id in
RUN/trackers.json); a resume-safe config change (e.g. train.epochs) cannot change an MLflow param (they
are immutable): the new value goes to the tag ``resumed.<key>``.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from . import Buffer, Tracker, log

_KEY = re.compile(r"[^\w\-. /]")          # MLflow's allowed key characters: alphanumerics _ - . space /
MAX_PARAM_VALUE = 6000
MAX_BATCH_PARAMS = 100                    # MLflow's limits per log_batch call
MAX_BATCH_METRICS = 1000
STATUS = {"finished": "FINISHED", "killed": "KILLED", "failed": "FAILED"}


def key(name: str) -> str:
    """A metric/param key MLflow accepts (other characters become "_"; at most 250 characters)."""
    return _KEY.sub("_", name)[:250]


def absolute_uri(uri: str) -> str:
    """A local store's URI with an absolute path (sqlite:///rel.db, file:rel, a plain path); others as given."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        return uri if rest.startswith("/") else Path(rest).resolve().as_uri()
    if ":" not in uri:                                   # a plain path: a file store
        return Path(uri).resolve().as_uri()
    return uri


class MlflowTracker(Tracker):
    name = "mlflow"
    order = 1
    # the client, and SQLAlchemy + Alembic for MLflow's default store (sqlite:///mlflow.db)
    modules = ("mlflow", "sqlalchemy", "alembic")
    extra = "mlflow"

    def __init__(self, run_dir: Path, cfg, state: dict):
        import mlflow
        from mlflow.tracking import MlflowClient
        self.run_dir = Path(run_dir)
        uri = cfg.train.mlflow_uri or state.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") \
            or mlflow.get_tracking_uri()
        self.uri = absolute_uri(str(uri))
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.train.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fastdmtg"
        self.run_id = self._existing_run(state.get("run_id"))
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(name)
                except Exception:                   # created meanwhile by a parallel run
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                         tags={"fastdmtg.run_dir": str(self.run_dir.resolve()),
                                               "fastdmtg.method": cfg.grouping.method,
                                               "fastdmtg.dataset": cfg.data.dataset})
            self.run_id = run.info.run_id
        self.buffer = Buffer(MAX_BATCH_METRICS)
        from ..tboard import _flat
        self.add_params(_flat(cfg.to_dict()))
        cfg_file = self.run_dir / "config.json"
        if cfg_file.exists():
            self.client.log_artifact(self.run_id, str(cfg_file))

    def _existing_run(self, run_id: str | None) -> str | None:
        """The stored run, reopened; None (a new run) when there is none or this store lacks it."""
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:
            log.warning(f"mlflow: run {run_id} of {self.run_dir / 'trackers.json'} is not in {self.uri}; "
                        "logging to a new MLflow run")
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def add_params(self, params: dict) -> None:
        """Log the params not logged yet; a changed value (a resume-safe change) as the tag resumed.<key>."""
        from mlflow.entities import Param, RunTag
        have = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for k, v in params.items():
            k, v = key(k), str(v)[:MAX_PARAM_VALUE]
            if k not in have:
                new.append(Param(k, v))
            elif have[k] != v:
                changed.append(RunTag(f"resumed.{k}", v))
        for i in range(0, len(new), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_BATCH_PARAMS])
        for i in range(0, len(changed), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, tags=changed[i:i + MAX_BATCH_PARAMS])

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from mlflow.entities import Metric
        if self.buffer.add(Metric(key(tag), value, int(time.time() * 1000), step)):
            self.flush()

    def flush(self) -> None:
        items = self.buffer.take()
        for i in range(0, len(items), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + MAX_BATCH_METRICS])

    def add_figure(self, tag: str, figure, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"{key(tag)}.png")

    def add_hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        self.add_params(hparams)
        for k, v in metrics.items():
            self.add_scalar(k, v, step)
        self.flush()

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=STATUS[status])


TRACKER = MlflowTracker
