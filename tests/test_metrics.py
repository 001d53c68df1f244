"""Run-level metrics and evaluation against independent computations: NormGain and the totals by
hand, the attribute meter by hand, and ``evaluate()`` against a plain loop over the split (not
against another ``evaluate()``)."""
from __future__ import annotations

import math

import pytest
import torch

from fastdmtg.metrics import normgain, summarize
from fastdmtg.tasks.attributes import AttributeTaskSet


def test_normgain_order_and_sign_of_the_reference():
    # an excluded task (reference 0) first in the dict: the others still count
    r = normgain({"a": 2.0, "b": 4.0, "z": 0.0}, {"z": 3.0, "a": 3.0, "b": 2.0})
    assert r["per_task"] == pytest.approx({"a": -50.0, "b": 50.0}) and r["excluded"] == ["z"]
    assert r["value"] == pytest.approx(0.0)
    # a negative reference has a defined relative gain: 100 · (−2 − (−1)) / (−2) = 50
    assert normgain({"a": -2.0}, {"a": -1.0})["per_task"]["a"] == pytest.approx(50.0)


def test_summarize_totals_by_hand():
    split = {"loss": {"a": 0.5, "b": 1.25}, "error": {"a": 10.0, "b": 30.0}, "count": 4}
    s = summarize(split, unified_error=True)
    assert s["total_loss"] == pytest.approx(1.75) and s["total_error"] == pytest.approx(40.0)
    assert s["count"] == 4 and s["loss"] == split["loss"]
    assert "total_error" not in summarize(split, unified_error=False)          # different units
    s = summarize({"loss": {"a": 1.0}, "error": None}, unified_error=True)
    assert "total_error" not in s and s["total_loss"] == 1.0


def _ce(row, y):
    return math.log(sum(math.exp(v) for v in row)) - row[y]


def test_attribute_meter_by_hand_and_over_batches():
    """N = 2 tasks, B = 3, two classes. Loss = mean CE per task, error = 100 · (1 − accuracy)."""
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.3, 0.2]],       # task a
                           [[1.0, 1.5], [3.0, 0.0], [-1.0, 0.0]]])     # task b       (N, B, C)
    labels = torch.tensor([[0, 1], [0, 0], [1, 1]])                    # (B, N)
    want_loss = {n: sum(_ce(logits[i, b].tolist(), int(labels[b, i])) for b in range(3)) / 3
                 for i, n in enumerate("ab")}
    # argmax: a → [0, 1, 0] vs [0, 0, 1]: 1 of 3 right; b → [1, 0, 1] vs [1, 0, 1]: 3 of 3
    want_err = {"a": 100 * (1 - 1 / 3), "b": 0.0}
    ts = AttributeTaskSet(["a", "b"])
    assert [(t.name, t.kind, t.out_channels) for t in ts.specs] == [("a", "class", 2), ("b", "class", 2)]
    assert ts.unified_error is True                                     # every error is a classification error
    one = ts.meter()
    one.update(logits, {"labels": labels})
    r = one.compute()
    assert r["loss"] == pytest.approx(want_loss) and r["error"] == pytest.approx(want_err)
    assert r["metrics"]["a"]["accuracy"] == pytest.approx(1 / 3) and r["count"] == 3
    two = ts.meter()
    two.update(logits[:, :1], {"labels": labels[:1]})
    two.update(logits[:, 1:], {"labels": labels[1:]})
    r2 = two.compute()
    assert r2["loss"] == pytest.approx(want_loss) and r2["error"] == pytest.approx(want_err) and r2["count"] == 3
    with pytest.raises(ValueError, match="no samples"):
        ts.meter().compute()
    # evaluation keeps no autograd graph, whatever the outputs carry
    g = ts.meter()
    g.update(logits.clone().requires_grad_(), {"labels": labels})
    assert not g.loss_sum.requires_grad and not g.correct.requires_grad


def test_evaluate_matches_a_plain_loop_over_the_split():
    """evaluate() of the argmax model (task i from branch a_i) with a batch size that leaves a
    partial batch, against the full forward of every sample and the definitions by hand."""
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.models import build_multibranch
    from fastdmtg.pipelines import build_source
    from fastdmtg.train import evaluate
    cfg = apply_overrides(get_recipe("synthetic_k3"), ["data.synthetic_train=32", "data.synthetic_val=16",
                                                       "data.synthetic_test=23", "model.width=4"])
    data = build_source(cfg.data, progress=False)
    ts = data.taskset
    torch.manual_seed(0)
    model = build_multibranch(cfg.model, ts.specs, cfg.data.image_size)
    n, k = ts.num_tasks, cfg.model.branches
    assignment = [(2 * i + 1) % k for i in range(n)]
    got = evaluate(model, ts, data, "test", 5, "cpu", assignment=assignment)
    assert model.training                                                   # mode restored

    batches = list(data.batches("test", 100, shuffle=False, device="cpu"))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])                      # (M, N)
    model.eval()
    with torch.no_grad():
        out = model(images)                                                 # (K, N, M, C): every head
    model.train()
    m = images.shape[0]
    assert m == 23 and got["count"] == 23
    for i, name in enumerate(ts.names):
        rows = out[assignment[i], i]                                        # (M, C)
        loss = sum(_ce(rows[j].tolist(), int(labels[j, i])) for j in range(m)) / m
        acc = sum(int(rows[j].argmax()) == int(labels[j, i]) for j in range(m)) / m
        assert got["loss"][name] == pytest.approx(loss, rel=1e-5)
        assert got["error"][name] == pytest.approx(100 * (1 - acc))
    assert got["total_loss"] == pytest.approx(sum(got["loss"].values()))
    assert got["total_error"] == pytest.approx(sum(got["error"].values()))
