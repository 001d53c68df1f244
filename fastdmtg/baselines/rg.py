"""RG: a random partition into K groups, mean ± std over --rg-partitions partitions."""
from __future__ import annotations

from ._core import Baseline, Row, RowStyle, random_partition

STYLE = RowStyle(partitions=True)


def rows(cmp, name: str) -> list[Row]:
    out = []
    for k in cmp.ks:
        if k > cmp.n:
            continue
        res, costs, groups = [], [], []
        for s in range(cmp.seeds):
            part = random_partition(cmp.n, k, s)
            r = cmp.run(f"rg/k{k}/seed{s}", cmp.cfg("fixed", part), f"rg K={k} seed {s}")
            res.append(r)
            costs.append(cmp.cost(r))
            groups.append(part)
        out.append(Row("rg", k, res, costs, groups, style=STYLE,
                       notes=[f"mean ± std over {cmp.seeds} random partitions; cost and hours per partition"]))
    return out


BASELINE = Baseline(names=("rg",), rows=rows, order=2, default=True, aggregated=True, style=STYLE,
                    help="random partition into K groups, mean ± std over --rg-partitions partitions")
