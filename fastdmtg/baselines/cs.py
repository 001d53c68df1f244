"""CS (the TAG paper): the cosine similarity of the tasks' gradients measured in one naive-MTL run
(cs-affinity), then TAG's selection on it; each selection trained as TAG's."""
from __future__ import annotations

import numpy as np

from ._core import Baseline, Row, affinity_rows


def rows(cmp, name: str) -> list[Row]:
    def go():
        cfg = cmp.cfg("cs-affinity")
        r = cmp.run("cs/affinity", cfg, "cs similarity", cost_factor=1.0 + cmp.n / cfg.cs.every)
        if r.get("cs_similarity") is None:
            raise ValueError("the CS run recorded no measurement (cs.every larger than the number of steps?)")
        return r, np.array(r["cs_similarity"])
    run, C = cmp.once("cs_similarity", go)
    cmp.details["cs_similarity"] = {"matrix": C.tolist(), "measurements": run["cs_measurements"],
                                    "every": run["cs_every"], "run": run["_key"]}
    return affinity_rows(cmp, "cs", "cs", "cs", C, run, "cs")


BASELINE = Baseline(names=("cs",), rows=rows, order=8, aggregated=True, later="the selected networks",
                    help="the TAG paper's CS: gradient cosine similarity (cs-affinity run) → tag_select → train")
