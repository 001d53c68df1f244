"""The baselines of ``fastdmtg compare``: one module per baseline, found by listing this package.

A module whose name does not start with "_" and that defines ``BASELINE = Baseline(...)``
(fastdmtg/baselines/_core.py) is a baseline: its names become ``--methods`` entries, its section
(grouping / augmentation / combination) and order place its rows in the tables, and its ``rows``
function runs what it needs through the comparison's run machinery. Adding a baseline is adding its
file (docs/baselines.md, "Adding a baseline"); nothing else names it.
"""
from __future__ import annotations

from ..registry import Plugins
from ._core import SECTIONS, Baseline, Row

__all__ = ["Baseline", "Row", "SECTIONS", "BASELINES", "all_baselines", "get", "known", "defaults", "aliases",
           "section_index", "reference", "reference_name", "clear_cache"]

def _one_reference(found: list[Baseline]) -> None:
    if sum(b.reference is not None for b in found) != 1:
        raise ValueError("exactly one baseline must declare the NormGain reference run (reference=...)")


# compare --methods name → its Baseline: every module of this package with ``BASELINE = Baseline(...)``
# (fastdmtg/registry.py), in the tables' order (section, then order)
BASELINES = Plugins("baseline", "compare --methods", __name__, "BASELINE",
                    accepts=lambda b: isinstance(b, Baseline), names=lambda b: b.names,
                    order=lambda b: (SECTIONS.index(b.section), b.order), group="fastdmtg.baselines",
                    check=_one_reference)


def clear_cache() -> None:
    """Forget the modules found (after a test adds one to ``__path__``)."""
    BASELINES.clear()


def all_baselines() -> list[Baseline]:
    return BASELINES.declarations()


def known() -> list[str]:
    """Every --methods name, in table order: grouping methods, augmentations, combinations."""
    return list(BASELINES)


def defaults() -> list[str]:
    """compare's default --methods."""
    return [n for n, b in BASELINES.items() if b.default]


def aliases() -> dict[str, str]:
    return {a: n for b in all_baselines() for a, n in b.aliases}


def get(name: str) -> Baseline:
    return BASELINES[name]


def section_index(name: str) -> int:
    """0 grouping methods, 1 training augmentations, 2 combinations (the TAG paper's layout)."""
    return SECTIONS.index(get(name).section)


def _reference_baseline() -> Baseline:
    return next(b for b in all_baselines() if b.reference is not None)


def reference_name() -> str:
    """The --methods name of the baseline whose run is the NormGain reference (naive)."""
    return _reference_baseline().names[0]


def reference(cmp) -> dict:
    """The NormGain reference run (naive MTL), trained or reused."""
    return _reference_baseline().reference(cmp)
