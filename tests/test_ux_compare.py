"""compare --seeds N: every method trained with N seeds → mean ± std, LaTeX beside Markdown/CSV,
grouping stability across seeds (issue 15, item 7)."""
import json
import statistics

import numpy as np
import pytest

from fastdmtg.compare import compare_main, partition_of
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
