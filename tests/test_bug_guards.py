"""One named test per bug that once survived the whole suite (issue 19: deliberate bugs put into
central functions, the suite run against each). Each test states the bug it catches; each was run
against that bug put back by hand (it fails) and against the code as it is (it passes).

Every expected value here is computed by hand or by an independent formula, never by the code
under test."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastdmtg.metrics import normgain
from fastdmtg.models import LinearHeads, MultiBranchNet, grad_scale
from fastdmtg.tasks.taskonomy import TaskonomyTaskSet, miou_from_confusion

sys.path.insert(0, str(Path(__file__).parent))


# ------------------------------------------------------------------------------------------ NormGain
def test_normgain_divides_by_the_reference_value():
    """Bug: (r − v) / v instead of (r − v) / r. Hand values: task a 100·(2 − 1)/2 = 50, task b
    100·(4 − 5)/4 = −25, task c has reference 0 (excluded); mean = 12.5."""
    r = normgain({"a": 2.0, "b": 4.0, "c": 0.0, "unused": 9.0}, {"a": 1.0, "b": 5.0, "c": 1.0})
    assert r["per_task"] == pytest.approx({"a": 50.0, "b": -25.0})
    assert r["value"] == pytest.approx(12.5)
    assert r["excluded"] == ["c"]
    # only the tasks of ``ours`` count; a task missing from the reference is an error
    assert normgain({"a": 8.0, "b": 1.0}, {"a": 6.0})["value"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="no result for task"):
        normgain({"a": 1.0}, {"a": 1.0, "b": 1.0})
    assert math.isnan(normgain({"a": 0.0}, {"a": 1.0})["value"])


# ------------------------------------------------------------------------------------------ 1/√K gradient
def test_grad_scale_multiplies_the_gradient_and_nothing_else():
    """Bug: _GradScale.backward returning g (identity). Forward is the identity; the gradient that
    reaches x is scale · upstream, checked against the upstream gradient by hand."""
    x = torch.randn(3, 4, requires_grad=True)
    up = torch.randn(3, 4)
    y = grad_scale(x, 0.25)
    assert torch.equal(y.detach(), x.detach())
    y.backward(up)
    torch.testing.assert_close(x.grad, 0.25 * up, rtol=0, atol=0)


def test_multibranch_gradients_are_scaled_by_one_over_sqrt_k():
    """The scaling inside a K-branch net (K = 4, 1/√K = 0.5 into the branches and into the heads):
    the heads' gradient is unchanged, each branch's gradient is 0.5× and the shared trunk's 0.25×
    the unscaled net's (chain rule through the two identity-forward scalings)."""
    k, s = 4, 1 / math.sqrt(4)

    def net(bs, hs):
        torch.manual_seed(0)
        return MultiBranchNet(nn.Linear(5, 6), nn.Linear(6, 6), LinearHeads(3, 6, 2), k, bs, hs)

    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    w = torch.randn(k, 3, 7, 2, generator=torch.Generator().manual_seed(2))     # (K, N, B, C) loss weights
    grads = []
    for bs, hs in ((1.0, 1.0), (s, s)):
        m = net(bs, hs)
        out = m(x)                                                              # (K, N, B, C)
        (out * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    plain, scaled = grads
    for n in plain:
        factor = 1.0 if n.startswith("heads") else s if n.startswith("branches") else s * s
        torch.testing.assert_close(scaled[n], factor * plain[n], rtol=1e-5, atol=1e-7, msg=n)
    assert any(n.startswith("shared") for n in plain) and any(n.startswith("branches") for n in plain)


# ------------------------------------------------------------------------------------------ mIoU
def _seg_meter_result(miou: str):
    """5 pixels: target [1, 1, 2, 0, 0], prediction [1, 0, 2, 2, 3] (class 0 = ignore).

    Over the valid pixels (target != 0): class 1: intersection 1, union 2 (pixel 2 predicted 0 is a
    miss, class 0 is no class) → 1/2; class 2: 1/1 → 1. Pixels 4 and 5 (target 0) count nowhere:
    counting them would make IoU_2 = 1/2 and put class 3 into the mean definition."""
    ts = TaskonomyTaskSet(["segment_semantic"], miou=miou)
    meter = ts.meter()
    t = torch.tensor([[[1, 1, 2, 0, 0]]])                                   # (B=1, H=1, W=5)
    logits = torch.zeros(1, 18, 1, 5)
    for col, cls in enumerate([1, 0, 2, 2, 3]):
        logits[0, cls, 0, col] = 4.0
    meter.update([logits], {"targets": {"segment_semantic": t}})
    return meter.compute()


@pytest.mark.parametrize("definition", ["reference", "mean"])
def test_miou_ignores_class_zero(definition):
    """Bug: mIoU counting the ignore class 0 (its pixels, or class 0 as a class). Hand values:
    reference = (1/2 + 1)/18 = 8.33 %, mean = (1/2 + 1)/2 = 75 %, both over 2 classes."""
    r = _seg_meter_result(definition)
    m = r["metrics"]["segment_semantic"]
    assert m["miou_reference"] == pytest.approx(100 * 1.5 / 18)
    assert m["miou_mean"] == pytest.approx(75.0)
    assert m["miou"] == pytest.approx(100 * 1.5 / 18 if definition == "reference" else 75.0)
    assert r["error"]["segment_semantic"] == pytest.approx(100 - m["miou"])
    assert m["classes"] == 2


def test_miou_from_confusion_hand_values():
    """The two definitions on a confusion matrix (rows target, columns prediction) with a class-0
    column (valid pixels predicted 0) and a class only ever predicted (class 3)."""
    c = torch.zeros(18, 18, dtype=torch.long)
    c[1, 1], c[1, 0], c[2, 2], c[2, 3], c[4, 1] = 3, 1, 2, 2, 1
    # IoU_1 = 3 / (4 + 4 − 3) = 3/5; IoU_2 = 2 / 4 = 1/2; IoU_3 = 0 / 2 = 0; IoU_4 = 0 / 1 = 0
    ref, n_ref = miou_from_confusion(c, "reference")         # classes 1, 2, 4 in the target; / 18
    assert ref == pytest.approx(100 * (0.6 + 0.5) / 18) and n_ref == 3
    mean, n_mean = miou_from_confusion(c, "mean")            # classes 1, 2, 3, 4 (target or prediction)
    assert mean == pytest.approx(100 * (0.6 + 0.5) / 4) and n_mean == 4
    assert math.isnan(miou_from_confusion(torch.zeros(18, 18), "mean")[0])
    assert miou_from_confusion(torch.zeros(18, 18), "reference") == (0.0, 0)
    with pytest.raises(ValueError, match="taskonomy_miou"):
        miou_from_confusion(c, "other")


# ------------------------------------------------------------------------------------------ τ annealing
def test_trainer_applies_the_tau_schedule_each_epoch(tmp_path, monkeypatch):
    """Bug: the trainer never calling method.on_epoch_start (τ stays at its initial value). The τ
    the method samples with, step by step: epoch e uses max(τ_end, τ_start · decay^e) = 8, 4, 3."""
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.train import Trainer
    cfg = apply_overrides(get_recipe("synthetic_k3"), [
        "train.tensorboard=false", "train.progress=false", "data.synthetic_train=128",
        "data.synthetic_val=64", "data.synthetic_test=64", "train.epochs=3", "train.batch_size=64",
        "model.width=4", "dmtg.tau_schedule=anneal", "dmtg.tau_start=8", "dmtg.tau_end=3",
        "dmtg.tau_decay=0.5"])
    t = Trainer(cfg, tmp_path / "run")
    seen = []
    real = t.method.weights

    def spy():
        seen.append(float(t.method.tau))
        return real()
    monkeypatch.setattr(t.method, "weights", spy)
    t.fit()
    assert seen == [8.0, 8.0, 4.0, 4.0, 3.0, 3.0]                       # 2 steps per epoch


# ------------------------------------------------------------------------------------------ cache keys
def _cache_folder(ds, base):
    from fastdmtg.pipelines.cache import DecodeCache
    return DecodeCache(ds, base, progress=False).folder


def test_celeba_cache_key_depends_on_more_than_the_image_size(tmp_path):
    """Bug: the decode cache keyed by the image size only. Two folders with the same image size,
    and one folder with and without a sample limit, get different cache entries; the same settings
    the same entry."""
    from celeba_fixture import write_celeba
    from fastdmtg.data.celeba import CelebADataset
    for name in ("a", "b"):
        write_celeba(tmp_path / name, n=8, seed=1)
    base = tmp_path / "cache"
    a = _cache_folder(CelebADataset(tmp_path / "a", None, 32), base)
    assert _cache_folder(CelebADataset(tmp_path / "a", None, 32), base) == a
    assert _cache_folder(CelebADataset(tmp_path / "b", None, 32), base) != a
    assert _cache_folder(CelebADataset(tmp_path / "a", None, 32, limits={"train": 2}), base) != a
    assert _cache_folder(CelebADataset(tmp_path / "a", None, 48), base) != a


def test_taskonomy_cache_key_includes_limits(tmp_path):
    """Bug: the raw Taskonomy cache key without ``limits``: a limited run and a full run of the same
    root would share (and keep re-decoding) one cache entry."""
    from taskonomy_fixture import write_fixture
    from fastdmtg.data.taskonomy import TaskonomyDataset
    fx = write_fixture(tmp_path / "raw", size=32, samples_per_building=2)
    names = ["segment_semantic", "depth_zbuffer"]

    def ds(**limits):
        return TaskonomyDataset.from_raw(fx["root"], names, 32, split_file=fx["split_file"], limits=limits)

    base = tmp_path / "cache"
    full = _cache_folder(ds(), base)
    assert _cache_folder(ds(), base) == full
    assert _cache_folder(ds(train=1), base) != full
    assert _cache_folder(ds(val=1, test=1), base) != full
    assert _cache_folder(ds(train=1), base) != _cache_folder(ds(train=2), base)


# ------------------------------------------------------------------------------------------ test command
def test_conftest_uses_the_triton_interpreter_only_without_a_gpu():
    """The documented command (no TRITON_INTERPRET) runs the kernels under Triton's interpreter on a
    CPU machine and on the GPU on a GPU machine (where an unconditional TRITON_INTERPRET=1 skipped
    every GPU kernel test)."""
    import os
    import conftest
    assert conftest.has_cuda_gpu() == torch.cuda.is_available()
    if conftest.INTERPRET_SET_HERE:                      # only where there is no GPU
        assert not torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "1"
