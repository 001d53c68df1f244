"""The datasets fastdmtg can open, by ``data.dataset`` name.

Adding a dataset = one format module (a ``Dataset`` subclass + ``FORMAT = DatasetFormat(...)``, see
``fastdmtg/data/base.py``) and one line here. Modules are imported on first use: listing the names
(config validation, ``fastdmtg recipes``) imports no format code.
"""
from __future__ import annotations

import importlib

FORMATS = {
    "synthetic": "fastdmtg.data.synthetic",
    "celeba": "fastdmtg.data.celeba",
    "taskonomy": "fastdmtg.data.taskonomy",
    "folder": "fastdmtg.data.folder",
    "tensors": "fastdmtg.data.tensors",
}


def get_format(name: str):
    """The ``DatasetFormat`` registered as ``name``."""
    if name not in FORMATS:
        raise ValueError(f"data.dataset: unknown dataset {name!r}; known: {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name]).FORMAT
