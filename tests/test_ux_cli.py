"""The researcher's command line (issue 15): logs a pipe can hold, predict on images of any size,
config files and the resolved dry run, --version."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdmtg.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.tensorboard=false"]
TINY = ["data.synthetic_train=256", "data.synthetic_val=64", "data.synthetic_test=64", "train.batch_size=16",
        "model.width=2", "data.image_size=16"]
SETS = [a for x in FAST + TINY for a in ("--set", x)]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """`fastdmtg train` with stdout and stderr piped (not a terminal): 3 epochs of 16 steps."""
    run = tmp_path_factory.mktemp("piped") / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "fastdmtg", "train", "--out", str(run), "--set", "train.epochs=3",
                        "--set", "train.log_every=1", *SETS], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    return run, p.stdout, p.stderr


def test_piped_log_is_small_and_keeps_the_epoch_lines(piped_run):
    run, out, err = piped_run
    assert "\r" not in out + err                               # no progress-bar redraws in a file
    assert len((out + err).encode()) < 4000, len((out + err).encode())
    lines = out.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("epoch ")] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    log = (run / "train.log").read_text()                     # the same messages, in the run folder
    assert log.count("epoch 3/3:") == 1 and "\r" not in log


def test_quiet_keeps_epoch_lines_and_log_level_drops_them(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "q"), "--quiet", "--set", "train.epochs=1", *SETS]) == 0
    assert "epoch 1/1:" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "w"), "--log-level", "warning", "--set", "train.epochs=1",
                 *SETS]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1:" not in out and "best epoch 1 of 1" in out          # the results still print


def test_progress_bars_follow_the_terminal(monkeypatch):
    from fastdmtg import log
    monkeypatch.setattr(log, "is_tty", lambda stream=None: False)
    assert log.bars_on(None) is False and log.bars_on(True) is True
    monkeypatch.setattr(log, "is_tty", lambda stream=None: True)
    assert log.bars_on(None) is True and log.bars_on(None, default=False) is False and log.bars_on(False) is False


# ----------------------------------------------------------------------------- predict

def _save(arr, path):
    from PIL import Image
    Image.fromarray(arr).save(path)
    return path


def test_predict_on_images_of_other_sizes(piped_run, tmp_path, capsys):
    import fastdmtg
    from fastdmtg.data.celeba import resize_like_reference
    run = piped_run[0]
    model, meta = fastdmtg.load_grouped(run)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)               # not the training 16×16
    gray = rng.integers(0, 256, (9, 12), dtype=np.uint8)
    paths = [_save(big, tmp_path / "big.png"), _save(gray, tmp_path / "gray.png")]
    probs = model.predict(paths, probabilities=True)
    preds = model.predict(paths)
    assert list(preds) == meta["tasks"]
    # by hand: the training decoder's resize (bilinear, half-pixel, rounded uint8), / 255, the model
    x = torch.cat([resize_like_reference(torch.from_numpy(a).permute(2, 0, 1)[None], 16)
                   for a in (big, np.repeat(gray[:, :, None], 3, 2))]).float() / 255
    with torch.no_grad():
        want = model(x)                                                    # (N, B, 2)
    for i, t in enumerate(meta["tasks"]):
        assert torch.equal(preds[t], want[i].argmax(-1))
        assert torch.allclose(probs[t], want[i].softmax(-1), atol=1e-6)
    # arrays and files agree; the CLI writes the same classes
    same = model.predict([big])
    assert all(int(same[t][0]) == int(preds[t][0]) for t in meta["tasks"])
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(paths[0]), str(paths[1]), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].split(",")[:3] == ["image", meta["tasks"][0], meta["tasks"][0] + ":p"]
    t0 = meta["tasks"][0]
    assert [int(r.split(",")[1]) for r in rows[1:]] == preds[t0].tolist()


def test_predict_bad_images_are_one_line_errors(piped_run, tmp_path, capsys):
    run = piped_run[0]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["predict", str(run), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {bad}: unreadable or truncated image (cannot identify image file '{bad}')"
    assert main(["predict", str(run), str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such image file" in capsys.readouterr().err
    import fastdmtg
    model, _ = fastdmtg.load_grouped(run)
    with pytest.raises(ValueError, match=r"image 0: expected an \(H, W, 3\) uint8 array"):
        model.predict([np.zeros((4, 4), np.float32)])


# ----------------------------------------------------------------------------- config files

def test_config_file_round_trip(tmp_path, capsys):
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"train": {"epochs": 4}, "dmtg": {"tau": 3.0}}))
    full = tmp_path / "full.json"
    assert main(["train", "--config", str(part), "--set", "train.seed=7", "--dry-run", "--save-config", str(full)]) == 0
    shown = json.loads(capsys.readouterr().out)
    saved = json.loads(full.read_text())
    assert shown == saved
    assert saved["train"]["epochs"] == 4 and saved["dmtg"]["tau"] == 3.0 and saved["train"]["seed"] == 7
    # auto resolved for this machine (no GPU here: CPU, no bf16, reference kernels, eager)
    if not torch.cuda.is_available():
        assert (saved["train"]["device"], saved["train"]["amp"], saved["train"]["kernels"],
                saved["train"]["compile"], saved["optim"]["fused"]) == ("cpu", "off", "reference", "off", "off")
    assert "auto" not in json.dumps(saved)
    # the written file is a full config: read back, it gives the same config
    assert main(["train", "--config", str(full), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out) == saved


def test_config_file_errors_name_the_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"epochs": "four"}}))
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f'error: {bad}: train.epochs: expected an integer, got "four"'
    bad.write_text(json.dumps({"trian": {}}))
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    assert "unknown keys ['trian']" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    assert f"{bad}: invalid JSON" in capsys.readouterr().err


def test_method_and_groups_at_the_command_line(tmp_path, capsys):
    """The partition text is parsed at the edge into typed lists; K follows the method only when asked
    (model.branches=0), a contradicting K is a one-line error (exit 2), never replaced."""
    sets = ["--set", "grouping.method=fixed", "--set", "grouping.groups=0,1,2|g1_t0,4,5|6,7,8"]
    assert main(["train", *sets, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["branches"] == 3
    # (3 groups and the recipe's K = 3 agree: this one is fine; 2 groups do not)
    assert main(["train", *sets[:2], "--set", "grouping.groups=0,1|2,3,4,5,6,7,8", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.branches=3, but grouping.method=fixed trains 2 branch(es) (one branch per group of "
        "grouping.groups (2)); set model.branches=2, or 0 (auto)")
    assert main(["train", *sets, "--set", "model.branches=0", "--dry-run"]) == 0
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert d["grouping"]["groups"] == [[0, 1, 2], ["g1_t0", 4, 5], [6, 7, 8]] and d["model"]["branches"] == 3
    assert "model.branches=3" in out.err                     # resolved for the dry run, and said so
    # --method naive-mtl takes the recipe's naive twin (K = 1); a config file with K = 3 contradicts it
    assert main(["train", "--method", "naive-mtl", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["grouping"]["method"] == "naive-mtl" and d["model"]["branches"] == 1
    part = tmp_path / "k3.json"
    part.write_text(json.dumps({"model": {"branches": 3}}))
    assert main(["train", "--method", "naive-mtl", "--config", str(part), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {part}: model.branches=3, but grouping.method=naive-mtl trains 1 branch(es) (one encoder for all "
        "tasks); set model.branches=1, or 0 (auto)")


def test_version(capsys):
    from fastdmtg import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fastdmtg {__version__}"


def test_errors_say_the_fix(piped_run, capsys):
    from fastdmtg.data.celeba import CelebAFormatError, select_tasks
    with pytest.raises(CelebAFormatError, match=r"unknown attribute '5_o_Clock_Shadow' \(data.tasks\); the file "
                                                r"has: Smiling, Young; to train on all of them: --set data.tasks=all"):
        select_tasks(["Smiling", "Young"], ["5_o_Clock_Shadow"], "list_attr_celeba.txt")
    # eval names the file it writes
    run = piped_run[0]
    assert main(["eval", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert f"per-task metrics written to {run / 'eval_val.json'}" in out and (run / "eval_val.json").exists()


# ----------------------------------------------------------------------------- issue 29: the researcher's view
# (--data-root detection, per-task summary, grouping confidence, predict labels, resume keeps results,
# TensorBoard contents, eval output, JSON floats)

def test_wrong_data_root_says_what_was_looked_for_and_what_was_found(tmp_path, capsys):
    """A typo'd --data-root, an empty folder, or a folder without labels.csv: one line naming what each
    dataset format looks for and what the folder holds, exit 2 — not the CelebA paper recipe's
    train.init=naive error."""
    looked = ("looked for list_attr_celeba.txt or img_align_celeba/ (CelebA); rgb/<building>/, <building>/rgb/ "
              "or a prepared index.json (Taskonomy); labels.csv (your own tasks)")
    cases = {"nope": "no such folder", "empty": "an empty folder"}
    (tmp_path / "empty").mkdir()
    mine = tmp_path / "mine"
    (mine / "img").mkdir(parents=True)
    for i in range(7):
        (mine / f"{i}.png").write_bytes(b"")
    (mine / "labels.txt").write_text("x")
    cases["mine"] = "0.png, 1.png, 2.png, 3.png, 4.png, 5.png, … (9 entries)"
    for name, found in cases.items():
        for cmd in (["train", "--out", str(tmp_path / "r")], ["compare", "--out", str(tmp_path / "c")]):
            assert main(cmd + ["--data-root", str(tmp_path / name)]) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"error: --data-root {tmp_path / name}: no dataset found: {looked} — found {found}", cmd
    assert not (tmp_path / "r").exists()
    # each format recognised from its own files picks its recipe (no names in the core)
    from fastdmtg.cli import default_recipe
    sys.path.insert(0, str(Path(__file__).parent))
    from folder_fixture import mixed_folder
    assert default_recipe(str(mixed_folder(tmp_path / "f"))) == "folder_k3"
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("")
    assert default_recipe(str(tmp_path / "celeba")) == "celeba9_k3"
    (tmp_path / "tx" / "rgb" / "b1").mkdir(parents=True)
    assert default_recipe(str(tmp_path / "tx")) == "taskonomy5_k3"
    assert default_recipe(None) == "synthetic_k3"


def _fmt_acc(a):
    return f"acc {100 * a:.1f}%"


def test_summary_and_epoch_lines_show_every_tasks_headline(piped_run):
    run, out, _ = piped_run
    res = json.loads((run / "results.json").read_text())
    hist = json.loads((run / "history.json").read_text())
    names = res["tasks"]
    text = " ".join(ln.strip() for ln in out.splitlines())
    want = ", ".join(f"{t} {_fmt_acc(res['test']['metrics'][t]['accuracy'])}" for t in names)
    assert f"test per task: {want}" in text
    # per epoch, a "val:" line (9 tasks ≤ 10) with each task's validation accuracy of history.json
    for h in hist:
        want = ", ".join(f"{t} {_fmt_acc(h['val']['metrics'][t]['accuracy'])}" for t in names)
        assert f"val: {want}" in text
    assert all(len(ln) <= 100 for ln in out.splitlines() if ln.startswith(("  val:", "    ", "test per task")))


def test_headlines_by_hand():
    from fastdmtg.report import headline, summary_line, epoch_task_lines
    split = {"loss": {"a": 0.5, "r": 1.0, "s": 2.0, "d": 0.3}, "error": {"a": 25.0, "s": 40.0},
             "metrics": {"a": {"accuracy": 0.75, "count": 8}, "r": {"mae": 1.25, "rmse": 2.5, "count": 8},
                         "s": {"miou": 60.0, "classes": 17}, "d": {}}}
    assert [headline(t, split) for t in "arsd"] == ["acc 75.0%", "MAE 1.25 RMSE 2.5", "mIoU 60.0", "loss 0.3000"]
    # more than 10 tasks: one line per epoch, the mean and the worst task of each kind
    many = {"loss": {f"t{i}": 1.0 for i in range(12)},
            "metrics": {f"t{i}": {"accuracy": 0.5 + i / 100} for i in range(12)}}
    lines = epoch_task_lines(many, [f"t{i}" for i in range(12)])
    assert lines == ["  val: accuracy mean 55.5% over 12 tasks (worst t0 50%)"]
    assert summary_line("x: ", split, ["r"]) == "x: mae mean 1.25 over 1 tasks (worst r 1.25)"


def test_grouping_confidence_by_hand():
    from fastdmtg.report import grouping_confidence
    import math
    probs = [[0.9, 0.05, 0.05], [0.48, 0.32, 0.20]]
    c = grouping_confidence(probs, [0, 0], ["a", "b"])
    assert c["per_task"]["a"]["margin"] == pytest.approx(0.85) and c["per_task"]["b"]["margin"] == pytest.approx(0.16)
    h = -(0.48 * math.log(0.48) + 0.32 * math.log(0.32) + 0.2 * math.log(0.2)) / math.log(3)
    assert c["per_task"]["b"]["entropy"] == pytest.approx(h)
    assert c["settled"] is False and c["least_settled_task"] == "b" and c["min_probability"] == 0.48
    assert grouping_confidence([[0.74, 0.25, 0.01]], [0], ["a"])["settled"] is False     # margin 0.49 < 0.5
    assert grouping_confidence([[0.75, 0.2, 0.05]], [0], ["a"])["settled"] is True
    assert grouping_confidence([[1.0]], [0], ["a"]) is None                               # K = 1: nothing to doubt


def test_confidence_in_console_results_and_figure(piped_run, tmp_path):
    run, out, err = piped_run
    res = json.loads((run / "results.json").read_text())
    conf = res["grouping_confidence"]
    for i, t in enumerate(res["tasks"]):
        row = res["probabilities"][i]
        a = res["assignment"][i]
        assert conf["per_task"][t]["probability"] == pytest.approx(row[a])
        assert conf["per_task"][t]["margin"] == pytest.approx(row[a] - max(p for j, p in enumerate(row) if j != a))
    for g in res["groups"]:                                 # each task's probability on its group's line
        assert "  group " in out and ", ".join(f"{t} {conf['per_task'][t]['probability']:.2f}" for t in g) in out
    low = conf["least_settled_task"]
    assert (f"grouping confidence: {'settled' if conf['settled'] else 'NOT settled'} — lowest margin "
            f"{conf['per_task'][low]['margin']:.2f} ({low}: p {conf['per_task'][low]['probability']:.2f}") in out
    assert ("warning: the grouping is not settled" in err) == (not conf["settled"])
    # grouping.png: every task's margin on its label, the state in the title
    from fastdmtg.plots import grouping_heatmap
    hist = json.loads((run / "history.json").read_text())
    fig = grouping_heatmap(hist, res["tasks"], tmp_path / "g.png", selected_epoch=res["best_epoch"],
                           keep_figure=True, confidence=conf)
    labels = [x.get_text() for x in fig.axes[0].get_yticklabels()]
    assert labels == [f"{t}  (margin {conf['per_task'][t]['margin']:.2f})" for t in res["tasks"]]
    assert ("grouping NOT settled" in fig._suptitle.get_text()) == (not conf["settled"])


def test_unsettled_grouping_warns_and_says_what_to_do(tmp_path, capsys):
    # one epoch at a tiny learning rate: the logits barely move from their start, p ≈ 1/3
    assert main(["train", "--out", str(tmp_path / "r"), "--quiet", "--set", "train.epochs=1", "--set", "optim.lr=1e-6",
                 *SETS]) == 0
    cap = capsys.readouterr()
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["grouping_confidence"]["settled"] is False
    assert "grouping confidence: NOT settled" in cap.out
    assert "warning: the grouping is not settled" in cap.err and "compare --stability" in cap.err \
        and "dmtg.tau_schedule=anneal" in cap.err and "train.epochs" in cap.err


def test_eval_prints_totals_and_per_task_lines(piped_run, capsys):
    run = piped_run[0]
    assert main(["eval", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    ev = json.loads((run / "eval_val.json").read_text())
    assert "{" not in out                                           # not the JSON
    assert f"\nval total loss {ev['total_loss']:.4f}, total error {ev['total_error']:.2f}\n" in out
    text = " ".join(ln.strip() for ln in out.splitlines())
    assert "val per task: " + ", ".join(f"{t} {_fmt_acc(ev['metrics'][t]['accuracy'])}" for t in ev["loss"]) in text


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)


def test_json_floats_have_no_float_noise(piped_run):
    from fastdmtg.report import round_floats
    assert round_floats({"a": [2.100000000000002, 0.1 + 0.2], "b": "x", "c": float("inf")}) == \
        {"a": [2.1, 0.3], "b": "x", "c": float("inf")}
    run = piped_run[0]
    for name in ("results.json", "history.json"):
        vals = list(_floats(json.loads((run / name).read_text())))
        assert vals and all(len(repr(v).lstrip("-").replace(".", "").lstrip("0").split("e")[0]) <= 12 for v in vals)


def test_method_naive_is_accepted_by_train(capsys):
    assert main(["train", "--method", "naive", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["grouping"]["method"] == "naive-mtl" and d["name"] == "synthetic_naive"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Your own tasks (binary smile no/yes, multi-class hair ids, regression age), 2 epochs, TensorBoard on."""
    sys.path.insert(0, str(Path(__file__).parent))
    from folder_fixture import mixed_folder
    base = tmp_path_factory.mktemp("folder")
    data = mixed_folder(base / "data", n=32, size=8)
    run = base / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sets = ["data.image_size=16", "model.width=1", "train.epochs=2", "train.batch_size=8", "train.progress=false"]
    p = subprocess.run([sys.executable, "-m", "fastdmtg", "train", "--data-root", str(data), "--out", str(run),
                        *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    return data, run, p.stdout


def test_mixed_tasks_summary_shows_accuracy_and_mae_rmse(folder_run):
    _, run, out = folder_run
    m = json.loads((run / "results.json").read_text())["test"]["metrics"]
    assert (f"test per task: smile {_fmt_acc(m['smile']['accuracy'])}, hair {_fmt_acc(m['hair']['accuracy'])}, "
            f"age MAE {m['age']['mae']:.4g} RMSE {m['age']['rmse']:.4g}") in out


def test_predict_writes_label_names(folder_run, tmp_path, capsys):
    import fastdmtg.api as api
    data, run, _ = folder_run
    imgs = [str(data / "img" / f"{i:03d}.png") for i in (24, 25, 26)]
    p = api.predict(run, imgs)
    assert p["smile"]["label"] == [["no", "yes"][c] for c in p["smile"]["class"].tolist()]
    assert p["hair"]["label"] == p["hair"]["class"].tolist()          # no names: the id, for every class task
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), *imgs, "--out", str(out)]) == 0
    rows = [r.split(",") for r in out.read_text().splitlines()]
    assert rows[0] == ["image", "smile", "smile:p", "hair", "hair:p", "age"]
    assert [r[1] for r in rows[1:]] == p["smile"]["label"]            # the names of labels.csv, not 0/1
    assert [int(r[3]) for r in rows[1:]] == p["hair"]["class"].tolist()


