"""Your own tasks (``fastdmtg/tasks/generic.py``) without any data folder: the declarations and their
checks, the stored form, the task set's losses and predictions and the meter, each against values
computed by hand. Written from the mutation run of that module (docs/testing.md)."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from fastdmtg.tasks import TaskSpec
from fastdmtg.tasks import generic as gen
from fastdmtg.tasks.generic import GenericMeter, GenericTaskSet, TaskDecl, decls_from_config

LN3 = math.log(3.0)


# ------------------------------------------------------------------------------------------------
# declarations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, pattern", [
    (("a", "ordinal"), r"task 'a': type must be one of binary\|multiclass\|regression, got 'ordinal'"),
    (("a", "regression", 0, (), -1.0), r"task 'a': weight must be a finite number >= 0, got -1.0"),
    (("a", "regression", 0, (), math.nan), "weight must be a finite number >= 0, got nan"),
    (("a", "regression", 0, (), math.inf), "weight must be a finite number >= 0, got inf"),
    (("a", "regression", 0, (), "1"), "weight must be a finite number >= 0, got '1'"),
    (("a", "binary", 3, ("n", "y")), r"task 'a': a binary task has classes 2 and two labels, got 3, \['n', 'y'\]"),
    (("a", "binary", 1, ("n", "y")), r"a binary task has classes 2 and two labels, got 1, \['n', 'y'\]"),
    (("a", "binary", 2, ("n",)), r"a binary task has classes 2 and two labels, got 2, \['n'\]"),
    (("a", "binary", 2, ("n", "y", "z")), "a binary task has classes 2 and two labels"),
    (("a", "multiclass", 1), "task 'a': a multiclass task needs classes >= 2, got 1"),
    (("a", "multiclass", 3.0), "a multiclass task needs classes >= 2, got 3.0"),
    (("a", "multiclass", 3, ("x", "y")), "task 'a': 2 labels for 3 classes"),
    (("a", "multiclass", 2, ("x", "y", "z")), "task 'a': 3 labels for 2 classes"),
    (("a", "regression", 0, (), 1.0, 0.0, 0.0), "task 'a': regression normalisation needs a finite mean and "
                                                 "std > 0, got mean 0.0, std 0.0"),
    (("a", "regression", 0, (), 1.0, 0.0, -1.0), "std > 0, got mean 0.0, std -1.0"),
    (("a", "regression", 0, (), 1.0, 0.0, math.inf), "std > 0, got mean 0.0, std inf"),
    (("a", "regression", 0, (), 1.0, math.nan, 1.0), "std > 0, got mean nan, std 1.0"),
    (("a", "regression", 0, (), 1.0, -math.inf, 1.0), "std > 0, got mean -inf, std 1.0"),
])
def test_decl_rejects(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        TaskDecl(*args)


def test_decl_accepts_the_boundaries():
    """weight 0, two classes, classes without names, any std > 0, a negative mean: all valid."""
    assert TaskDecl("a", "binary", 2, ("n", "y"), 0.0).weight == 0.0
    assert TaskDecl("a", "multiclass", 2).classes == 2
    assert TaskDecl("a", "multiclass", 3, ("x", "y", "z")).labels == ("x", "y", "z")
    assert TaskDecl("a", "multiclass", 3, (), 2).weight == 2                 # an int weight is a number
    r = TaskDecl("a", "regression", 0, (), 1.0, -5.0, 1e-6)
    assert (r.mean, r.std) == (-5.0, 1e-6)


def test_decl_is_immutable():
    """A declaration is the resolved, stored form: it cannot be changed after the checks ran."""
    d = TaskDecl("r", "regression", 0, (), 1.0, 10.0, 4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.std = 0.0
    assert {d, TaskDecl("r", "regression", 0, (), 1.0, 10.0, 4.0)} == {d}       # hashable, equal by value


def test_out_channels():
    assert TaskDecl("b", "binary", 2, ("n", "y")).out_channels == 2
    assert TaskDecl("m", "multiclass", 5).out_channels == 5
    assert TaskDecl("r", "regression").out_channels == 1
    assert TaskDecl("r", "regression").classes == 0                           # the documented default
    assert TaskDecl.from_dict("r", {"type": "regression"}) == TaskDecl("r", "regression")


def test_to_dict_is_the_stored_form_and_round_trips():
    b = TaskDecl("b", "binary", 2, ("n", "y"), 2.0)
    m = TaskDecl("m", "multiclass", 3)
    mn = TaskDecl("mn", "multiclass", 2, ("lo", "hi"), 0.5)
    r = TaskDecl("r", "regression", 0, (), 1.0, 10.0, 4.0)
    assert b.to_dict() == {"type": "binary", "classes": 2, "labels": ["n", "y"], "weight": 2.0}
    assert m.to_dict() == {"type": "multiclass", "classes": 3, "weight": 1.0}
    assert mn.to_dict() == {"type": "multiclass", "classes": 2, "labels": ["lo", "hi"], "weight": 0.5}
    assert r.to_dict() == {"type": "regression", "weight": 1.0, "mean": 10.0, "std": 4.0}
    for d in (b, m, mn, r):
        assert TaskDecl.from_dict(d.name, d.to_dict()) == d


def test_from_dict_defaults():
    assert TaskDecl.from_dict("b", {"type": "binary", "labels": ["n", "y"]}) == TaskDecl("b", "binary", 2, ("n", "y"))
    b = TaskDecl.from_dict("b", {"type": "binary", "labels": ["n", "y"]})
    assert (b.classes, b.weight, b.mean, b.std) == (2, 1.0, 0.0, 1.0)
    r = TaskDecl.from_dict("r", {"type": "regression"})
    assert (r.classes, r.labels, r.weight, r.mean, r.std) == (0, (), 1.0, 0.0, 1.0)
    r = TaskDecl.from_dict("r", {"type": "regression", "weight": 3, "mean": -2, "std": 0.5})
    assert (r.weight, r.mean, r.std) == (3.0, -2.0, 0.5)
    # a missing or non-string type is a type error of the declaration, not a crash
    for d in ({}, {"type": 3}, {"type": None, "classes": 2}):
        with pytest.raises(ValueError, match=r"^task 'x': type must be one of binary\|multiclass\|regression, got "):
            TaskDecl.from_dict("x", d)
    # a multiclass task has no default number of classes
    with pytest.raises(ValueError, match="task 'm': a multiclass task needs classes >= 2, got 0"):
        TaskDecl.from_dict("m", {"type": "multiclass"})


@pytest.mark.parametrize("d, pattern", [
    ([1], r"^data.folder_tasks: task 'x': expected an object, got \[1\]$"),
    ({"type": "binary", "kind": 1, "color": 2},
     r"^data.folder_tasks: task 'x': unknown keys \['color', 'kind'\]; expected \['classes', 'labels', 'mean', "
     r"'std', 'type', 'weight'\]$"),
    ({"type": "regression", "weight": "1"}, r"^data.folder_tasks: task 'x': weight must be a number, got '1'$"),
    ({"type": "regression", "weight": True}, "weight must be a number, got True"),
    ({"type": "regression", "mean": None}, "mean must be a number, got None"),
    ({"type": "regression", "std": False}, "std must be a number, got False"),
    ({"type": "multiclass", "classes": "3"}, r"^data.folder_tasks: task 'x': classes must be an integer, got '3'$"),
    ({"type": "multiclass", "classes": 3.0}, "classes must be an integer, got 3.0"),
    ({"type": "multiclass", "classes": True}, "classes must be an integer, got True"),
    ({"type": "multiclass", "classes": 2, "labels": "ab"},
     r"^data.folder_tasks: task 'x': labels must be a list of strings, got 'ab'$"),
    ({"type": "multiclass", "classes": 2, "labels": ["a", 1]}, r"labels must be a list of strings, got \['a', 1\]"),
])
def test_from_dict_rejects(d, pattern):
    with pytest.raises(ValueError, match=pattern):
        TaskDecl.from_dict("x", d)


def test_from_dict_names_where():
    with pytest.raises(ValueError, match=r"^tasks.json: task 'x': expected an object, got 3$"):
        TaskDecl.from_dict("x", 3, where="tasks.json")


def test_decls_from_config_order_and_missing():
    cfg = {"b": {"type": "binary", "classes": 2, "labels": ["n", "y"], "weight": 1.0},
           "r": {"type": "regression", "weight": 1.0, "mean": 1.0, "std": 2.0},
           "m": {"type": "multiclass", "classes": 4, "weight": 1.0}}
    assert [d.name for d in decls_from_config(cfg)] == ["b", "r", "m"]
    assert [(d.name, d.type) for d in decls_from_config(cfg, ["m", "b"])] == [("m", "multiclass"), ("b", "binary")]
    with pytest.raises(ValueError, match=r"^data.folder_tasks: no declaration of task\(s\) \['x', 'y'\]; it declares "
                                         r"\['b', 'r', 'm'\]$"):
        decls_from_config(cfg, ["b", "x", "y"])
    ts = GenericTaskSet.from_config(cfg, ["r", "m"])
    assert ts.decls == decls_from_config(cfg, ["r", "m"])


def test_annotations_resolve():
    """The annotations are valid types (strings until typing.get_type_hints evaluates them)."""
    assert typing.get_type_hints(decls_from_config) == {"folder_tasks": dict, "names": list[str] | None,
                                                        "return": list[TaskDecl]}
    assert typing.get_type_hints(GenericTaskSet.from_config) == {"folder_tasks": dict, "names": list[str] | None,
                                                                 "return": GenericTaskSet}
    assert typing.get_type_hints(TaskDecl) == {"name": str, "type": str, "classes": int, "labels": tuple,
                                               "weight": float, "mean": float, "std": float}
    assert typing.get_type_hints(TaskDecl.from_dict)["return"] is TaskDecl
    assert typing.get_type_hints(GenericTaskSet.__init__) == {"decls": list[TaskDecl]}
    assert typing.get_type_hints(GenericTaskSet.meter) == {"return": GenericMeter}
    for f in (TaskDecl.to_dict, TaskDecl.out_channels.fget, GenericTaskSet.head_loss, GenericTaskSet.head_losses,
              GenericTaskSet.predictions, GenericMeter.__init__, GenericMeter.update, GenericMeter.compute):
        typing.get_type_hints(f)


# ------------------------------------------------------------------------------------------------
# the task set
# ------------------------------------------------------------------------------------------------
def test_task_set_checks_specs_and_unified_error():
    with pytest.raises(ValueError, match="^a task set needs at least one task$"):
        GenericTaskSet([])
    with pytest.raises(ValueError, match=r"^duplicate task names in \['a', 'b', 'a'\]$"):
        GenericTaskSet([TaskDecl("a", "regression"), TaskDecl("b", "regression"), TaskDecl("a", "multiclass", 2)])
    b, m, r = TaskDecl("b", "binary", 2, ("n", "y")), TaskDecl("m", "multiclass", 4), TaskDecl("r", "regression")
    ts = GenericTaskSet([b, m, r])
    assert ts.specs == [TaskSpec("b", "binary", 2), TaskSpec("m", "multiclass", 4), TaskSpec("r", "regression", 1)]
    assert not ts.unified_error
    assert GenericTaskSet([b, m]).unified_error
    assert not GenericTaskSet([r]).unified_error
    assert isinstance(ts.meter(), GenericMeter) and ts.meter().ts is ts


def test_head_loss_by_hand_with_one_label():
    """A single labelled sample: the loss is that sample's, not halved (n = 1)."""
    ts = GenericTaskSet([TaskDecl("b", "binary", 2, ("n", "y")), TaskDecl("r", "regression", 0, (), 1.0, 10.0, 4.0)])
    pred = torch.tensor([[[0.0, LN3], [5.0, -5.0]],                             # (K=2, B=2, 2)
                         [[LN3, 0.0], [1.0, 1.0]]])
    y = torch.tensor([1.0, math.nan])
    # softmax([0, ln 3]) = (1/4, 3/4): −log(3/4); softmax([ln 3, 0]) = (3/4, 1/4): −log(1/4)
    torch.testing.assert_close(ts.head_loss(0, pred, y), torch.tensor([math.log(4 / 3), math.log(4.0)]))
    # regression, y = 14 → t = (14 − 10)/4 = 1; outputs 0.5 and 3 → (0.5 − 1)² = 0.25, (3 − 1)² = 4
    pr = torch.tensor([[[7.0], [0.5]], [[7.0], [3.0]]])
    torch.testing.assert_close(ts.head_loss(1, pr, torch.tensor([math.nan, 14.0])), torch.tensor([0.25, 4.0]))
    # two labels: the mean; y = 6 → t = −1, y = 18 → t = 2: ((0 + 1)² + (1 − 2)²)/2 = 1
    pr = torch.tensor([[[0.0], [1.0], [9.0]]])
    torch.testing.assert_close(ts.head_loss(1, pr, torch.tensor([6.0, 18.0, math.nan])), torch.tensor([1.0]))


