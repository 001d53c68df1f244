"""Every number the comparison tables print (``fastdmtg.compare_tables``: build_tables and the LaTeX
table), on hand-made result folders: results.json and history.json written by hand in
the trainer's format, read back as ``compare`` reads them, every expected value worked out by hand
in the comments. No training: the whole file runs in about a second.

Three tasks a, b, c. Naive MTL (the NormGain reference): test loss (2, 4, 1), error (10, 20, 40) %.
NormGain of a task = 100 · (reference − method) / reference, the mean over tasks; > 0 is better.

  dmtg K=2, two seeds      loss            NormGain_L per task     error        NormGain_E per task
    seed 0                 (1, 3, 1.5)     (+50, +25, −50) → +8.33  (5, 20, 30)  (+50, 0, +25) → +25
    seed 1                 (1.5, 2, 1)     (+25, +50, 0)  → +25     (10, 10, 20) (0, +50, +50) → +33.33
  rg K=2, two partitions
    partition 0            (3, 4, 1)       (−50, 0, 0) → −16.67     (10, 20, 40) (0, 0, 0) → 0
    partition 1            (2, 6, 2)       (0, −50, −100) → −50     (20, 20, 40) (−100, 0, 0) → −33.33
  dmtg two-shot (scratch)  (1, 2, 1)       (+50, +50, 0) → +33.33   (5, 10, 20)  (+50, +50, +50) → +50

Mean ± sample std (n − 1) over two values x, y: (x + y)/2 ± |x − y|/√2.
"""
import json
import math

import pytest

from fastdmtg.baselines._core import Row
from fastdmtg.baselines._core import best_val_losses as _best_val_losses
from fastdmtg.baselines import get as baselines_get
from fastdmtg.baselines.dmtg_two_shot import SCRATCH
from fastdmtg.compare_tables import build_tables, latex_table, row_metrics
from fastdmtg.checkpoint import read_json

NAMES = ["a", "b", "c"]


def _result(tmp_path, key, loss, error, epochs=10, branches=2, seconds=36.0, metrics=None):
    """A finished run's folder as the trainer leaves it (results.json, history.json), read back the
    way ``Comparison.run`` does (read_json, then "_dir" and "_key")."""
    d = tmp_path / key
    d.mkdir(parents=True)
    test = {"loss": dict(zip(NAMES, loss))}
    if error is not None:
        test["error"] = dict(zip(NAMES, error))
    if metrics is not None:
        test["metrics"] = metrics
    res = {"tasks": NAMES, "epochs": epochs, "num_branches": branches, "train_time_s": seconds,
           "total_loss": sum(loss), "test": test}
    if error is not None:
        res["total_error"] = sum(error)
    (d / "results.json").write_text(json.dumps(res))
    # two epochs of validation losses: epoch 1 is best for a and for {a, b}, epoch 0 for b and c
    hist = [{"epoch": 0, "val": {"loss": {"a": 3.0, "b": 1.0, "c": 1.0}}},
            {"epoch": 1, "val": {"loss": {"a": 1.0, "b": 2.0, "c": 4.0}}}]
    (d / "history.json").write_text(json.dumps(hist))
    out = read_json(d / "results.json")
    out["_dir"], out["_key"] = str(d), key
    return out


def _cost(res):
    """(key, branch-epochs, seconds) of a run, as ``Comparison.cost`` gives them."""
    return res["_key"], res["num_branches"] * res["epochs"], res["train_time_s"]


@pytest.fixture
def rows(tmp_path):
    naive = _result(tmp_path, "naive", (2, 4, 1), (10, 20, 40), branches=1, seconds=30.0)
    d0 = _result(tmp_path, "dmtg/k2", (1, 3, 1.5), (5, 20, 30))
    d1 = _result(tmp_path, "dmtg/k2-seed1", (1.5, 2, 1), (10, 10, 20))
    r0 = _result(tmp_path, "rg/k2/p0", (3, 4, 1), (10, 20, 40), seconds=40.0)
    r1 = _result(tmp_path, "rg/k2/p1", (2, 6, 2), (20, 20, 40), seconds=80.0)
    ts = _result(tmp_path, "dmtg-two-shot/k2/scratch", (1, 2, 1), (5, 10, 20), seconds=72.0)
    part = [[0, 1], [2]]
    return naive, [
        Row("naive", None, [naive], [_cost(naive)], [[[0, 1, 2]]]),
        Row("dmtg", 2, [d0, d1], [_cost(d0)], [part, part], networks=[[[0, 1], [0, 2]]]),
        Row("rg", 2, [r0, r1], [_cost(r0), _cost(r1)], [[[0], [1, 2]], [[0, 2], [1]]]),
        Row("dmtg two-shot (scratch)", 2, [ts], [_cost(d0), _cost(ts)], [part], style=SCRATCH),
    ]


