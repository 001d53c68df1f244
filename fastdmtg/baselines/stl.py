"""STL: one network per task — ``fixed`` groups 0|1|…|N−1 with nothing shared."""
from __future__ import annotations

from ._core import Baseline, Row, partition_of


def stl_cfg(cmp):
    """STL: nothing may be shared between the task networks — a configured shared trunk is
    switched off (and the result checked on the built model). → (config, notes)"""
    from ..models import build_parts
    from ..registry import BACKBONES
    model = BACKBONES.load(cmp.base.model.arch).share_nothing(cmp.base.model)     # its fields that share a trunk
    notes = [f"STL: model.{k}={getattr(cmp.base.model, k)} overridden to {v} (single-task networks share nothing)"
             for k, v in model.items()]
    cfg = cmp.cfg("fixed", [[t] for t in range(cmp.n)], model=model)
    shared = build_parts(cfg.model, cmp.specs, cmp.image_size).shared
    if any(True for _ in shared.parameters()):
        raise ValueError("STL: this model still has a shared trunk with parameters (model.shared); "
                         "single-task networks must not share one")
    return cfg, notes


def stl_run(cmp) -> dict:
    """The STL run, shared with HOA (its single-task losses) and BMTN (its RSA features)."""
    def go():
        cfg, notes = stl_cfg(cmp)
        for note in notes:
            cmp.log(f"    note: {note}", flush=True)
        res = cmp.run("stl", cfg, "stl")
        res["_notes"] = notes
        return res
    return cmp.once("stl", go)


def rows(cmp, name: str) -> list[Row]:
    r = stl_run(cmp)
    return [Row("stl", None, cmp.repeats(r, "stl"), [cmp.cost(r)], [partition_of(r["assignment"])],
                notes=list(r["_notes"]) +
                ["K=N branches with nothing shared in one model train exactly like N separate networks "
                 "(losses never mix; same initialisation and batch order; one joint best epoch)"])]


BASELINE = Baseline(names=("stl",), rows=rows, order=1, default=True, aggregated=True,
                    help="one network per task: fixed groups 0|1|...|N-1 with nothing shared")