def test_head_losses_total_by_hand():
    """total = Σ_i w_i Σ_k z[i, k]·L[i, k] with the task weights; pruned heads hold 0 in L."""
    ts = GenericTaskSet([TaskDecl("b", "binary", 2, ("n", "y"), 3.0),
                         TaskDecl("r", "regression", 0, (), 0.5, 0.0, 1.0)])
    out = [torch.tensor([[[0.0, LN3]], [[LN3, 0.0]]]),                          # (K=2, B=1, 2)
           torch.tensor([[[2.0]], [[-1.0]]])]                                   # (K=2, B=1, 1)
    y = torch.tensor([[1.0, 0.0]])                                              # (B=1, N=2)
    z = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    total, L = ts.head_losses(out, {"targets": y}, z)
    l0, l1 = math.log(4 / 3), math.log(4.0)
    torch.testing.assert_close(L, torch.tensor([[l0, l1], [4.0, 1.0]]))
    assert float(total) == pytest.approx(3 * (l0 + 2 * l1) + 0.5 * (4 * 4 + 8 * 1), rel=1e-6)
    assert not L.requires_grad
    # pruning: task 0 keeps head 1 only, task 1 head 0 only
    total, L = ts.head_losses([out[0][1:], out[1][:1]], {"targets": y}, z, active=((1,), (0,)))
    torch.testing.assert_close(L, torch.tensor([[0.0, l1], [4.0, 0.0]]))
    assert float(total) == pytest.approx(3 * 2 * l1 + 0.5 * 4 * 4, rel=1e-6)


