"""``fastdmtg.registry.Plugins``, the table type of every extension point, on a planted package: which
modules are plugins, the order (declared, then the first name), several declarations in one module,
entry points of other packages (a module, a "module:attribute", one of the package's own modules met
twice), ``add``/``remove``, and every refusal with the file or entry point it names."""
from __future__ import annotations

import re
import sys
import uuid
from dataclasses import dataclass

import pytest

from fastdmtg.registry import Plugins


@dataclass(frozen=True, eq=False)
class Decl:
    names: tuple
    order: int
    extra: dict | None = None          # unhashable, as a DatasetFormat's presets are


def _write(folder, name: str, text: str):
    (folder / f"{name}.py").write_text(text)


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A package ``plug_<id>``: a.py (alpha, order 1), b.py (a tuple: beta+b2 at 0, gamma at 1),
    z.py (zeta+aaa at 1: ties broken by the first name), _hidden.py and c.py (no declaration)."""
    pkg = f"plug_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "site"
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text("")
    head = f"from {__name__} import Decl\n"
    _write(root / pkg, "a", head + "THING = Decl(('alpha',), 1, {'k': [1]})\n")
    _write(root / pkg, "b", head + "THING = (Decl(('beta', 'b2'), 0), Decl(('gamma',), 1))\n")
    _write(root / pkg, "z", head + "THING = Decl(('zeta', 'aaa'), 1)\n")
    _write(root / pkg, "_hidden", head + "THING = Decl(('hidden',), 0)\n")
    _write(root / pkg, "c", "OTHER = 1\n")
    monkeypatch.syspath_prepend(str(root))
    yield pkg, root
    for m in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".") or m.startswith("plug_ext")]:
        del sys.modules[m]


def _table(pkg, group=None):
    return Plugins("thing", "x.thing", pkg, "THING", accepts=lambda d: isinstance(d, Decl),
                   names=lambda d: d.names, order=lambda d: d.order, group=group)


def _entry_points(root, group: str, lines: list[str]) -> None:
    dist = root / f"plug_ext_{uuid.uuid4().hex[:6]}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.name.split('-')[0]}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n" + "\n".join(lines) + "\n")


def test_the_package_modules_that_declare_are_the_table_in_declared_order(planted):
    pkg, _ = planted
    t = _table(pkg)
    assert list(t) == ["beta", "b2", "alpha", "gamma", "zeta", "aaa"]    # order 0, then 1 by first name
    assert t["b2"] is t["beta"] and t.load("alpha").extra == {"k": [1]}
    assert [d.names[0] for d in t.declarations()] == ["beta", "alpha", "gamma", "zeta"]
    assert len(t) == 6 and "hidden" not in t
    with pytest.raises(ValueError, match=r"^x.thing: unknown thing 'nope'; known: beta, b2, alpha, gamma, zeta, aaa$"):
        t.load("nope")


def test_a_file_added_later_counts_after_clear(planted):
    pkg, root = planted
    t = _table(pkg)
    assert "late" not in t
    _write(root / pkg, "late", f"from {__name__} import Decl\nTHING = Decl(('late',), -1)\n")
    assert "late" not in t                                   # the table was read: kept until cleared
    t.clear()
    assert list(t)[0] == "late"


def test_entry_points_add_modules_and_declarations_once(planted):
    pkg, root = planted
    (root / "plug_ext_mod.py").write_text(f"from {__name__} import Decl\nTHING = Decl(('ext',), 2)\n"
                                          "EXTRA = Decl(('extra',), 3)\n")
    group = f"plugtest.{uuid.uuid4().hex[:6]}"
    _entry_points(root, group, ["ext = plug_ext_mod", "extra = plug_ext_mod:EXTRA", f"own = {pkg}.a"])
    t = _table(pkg, group)
    assert list(t)[-2:] == ["ext", "extra"] and list(t).count("alpha") == 1     # its own module met twice: once
    assert "ext" not in _table(pkg)                          # no group: none of them


def test_a_broken_entry_point_is_named(planted):
    pkg, root = planted
    group = f"plugtest.{uuid.uuid4().hex[:6]}"
    _entry_points(root, group, ["bad = plug_ext_missing_module"])
    with pytest.raises(ValueError, match=rf"^thing plugin plug_ext_missing_module \(entry point 'bad' of "
                                         rf"{re.escape(group)}\): ModuleNotFoundError"):
        list(_table(pkg, group))


def test_add_and_remove_a_module_of_another_package(planted):
    pkg, root = planted
    (root / "plug_ext_added.py").write_text(f"from {__name__} import Decl\nTHING = Decl(('added',), 0)\n")
    t = _table(pkg)
    before = list(t)
    t.add("plug_ext_added")
    t.add("plug_ext_added")                                  # twice: once
    assert list(t) == ["added", *before]                     # order 0, "added" < "beta"
    t.remove("plug_ext_added")
    assert list(t) == before


def test_refusals_name_the_file(planted):
    pkg, root = planted
    _write(root / pkg, "twice", f"from {__name__} import Decl\nTHING = Decl(('gamma',), 5)\n")
    with pytest.raises(ValueError, match="^x.thing: thing name 'gamma' declared twice$"):
        list(_table(pkg))
    (root / pkg / "twice.py").unlink()
    _write(root / pkg, "wrong", "THING = 'alpha'\n")
    with pytest.raises(ValueError, match=r"wrong.py: THING is 'alpha', not a thing declaration$"):
        list(_table(pkg))
    _write(root / pkg, "wrong", "import no_such_module_at_all\n")
    sys.modules.pop(f"{pkg}.wrong", None)
    with pytest.raises(ValueError, match=r"^thing plugin .*wrong.py: ModuleNotFoundError: No module named "
                                         r"'no_such_module_at_all'$"):
        list(_table(pkg))


def test_a_table_rule_runs_once_when_the_table_is_built(planted):
    pkg, _ = planted
    calls = []

    def rule(decls):
        calls.append([d.names[0] for d in decls])
        if len(decls) > 3:
            raise ValueError("at most three declarations")
    t = Plugins("thing", "x.thing", pkg, "THING", accepts=lambda d: isinstance(d, Decl), names=lambda d: d.names,
                order=lambda d: d.order, check=rule)
    with pytest.raises(ValueError, match="at most three declarations"):
        list(t)
    with pytest.raises(ValueError, match="at most three declarations"):   # refused again: nothing kept
        t.load("alpha")
    calls.clear()
    ok = Plugins("thing", "x.thing", pkg, "THING", accepts=lambda d: isinstance(d, Decl), names=lambda d: d.names,
                 order=lambda d: d.order, check=lambda decls: calls.append(len(decls)))
    assert list(ok) and ok["gamma"] and "zeta" in ok
    assert calls == [4]                                      # the table's four declarations, checked once
