"""The training augmentations on one shared network (fastdmtg.methods.AUGMENTATIONS: UW, GradNorm,
PCGrad, the torchjd aggregators): one run each, in naive MTL's shape."""
from __future__ import annotations

from ..methods import AUGMENTATIONS
from ._core import Baseline, Row, partition_of


def rows(cmp, name: str) -> list[Row]:
    r = cmp.run(name, cmp.cfg(name), name)
    return [Row(name, None, cmp.repeats(r, name), [cmp.cost(r)], [partition_of(r["assignment"])],
                notes=["one shared network (naive-MTL shape); Train time includes the augmentation's "
                       "extra backward passes"])]


BASELINE = Baseline(names=tuple(AUGMENTATIONS), rows=rows, section="augmentation", order=0,
                    help="training augmentations on one shared network (fastdmtg.methods.AUGMENTATIONS)")