def test_predictions_by_hand():
    ts = GenericTaskSet([TaskDecl("b", "binary", 2, ("no", "yes")), TaskDecl("m", "multiclass", 3),
                         TaskDecl("c", "multiclass", 2, ("cat", "dog")),
                         TaskDecl("r", "regression", 0, (), 1.0, 10.0, 4.0)])
    out = [torch.tensor([[0.0, LN3], [LN3, 0.0], [0.0, 0.0]]),                 # (B=3, 2)
           torch.tensor([[0.0, 0.0, math.log(2.0)], [LN3, 0.0, 0.0], [0.0, 1.0, 0.0]]),
           torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]]),
           torch.tensor([[0.5], [-1.0], [0.0]], requires_grad=True)]
    p = ts.predictions(out)
    assert list(p) == ["b", "m", "c", "r"]
    torch.testing.assert_close(p["b"]["probabilities"], torch.tensor([[0.25, 0.75], [0.75, 0.25], [0.5, 0.5]]))
    assert p["b"]["class"].tolist() == [1, 0, 0] and p["b"]["class"].dtype == torch.int64
    assert p["b"]["label"] == ["yes", "no", "no"]
    torch.testing.assert_close(p["m"]["probabilities"][:2], torch.tensor([[0.25, 0.25, 0.5], [0.6, 0.2, 0.2]]))
    assert p["m"]["class"].tolist() == [2, 0, 1] and p["m"]["label"] == [2, 0, 1]      # no names: the id
    assert p["c"]["label"] == ["cat", "dog", "cat"]
    assert set(p["r"]) == {"value"}
    torch.testing.assert_close(p["r"]["value"], torch.tensor([12.0, 6.0, 10.0]))          # 10 + 4·out
    assert not p["r"]["value"].requires_grad