def _table(md: str, title: str) -> list[list[str]]:
    """The body rows of the markdown table under the heading that starts with ``title``."""
    lines = md.split("## " + title, 1)[1].split("\n## ", 1)[0].splitlines()
    body = [ln for ln in lines if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in body]


def test_results_table_normgain_totals_and_cost(rows):
    naive, rs = rows
    t = build_tables(rs, NAMES, naive)
    main = {(r[0], r[1]): r[2:9] for r in _table(t["markdown"], "Results")}
    # Total loss, total error, NormGain_L, NormGain_E, rel. encoder cost, train time, runs
    assert main[("naive-mtl", "—")] == ["7.0000", "70.00", "—", "—", "1.00", "30 s", "1"]
    # dmtg: totals (5.5, 4.5) → 5 ± 0.7071, (55, 40) → 47.5 ± 10.61; NormGain_L (8.33, 25) → 16.67 ±
    # 11.79; NormGain_E (25, 33.33) → 29.17 ± 5.89; cost 2 branches × 10 epochs / naive's 10 epochs
    assert main[("dmtg", "2")] == ["5.0000 ± 0.7071", "47.50 ± 10.61", "+16.67 ± 11.79", "+29.17 ± 5.89",
                                   "2.00", "36 s", "1"]
    # rg: worse than naive → negative; (8, 10) → 9 ± 1.4142, (70, 80) → 75 ± 7.07, (−16.67, −50) →
    # −33.33 ± 23.57, (0, −33.33) → −16.67 ± 23.57; cost and time per partition: 20/10, (40 + 80)/2 s
    assert main[("rg", "2")] == ["9.0000 ± 1.4142", "75.00 ± 7.07", "-33.33 ± 23.57", "-16.67 ± 23.57",
                                 "2.00", "1.0 min", "2"]
    # one result: no ± ; two runs (the naive-init run it starts from, its own) → cost (20 + 20)/10
    assert main[("dmtg two-shot (scratch)", "2")] == ["4.0000", "35.00", "+33.33", "+50.00", "4.00", "1.8 min",
                                                      "2"]
    # the same numbers unrounded in comparison.json's rows
    js = {(r["method"], r["K"]): r for r in t["rows"]}
    d = js[("dmtg", 2)]
    assert d["normgain_loss"] == pytest.approx(50 / 3) and d["normgain_loss_std"] == pytest.approx(25 / 3 * 2 ** 0.5)
    assert d["normgain_error"] == pytest.approx(175 / 6) and d["normgain_error_std"] == pytest.approx(
        25 / 6 * 2 ** 0.5)
    assert d["total_loss"] == pytest.approx(5.0) and d["total_loss_std"] == pytest.approx(0.5 ** 0.5)
    assert d["total_error"] == pytest.approx(47.5) and d["total_error_std"] == pytest.approx(7.5 * 2 ** 0.5)
    assert d["rel_encoder_cost"] == pytest.approx(2.0) and d["n"] == 2 and d["runs"] == 1
    assert js[("rg", 2)]["normgain_loss"] == pytest.approx(-100 / 3)
    assert js[("rg", 2)]["rel_encoder_cost"] == pytest.approx(2.0) and js[("rg", 2)]["hours"] == pytest.approx(60 / 3600)
    assert js[("naive", None)]["normgain_loss"] is None     # the reference: no gain against itself (README, docs/baselines.md)
    assert d["groups"] == [[["a", "b"], ["c"]]] * 2
    # and in comparison.csv
    csv = {ln.split(",")[0]: ln.split(",") for ln in t["csv"].splitlines()}
    head = csv["method"]
    assert float(csv["dmtg"][head.index("normgain_loss")]) == pytest.approx(50 / 3)
    assert float(csv["rg"][head.index("total_error_std")]) == pytest.approx(50 ** 0.5)
    main_md = t["markdown"].split("## Results", 1)[1].split("\n## ", 1)[0]
    assert "| dmtg | 2 |" in main_md and "{a,b} {c}" in main_md and "2 random partitions" in main_md


