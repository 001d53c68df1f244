"""compare --seeds N: every method trained with N seeds → mean ± std, LaTeX beside Markdown/CSV,
grouping stability across seeds (issue 15, item 7)."""
import json
import statistics

import numpy as np
import pytest

from fastdmtg.baselines._core import partition_of
from fastdmtg.compare import compare_main
from fastdmtg.seeds import fmt_flops, fmt_time, stability

SETS = ["train.tensorboard=false", "train.progress=false", "data.synthetic_groups=2",
        "data.synthetic_tasks_per_group=2", "data.synthetic_train=128", "data.synthetic_val=64",
        "data.synthetic_test=64", "train.epochs=2", "train.batch_size=64", "data.image_size=16", "model.width=2"]


def test_stability_by_hand():
    # 4 tasks, 2 seeds: {0,1}{2,3} and {0,1,2}{3}
    s = stability([[[0, 1], [2, 3]], [[0, 1, 2], [3]]], 4)
    want = np.array([[1, 1, .5, 0], [1, 1, .5, 0], [.5, .5, 1, .5], [0, 0, .5, 1]])
    assert np.allclose(s, want)


def test_number_formats():
    assert fmt_time(0.00429) == "15 s" and fmt_time(0.5) == "30.0 min" and fmt_time(2.5) == "2.50 h"
    assert fmt_flops(3.55e-05) == "35.5 kFLOP" and fmt_flops(0.22) == "220 MFLOP" and fmt_flops(38.9) == "38.9 GFLOP"


