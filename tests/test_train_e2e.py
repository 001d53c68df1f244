"""End-to-end training on the planted-group synthetic data: loss falls, the planted groups are read
out, pruning leaves N heads, the pruned model reproduces the argmax model, resume is exact."""
import json

import pytest
import torch

from fastdmtg import load_grouped
from fastdmtg.config import apply_overrides, get_recipe
from fastdmtg.pipelines import build_source
from fastdmtg.data.synthetic import planted_groups, task_names
from fastdmtg.train import NonFiniteLoss, Trainer, TrainingInterrupted, evaluate, train

FAST = ["train.tensorboard=false", "train.progress=false"]


def small_cfg(extra=()):
    # a reduced problem: runs in a few seconds, enough to exercise every part of the loop
    return apply_overrides(get_recipe("synthetic_k3"), FAST + [
        "data.synthetic_train=600", "data.synthetic_val=200", "data.synthetic_test=200",
        "train.epochs=3", "train.batch_size=64", "model.width=4", *extra])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default recipe, as `fastdmtg train` runs it (seed 0), plus its naive-MTL reference."""
    root = tmp_path_factory.mktemp("runs")
    naive = train(apply_overrides(get_recipe("synthetic_naive"), FAST), root / "naive")
    cfg = apply_overrides(get_recipe("synthetic_k3"), FAST + [f"train.reference={root / 'naive'}"])
    res = train(cfg, root / "dmtg")
    return root / "dmtg", res, naive


def test_default_recipe_finds_planted_groups(default_run):
    run_dir, res, naive = default_run
    names = task_names(3, 3)
    planted = sorted(sorted(names[i] for i in g) for g in planted_groups(3, 3))
    assert sorted(sorted(g) for g in res["groups"]) == planted
    hist = json.loads((run_dir / "history.json").read_text())
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]          # training loss falls
    # each task's probability mass concentrates on its branch
    assert min(max(row) for row in res["probabilities"]) > 0.9
    # DMTG beats naive MTL on this data (one 1-channel encoder cannot serve three groups)
    assert res["total_error"] < naive["total_error"]
    assert res["normgain_error"]["value"] > 0 and res["normgain_loss"]["value"] > 0
    for f in ("config.json", "results.json", "history.json", "grouping.png", "grouped_model.json",
              "grouped_model.safetensors", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / f).exists(), f


def test_pruned_model_reproduces_argmax_model(default_run):
    run_dir, res, _ = default_run
    model, meta = load_grouped(run_dir)
    assert sum(h.num_tasks for h in model.heads) == 9                     # N heads of K·N
    assert len(model.branches) == len(res["groups"])
    from fastdmtg.config import Config
    cfg = Config.load(run_dir / "config.json")
    data = build_source(cfg.data, progress=False)
    got = evaluate(model, data.taskset, data, "test", 500, "cpu")
    for t in res["test"]["loss"]:
        assert got["loss"][t] == pytest.approx(res["test"]["loss"][t], rel=1e-5, abs=1e-6)
        assert got["error"][t] == pytest.approx(res["test"]["error"][t], abs=1e-9)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(small_cfg(), tmp_path / "full")
    cfg = small_cfg()
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "cut", stop_after_steps=13)                 # mid epoch 2 (10 steps/epoch)
    st = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (st["epoch"], st["step_in_epoch"]) == (1, 3)
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert resumed["assignment"] == full["assignment"]
    assert torch.allclose(torch.tensor(resumed["probabilities"]), torch.tensor(full["probabilities"]), atol=1e-6)
    for t in full["test"]["loss"]:
        assert resumed["test"]["loss"][t] == pytest.approx(full["test"]["loss"][t], rel=1e-5)
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["train_loss"] for h in h_cut] == pytest.approx([h["train_loss"] for h in h_full], rel=1e-5)


def test_refuses_to_overwrite_a_run(tmp_path):
    train(small_cfg(["train.epochs=1"]), tmp_path / "r")
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_cfg(["train.epochs=1"]), tmp_path / "r")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    t = Trainer(small_cfg(["train.log_every=1"]), tmp_path / "nan")
    real = t.taskset.head_losses
    calls = {"n": 0}

    def poisoned(outputs, batch, z, **kw):
        calls["n"] += 1
        total, L = real(outputs, batch, z, **kw)
        return (total * float("nan") if calls["n"] > 14 else total), L
    monkeypatch.setattr(t.taskset, "head_losses", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite training loss at epoch 2, step 15"):
        t.fit()
    st = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert st["epoch"] == 1 and st["step_in_epoch"] == 0                # the end of epoch 1: last good state
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


def test_init_from_naive_copies_into_all_branches(tmp_path):
    naive_cfg = apply_overrides(small_cfg(["train.epochs=1"]), ["grouping.method=naive-mtl", "model.branches=1"])
    train(naive_cfg, tmp_path / "naive")
    t = Trainer(small_cfg([f"train.init_from={tmp_path / 'naive'}"]), tmp_path / "dmtg")
    naive_state = torch.load(tmp_path / "naive" / "checkpoints" / "best.pt", weights_only=True)["model"]
    for k in range(3):
        for name, v in naive_state.items():
            mapped = name.replace("branches.0.", f"branches.{k}.").replace("heads.0.", f"heads.{k}.")
            assert torch.equal(t.model.state_dict()[mapped], v), mapped


def test_cli_train_eval_and_errors(tmp_path, capsys):
    from fastdmtg.cli import main
    args = ["train", "--out", str(tmp_path / "run"), "--quiet", "--set", "train.epochs=1",
            "--set", "data.synthetic_train=300", "--set", "data.synthetic_val=100", "--set", "data.synthetic_test=100",
            "--set", "train.tensorboard=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "group 1:" in out and "test total loss" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 1
    assert main(["eval", str(tmp_path / "run"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert ev["total_loss"] == pytest.approx(res["total_loss"], rel=1e-5)
    assert main(["train", "--set", "train.epochs=zero"]) == 2
    assert "train.epochs: expected an integer" in capsys.readouterr().err
    assert main(["train", "--set", "model.branches=-1"]) == 2
    assert "model.branches (K) must be >= 1, or 0 (auto), got -1" in capsys.readouterr().err
    assert main(["train", "--set", "train.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
    # (the default celeba9_k3 follows the paper: it needs --init-from first, tests/test_fidelity.py)
    assert main(["train", "--data-root", str(tmp_path / "missing"), "--set", "train.init=scratch"]) == 2
    assert "no dataset found" in capsys.readouterr().err      # what was looked for there: tests/test_ux_cli.py


def test_batched_branches_run_matches_separate_run(tmp_path):
    """Training with batched branches follows the same trajectory as K separate branches, and its
    pruned model reproduces its argmax evaluation."""
    sep = train(small_cfg(["train.epochs=2", "model.batched=off"]), tmp_path / "sep")
    bat = train(small_cfg(["train.epochs=2", "model.batched=on"]), tmp_path / "bat")
    assert bat["assignment"] == sep["assignment"]
    for t in sep["test"]["loss"]:
        # equal up to float reassociation (grouped vs separate convs) amplified over 20 Adam steps
        assert bat["test"]["loss"][t] == pytest.approx(sep["test"]["loss"][t], rel=1e-2)
    model, _ = load_grouped(tmp_path / "bat")
    from fastdmtg.config import Config
    cfg = Config.load(tmp_path / "bat" / "config.json")
    data = build_source(cfg.data, progress=False)
    got = evaluate(model, data.taskset, data, "test", 500, "cpu")
    for t in bat["test"]["loss"]:
        assert got["loss"][t] == pytest.approx(bat["test"]["loss"][t], rel=1e-5, abs=1e-6)


def test_cli_exit_codes_for_interruption_and_non_finite_loss(tmp_path, monkeypatch, capsys):
    """`fastdmtg train` (and `compare`, through the same helper) exits 130 on an interruption
    (resumable) and 3 on a non-finite loss, with the message on stderr."""
    from fastdmtg import train as train_mod
    from fastdmtg.cli import main

    def stop(*a, **k):
        raise TrainingInterrupted("interrupted at epoch 1, step 3")
    monkeypatch.setattr(train_mod, "train", stop)
    assert main(["train", "--out", str(tmp_path / "a"), "--quiet"]) == 130
    assert "interrupted at epoch 1" in capsys.readouterr().err

    def nan(*a, **k):
        raise NonFiniteLoss("non-finite training loss at epoch 1, step 2")
    monkeypatch.setattr(train_mod, "train", nan)
    assert main(["train", "--out", str(tmp_path / "b"), "--quiet"]) == 3
    assert "error: non-finite training loss" in capsys.readouterr().err
