"""Trackers (fastdmtg/trackers, docs/trackers.md): MLflow and W&B get what TensorBoard gets — the same
scalars at the same steps, the config, the final test metrics and the grouping figure — read back from
each tracker's own store; a resumed run continues the same tracker run; a missing package is a one-line
error; a tracker that fails mid-run is dropped and the run goes on; under DDP only rank 0 logs."""
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fastdmtg.cli import main
from fastdmtg.config import ConfigError, apply_overrides, get_recipe
from fastdmtg.train import TrainingInterrupted, train

TINY = ["train.progress=false", "data.synthetic_train=256", "data.synthetic_val=64", "data.synthetic_test=64",
        "train.batch_size=64", "model.width=2", "data.image_size=16", "train.epochs=2"]   # 4 steps per epoch


def tiny(extra=()):
    return apply_overrides(get_recipe("synthetic_k3"), TINY + list(extra))


def need(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'fastdmtg[mlflow,wandb]')")


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of RUN/tb: tag → [(step, value)] (the hparams record is apart)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    return {t: [(e.step, e.value) for e in ev.Scalars(t)] for t in ev.Tags()["scalars"]}


def interrupted_then_resumed(cfg, run: Path) -> dict:
    """Stop in epoch 2 (step 6 of 8), then resume to the end: both halves in one tracker run."""
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, stop_after_steps=6)
    return train(cfg, run, resume=True)


