"""Fidelity switches (docs/fidelity.md): each does what it says.

mIoU definitions on a hand-made confusion matrix (and the classes they count); the best-checkpoint rule
on a scripted sequence of (train, val) losses, alone and wired into the Trainer (the validation loss for
classification too), and its sentence in --dry-run; the plateau target and the validation cadence;
the recipes' scheduler values (naive MTL: PyTorch's ReduceLROnPlateau defaults), the reference preset
(no stop on divergence, fp32), the Table 6 recipes; naive-MTL initialisation as a clear error; the
precision policy's fp32 layers under bf16 autocast on CPU and the decoders' flag under every train.amp;
the precision benchmark's paired test; shared vs per-rank Gumbel noise on two gloo ranks (torchrun).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdmtg.config import (RECIPE_FOLLOWS, RECIPES, ConfigError, ModelConfig, apply_overrides, check_init,
                             get_recipe)
from fastdmtg.data.taskonomy import TASKONOMY_5
from fastdmtg.tasks.taskonomy import TaskonomyTaskSet, miou_from_confusion
from fastdmtg.train import build_scheduler, improves_best, plateau_step, validation_due

FAST = ["train.tensorboard=false", "train.progress=false"]


# ------------------------------------------------------------------------------------------ mIoU
def _confusion():
    """Rows target, columns prediction, over pixels whose target is not 0.
    target 1: 3 predicted 1, 1 predicted 2              → IoU_1 = 3 / (4 + 3 − 3) = 3/4
    target 2: 2 predicted 2, 2 predicted 3, 1 predicted 0 → IoU_2 = 2 / (5 + 3 − 2) = 1/3
    class 3 only predicted                              → IoU_3 = 0 / (0 + 2 − 0) = 0"""
    c = torch.zeros(18, 18, dtype=torch.long)
    c[1, 1], c[1, 2] = 3, 1
    c[2, 2], c[2, 3], c[2, 0] = 2, 2, 1
    return c


def test_miou_definitions_on_hand_made_confusion():
    ref, n_ref = miou_from_confusion(_confusion(), "reference")
    mean, n_mean = miou_from_confusion(_confusion(), "mean")
    assert ref == pytest.approx(100 * (3 / 4 + 1 / 3) / 18)          # Σ over classes in the target / 18
    assert n_ref == 2
    assert mean == pytest.approx(100 * (3 / 4 + 1 / 3 + 0) / 3)       # mean over target ∪ prediction
    assert n_mean == 3
    # a perfect prediction: reference tops out at (#classes in the target)/18, mean at 100
    perfect = torch.diag(torch.tensor([0] + [5] * 17))
    assert miou_from_confusion(perfect, "reference")[0] == pytest.approx(100 * 17 / 18)
    assert miou_from_confusion(perfect, "mean")[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="taskonomy_miou"):
        miou_from_confusion(perfect, "macro")


@pytest.mark.parametrize("definition", ["reference", "mean"])
def test_meter_reports_the_chosen_miou(definition):
    ts = TaskonomyTaskSet(["segment_semantic"], miou=definition)
    conf = _confusion()
    # pixels realising the confusion matrix: (target, prediction) pairs, plus ignored target-0 pixels
    pairs = [(t, p) for t in range(18) for p in range(18) for _ in range(int(conf[t, p]))] + [(0, 5), (0, 0)]
    t = torch.tensor([a for a, _ in pairs]).view(1, 1, -1)
    logits = torch.zeros(1, 18, 1, len(pairs))
    for j, (_, p) in enumerate(pairs):
        logits[0, p, 0, j] = 4.0
    meter = ts.meter()
    meter.update([logits], {"targets": {"segment_semantic": t}})
    m = meter.compute()["metrics"]["segment_semantic"]
    want = {"reference": 100 * (3 / 4 + 1 / 3) / 18, "mean": 100 * (3 / 4 + 1 / 3) / 3}
    assert m["miou"] == pytest.approx(want[definition]) and m["miou_definition"] == definition
    assert m["miou_reference"] == pytest.approx(want["reference"]) and m["miou_mean"] == pytest.approx(want["mean"])
    assert meter.compute()["error"]["segment_semantic"] == pytest.approx(100 - want[definition])


def test_meter_counts_the_target_classes_when_prediction_and_target_differ():
    """The reference mIoU averages over the classes present in the *target* (rows of the confusion
    matrix): target classes {1, 2, 3}, predicted classes {1, 2, 4, 5}. IoU_1 = 2/3 (pixels: 1→1, 1→1,
    1→4; prediction 1 nowhere else), IoU_2 = 1/3 (2→2, 2→5, 3→2), IoU_3 = 0 (3 never predicted);
    classes 4 and 5 are only predicted. reference: (2/3 + 1/3 + 0)/18 over 3 classes; mean: over
    target ∪ prediction, 5 classes. A transposed matrix (rows prediction) would count 4 classes for
    the reference definition."""
    pairs = [(1, 1), (1, 1), (1, 4), (2, 2), (2, 5), (3, 2), (0, 5)]            # (target, prediction)
    t = torch.tensor([a for a, _ in pairs]).view(1, 1, -1)
    logits = torch.zeros(1, 18, 1, len(pairs))
    for j, (_, p) in enumerate(pairs):
        logits[0, p, 0, j] = 4.0
    for definition, classes, want in (("reference", 3, 100 * (2 / 3 + 1 / 3) / 18),
                                      ("mean", 5, 100 * (2 / 3 + 1 / 3) / 5)):
        meter = TaskonomyTaskSet(["segment_semantic"], miou=definition).meter()
        meter.update([logits], {"targets": {"segment_semantic": t}})
        m = meter.compute()["metrics"]["segment_semantic"]
        assert m["classes"] == classes and m["miou"] == pytest.approx(want), definition


def test_taskset_from_config_reads_the_switches():
    from fastdmtg.config import DataConfig
    ts = TaskonomyTaskSet.from_config(TASKONOMY_5, DataConfig(dataset="taskonomy", taskonomy_miou="mean",
                                                              taskonomy_rotate_loss=True,
                                                              taskonomy_eval_loss="batch_mean"))
    assert ts.miou == "mean" and ts.rotate_loss and ts.eval_loss == "batch_mean"
    assert TaskonomyTaskSet.from_config(TASKONOMY_5, DataConfig(dataset="taskonomy")).eval_loss == "set"
    with pytest.raises(ConfigError, match="taskonomy_miou"):
        DataConfig(taskonomy_miou="macro")
    with pytest.raises(ConfigError, match="data.taskonomy_eval_loss: expected set|batch_mean"):
        DataConfig(taskonomy_eval_loss="batch")


# ------------------------------------------------------------------------------------------ best checkpoint
# (train loss, val criterion) per validation; saves by hand under each rule
SCRIPT = [(5.0, 3.0), (4.0, 3.5), (3.0, 2.9), (3.5, 2.0), (2.5, 2.5), (2.6, 2.4)]
SAVES = {"reference": [0, 2, 4],          # (3.5, 2.0): val improved, train did not (3.5 > 3.0)
                                          # (2.5, 2.5): both beat the last save (3.0, 2.9) → saved, although
                                          #   2.5 > 2.0, the best validation seen (bests move only on a save)
                                          # (2.6, 2.4): train 2.6 > 2.5
         "val_loss": [0, 2, 3]}


@pytest.mark.parametrize("rule", ["reference", "val_loss"])
def test_best_rule_on_scripted_losses(rule):
    best_val = best_train = math.inf
    saved = []
    for i, (tr, va) in enumerate(SCRIPT):
        if improves_best(rule, va, tr, best_val, best_train):
            best_val, best_train = va, tr
            saved.append(i)
    assert saved == SAVES[rule]


@pytest.mark.parametrize("rule", ["reference", "val_loss"])
def test_trainer_applies_best_rule_and_epoch1_validation(tmp_path, monkeypatch, rule):
    """The Trainer end to end with scripted epoch losses (no training): validation after epochs 1, 2, 4, 6
    (val_every=2 + val_first_epoch), best.pt from the rule, the plateau scheduler fed the validation loss."""
    import fastdmtg.train as T
    cfg = apply_overrides(get_recipe("synthetic_k3"), FAST + [
        "data.synthetic_train=64", "data.synthetic_val=32", "data.synthetic_test=32", "train.batch_size=32",
        "model.width=1", "train.epochs=6", "train.val_every=2", f"train.best_rule={rule}",
        "optim.schedule=plateau", "optim.plateau_patience=0", "optim.plateau_threshold=0.0", "optim.gamma=0.5"])
    trains = [5.0, 4.0, 3.0, 5.5, 2.5, 2.6]
    vals = iter([3.0, 3.5, 2.0, 2.5])               # after epochs 1, 2, 4, 6
    tr = T.Trainer(cfg, tmp_path / "run", progress=False)

    def fake_epoch(stop_after_steps=None):
        tr.epoch_loss_sum, tr.epoch_samples = trains[tr.epoch] * 10, 10
    monkeypatch.setattr(tr, "train_epoch", fake_epoch)
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: {"total_loss": next(vals), "loss": {}, "error": None})
    lrs = []
    for _ in range(6):
        tr.train_epoch()
        lrs.append(tr.end_epoch()["lr"])
    assert [h["epoch"] for h in tr.history if "val" in h] == [1, 2, 4, 6]             # 1-based in history.json
    # by hand, (train, val) at the validations: e0 (5, 3.0) saved by both rules; e1 (4, 3.5) val worse;
    # e3 (5.5, 2.0): val_loss saves, reference does not (train 5.5 > 5 at the last save);
    # e5 (2.6, 2.5): reference saves (2.5 < 3.0 and 2.6 < 5), val_loss does not (2.5 > 2.0)
    want = {"reference": 5, "val_loss": 3}[rule]
    assert tr.best_epoch == want
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_rule"] == rule and best["epoch"] == want
    # plateau on the validation loss (patience 0, threshold 0), stepped only after validations: halved
    # after epoch 2 (3.5 > 3.0) and after epoch 6 (2.5 > 2.0); the history records the lr of each epoch
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 5e-3, 5e-3])
    assert tr.current_lr() == pytest.approx(2.5e-3)


@pytest.mark.parametrize("rule", ["reference", "val_loss"])
def test_best_checkpoint_ranks_on_the_validation_loss_for_classification_too(tmp_path, monkeypatch, rule):
    """The release ranks CelebA checkpoints on the validation total *loss* (its accuracy accumulator is
    off in every training config): on classification data whose validation error and loss disagree,
    best.pt follows the loss under both rules (the reference rule still asks the training loss to
    improve too)."""
    import fastdmtg.train as T
    cfg = apply_overrides(get_recipe("synthetic_k3"), FAST + [
        "data.synthetic_train=64", "data.synthetic_val=32", "data.synthetic_test=32", "train.batch_size=32",
        "model.width=1", "train.epochs=3", f"train.best_rule={rule}", "optim.schedule=none"])
    trains = [5.0, 4.0, 3.0]
    # (total loss, total error) after epochs 1, 2, 3: the loss is lowest after epoch 2, the error after
    # epoch 3 (a run ranked on the error keeps epoch 3)
    vals = iter([(3.0, 50.0), (2.0, 45.0), (2.5, 30.0)])
    tr = T.Trainer(cfg, tmp_path / "run", progress=False)

    def fake_epoch(stop_after_steps=None):
        tr.epoch_loss_sum, tr.epoch_samples = trains[tr.epoch] * 10, 10

    def fake_eval(*a, **k):
        loss, err = next(vals)
        return {"total_loss": loss, "total_error": err, "loss": {}, "error": {"t": err}}
    monkeypatch.setattr(tr, "train_epoch", fake_epoch)
    monkeypatch.setattr(T, "evaluate", fake_eval)
    for _ in range(3):
        tr.train_epoch()
        tr.end_epoch()
    assert tr.best_epoch == 1
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["criterion"] == 2.0 and best["val_total_loss"] == 2.0


@pytest.mark.parametrize("rule,words", [
    ("reference", "best.pt: lowest validation total loss among the validations where the training loss also improved"),
    ("val_loss", "best.pt: lowest validation total loss (train.best_rule=val_loss)")])
def test_dry_run_states_what_best_pt_is_chosen_on(capsys, rule, words):
    from fastdmtg.cli import main
    assert main(["train", "--recipe", "celeba9_k3_reference", "--dry-run", "--set", f"train.best_rule={rule}"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["train"]["best_rule"] == rule               # stdout: the JSON alone
    lines = [ln for ln in err.splitlines() if ln.startswith("best.pt:")]
    assert len(lines) == 1 and lines[0].startswith(words)
    if rule == "val_loss":
        assert "training loss" not in lines[0]


# ------------------------------------------------------------------------------------------ schedules
def _lr_after(cfg, train_losses, val_losses):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sch = build_scheduler(cfg, opt)
    out = []
    for e, tr in enumerate(train_losses):
        plateau_step(sch, cfg, tr, val_losses.get(e))
        out.append(opt.param_groups[0]["lr"])
    return sch, out


def test_naive_recipe_scheduler_values_and_cadence():
    cfg = get_recipe("taskonomy5_naive")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    sch, lrs = _lr_after(cfg, [1.0] * 23, {})
    assert isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (sch.factor, sch.patience, sch.threshold, sch.threshold_mode, sch.min_lrs) == (0.1, 10, 1e-4, "rel", [3e-5])
    # on the training loss: the first epoch sets the best; 11 epochs without a 1e-4 relative improvement → ×0.1
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.01) and lrs[22] == pytest.approx(0.001)
    # 0.99995 is not a 1e-4 relative improvement of 1.0
    _, lrs = _lr_after(cfg, [1.0] + [0.99995] * 11, {})
    assert lrs[-1] == pytest.approx(0.01)
    assert [e for e in range(100) if validation_due(cfg, e)] == [0] + list(range(9, 100, 10))


def test_dmtg_recipes_paper_vs_reference():
    paper, ref = get_recipe("taskonomy5_k3"), get_recipe("taskonomy5_k3_reference")
    assert RECIPE_FOLLOWS["taskonomy5_k3"] == "paper" and RECIPE_FOLLOWS["taskonomy5_k3_reference"] == "reference"
    assert (paper.optim.lr, paper.optim.plateau_on, paper.train.init) == (1e-4, "val", "naive")
    assert (ref.optim.lr, ref.optim.plateau_on, ref.train.init) == (1e-3, "train", "scratch")
    assert ref.train.amp == "off" and ref.data.taskonomy_seg_resize == "bilinear"
    for c in (paper, ref):
        assert (c.optim.gamma, c.optim.plateau_patience, c.optim.plateau_threshold, c.optim.min_lr) == (0.5, 3, 0.1, 3e-5)
        assert c.train.val_every == 2 and c.train.val_first_epoch and c.train.best_rule == "reference"
        assert c.data.taskonomy_miou == "reference" and c.model.sync_bn and c.dmtg.ddp_noise == "shared"
    # the reference plateau watches the training loss every epoch; the paper's the validation loss
    _, lrs = _lr_after(ref, [1.0] * 5, {1: 0.1, 3: 0.05})
    assert lrs[4] == pytest.approx(5e-4)
    _, lrs = _lr_after(paper, [1.0] * 12, {e: 1.0 for e in (0, 1, 3, 5, 7, 9, 11)})
    # validations at epochs 0, 1, 3, 5, 7 (+9, 11): the 4th without gain (epoch 7) halves the lr;
    # epochs without a validation leave the schedule alone
    assert lrs[:7] == pytest.approx([1e-4] * 7) and lrs[7:] == pytest.approx([5e-5] * 5)
    vit = get_recipe("taskonomy5_vit_k3")
    assert (vit.model.shared_blocks, vit.train.batch_size) == (6, 20)
    cel, cel_ref = get_recipe("celeba9_k3"), get_recipe("celeba9_k3_reference")
    assert (cel.optim.schedule, cel.optim.plateau_on, cel.optim.gamma) == ("plateau", "val", 0.5)
    assert (cel_ref.optim.schedule, cel_ref.optim.step_epochs, cel_ref.optim.gamma) == ("step", 15, 0.5)
    for name, fn in RECIPES.items():
        doc = (fn.__doc__ or "").lower()
        follows = RECIPE_FOLLOWS[name]
        assert follows in ("paper", "reference", "ours")
        assert ("reference" in doc or "release" in doc) if follows == "reference" else doc, name


def test_reference_recipes_train_on_through_a_divergence_and_paper_recipes_run_fp32():
    """The release stops only on a NaN loss: every *_reference recipe flags a divergence and trains on.
    The paper and reference recipes (naive twins included) train in fp32 (train.amp=off); the mixed
    policy stays a switch."""
    refs = [n for n, f in RECIPE_FOLLOWS.items() if f == "reference"]
    assert refs and all(n.endswith("_reference") for n in refs)
    for name in refs:
        cfg = get_recipe(name)
        assert cfg.train.on_divergence == "warn" and cfg.train.amp == "off", name
        if cfg.data.dataset == "taskonomy":
            assert cfg.data.taskonomy_eval_loss == "batch_mean" and cfg.train.eval_batch_size == cfg.train.batch_size
    for name in (n for n, f in RECIPE_FOLLOWS.items() if f == "paper"):
        cfg = get_recipe(name)
        assert cfg.train.amp == "off" and cfg.train.on_divergence == "error", name
        assert cfg.data.taskonomy_eval_loss == "set", name


@pytest.mark.parametrize("label,blocks", [(0, 0), (3, 1), (6, 4), (9, 7)])
def test_table6_recipes_use_the_release_batch_and_split(label, blocks):
    """Table 6 (shared blocks "0/3/6/9", K = 3): the release's share_{0,3,6,9} configs use batch 16 per
    process and split at width-list entry p = label, i.e. model.shared_blocks = p − 2 (0 for p = 0);
    their naive twin (--method naive-mtl) has the same split, so --init-from maps onto every branch."""
    from argparse import Namespace
    from fastdmtg.cli import build_config
    for suffix, follows in (("", "paper"), ("_reference", "reference")):
        name = f"taskonomy5_k3_share{label}{suffix}"
        cfg = get_recipe(name)
        assert RECIPE_FOLLOWS[name] == follows and cfg.name == name
        assert (cfg.model.branches, cfg.model.shared_blocks, cfg.train.batch_size) == (3, blocks, 16)
        base = get_recipe(f"taskonomy5_k3{suffix}")
        assert (cfg.optim, cfg.dmtg, cfg.train.init) == (base.optim, base.dmtg, base.train.init)
        args = Namespace(recipe=name, method="naive-mtl", overrides=[], data_root=None, init_from=None,
                         reference=None, config=None)
        naive = build_config(args)
        assert naive.grouping.method == "naive-mtl" and naive.model.shared_blocks == blocks
        assert naive.name == f"taskonomy5_naive_share{label}{suffix}"
        assert naive.optim == get_recipe(f"taskonomy5_naive{suffix}").optim


def test_naive_init_is_an_explicit_error(tmp_path, capsys):
    cfg = get_recipe("celeba9_k3")
    with pytest.raises(ConfigError, match=r"train\.init=naive.*init-from.*train\.init=scratch"):
        check_init(cfg)
    check_init(apply_overrides(cfg, ["train.init_from=runs/naive"]))
    check_init(apply_overrides(cfg, ["train.init=scratch"]))
    check_init(get_recipe("celeba9_naive"))
    # through the CLI: one line, exit 2, before any data is read
    from fastdmtg.cli import main
    assert main(["train", "--recipe", "celeba9_k3", "--data-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.init=naive")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ precision
def _tiny_taskonomy_model():
    from fastdmtg.models import build_multibranch
    torch.manual_seed(0)
    ts = TaskonomyTaskSet(TASKONOMY_5)
    return build_multibranch(ModelConfig(arch="xception", branches=2, shared_blocks=10), ts.specs, 32), ts


def _record(seen: dict, key: str):
    def hook(m, i, o):
        outs = o if isinstance(o, (list, tuple)) else [o]
        seen.setdefault(key, set()).update(t.dtype for t in outs)              # returns None: output kept
    return hook


@pytest.mark.parametrize("amp", ["mixed", "bf16"])
def test_precision_policy_keeps_decoders_and_losses_fp32(amp):
    from fastdmtg.models.xception import Decoder
    from fastdmtg.step import StepModule, autocast_factory, set_output_precision
    from fastdmtg.builder import prepare_model, resolve
    model, ts = _tiny_taskonomy_model()
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    assert set_output_precision(model, keep_fp32=False) == 2 * 5               # K·N decoders
    seen = {}
    model.branches[0][0].rep[1][1].register_forward_hook(_record(seen, "encoder"))   # an encoder conv
    for d in decoders:
        d[0].register_forward_hook(_record(seen, "decoder first"))                  # ConvTranspose
        d[-1].register_forward_hook(_record(seen, "decoder last"))                  # the output conv

    class Const(torch.nn.Module):
        def weights(self):
            return torch.full((5, 2), 0.5)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 32, 32, generator=g),
             "targets": {"segment_semantic": torch.randint(0, 18, (2, 32, 32), generator=g),
                         "depth_zbuffer": torch.randn(2, 1, 32, 32, generator=g),
                         "normal": torch.randn(2, 3, 32, 32, generator=g),
                         "keypoints2d": torch.randn(2, 1, 32, 32, generator=g),
                         "edge_texture": torch.full((2, 1, 32, 32), -0.671)},
             "mask": torch.ones(2, 1, 32, 32, dtype=torch.bool)}
    # the trainer's own wiring: prepare_model sets the heads from train.amp
    cfg = apply_overrides(get_recipe("taskonomy5_k3"), [f"train.amp={amp}", "model.batched=off"])
    model, _ = prepare_model(model, cfg, resolve(cfg, torch.device("cpu")), world_size=1)
    assert all(d.keep_fp32 == (amp == "mixed") for d in decoders)
    total, L = StepModule(model, Const(), ts, autocast_factory(True, torch.device("cpu"), False))(batch)
    want = torch.float32 if amp == "mixed" else torch.bfloat16
    assert seen == {"encoder": {torch.bfloat16}, "decoder first": {want}, "decoder last": {want}}
    assert total.dtype == torch.float32 and L.dtype == torch.float32           # losses in fp32
    # an fp32 decoder can hit the edge background exactly; a bf16 one stays at least 8.45e-4 away
    d = decoders[0]
    with torch.no_grad():
        d[-1].weight.zero_()
        d[-1].bias.fill_(-0.671)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = d(torch.rand(1, 512, 2, 2)).float()
    if amp == "mixed":
        assert float((y + 0.671).abs().max()) < 1e-7
    else:
        assert float((y + 0.671).abs().min()) > 8e-4


@pytest.mark.parametrize("amp", ["auto", "off", "mixed", "bf16"])
def test_decoder_fp32_flag_follows_train_amp(amp):
    """prepare_model marks every decoder fp32 unless train.amp=bf16: under auto (mixed on CUDA) and off
    too, so a CUDA default run keeps its heads in fp32."""
    from fastdmtg.models.xception import Decoder
    from fastdmtg.builder import prepare_model, resolve
    model, _ = _tiny_taskonomy_model()
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    for d in decoders:
        d.keep_fp32 = amp == "bf16"                    # the opposite of what the policy must set
    cfg = apply_overrides(get_recipe("taskonomy5_k3"), [f"train.amp={amp}", "model.batched=off"])
    prepare_model(model, cfg, resolve(cfg, torch.device("cpu")), world_size=1)
    assert len(decoders) == 10 and all(d.keep_fp32 == (amp != "bf16") for d in decoders)


@pytest.mark.parametrize("batched", [False, True])
def test_precision_policy_keeps_linear_heads_fp32(batched, monkeypatch):
    """CelebA: the stacked linear heads (and the batched net's einsum over all K·N heads) in fp32."""
    import fastdmtg.models.batched as B
    import fastdmtg.models.multibranch as MB
    calls, real = [], MB.fp32_heads
    spy = lambda fn, *xs: calls.append(1) or real(fn, *xs)                      # noqa: E731
    monkeypatch.setattr(B if batched else MB, "fp32_heads", spy)
    from fastdmtg.models import build_multibranch
    from fastdmtg.models.batched import BatchedMultiBranchNet
    from fastdmtg.step import set_output_precision
    from fastdmtg.tasks import TaskSpec
    from fastdmtg.builder import prepare_model, resolve
    torch.manual_seed(0)
    specs = [TaskSpec(f"t{i}", "class", 2) for i in range(3)]
    x = torch.rand(4, 3, 32, 32)
    got = {}
    for amp in ("mixed", "bf16"):
        net = build_multibranch(ModelConfig(arch="resnet_celeba", branches=2, width=4), specs, 32)
        cfg = apply_overrides(get_recipe("synthetic_k3"),
                              [f"train.amp={amp}", f"model.batched={'on' if batched else 'off'}"])
        net, _ = prepare_model(net, cfg, resolve(cfg, torch.device("cpu")))
        assert isinstance(net, BatchedMultiBranchNet) == batched
        seen = {}
        first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(_record(seen, "encoder"))
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[amp] = net(x)                                                    # (K, N, B, C)
        assert seen["encoder"] == {torch.bfloat16}
        # the heads' fp32 island: once per branch's LinearHeads, or once for the batched einsum
        assert len(calls) == ((1 if batched else 2) if amp == "mixed" else 0)
    assert got["mixed"].dtype == torch.float32
    # (the fp32 bias, zero at init, promotes a bf16 einsum's result to fp32: compare values, not
    # dtypes; CPU autocast runs the batched net's 4-d einsum in fp32 anyway, so only per-branch here)
    bf16_valued = {a: bool((o == o.to(torch.bfloat16).float()).all()) for a, o in got.items()}
    assert bf16_valued["mixed"] is False and (batched or bf16_valued["bf16"])
    assert set_output_precision(net, keep_fp32=True) >= 1


def test_head_policy_traces_under_torch_compile():
    """The CUDA default compiles the step: dynamo must keep the fp32 island (fullgraph, no break)."""
    from fastdmtg.models.xception import Decoder
    torch.manual_seed(0)
    m = Decoder(1, in_channels=8, widths=(4, 4, 4, 4))
    x = torch.rand(2, 8, 2, 2)
    comp = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye, yc = m(x), comp(x)
    assert ye.dtype == yc.dtype == torch.float32 and torch.equal(ye, yc)


def test_evaluation_runs_in_fp32_unless_plain_bf16():
    from fastdmtg.builder import use_bf16
    from fastdmtg.train import eval_autocast
    dev = torch.device("cpu")
    x = torch.ones(2, 2)
    for amp, train_bf16, eval_bf16 in (("mixed", True, False), ("bf16", True, True), ("off", False, False),
                                       ("auto", False, False)):
        cfg = apply_overrides(get_recipe("synthetic_k3"), [f"train.amp={amp}"])
        assert use_bf16(cfg, dev) == train_bf16
        with eval_autocast(cfg, dev):
            assert ((x @ x).dtype == torch.bfloat16) == eval_bf16
    assert use_bf16(apply_overrides(get_recipe("synthetic_k3"), ["train.amp=auto"]), torch.device("cuda"))


def test_precision_benchmark_paired_test_by_hand(tmp_path):
    """benchmarks/precision.py's analysis: the paired t-test of the per-seed test errors. Student's t
    quantiles against table values (t_0.975 with 1, 2, 10 degrees of freedom: 12.706, 4.303, 2.228);
    on the results file's seeds (off 40.90 / 64.50 / 53.60, mixed 40.30 / 69.60 / 53.80): differences
    −0.6, 5.1, 0.2 → mean 1.5667, sd 3.0860, se 1.7817, 95 % CI 1.5667 ± 4.3027·1.7817 = [−6.10, 9.23];
    --reanalyse rewrites a report's analysis from its own table."""
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("precision_bench", root / "benchmarks" / "precision.py")
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    for df, want in ((1, 12.7062), (2, 4.3027), (10, 2.2281)):
        assert P.t_quantile(0.975, df) == pytest.approx(want, abs=1e-4)
    r = P.paired_shift([40.90, 64.50, 53.60], [40.30, 69.60, 53.80])
    assert (r["n"], r["mean"], r["sd"], r["se"]) == (3, pytest.approx(1.566667, abs=1e-6),
                                                     pytest.approx(3.085990, abs=1e-6), pytest.approx(1.781697, abs=1e-6))
    assert (r["lo"], r["hi"]) == (pytest.approx(-6.0994, abs=1e-4), pytest.approx(9.2327, abs=1e-4))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        P.paired_shift([1.0], [2.0])
    report = tmp_path / "r.md"
    report.write_text("# t\n\n| seed | off | mixed |\n|---|---:|---:|\n| 0 | 40.90 | 40.30 |\n| 1 | 64.50 | 69.60 |\n"
                      "| 2 | 53.60 | 53.80 |\n| mean ± std | 53.00 ± 11.81 | 54.57 ± 14.67 |\n\n- old line\n")
    text = P.reanalyse(str(report))
    assert "old line" not in text and "| mean ± std |" in text
    assert "mixed − off, paired by seed (n = 3): mean shift +1.57 total-error points, 95 % CI [-6.10, +9.23]" in text


# ------------------------------------------------------------------------------------------ DDP
PROBE = Path(__file__).with_name("ddp_noise_probe.py")


@pytest.mark.timeout(600)
def test_two_gloo_ranks_share_or_split_the_gumbel_noise(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(PROBE),
           str(tmp_path)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=560)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "probe.json").read_text())
    shared, per_rank = res["shared"], res["per_rank"]
    for mode in (shared, per_rank):
        assert len(mode["z"]) == 2 and mode["global_batch"] == 2 * 8
        z0, z1 = (torch.tensor(z) for z in mode["z"])            # (steps, N, K) per rank
        assert z0.shape == (2, 9, 3) and not torch.equal(z0[0], z0[1])   # a new draw every step
    assert torch.equal(torch.tensor(shared["z"][0]), torch.tensor(shared["z"][1]))       # the same z on both
    assert not torch.allclose(torch.tensor(per_rank["z"][0]), torch.tensor(per_rank["z"][1]), atol=1e-3)
    assert shared["z"][0] == per_rank["z"][0]                    # rank 0 keeps the base seed either way
    assert "SyncBatchNorm runs on CUDA only" in res["sync_bn_error"]
    # the epoch's training loss is the mean over both ranks' samples; the validation loss is rank 0's
    assert res["global_mean"] == [2.0, 2.0] and res["broadcast"] == [7.0, 7.0]
    # one epoch, 64 samples, 8 per rank per step: the ranks' shards are disjoint, each sample of the
    # epoch is seen once (64 = 4 full global batches), and after the all-reduced steps (per-rank noise,
    # so the ranks' own S gradients differ) both ranks hold the same S and the same weights
    a, b = res["fit"]
    assert len(a["steps"]) == len(b["steps"]) == 4 and all(len(s) == 8 for s in a["steps"] + b["steps"])
    sa, sb = {h for s in a["steps"] for h in s}, {h for s in b["steps"] for h in s}
    assert len(sa) == len(sb) == 32 and not sa & sb
    S0, S1 = torch.tensor(a["S"]), torch.tensor(b["S"])
    assert torch.equal(S0, S1) and not torch.equal(S0, torch.ones_like(S0))    # trained, and in sync
    assert a["weights"] == b["weights"]
