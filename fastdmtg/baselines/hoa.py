"""HOA (Standley et al. 2020): every pair network + the STL singles → hoa_select → the chosen networks."""
from __future__ import annotations

import numpy as np

from ._core import Baseline, Row, best_val_losses, selection_row, train_selection
from .stl import stl_run


def hoa_tables(cmp) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Single-task and pair validation losses, each network at its own best epoch."""
    def go():
        stl = stl_run(cmp)
        pair = np.full((cmp.n, cmp.n), np.nan)
        pairs = [(a, b) for a in range(cmp.n) for b in range(a + 1, cmp.n)]
        # every pair run before any result is read: a plan (compare_plan) lists them all at once
        runs = [cmp.run(f"hoa/pair_{a}_{b}", cmp.cfg("networks", [[a, b]]),
                        f"hoa pair ({cmp.names[a]}, {cmp.names[b]})") for a, b in pairs]
        single = np.array([v[0] for v in best_val_losses(stl, [[t] for t in range(cmp.n)])])
        for (a, b), r in zip(pairs, runs):
            la, lb = best_val_losses(r, [[a, b]])[0]
            pair[a, b], pair[b, a] = la, lb
        return single, pair, runs
    return cmp.once("hoa_tables", go)


def rows(cmp, name: str) -> list[Row]:
    from ..grouping_search import hoa_select
    single, pair, pair_runs = hoa_tables(cmp)
    stl = stl_run(cmp)
    cmp.details["hoa_losses"] = {"single": single.tolist(), "pair": np.nan_to_num(pair).tolist(),
                                 "note": "pair[t][u] = val loss of t in the network {t,u}"}
    out = []
    for k in cmp.ks:
        sel = hoa_select(single, pair, k)
        cmp.details[f"hoa_selection_k{k}"] = sel.to_dict()
        r = train_selection(cmp, f"hoa/k{k}", f"hoa K={k}", sel)
        costs = [cmp.cost(stl)] + [cmp.cost(p) for p in pair_runs] + [cmp.cost(r)]
        out.append(selection_row(cmp, "hoa", k, f"hoa K={k}", sel, r, costs))
    return out


BASELINE = Baseline(names=("hoa",), rows=rows, order=4, default=True, aggregated=True,
                    later="the selected networks",
                    help="HOA: all pair networks + the STL singles → hoa_select → train the chosen networks")