# ---------------------------------------------------------------- MLflow
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    need("mlflow", "sqlalchemy", "alembic", "tensorboard")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)         # a sqlite store's artifacts go to ./mlruns (MLflow's default root)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_mlflow_gets_what_tensorboard_gets_and_a_resume_continues_the_run(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    cfg = tiny(["train.logger=mlflow", "train.experiment=trackers-test"])
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, stop_after_steps=6)
    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == mlflow_store
    client = MlflowClient(mlflow_store)
    assert client.get_run(state["run_id"]).info.status == "KILLED"          # interrupted, resumable
    res = train(cfg, run, resume=True)
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == state
    exp = client.get_experiment_by_name("trackers-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]               # one MLflow run, continued
    r = client.get_run(state["run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "run"
    hist = json.loads((run / "history.json").read_text())
    names = res["tasks"]

    def series(k):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, k), key=lambda m: m.step)]
    # per epoch, at the epoch's last step: the values of history.json
    steps = [h["global_step"] for h in hist]
    assert steps == [4, 8]
    for t in names:
        assert series(f"val/loss/{t}") == [(s, pytest.approx(h["val"]["loss"][t])) for s, h in zip(steps, hist)]
    assert series(f"grouping/p/{names[0]}/branch2") == [(s, pytest.approx(h["probabilities"][0][1]))
                                                       for s, h in zip(steps, hist)]
    assert series("train/epoch") == [(4, 1.0), (8, 2.0)]
    # the same scalars as TensorBoard, step for step (before and after the resume)
    tb = tb_scalars(run)
    from fastdmtg.tboard import hparam_metrics
    final = hparam_metrics(res)
    assert {"test/total_loss", "test/total_error", "best_epoch"} <= set(final)
    assert set(r.data.metrics) == set(tb) | set(final)
    for k, v in final.items():
        assert r.data.metrics[k] == pytest.approx(v), k
    for tag, points in tb.items():
        assert series(tag) == [(s, pytest.approx(v)) for s, v in points], tag
    # hparams: the config as params, the final test metrics
    assert r.data.params["train.epochs"] == "2" and r.data.params["model.width"] == "2"
    assert r.data.params["train.logger"] == "mlflow"
    assert r.data.metrics["test/total_loss"] == pytest.approx(res["total_loss"])
    assert r.data.metrics["best_epoch"] == res["best_epoch"]
    # the grouping figure and the config as artifacts
    arts = {a.path for a in client.list_artifacts(r.info.run_id)} | \
        {a.path for a in client.list_artifacts(r.info.run_id, "grouping")}
    assert {"config.json", "grouping/selected_epoch.png"} <= arts
    png = Path(client.download_artifacts(r.info.run_id, "grouping/selected_epoch.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_resume_with_more_epochs_keeps_params_and_tags_the_change(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    train(tiny(["train.logger=mlflow", "train.epochs=1"]), run)
    res = train(tiny(["train.logger=mlflow", "train.epochs=2"]), run, resume=True)
    rid = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    r = MlflowClient(mlflow_store).get_run(rid)
    # MLflow params are immutable: the first value stays, the resumed value is a tag
    assert r.data.params["train.epochs"] == "1" and r.data.tags["resumed.train.epochs"] == "2"
    assert r.data.metrics["test/total_loss"] == pytest.approx(res["total_loss"])    # the latest result
    assert r.info.status == "FINISHED"


def test_mlflow_uri_is_made_absolute_for_a_resume_from_elsewhere(tmp_path, monkeypatch):
    from fastdmtg.trackers.mlflow import absolute_uri, key
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("file:rel") == (tmp_path / "rel").as_uri()
    assert absolute_uri("http://host:5000") == "http://host:5000"
    assert key("val/loss/a:b (c)") == "val/loss/a_b _c_"


# ---------------------------------------------------------------- Weights & Biases (offline)
def wandb_records(path: Path) -> list:
    """The records of a W&B run file (.wandb): a LevelDB-style log (7-byte file header, 32 KiB blocks,
    each chunk a 7-byte header: CRC32C, length, type full/first/middle/last) of protobuf ``Record``s,
    decoded with W&B's own message definitions (wandb.proto)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                        # a block's tail too short for a header: padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _items(items) -> dict:
    return {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in items}


def test_wandb_offline_gets_what_tensorboard_gets_and_a_resume_keeps_the_run_id(tmp_path, monkeypatch):
    need("wandb", "tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))          # W&B's own files outside the run folder too
    run = tmp_path / "run"
    res = interrupted_then_resumed(tiny(["train.logger=wandb", "train.experiment=trackers-test"]), run)
    state = json.loads((run / "trackers.json").read_text())["wandb"]
    assert state["project"] == "trackers-test"
    folders = sorted((run / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(folders) == 2                                  # the first process and the resumed one
    history, config, summary, runs = {}, {}, {}, []
    for f in folders:
        for rec in wandb_records(f / f"run-{state['id']}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                runs.append((rec.run.run_id, rec.run.project, rec.run.display_name))
                config.update(_items(rec.run.config.update))
            elif kind == "config":
                config.update(_items(rec.config.update))
            elif kind == "history":
                row = _items(rec.history.item)
                for k, v in row.items():
                    if not k.startswith("_") and k != "global_step":
                        history.setdefault(k, []).append((row["global_step"], v))
            elif kind == "summary":
                summary.update(_items(rec.summary.update))
    assert runs == [(state["id"], "trackers-test", "run")] * 2
    tb = tb_scalars(run)
    scalars = {k: v for k, v in history.items() if not k.startswith("grouping/selected_epoch")}
    assert set(scalars) == set(tb)
    for tag, points in tb.items():
        assert sorted(scalars[tag]) == [(s, pytest.approx(v)) for s, v in points], tag
    assert config["train.epochs"] == 2 and config["train.logger"] == "wandb"
    assert summary["test/total_loss"] == pytest.approx(res["total_loss"])
    assert summary["best_epoch"] == res["best_epoch"]
    # the grouping figure: an image in the history, its PNG in the run's media folder
    fig = next(v for k, v in history.items() if k.startswith("grouping/selected_epoch"))
    assert fig and list(folders[-1].glob("files/media/images/grouping/selected_epoch*.png"))


# ---------------------------------------------------------------- errors and the fan-out
def test_a_missing_tracker_package_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import fastdmtg.trackers as trackers
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = ["train", "--out", str(tmp_path / "run"), "--logger", "mlflow"] + \
        [a for x in TINY for a in ("--set", x)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --logger mlflow (train.logger): the package mlflow is not installed; "
                   "install with: pip install 'fastdmtg[mlflow]'"]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("value, message", [
    ("mlfow", "train.logger: unknown tracker 'mlfow'; expected mlflow|wandb"),
    ("tensorboard", "train.logger: TensorBoard is train.tensorboard"),
])
def test_logger_names_are_checked(value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("|", r"\|")):
        tiny([f"train.logger={value}"])


class Recorder:
    """A tracker that records its calls (and fails on demand)."""
    modules = ()
    extra = ""
    calls: list = []
    fail_on: str | None = None

    def __init__(self, name="rec"):
        self.name = name

    def __getattr__(self, method):
        if method.startswith("__"):
            raise AttributeError(method)

        def call(*args):
            Recorder.calls.append((self.name, method) + args)
            if method == Recorder.fail_on:
                raise RuntimeError(f"{self.name} is down")
        return call


def test_fan_out_order_step_status_and_a_failing_tracker(caplog):
    from fastdmtg.trackers import Trackers, status_of
    from fastdmtg.train import NonFiniteLoss
    Recorder.calls, Recorder.fail_on = [], None
    ts = Trackers([Recorder("tensorboard"), Recorder("mlflow")])
    assert ts.names == ["mlflow", "tensorboard"]              # TensorBoard last: it closes the figure
    ts.add_scalar("a", 1, 5)
    ts.add_scalar("a", 2, 3)
    ts.add_hparams({"x": 1}, {"m": 2})
    assert ("mlflow", "add_hparams", {"x": 1}, {"m": 2.0}, 5) in Recorder.calls   # at the highest step
    Recorder.fail_on = "add_scalar"
    ts.add_scalar("b", 1, 6)                                   # mlflow fails: dropped, a warning
    assert ts.names == []
    assert "the run goes on without mlflow" in caplog.text
    assert status_of(None) == "finished" and status_of(KeyboardInterrupt()) == "killed"
    assert status_of(TrainingInterrupted("x")) == "killed" and status_of(NonFiniteLoss("x")) == "failed"


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_finishes(tmp_path, monkeypatch, caplog):
    import fastdmtg.trackers as trackers
    Recorder.calls, Recorder.fail_on = [], None

    class Flaky(Recorder):
        def __init__(self, run_dir, cfg, state):
            super().__init__("flaky")

        def state(self):
            return {"id": "f1"}
    sys.modules[__name__].Flaky = Flaky
    monkeypatch.setitem(trackers.TRACKERS.table, "flaky", Flaky)      # as if a file declared it
    Recorder.fail_on = "add_figure"
    run = tmp_path / "run"
    res = train(tiny(["train.logger=flaky", "train.tensorboard=false"]), run)
    assert (run / "results.json").exists() and res["best_epoch"] in (1, 2)
    names = [c[1] for c in Recorder.calls]
    assert "add_scalar" in names and "add_figure" in names
    assert "add_hparams" not in names                          # dropped at the figure
    assert names[-1] == "close" and Recorder.calls[-1][2] == "failed"
    assert "flaky: add_figure failed (RuntimeError: flaky is down)" in caplog.text
    assert json.loads((run / "trackers.json").read_text()) == {"flaky": {"id": "f1"}}


@pytest.mark.timeout(600)
def test_under_ddp_only_rank_0_logs(tmp_path):
    """Two gloo ranks: one TensorBoard event file (one writer), one W&B run when W&B is installed."""
    args = ["--quiet", "--set", "data.synthetic_train=256", "--set", "data.synthetic_val=64",
            "--set", "data.synthetic_test=64", "--set", "train.batch_size=32", "--set", "model.width=2",
            "--set", "data.image_size=16", "--set", "train.epochs=1"]
    with_wandb = importlib.util.find_spec("wandb") is not None
    if with_wandb:
        args += ["--logger", "wandb"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    run = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastdmtg", "train", "--out", str(run), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["speed"]["world_size"] == 2
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    if with_wandb:
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1