def test_normgain_direction_per_row(tmp_path):
    """Better than naive on every task → positive; worse → negative; the same → 0. Not symmetric:
    halving a loss is +50 %, doubling it −100 % (a swapped reference would give +100 % / −50 %)."""
    naive = _result(tmp_path, "naive", (2, 4, 1), (10, 20, 40), branches=1)
    half = _result(tmp_path, "half", (1, 2, 0.5), (5, 10, 20))
    double = _result(tmp_path, "double", (4, 8, 2), (20, 40, 80))
    m = row_metrics(Row("x", 1, [half], [_cost(half)]), naive)
    assert m["normgain_loss"] == pytest.approx(50.0) and m["normgain_error"] == pytest.approx(50.0)
    m = row_metrics(Row("x", 1, [double], [_cost(double)]), naive)
    assert m["normgain_loss"] == pytest.approx(-100.0) and m["normgain_error"] == pytest.approx(-100.0)
    m = row_metrics(Row("x", 1, [naive], [_cost(naive)]), naive)
    assert m["normgain_loss"] == 0.0 and m["normgain_loss_std"] == 0.0 and m["n"] == 1


def test_per_task_tables(rows):
    naive, rs = rows
    t = build_tables(rs, NAMES, naive)
    per = {(r[0], r[1]): r[2:] for r in _table(t["markdown"], "Per task: test loss")}
    assert per[("naive-mtl", "—")] == ["2.0000", "4.0000", "1.0000"]
    # dmtg: mean losses (1.25, 2.5, 1.25); per-task gains averaged over seeds: a (50 + 25)/2,
    # b (25 + 50)/2, c (−50 + 0)/2
    assert per[("dmtg", "2")] == ["1.2500 (+37.5)", "2.5000 (+37.5)", "1.2500 (-25.0)"]
    # rg: (2.5, 5, 1.5); a (−50 + 0)/2, b (0 − 50)/2, c (0 − 100)/2
    assert per[("rg", "2")] == ["2.5000 (-25.0)", "5.0000 (-25.0)", "1.5000 (-50.0)"]
    err = {(r[0], r[1]): r[2:] for r in _table(t["markdown"], "Per task: test error")}
    assert err[("naive-mtl", "—")] == ["10.00", "20.00", "40.00"]
    assert err[("dmtg", "2")] == ["7.50", "15.00", "25.00"] and err[("rg", "2")] == ["15.00", "20.00", "40.00"]
    csv = {ln.split(",")[0]: ln.split(",") for ln in t["per_task_csv"].splitlines()}
    head = csv["method"]
    assert float(csv["dmtg"][head.index("gain:c")]) == pytest.approx(-25.0)
    assert float(csv["rg"][head.index("loss:b")]) == pytest.approx(5.0)
    assert float(csv["dmtg"][head.index("error:a")]) == pytest.approx(7.5)


def test_aggregator_rows_keep_their_baselines_table_treatment(rows):
    """--aggregator renames a row METHOD+NAME; its treatment stays its baseline's (RowStyle): RG+uw's
    cost and time per partition, the two-shot rows in the one-shot vs two-shot table. (Before the
    styles: rg+uw summed its partitions' cost, 4.00 and 2.0 min, and the two-shot table failed with a
    KeyError on "dmtg two-shot (scratch)+uw".)"""
    from dataclasses import replace
    naive, rs = rows
    rs = [replace(r, method=r.method + "+uw") if r.method in ("rg", "dmtg two-shot (scratch)") else r for r in rs]
    rs[2] = replace(rs[2], style=baselines_get("rg").style)
    t = build_tables(rs, NAMES, naive)
    main = {(r[0], r[1]): r[2:9] for r in _table(t["markdown"], "Results")}
    assert main[("rg+uw", "2")][4:6] == ["2.00", "1.0 min"]
    assert [r[1] for r in _table(t["markdown"], "One-shot vs two-shot")] == ["retrain from scratch", "DMTG (one-shot)"]


