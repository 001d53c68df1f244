"""DMTG's groups retrained from scratch and from the naive-MTL weights (the paper's Table 4)."""
from __future__ import annotations

from ._core import Baseline, Row, RowStyle, partition_of
from .dmtg import dmtg_run
from .naive import naive_run

# their rows in the one-shot vs two-shot table (DMTG's own row: fastdmtg/baselines/dmtg.py)
SCRATCH = RowStyle(two_shot=(0, "retrain from scratch", True))
NAIVE_INIT = RowStyle(two_shot=(1, "retrain from naive-MTL init", True))


def rows(cmp, name: str) -> list[Row]:
    out = []
    for k in cmp.ks:
        d = dmtg_run(cmp, k)
        groups = partition_of(d["assignment"])
        scratch = cmp.run(f"dmtg-two-shot/k{k}/scratch", cmp.cfg("fixed", groups),
                          f"dmtg two-shot K={k} (scratch)")
        nv = naive_run(cmp)
        init = cmp.run(f"dmtg-two-shot/k{k}/naive-init", cmp.cfg("fixed", groups, train={"init_from": nv["_dir"]}),
                       f"dmtg two-shot K={k} (naive init)")
        out.append(Row("dmtg two-shot (scratch)", k, cmp.repeats(scratch, f"dmtg two-shot K={k} (scratch)"),
                       [cmp.cost(d), cmp.cost(scratch)], [groups], style=SCRATCH))
        out.append(Row("dmtg two-shot (naive init)", k, cmp.repeats(init, f"dmtg two-shot K={k} (naive init)"),
                       [cmp.cost(d), cmp.cost(nv), cmp.cost(init)], [groups],
                       style=NAIVE_INIT))
    return out


BASELINE = Baseline(names=("dmtg-two-shot",), rows=rows, order=7, default=True, aggregated=True,
                    aliases=(("two-shot", "dmtg-two-shot"),), later="the retrained groups",
                    help="DMTG's groups retrained from scratch and from the naive-MTL weights (Table 4)")
