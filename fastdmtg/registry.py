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


class Registry(dict):
    """One extension point's table: name → "module:attribute", the module imported on first ``load``.
    A dict, so that listing and checking names (config validation, ``fastdmtg recipes``) imports none
    of the modules; ``kind`` and ``field`` name the thing and its config field in the error for an
    unknown name; ``group``: an entry-point group whose entries other packages add (a built-in name
    is not replaced)."""

    def __init__(self, kind: str, field: str, entries: dict[str, str], group: str | None = None):
        super().__init__(entries)
        self.kind, self.field = kind, field
        if group is not None:
            # entries of other packages: their entry points of ``group`` (name = "module:attribute")
            from importlib.metadata import entry_points
            self.update({ep.name: ep.value for ep in entry_points(group=group) if ep.name not in entries})

    def load(self, name: str):
        """The attribute registered as ``name``; an unknown name is a ValueError naming the field and
        the known names."""
        return lazy_lookup(self, name, self.field, self.kind)


# data.backend name -> "module:attribute" of the loader backend's ``LoaderBackend`` (its name, its
# availability check, how it builds its source: fastdmtg/pipelines/source.py). Adding a backend = its
# file + one line here. The table lives here, not in fastdmtg.pipelines, because the config validates
# data.backend against it and fastdmtg.pipelines imports the config.
LOADER_BACKENDS = Registry("backend", "data.backend", {
    "gpu-cache": "fastdmtg.pipelines.resident:GPU_CACHE",
    "memory": "fastdmtg.pipelines.resident:MEMORY",
    "torch": "fastdmtg.pipelines.torch_files:BACKEND",
    "ffcv": "fastdmtg.pipelines.ffcv_source:BACKEND",
    "dali": "fastdmtg.pipelines.dali_source:BACKEND",
})

# model.arch name -> "module:attribute" of the backbone's ``Backbone`` declaration (fastdmtg/models/
# backbone.py: its builder, whether it loads pretrained weights, what leaves it nothing shared). Adding a
# backbone = its file + one line here; the config validates model.arch against this table.
BACKBONES = Registry("backbone", "model.arch", {
    "resnet_celeba": "fastdmtg.models.resnet_celeba:BACKBONE",
    "xception": "fastdmtg.models.xception:BACKBONE",
    "vit_base": "fastdmtg.models.vit:BACKBONE",
})