# ------------------------------------------------------------------------------------------------
# the meter
# ------------------------------------------------------------------------------------------------
def test_meter_counts_and_errors():
    ts = GenericTaskSet([TaskDecl("m", "multiclass", 3), TaskDecl("r", "regression", 0, (), 1.0, 1.0, 2.0)])
    m = ts.meter()
    with pytest.raises(ValueError, match="^no samples were evaluated$"):
        m.compute()
    # 3 samples, 2 tasks; task m labelled twice, task r never
    out = [torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 9.0]]), torch.zeros(3, 1)]
    m.update(out, {"targets": torch.tensor([[1.0, math.nan], [2.0, math.nan], [math.nan, math.nan]])})
    with pytest.raises(ValueError, match=r"^task 'r': no labelled sample in the evaluated split \(every cell of its "
                                         r"column is empty there\)$"):
        m.compute()
    # one labelled r: value 1 + 2·0.5 = 2 vs 5 → |e| = 3; standardised target (5 − 1)/2 = 2, loss (0.5 − 2)² = 2.25
    m.update([torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5]])], {"targets": torch.tensor([[2.0, 5.0]])})
    res = m.compute()
    assert res["count"] == 4                                         # every sample, labelled or not
    # m: predictions 1, 0, (unlabelled), 2 vs 1, 2, 2 → 2 of 3 correct
    assert res["metrics"]["m"] == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert res["error"] == {"m": pytest.approx(100 / 3)}
    assert res["metrics"]["r"] == {"mae": pytest.approx(3.0), "rmse": pytest.approx(3.0), "count": 1}
    assert res["loss"]["r"] == pytest.approx(2.25)