def test_tensorboard_regression_units_task_losses_and_hparams(folder_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run, _ = folder_run
    res = json.loads((run / "results.json").read_text())
    hist = json.loads((run / "history.json").read_text())
    ev = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    for key in ("mae", "rmse"):                                        # data units, as results.json
        assert [e.value for e in ev.Scalars(f"val/{key}/age")] == pytest.approx(
            [h["val"]["metrics"]["age"][key] for h in hist])
    assert [e.value for e in ev.Scalars("val/accuracy/smile")] == pytest.approx(
        [h["val"]["metrics"]["smile"]["accuracy"] for h in hist])
    for t in res["tasks"]:
        got = [e.value for e in ev.Scalars(f"train/task_loss/{t}")]
        assert got == pytest.approx([h["train_task_loss"][t] for h in hist]) and all(v > 0 for v in got)
    hp = EventAccumulator(str(run / "tb" / "hparams"))
    hp.Reload()
    assert hp.Scalars("test/mae/age")[0].value == pytest.approx(res["test"]["metrics"]["age"]["mae"])
    assert hp.Scalars("test/error/smile")[0].value == pytest.approx(res["test"]["error"]["smile"])
    assert hp.Scalars("grouping/min_margin")[0].value == pytest.approx(res["grouping_confidence"]["min_margin"])
    assert hp.Scalars("grouping/groups")[0].value == len(res["groups"])


def test_task_train_loss_is_the_assigned_heads_loss(tmp_path):
    """Per-task training loss by hand: with fixed groups (K = 3, task t in branch t // 3) each task's
    loss weight is 1 on its own head and 0 elsewhere, so Σ_t of the tasks' losses at their assigned
    heads is the epoch's mean training loss (any other head's loss would not add up to it)."""
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.train import train
    train(apply_overrides(get_recipe("synthetic_k3"), [*FAST, *TINY, "train.epochs=1", "train.progress=false",
                                                       "grouping.method=fixed", "grouping.groups=0,1,2|3,4,5|6,7,8"]),
          tmp_path / "n")
    h = json.loads((tmp_path / "n" / "history.json").read_text())[0]
    assert h["assignment"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sum(h["train_task_loss"].values()) == pytest.approx(h["train_loss"], rel=1e-5)


def test_resume_with_more_epochs_keeps_the_earlier_results(piped_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(piped_run[0], run)
    before = {n: (run / n).read_bytes() for n in ("results.json", "grouped_model.json", "grouped_model.safetensors",
                                                   "grouping.png")}
    assert main(["train", "--resume", str(run), "--set", "train.epochs=4", "--quiet"]) == 0
    out = capsys.readouterr().out
    prev = run / "previous" / "1"
    assert f"moved to {prev}" in out and "results.json" in out
    for n, b in before.items():
        assert (prev / n).read_bytes() == b                     # the earlier schedule's result, as it was
    assert json.loads((run / "results.json").read_text())["epochs"] == 4
    assert json.loads((prev / "results.json").read_text())["epochs"] == 3
    # a second continuation goes to previous/2; a plain resume of a finished run moves nothing
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not (run / "previous" / "2").exists() and (run / "results.json").exists()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=5", "--quiet"]) == 0
    assert json.loads((run / "previous" / "2" / "results.json").read_text())["epochs"] == 4
