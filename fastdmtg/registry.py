"""Name → implementation tables whose modules are imported on first use (datasets, grouping methods):
listing the names (config validation, ``fastdmtg recipes``) imports none of them."""
from __future__ import annotations

import importlib


def lazy_lookup(table: dict[str, str], name: str, field: str, kind: str):
    """``table[name]`` = "module:attribute" → that attribute; an unknown name is a ValueError naming
    the config field and the known names."""
    if name not in table:
        raise ValueError(f"{field}: unknown {kind} {name!r}; known: {', '.join(table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


# data.backend name -> "module:attribute" of the loader backend's ``LoaderBackend`` (its name, its
# availability check, how it builds its source: fastdmtg/pipelines/source.py). Adding a backend = its
# file + one line here. The table lives here, not in fastdmtg.pipelines, because the config validates
# data.backend against it and fastdmtg.pipelines imports the config.
LOADER_BACKENDS = {
    "gpu-cache": "fastdmtg.pipelines.resident:GPU_CACHE",
    "memory": "fastdmtg.pipelines.resident:MEMORY",
    "torch": "fastdmtg.pipelines.torch_files:BACKEND",
    "ffcv": "fastdmtg.pipelines.ffcv_source:BACKEND",
    "dali": "fastdmtg.pipelines.dali_source:BACKEND",
}
