"""BMTN (Vandenhende et al. 2020): RSA affinity from the STL networks → split point + clustering → train."""
from __future__ import annotations

from ._core import Baseline, Row
from .stl import stl_run


def rows(cmp, name: str) -> list[Row]:
    from ..grouping_search import bmtn_select
    from ..methods.bmtn import rsa_locations, split_options, stl_rsa_affinity
    field = rsa_locations(cmp.base.model).split_field      # refuses a backbone without RSA locations
    splits = split_options(cmp.base.model, cmp.specs, cmp.image_size)
    stl = stl_run(cmp)
    rsa = cmp.once("rsa", lambda: stl_rsa_affinity(stl["_dir"], cmp.rsa_images))
    A = rsa["affinity"]
    cmp.details["bmtn_rsa"] = {"locations": rsa["locations"], "num_images": rsa["num_images"],
                               "affinity": A.tolist()}
    recipe_split = splits[getattr(cmp.base.model, field)]
    out = []
    for k in cmp.ks:
        budget = recipe_split["shared_params"] + k * recipe_split["branch_params"]
        sel = bmtn_select(A, k, splits, budget)
        cmp.details[f"bmtn_selection_k{k}"] = {key: v for key, v in sel.items()}
        r = cmp.run(f"bmtn/k{k}", cmp.cfg("fixed", sel["groups"], model={field: sel["split"]}), f"bmtn K={k}")
        notes = [f"split {sel['split']} (encoder params {sel['params']:,} ≤ budget {budget:,}), "
                 f"clustering cost {sel['cost']:.3f}"]
        if not sel["optimal"]:
            notes.append("clustering by complete linkage + local moves (too many partitions to enumerate)")
        out.append(Row("bmtn", k, cmp.repeats(r, f"bmtn K={k}"), [cmp.cost(stl), cmp.cost(r)], [sel["groups"]],
                       notes=notes))
    return out


BASELINE = Baseline(names=("bmtn",), rows=rows, order=5, default=True, aggregated=True,
                    later="the selected networks",
                    help="BMTN: RSA affinity from the STL networks → split point + clustering → train")
