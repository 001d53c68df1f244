"""Extension points: one pattern for all of them — a plugin is a file.

Every extension point is a package and an attribute name:

    dataset formats           data.dataset      fastdmtg/data/         FORMAT       (data/registry.py)
    grouping methods          grouping.method   fastdmtg/methods/      METHOD       (methods/__init__.py)
    training augmentations    train.aggregator  fastdmtg/methods/      AUGMENTATION (methods/__init__.py)
    backbones                 model.arch        fastdmtg/models/       BACKBONE     (below)
    loader backends           data.backend      pipelines/             BACKEND      (below)
    trackers                  train.logger      fastdmtg/trackers/     TRACKER      (trackers/__init__.py)
    compare's baselines       compare --methods fastdmtg/baselines/    BASELINE     (baselines/__init__.py)

A module of the package whose name does not start with "_" and that defines the attribute is a
plugin: the attribute holds its declaration (a ``DatasetFormat``, a ``GroupingMethod`` class, a
``Backbone``, a ``LoaderBackend``, ...) or a tuple of them, and each declaration carries its names.
Adding one = adding its file; nothing else names it. The table is built when it is first read (its
modules imported then, a broken file reported by name), in the order the point declares (``order``:
e.g. the methods' order is their config sections' order, the formats' their detection order).

From another package: an entry point of the point's group (``fastdmtg.datasets``,
``fastdmtg.methods``, ... — ``group`` below) whose value names the plugin module (or its declaration,
"module:attribute"), or ``table.add("module")`` at run time before the name is used.
"""
from __future__ import annotations

import importlib
import pkgutil
import types
from collections.abc import Mapping
from typing import Any, Callable


def _unique(decls) -> list:
    """Each object once, first occurrence kept (by identity: declarations need not be hashable)."""
    out: dict[int, Any] = {}
    for d in decls:
        out.setdefault(id(d), d)
    return list(out.values())


def _own_name(decl) -> tuple[str, ...]:
    return (decl.name,)