def test_compare_with_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--recipe", "synthetic_k3", "--methods", "naive,dmtg", "--k", "2", "--seeds", "2", "--no-flops",
            "--out", str(out), *[x for s in SETS for x in ("--set", s)]]
    assert compare_main(args) == 0
    rows = {(r["method"], r["K"]): r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    runs = {"naive": ["naive", "naive-seed1"], "dmtg": ["dmtg/k2", "dmtg/k2-seed1"]}
    for method, k in (("naive", None), ("dmtg", 2)):
        res = [json.loads((out / d / "results.json").read_text()) for d in runs[method]]
        cfgs = [json.loads((out / d / "config.json").read_text()) for d in runs[method]]
        assert [c["train"]["seed"] for c in cfgs] == [0, 1]
        r = rows[(method, k)]
        tl = [x["total_loss"] for x in res]
        assert r["n"] == 2
        assert r["total_loss"] == pytest.approx(statistics.mean(tl))
        assert r["total_loss_std"] == pytest.approx(statistics.stdev(tl))
    md = (out / "comparison.md").read_text()
    dm_line = next(ln for ln in md.splitlines() if ln.startswith("| dmtg | 2 |"))
    assert dm_line.count("±") >= 4                     # total loss, error, NormGain_L, NormGain_E
    # the report (issue 29): naive MTL under train's name, its NormGain "—" here and empty in the CSV
    # (not the other seed against the first), no paper table numbers for the embedded data
    nv = next(ln for ln in md.splitlines() if ln.startswith("| naive-mtl | — |")).split(" | ")
    assert nv[4:6] == ["—", "—"] and "(Table" not in md and "each cell the mean of 2 seeds" in md
    import csv as _csv
    import io
    crow = next(r for r in _csv.DictReader(io.StringIO((out / "comparison.csv").read_text())) if r["method"] == "naive")
    assert crow["normgain_loss"] == crow["normgain_loss_std"] == crow["normgain_error"] == ""
    tex = (out / "comparison.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\pm" in tex and tex.count("\\\\") >= 3
    # grouping stability of DMTG over its two seeds, by hand from the two results
    parts = [partition_of(json.loads((out / d / "results.json").read_text())["assignment"]) for d in runs["dmtg"]]
    names = json.loads((out / "dmtg/k2/results.json").read_text())["tasks"]
    csv = (out / "grouping_stability_dmtg_k2.csv").read_text().splitlines()
    assert csv[0] == "task," + ",".join(names)
    got = np.array([[float(v) for v in ln.split(",")[1:]] for ln in csv[1:]])
    assert np.allclose(got, stability(parts, 4), atol=1e-3) and np.allclose(np.diag(got), 1)
    assert (out / "grouping_stability_dmtg_k2.png").stat().st_size > 1000
    # the same matrix from the run folders themselves (e.g. separate `fastdmtg train --set train.seed=S` runs)
    assert compare_main(["--stability", str(out / "dmtg/k2"), str(out / "dmtg/k2-seed1"), "--out",
                         str(tmp_path / "st")]) == 0
    assert (tmp_path / "st" / "grouping_stability.csv").read_text().splitlines()[1:] == csv[1:]


# ----------------------------------------------------------------------------- issue 29: the report's format

def _res(loss: dict, error: dict | None, metrics: dict | None = None, assignment=(0, 0)):
    return {"test": {"loss": loss, "error": error, "metrics": metrics or {}}, "total_loss": sum(loss.values()),
            "total_error": None if error is None or len(error) < len(loss) else sum(error.values()),
            "num_branches": 1, "epochs": 2, "train_time_s": 1.0, "assignment": list(assignment)}


def test_report_format_on_your_own_tasks():
    """Mixed tasks (a regression: no total error anywhere): the all-"—" total-error column is left out;
    no paper table numbers in the headings of a non-paper recipe; losses in fixed decimals; the
    naive-MTL reference row's NormGain is "—" in the Markdown and empty in the CSV (null in JSON)."""
    from fastdmtg.baselines._core import Row
    from fastdmtg.compare_tables import build_tables
    names = ["cls", "age"]
    naive = _res({"cls": 0.5, "age": 0.0012345}, {"cls": 20.0}, {"age": {"mae": 1.5, "rmse": 2.0}})
    seed1 = _res({"cls": 0.4, "age": 0.0010}, {"cls": 10.0}, {"age": {"mae": 1.25, "rmse": 1.75}})
    dm = _res({"cls": 0.25, "age": 0.001}, {"cls": 10.0}, {"age": {"mae": 1.0, "rmse": 1.5}}, (0, 1))
    rows = [Row("naive", None, [naive, seed1], [("naive", 2.0, 1.0)], [[[0, 1]]] * 2),
            Row("dmtg", 2, [dm, dm], [("dmtg/k2", 4.0, 2.0)], [[[0], [1]]] * 2)]
    t = build_tables(rows, names, naive)
    md = t["markdown"]
    head = next(ln for ln in md.splitlines() if ln.startswith("| Method | K | Total loss"))
    assert "Total error" not in head and "NormGain_E" in head                 # cls has an error: NormGain_E stays
    assert "Table" not in md                                                  # your own data: no citation
    assert "e-0" not in md and "e+0" not in md
    pt = next(ln for ln in md.splitlines() if ln.startswith("| naive-mtl | — | 0.4500 |"))    # per task: the means
    assert pt == "| naive-mtl | — | 0.4500 | 0.0011 |"
    assert "## Per task: test loss (NormGain_L %) — each cell the mean of 2 seeds" in md
    naive_line = next(ln for ln in md.splitlines() if ln.startswith("| naive-mtl | — | 0.4511 ± "))
    assert naive_line.split(" | ")[3:5] == ["—", "—"]                           # NormGain_L, NormGain_E
    csv_row = t["csv"].splitlines()[1].split(",")
    keys = t["csv"].splitlines()[0].split(",")
    got = dict(zip(keys, csv_row))
    assert got["method"] == "naive" and all(got[k] == "" for k in ("normgain_loss", "normgain_loss_std",
                                                                    "normgain_error", "normgain_error_std"))
    assert t["rows"][0]["normgain_loss"] is None
    # the paper's recipes cite the tables
    md = build_tables(rows, names, naive, paper=True)["markdown"]
    assert "## Results (Tables 1 and 3)" in md and "(Table 2)" in md and "## Groupings (Tables A4/A5)" in md
