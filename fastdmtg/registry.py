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
