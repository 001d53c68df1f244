"""TAG (Fifty et al. 2021): one affinity run (tag-affinity) → tag_select per K → the chosen networks."""
from __future__ import annotations

import numpy as np

from ._core import Baseline, Row, affinity_rows


def tag_affinity(cmp) -> tuple[dict, np.ndarray]:
    """The affinity run and its inter-task affinity matrix (shared by TAG and TAG + PCGrad)."""
    def go():
        cfg = cmp.cfg("tag-affinity")
        r = cmp.run("tag/affinity", cfg, "tag affinity", cost_factor=1.0 + cmp.n / cfg.tag.affinity_every)
        if r.get("tag_affinity") is None:
            raise ValueError("the TAG affinity run recorded no measurement (tag.affinity_every larger "
                             "than the number of steps?)")
        return r, np.array(r["tag_affinity"])
    return cmp.once("tag_affinity", go)


def tag_rows(cmp, method: str, key: str, label: str, **sections) -> list[Row]:
    """TAG's selection per K from the one affinity run, each trained (``sections``: config fields
    per section, e.g. train={"aggregator": "pcgrad"} for TAG + PCGrad)."""
    aff_run, Z = tag_affinity(cmp)
    cmp.details["tag_affinity"] = {"matrix": Z.tolist(), "measurements": aff_run["tag_affinity_measurements"],
                                   "every": aff_run["tag_affinity_every"], "run": aff_run["_key"]}
    return affinity_rows(cmp, method, key, label, Z, aff_run, "tag", **sections)


def rows(cmp, name: str) -> list[Row]:
    return tag_rows(cmp, "tag", "tag", "tag")


BASELINE = Baseline(names=("tag",), rows=rows, order=3, default=True, aggregated=True,
                    later="the selected networks",
                    help="TAG: affinity run (tag-affinity) → tag_select → train the chosen networks")
