"""docs/architecture.md names real things: every code name it writes in backticks that looks like one
(``config.resume_changes``, ``RunFolder.claim``, ``aggregators.NAMES``), every file and folder
(``run_folder.py``, ``fastdmtg/models/``) and every test (``tests/test_x.py::test_name``) exists, and
each extension point of its table is the ``Plugins`` table it names, over the package and attribute it
names. A rename or a move that leaves the page behind fails here."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# where a short dotted name's first part may live (docs write ``aggregators.NAMES`` for
# fastdmtg.methods.aggregators.NAMES)
PACKAGES = ("fastdmtg", "fastdmtg.methods", "fastdmtg.baselines", "fastdmtg.models", "fastdmtg.data",
            "fastdmtg.trackers", "fastdmtg.pipelines", "fastdmtg.kernels")
FOLDERS = ("", "fastdmtg/", "tests/", "fastdmtg/methods/", "fastdmtg/baselines/", "fastdmtg/models/",
           "fastdmtg/data/", "fastdmtg/trackers/", "pipelines/", "kernels/")
OTHER_LIBRARIES = ("torch", "ray", "numpy", "torchjd")


def _ticks() -> list[str]:
    return sorted(set(re.findall(r"`([^`\n]+)`", DOC.read_text())))


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


def _classes():
    """Every class defined at module level in the package's modules, by name → (module, class)."""
    out = {}
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        for path in Path(mod.__file__).parent.glob("*.py"):
            m = _module(f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg)
            for k, v in vars(m).items():
                if isinstance(v, type) and v.__module__ == m.__name__:
                    out.setdefault(k, v)
    return out


def _resolves(token: str, classes) -> bool:
    parts = token.split(".")
    if parts[0] in classes:                           # Class.attribute
        obj = classes[parts[0]]
        for p in parts[1:]:
            if not hasattr(obj, p):
                return False
        return True
    for pkg in PACKAGES:
        for i in range(len(parts), 0, -1):          # the longest importable module prefix
            mod = _module(".".join([pkg, *parts[:i]]))
            if mod is None:
                continue
            obj = mod
            for p in parts[i:]:
                obj = getattr(obj, p, None)
                if obj is None:
                    break
            else:
                return True
            break
    return False


def _config_field(token: str) -> bool:
    from fastdmtg.config import Config
    d = Config().to_dict()
    sec, _, field = token.partition(".")
    return isinstance(d.get(sec), dict) and field in d[sec]


def test_every_dotted_code_name_exists():
    classes = _classes()
    names = [t for t in _ticks() if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", t)]
    assert len(names) > 20                            # the page does name code
    missing = [t for t in names if not _config_field(t) and not t.startswith("fastdmtg.")
               and t.split(".")[0] not in OTHER_LIBRARIES
               and not t.endswith(".py") and not _resolves(t, classes)]
    # entry-point groups are names, not modules
    missing = [t for t in missing if not re.fullmatch(r"fastdmtg\.\w+", t)]
    assert missing == []


def test_every_named_file_and_test_exists():
    tests_defined = {n.name for f in (ROOT / "tests").glob("test_*.py")
                     for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.FunctionDef)}
    missing = []
    for t in _ticks():
        path, _, test = t.partition("::")
        if test and not path:                         # "::test_name" after a named file
            if test not in tests_defined:
                missing.append(t)
            continue
        if not re.fullmatch(r"[\w./-]+(\.py|\.md|/)", path) or " " in t:
            continue
        if not any((ROOT / (prefix + path)).exists() for prefix in FOLDERS):
            missing.append(t)
        elif test:
            src = (ROOT / path).read_text()           # a test is named with its path from the root
            if f"def {test}(" not in src:
                missing.append(t)
    assert missing == []


def test_the_extension_point_table_is_the_code():
    """Each row of "Extension points"' first table: its table object is a ``Plugins`` over the package
    folder and attribute the row names, and validates the config field it names."""
    from fastdmtg.registry import Plugins
    text = DOC.read_text().split("## Extension points", 1)[1]
    rows = re.findall(r"^\| ([^|]+) \| `([^`]+)` \| `([^`]+)` \| `(\w+)`: [^|]+ \| `([\w.]+)` \|$", text, re.M)
    assert len(rows) == 7
    classes = _classes()
    for point, field, folder, attr, table_name in rows:
        assert _resolves(table_name, classes), table_name
        mod, _, name = table_name.rpartition(".")
        table = getattr(importlib.import_module("fastdmtg." + mod), name)
        assert isinstance(table, Plugins), point
        assert (table.field, table.attr) == (field, attr), point
        repo_folder = {"fastdmtg.pipelines": "pipelines/"}.get(table.package, table.package.replace(".", "/") + "/")
        assert folder == repo_folder and (ROOT / folder).is_dir(), point
        assert len(table) > 0


@pytest.mark.parametrize("planted", ["config.no_such_function", "RunFolder.no_such_method", "aggregators.NOPE"])
def test_the_name_check_fails_on_a_planted_wrong_name(planted):
    assert not _resolves(planted, _classes())


def _texts_built_in_code(path: Path) -> list[str]:
    """Calls of ``apply_overrides`` in ``path`` whose overrides are written there (a string or an
    f-string in a list literal): typed values turned into text and parsed back."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and len(node.args) >= 2):
            continue
        fn = node.func
        if (fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", None)) != "apply_overrides":
            continue
        arg = node.args[1]
        if isinstance(arg, (ast.List, ast.Tuple)) and any(
                isinstance(e, ast.JoinedStr) or (isinstance(e, ast.Constant) and isinstance(e.value, str))
                for e in arg.elts):
            out.append(f"{path.name}:{node.lineno}")
    return out


def test_text_forms_exist_only_at_the_edge():
    """"Values at the edges": inside the package a config changes through typed values (``evolve``);
    only the command line (cli.py) turns its flags into ``--set`` texts."""
    found = [hit for f in sorted((ROOT / "fastdmtg").rglob("*.py")) if f.name != "cli.py"
             for hit in _texts_built_in_code(f)]
    assert found == []


def test_the_edge_check_sees_a_planted_text(tmp_path):
    planted = ROOT / "fastdmtg" / "api.py"
    text = planted.read_text().replace('evolve(cfg, data={"folder_tasks": folder_tasks})',
                                       'apply_overrides(cfg, [f"data.folder_tasks={folder_tasks}"])')
    assert text != planted.read_text()
    copy = tmp_path / "api.py"
    copy.write_text(text)
    assert [hit.split(":")[0] for hit in _texts_built_in_code(copy)] == ["api.py"]