class Plugins(Mapping):
    """One extension point's table: name → declaration, found by listing ``package`` for modules that
    define ``attr``. ``kind`` and ``field`` name the thing and its config field in the error for an
    unknown name; ``accepts(obj)``: whether a module's ``attr`` is a declaration of this point (anything
    else under that name is an error naming the file); ``names(decl)``: the names it is known by;
    ``order(decl)``: its sort key (ties: its first name); ``group``: the entry-point group other
    packages add theirs through; ``check(declarations)``: a rule over the whole table, run once when it
    is built (raises ValueError)."""

    def __init__(self, kind: str, field: str, package: str, attr: str, *, accepts: Callable[[Any], bool],
                 order: Callable[[Any], Any], names: Callable[[Any], tuple[str, ...]] = _own_name,
                 group: str | None = None, check: Callable[[list], None] | None = None):
        self.kind, self.field, self.package, self.attr = kind, field, package, attr
        self._accepts, self._names, self._order, self.group = accepts, names, order, group
        self._check = check
        self._added: list[str] = []               # modules of other packages, table.add
        self._found: dict[str, Any] | None = None

    # --------------------------------------------------------------------- discovery
    def _import(self, module: str, where: str):
        try:
            return importlib.import_module(module)
        except Exception as e:                   # a broken plugin file: say which one, in one line
            raise ValueError(f"{self.kind} plugin {where}: {type(e).__name__}: {e}") from e

    def _declarations(self, obj, where: str) -> list:
        """The declarations a module (or an entry point's object) holds."""
        if isinstance(obj, types.ModuleType):
            if getattr(obj.__spec__, "_initializing", False):
                # read while the module is still being imported (an import cycle through the table's
                # first read): its declaration may not exist yet, and the table would miss it for good
                raise RuntimeError(f"{self.kind} table read while {where} is being imported; read "
                                   f"{self.package}'s table only after the imports")
            obj = getattr(obj, self.attr, None)
            if obj is None:
                return []
        items = list(obj) if isinstance(obj, tuple) else [obj]
        for d in items:
            if not self._accepts(d):
                raise ValueError(f"{self.kind} plugin {where}: {self.attr} is {d!r}, not a {self.kind} declaration")
        return items

    def _discover(self) -> dict[str, Any]:
        pkg = importlib.import_module(self.package)
        decls: list = []
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            where = f"{info.module_finder.path}/{info.name}.py"
            decls += self._declarations(self._import(f"{self.package}.{info.name}", where), where)
        for module in self._added:
            decls += self._declarations(self._import(module, module), module)
        if self.group is not None:
            from importlib.metadata import entry_points
            for ep in entry_points(group=self.group):
                try:
                    obj = ep.load()
                except Exception as e:
                    raise ValueError(f"{self.kind} plugin {ep.value} (entry point {ep.name!r} of {self.group}): "
                                     f"{type(e).__name__}: {e}") from e
                decls += self._declarations(obj, ep.value)
        decls = _unique(decls)                   # one declaration reached twice (an entry point of ours) counts once
        decls.sort(key=lambda d: (self._order(d), self._names(d)[0]))
        found: dict[str, Any] = {}
        for d in decls:
            for name in self._names(d):
                if name in found:
                    raise ValueError(f"{self.field}: {self.kind} name {name!r} declared twice")
                found[name] = d
        if self._check is not None:
            self._check(decls)
        return found

    @property
    def table(self) -> dict[str, Any]:
        if self._found is None:
            self._found = self._discover()
        return self._found

    def clear(self) -> None:
        """Forget what was found (a test that adds a module to the package's ``__path__``)."""
        self._found = None

    def add(self, module: str) -> None:
        """Register the plugin module ``module`` of another package (imported on the table's next read)."""
        if module not in self._added:
            self._added.append(module)
        self.clear()

    def remove(self, module: str) -> None:
        """Undo ``add`` (tests)."""
        if module in self._added:
            self._added.remove(module)
        self.clear()

    # --------------------------------------------------------------------- the mapping
    def __getitem__(self, name: str):
        return self.table[name]

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def load(self, name: str):
        """The declaration registered as ``name``; an unknown name is a ValueError naming the config
        field and the known names."""
        if name not in self.table:
            raise ValueError(f"{self.field}: unknown {self.kind} {name!r}; known: {', '.join(self.table)}")
        return self.table[name]

    def declarations(self) -> list:
        """Each declaration once, in table order."""
        return _unique(self.table.values())


def subclass_of(base: type) -> Callable[[Any], bool]:
    """``accepts`` for a point whose declarations are classes (methods, trackers): a subclass of ``base``."""
    return lambda obj: isinstance(obj, type) and issubclass(obj, base)


def _is(type_name: str, module: str):
    """``accepts`` for a declaration type defined in ``module`` (imported when the table is first
    read, so that this module imports none of the extension points)."""
    def accepts(obj) -> bool:
        return isinstance(obj, getattr(importlib.import_module(module), type_name))
    return accepts


# data.backend: each loader backend's ``LoaderBackend`` (its name, its availability check, how it
# builds its source, its DDP behaviour: pipelines/source.py). The config validates
# data.backend against this table (it reads the names; the loaders import the config only inside
# their commands).
LOADER_BACKENDS = Plugins("backend", "data.backend", "fastdmtg.pipelines", "BACKEND",
                          accepts=_is("LoaderBackend", "fastdmtg.pipelines.source"),
                          order=lambda b: b.order, group="fastdmtg.backends")

# model.arch: each backbone's ``Backbone`` declaration (fastdmtg/models/backbone.py: its builder,
# whether it loads pretrained weights, what leaves it nothing shared); the config validates
# model.arch against this table.
BACKBONES = Plugins("backbone", "model.arch", "fastdmtg.models", "BACKBONE",
                    accepts=_is("Backbone", "fastdmtg.models.backbone"), order=lambda b: b.order,
                    group="fastdmtg.backbones")
