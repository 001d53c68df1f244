"""naive MTL: one shared encoder, every task in one group — the NormGain reference of every row."""
from __future__ import annotations

from ._core import Baseline, Row, RowStyle, partition_of

STYLE = RowStyle(display="naive-mtl", reference=True)


def naive_run(cmp) -> dict:
    """The naive-MTL run (--naive-recipe, else the recipe itself): shared by every baseline that needs
    it (the tables' reference, DMTG's and the two-shot retraining's initialisation)."""
    def go():
        cfg = cmp.cfg("naive-mtl", base=cmp.naive_base)
        return cmp.run("naive", cfg, "naive")
    return cmp.once("naive", go)


def rows(cmp, name: str) -> list[Row]:
    r = naive_run(cmp)
    return [Row("naive", None, cmp.repeats(r, "naive"), [cmp.cost(r)], [partition_of(r["assignment"])],
                style=STYLE)]


BASELINE = Baseline(names=("naive",), rows=rows, order=0, default=True, aliases=(("naive-mtl", "naive"),),
                    reference=naive_run, style=STYLE, help="naive MTL, one encoder (the NormGain reference)")