def test_two_shot_and_groupings_tables(rows):
    naive, rs = rows
    t = build_tables(rs, NAMES, naive)
    two = _table(t["markdown"], "One-shot vs two-shot")
    # one-shot: means without ± (5, 16.67, 47.5, 29.17); scratch second (the table's order)
    assert two == [["2", "retrain from scratch", "4.0000", "+33.33", "35.00", "+50.00"],
                   ["2", "DMTG (one-shot)", "5.0000", "+16.67", "47.50", "+29.17"]]
    g = {r[0]: r[1:] for r in _table(t["markdown"], "Groupings")}
    # the group serving each task (1-based); seed 0's networks [{a, b}, {a, c}]: a also trained in 2
    assert g["dmtg (seed 0)"] == ["2", "1 (+2)", "1", "2"] and g["dmtg (seed 1)"] == ["2", "1", "1", "2"]
    assert g["rg (seed 0)"] == ["2", "1", "2", "2"] and g["rg (seed 1)"] == ["2", "1", "2", "1"]
    assert g["naive-mtl"] == ["—", "1", "1", "1"]


def test_regression_tasks_have_no_normgain_e(tmp_path):
    """Without errors (regression tasks): NormGain_E and the total error are "—", the per-task
    table shows MAE / RMSE (means over the seeds)."""
    met = [{t: {"mae": v, "rmse": 2 * v} for t, v in zip(NAMES, (0.5, 1.0, 2.0))},
           {t: {"mae": v, "rmse": 2 * v} for t, v in zip(NAMES, (1.5, 1.0, 4.0))}]
    naive = _result(tmp_path, "naive", (2, 4, 1), None, branches=1, metrics=met[0])
    r0 = _result(tmp_path, "m0", (1, 3, 1.5), None, metrics=met[0])
    r1 = _result(tmp_path, "m1", (1.5, 2, 1), None, metrics=met[1])
    t = build_tables([Row("naive", None, [naive], [_cost(naive)], [[[0, 1, 2]]]),
                      Row("dmtg", 2, [r0, r1], [_cost(r0)], [[[0, 1], [2]]] * 2)], NAMES, naive)
    # the total error and NormGain_E columns have no value in any row: dropped from the table
    head = t["markdown"].split("## Results", 1)[1].splitlines()[2]
    assert "Total error" not in head and "NormGain_E" not in head and "NormGain_L" in head
    main = {(r[0], r[1]): r[2:4] for r in _table(t["markdown"], "Results")}
    assert main[("dmtg", "2")] == ["5.0000 ± 0.7071", "+16.67 ± 11.79"]
    err = {(r[0], r[1]): r[2:] for r in _table(t["markdown"], "Per task: test error")}
    assert err[("dmtg", "2")] == ["1 / 2", "1 / 2", "3 / 6"]


def test_latex_table_numbers(rows):
    naive, rs = rows
    tex = latex_table(rs, naive, "t")
    line = next(ln for ln in tex.splitlines() if ln.startswith("dmtg & 2"))
    cells = [c.strip() for c in line.rstrip("\\ ").split("&")]
    assert cells[2:] == [r"$5.0000 \pm 0.7071$", r"$47.50 \pm 10.61$", r"$+16.67 \pm 11.79$",
                         r"$+29.17 \pm 5.89$", "2.00", "36 s", "2"]
    line = next(ln for ln in tex.splitlines() if ln.startswith("naive-mtl & --"))
    assert [c.strip() for c in line.rstrip("\\ ").split("&")][2:] == ["$7.0000$", "$70.00$", "--", "--", "1.00",
                                                                      "30 s", "1"]


def test_best_val_losses_from_history(tmp_path):
    """history.json: the per-task validation losses at the epoch where a task set's summed loss is
    lowest — {a}: epoch 1 (1 < 3); {b}: epoch 0; {a, b}: epoch 1 (3 < 4); {b, c}: epoch 0 (2 < 6)."""
    res = _result(tmp_path, "run", (1, 1, 1), (1, 1, 1))
    assert _best_val_losses(res, [[0], [1], [0, 1], [1, 2]]) == [[1.0], [1.0], [1.0, 2.0], [1.0, 1.0]]
    (tmp_path / "run" / "history.json").write_text(json.dumps([{"epoch": 0, "train": {}}]))
    with pytest.raises(ValueError, match="no validation results in history.json"):
        _best_val_losses(res, [[0]])
    assert math.isfinite(row_metrics(Row("x", 1, [res], [_cost(res)]), res)["normgain_loss"])
