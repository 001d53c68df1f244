"""DMTG (one shot): the grouping is learned while the groups train."""
from __future__ import annotations

from ._core import Baseline, Row, RowStyle, partition_of
from .naive import naive_run

#: the one-shot row of the one-shot vs two-shot table (fastdmtg/baselines/dmtg_two_shot.py: rows 0 and 1)
STYLE = RowStyle(learned_grouping=True, two_shot=(2, "DMTG (one-shot)", False))


def dmtg_run(cmp, k: int) -> dict:
    """The DMTG run at K (shared with the two-shot retraining, which reads its grouping)."""
    train = {}
    if cmp.base.train.init == "naive" and not cmp.base.train.init_from:
        train["init_from"] = naive_run(cmp)["_dir"]     # the paper's recipes start from it
    return cmp.once(f"dmtg{k}", lambda: cmp.run(f"dmtg/k{k}", cmp.cfg("dmtg", branches=k, train=train),
                                                f"dmtg K={k}"))


def rows(cmp, name: str) -> list[Row]:
    out = []
    for k in cmp.ks:
        r = dmtg_run(cmp, k)
        rs = cmp.repeats(r, f"dmtg K={k}")             # each seed may find its own grouping
        out.append(Row("dmtg", k, rs, [cmp.cost(r)], [partition_of(x["assignment"]) for x in rs],
                       style=STYLE))
    return out


BASELINE = Baseline(names=("dmtg",), rows=rows, order=6, default=True, style=STYLE, help="DMTG (one shot)")
