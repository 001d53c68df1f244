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