def test_meter_regression_only_has_no_error_and_accumulates_over_batches():
    ts = GenericTaskSet([TaskDecl("r", "regression", 0, (), 1.0, 0.0, 1.0)])
    m = GenericMeter(ts)
    m.update([torch.tensor([[1.0], [2.0]])], {"targets": torch.tensor([[0.0], [2.0]])})      # |e| 1, 0
    m.update([torch.tensor([[0.0], [5.0]])], {"targets": torch.tensor([[3.0], [math.nan]])})  # |e| 3, —
    res = m.compute()
    assert res["error"] is None and res["count"] == 4
    assert res["metrics"]["r"] == {"mae": pytest.approx(4 / 3), "rmse": pytest.approx(math.sqrt(10 / 3)), "count": 3}
    assert res["loss"] == {"r": pytest.approx(10 / 3)}


def test_meter_update_builds_no_autograd_graph(monkeypatch):
    ts = GenericTaskSet([TaskDecl("b", "binary", 2, ("n", "y"))])
    seen = []
    real = ts.head_loss

    def spy(*args):
        seen.append(torch.is_grad_enabled())
        return real(*args)
    monkeypatch.setattr(ts, "head_loss", spy)
    ts.meter().update([torch.zeros(2, 2, requires_grad=True)], {"targets": torch.tensor([[0.0], [1.0]])})
    assert seen == [False]


def test_mean_and_std_only_on_regression_tasks():
    """A classification declaration with a regression normalisation was accepted and the fields
    silently dropped (to_dict leaves them out): now a one-line error naming the task."""
    from fastdmtg.config import Config, ConfigError
    with pytest.raises(ValueError, match=r"^data.folder_tasks: task 'b': mean and std apply to regression tasks "
                                         r"only \(this one is binary\); remove them$"):
        TaskDecl.from_dict("b", {"type": "binary", "labels": ["n", "y"], "std": 0})
    with pytest.raises(ValueError, match=r"task 'm': mean and std apply to regression tasks only"):
        TaskDecl.from_dict("m", {"type": "multiclass", "classes": 3, "mean": 1.0})
    with pytest.raises(ValueError, match=r"^task 'b': mean and std apply to regression tasks only \(this one is "
                                         r"binary\), got mean 0.0, std 2.0$"):
        TaskDecl("b", "binary", 2, ("n", "y"), std=2.0)
    with pytest.raises(ConfigError, match="mean and std apply to regression tasks only"):
        Config.from_dict({"data": {"dataset": "folder", "folder_tasks": {
            "b": {"type": "binary", "classes": 2, "labels": ["n", "y"], "weight": 1.0, "std": 0.0}}}})
    r = TaskDecl.from_dict("r", {"type": "regression", "mean": 2.0, "std": 3.0})
    assert (r.mean, r.std) == (2.0, 3.0)
