"""The datasets fastdmtg can open, by ``data.dataset`` name.

Adding a dataset = one format module (a ``Dataset`` subclass + ``FORMAT = DatasetFormat(...)``, see
``fastdmtg/data/base.py``) and one line here. Modules are imported on first use: listing the names
(config validation, ``fastdmtg recipes``) imports no format code.
"""
from __future__ import annotations

from ..registry import Registry

FORMATS = Registry("dataset", "data.dataset", {
    "synthetic": "fastdmtg.data.synthetic:FORMAT",
    "celeba": "fastdmtg.data.celeba:FORMAT",
    "taskonomy": "fastdmtg.data.taskonomy:FORMAT",
    "folder": "fastdmtg.data.folder:FORMAT",
    "tensors": "fastdmtg.data.tensors:FORMAT",
})
get_format = FORMATS.load          # name → its DatasetFormat


def task_presets() -> dict[str, list[str]]:
    """Every format's task presets (data.tasks="celeba9"), by preset name."""
    return {k: v for name in FORMATS for k, v in get_format(name).presets.items()}


def recipes_of(name: str, config_module) -> list:
    """The ``Recipe``s of format ``name`` (``config_module`` = fastdmtg.config, handed to the format's
    ``recipes`` so that formats never import the config)."""
    fmt = get_format(name)
    return [] if fmt.recipes is None else fmt.recipes(config_module)
