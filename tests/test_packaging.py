"""What an install holds: setup.py's packages are every package folder of the repository (a regular,
non-editable install copies only those; an editable one finds any folder, so the suite would not
notice a missing one), mapped as docs/architecture.md says (kernels/ and pipelines/ inside the
fastdmtg namespace)."""
from __future__ import annotations

import runpy
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwargs(monkeypatch) -> dict:
    seen: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)                         # setuptools paths are relative to the project root
    runpy.run_path(str(ROOT / "setup.py"))
    return seen


def test_every_package_folder_is_installed(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    folders = {"fastdmtg": "fastdmtg", "kernels": "fastdmtg.kernels", "pipelines": "fastdmtg.pipelines"}
    expected = set()
    for folder, name in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join([name, *rel]))
    assert "fastdmtg.baselines" in expected
    assert sorted(kw["packages"]) == sorted(expected)
    assert kw["package_dir"] == {"fastdmtg": "fastdmtg", "fastdmtg.kernels": "kernels",
                                 "fastdmtg.pipelines": "pipelines"}
