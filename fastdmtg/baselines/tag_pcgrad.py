"""TAG's selected networks trained with PCGrad (the TAG paper §5: the two are complementary)."""
from __future__ import annotations

from ._core import Baseline, Row
from .tag import tag_rows


def rows(cmp, name: str) -> list[Row]:
    return tag_rows(cmp, "tag+pcgrad", "tag-pcgrad", "tag+pcgrad", train={"aggregator": "pcgrad"})


BASELINE = Baseline(names=("tag-pcgrad",), rows=rows, section="combination", order=0,
                    later="the selected networks", help="TAG's selected networks trained with PCGrad (the TAG paper §5)")
