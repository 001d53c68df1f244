"""The datasets fastdmtg can open, by ``data.dataset`` name.

Adding a dataset = one format module in this package (a ``Dataset`` subclass + ``FORMAT =
DatasetFormat(...)``, see ``fastdmtg/data/base.py``); nothing else names it. A module outside the
package: ``FORMATS.add("module")`` before it is used, or an entry point of the group
``fastdmtg.datasets`` (``fastdmtg/registry.py``; docs/pipelines.md "Adding a dataset").
"""
from __future__ import annotations

from ..registry import Plugins
from .base import DatasetFormat

# the order (DatasetFormat.order) is the order of detection (``detect_format``: a more specific format
# first) and of listings (``fastdmtg recipes``)
FORMATS = Plugins("dataset", "data.dataset", "fastdmtg.data", "FORMAT",
                  accepts=lambda d: isinstance(d, DatasetFormat), order=lambda f: f.order,
                  group="fastdmtg.datasets")
get_format = FORMATS.load          # name → its DatasetFormat


def task_presets() -> dict[str, list[str]]:
    """Every format's task presets (data.tasks="celeba9"), by preset name."""
    return {k: v for fmt in FORMATS.declarations() for k, v in fmt.presets.items()}


def recipes_of(name: str, config_module) -> list:
    """The ``Recipe``s of format ``name`` (``config_module`` = fastdmtg.config, handed to the format's
    ``recipes`` so that formats never import the config)."""
    fmt = get_format(name)
    return [] if fmt.recipes is None else fmt.recipes(config_module)
