"""Extension points as plugins: a dataset format added the way docs/pipelines.md "Adding a dataset"
says (its two code blocks run literally, the module written to a temporary folder on sys.path) is
known to the config, the recipe table, the naive-MTL switch, predict's resize and trains."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipelines.md"


def _doc_blocks() -> list[str]:
    text = DOC.read_text()
    section = text.split("## Adding a dataset\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def mydata(tmp_path, monkeypatch):
    """The doc's format module as tmp_path/mydata.py, registered by the doc's registry block."""
    from fastdmtg.data import registry
    blocks = _doc_blocks()
    assert len(blocks) == 2, "the section has the module and the registry line"
    (tmp_path / "mydata.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    import fastdmtg.config as C
    saved = [dict(t) for t in (C.RECIPES, C.RECIPE_FOLLOWS, C.NAIVE_OF)], set(C._FORMATS_WITH_RECIPES)
    assert "mydata" not in registry.FORMATS
    exec(compile(blocks[1], "docs/pipelines.md (registry block)", "exec"), {})
    yield
    registry.FORMATS.remove("mydata")
    for t, old in zip((C.RECIPES, C.RECIPE_FOLLOWS, C.NAIVE_OF), saved[0]):
        t.clear()
        t.update(old)
    C._FORMATS_WITH_RECIPES.clear()
    C._FORMATS_WITH_RECIPES.update(saved[1])
    sys.modules.pop("mydata", None)


def test_a_format_module_in_the_package_is_found_with_no_line(plugin_file):
    """The doc's module dropped into fastdmtg/data/ is a dataset format by itself: no registry line."""
    from fastdmtg.config import DataConfig
    from fastdmtg.data.registry import FORMATS, get_format
    before = list(FORMATS)
    plugin_file(FORMATS, "mydata", _doc_blocks()[0])
    assert list(FORMATS) == before + ["mydata"]          # after the built-ins (DatasetFormat.order)
    assert get_format("mydata").about == "two colour tasks on random images"
    DataConfig(dataset="mydata")


def test_doc_dataset_is_known_everywhere_and_trains(mydata, tmp_path):
    from fastdmtg.cli import _train_parser, build_config
    from fastdmtg.config import NAIVE_OF, RECIPE_FOLLOWS, DataConfig, get_recipe
    from fastdmtg.data import known_task_names
    from fastdmtg.predict import resize_uint8
    from fastdmtg.train import train

    DataConfig(dataset="mydata")                                   # the config accepts the new name
    cfg = get_recipe("mydata_k2")                                 # its recipes are in the table
    assert (cfg.data.dataset, cfg.num_branches, RECIPE_FOLLOWS["mydata_k2"]) == ("mydata", 2, "ours")
    assert NAIVE_OF["mydata_k2"] == "mydata_naive"
    ap = argparse.ArgumentParser()
    _train_parser(ap.add_subparsers(dest="cmd"))
    naive = build_config(ap.parse_args(["train", "--recipe", "mydata_k2", "--method", "naive-mtl"]))
    assert naive.grouping.method == "naive-mtl" and naive.name == "mydata_naive" and naive.num_branches == 1
    assert known_task_names(cfg.data) == ["red", "green"]
    import torch
    x = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    from fastdmtg.data.celeba import resize_like_reference
    assert torch.equal(resize_uint8(x, 16, "mydata"), resize_like_reference(x, 16))   # the format's resize

    res = train(cfg, tmp_path / "run", progress=False)             # one tiny epoch through the library
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dataset"] == "mydata"
    assert res["dataset"] == "mydata" and res["tasks"] == ["red", "green"] and res["epochs"] == 1
    assert sorted(t for g in res["groups"] for t in g) == ["green", "red"]
    assert math.isfinite(res["total_error"])


# ----------------------------------------------------------------------------- loader backends

def test_backend_table_is_the_one_list_config_and_pipelines_use():
    from fastdmtg import pipelines as P
    from fastdmtg.config import ConfigError, DataConfig
    from fastdmtg.registry import LOADER_BACKENDS
    assert P.BACKENDS == tuple(LOADER_BACKENDS)
    for name in LOADER_BACKENDS:                         # each entry declares its own name and check
        b = P.backend(name)
        assert b.name == name and isinstance(b.status(deep=False)[0], bool)
        DataConfig(backend=name)
    with pytest.raises(ConfigError, match=r"data.backend: expected auto\|gpu-cache\|memory\|torch\|ffcv\|dali, "
                                          r"got 'nope'"):
        DataConfig(backend="nope")


def test_a_backend_of_another_package_is_added_by_one_line(tmp_path, monkeypatch):
    """A plugin module outside the package: ``table.add("module")`` (or an entry point of the table's
    group) registers it; the config accepts its name and the source is built by it."""
    from fastdmtg.config import ConfigError, DataConfig
    from fastdmtg.pipelines import build_source
    from fastdmtg.registry import LOADER_BACKENDS
    with pytest.raises(ConfigError):
        DataConfig(backend="mine")
    from test_file_counts import BACKEND_FILE                   # the throwaway backend, named "mine"
    (tmp_path / "my_backend.py").write_text(BACKEND_FILE.format(name="mine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    LOADER_BACKENDS.add("my_backend")
    try:
        cfg = DataConfig(backend="mine", synthetic_train=8, synthetic_val=4, synthetic_test=4, image_size=16)
        assert build_source(cfg, progress=False).built_by == "mine"
    finally:
        LOADER_BACKENDS.remove("my_backend")
        sys.modules.pop("my_backend", None)
    assert "mine" not in LOADER_BACKENDS


# ----------------------------------------------------------------------------- fields that don't change results

def test_resume_and_compare_rules_derive_from_one_table():
    from fastdmtg import compare_runs
    from fastdmtg.config import EFFECTS, FIELD_EFFECTS, RESUME_SAFE, SAME_RESULTS_FIELDS, _SECTIONS
    assert compare_runs._VOLATILE is SAME_RESULTS_FIELDS
    for key, (effect, resumable, what) in FIELD_EFFECTS.items():
        assert effect in EFFECTS and isinstance(resumable, bool) and what
        if "." in key:                                         # every field named exists in its section
            sec, name = key.split(".")
            assert name in _SECTIONS[sec].__dataclass_fields__, key
    # consistent: a field a resume may change that does not change results is one compare ignores, and a
    # field compare ignores but a resume may not change is one the checkpoint's state depends on
    for key, (effect, resumable, _) in FIELD_EFFECTS.items():
        if "." in key:
            assert (tuple(key.split(".")) in SAME_RESULTS_FIELDS) == (effect != "results"), key
        assert (key in RESUME_SAFE) == resumable, key
    not_resumable = {k for k, (e, r, _) in FIELD_EFFECTS.items() if not r}
    assert not_resumable == {"train.device", "model.batched", "data.backend", "data.root"}
    # the resume rule as it was (hand-kept list before the table): unchanged, in the same order
    assert list(RESUME_SAFE) == [
        "name", "train.epochs", "train.val_every", "train.log_every", "train.progress", "train.tensorboard",
        "train.logger", "train.mlflow_uri", "train.experiment", "train.eval_batch_size", "train.divergence_factor",
        "train.on_divergence", "train.kernels", "train.compile", "train.cuda_graph", "train.channels_last",
        "optim.fused", "data.num_workers", "data.cache_dir"]
    # compare's rule: the earlier hand-kept set, plus the no-effect / rounding fields the resume list had
    old = {("train", "progress"), ("train", "tensorboard"), ("train", "device"), ("data", "root"),
           ("data", "cache_dir"), ("data", "num_workers"), ("data", "backend"), ("train", "kernels"),
           ("train", "compile"), ("train", "cuda_graph"), ("train", "channels_last"), ("model", "batched"),
           ("optim", "fused")}
    assert SAME_RESULTS_FIELDS - old == {("train", "logger"), ("train", "mlflow_uri"), ("train", "experiment"),
                                         ("train", "eval_batch_size")}
    assert old <= SAME_RESULTS_FIELDS


def test_both_rules_act_on_the_table():
    from fastdmtg.compare_runs import _same_config
    from fastdmtg.config import ConfigError, apply_overrides, get_recipe, resume_changes
    base = get_recipe("synthetic_k3")
    for change, resume_ok, same in (("train.kernels=reference", True, True), ("train.logger=mlflow", True, True),
                                    ("data.backend=memory", False, True), ("train.epochs=11", True, False),
                                    ("optim.lr=0.5", False, False)):
        new = apply_overrides(base, [change])
        assert _same_config(base.to_dict(), new.to_dict()) == same, change
        if resume_ok:
            assert resume_changes(base, new, 1)
        else:
            with pytest.raises(ConfigError, match=change.split("=")[0]):
                resume_changes(base, new, 1)


# ----------------------------------------------------------------------------- one registry type, no re-exports

def _tables():
    from fastdmtg import baselines, pipelines, trackers
    from fastdmtg.data import registry as data_registry
    from fastdmtg.methods import AUGMENTATIONS, METHODS, augmentation_class, method_class
    from fastdmtg.registry import BACKBONES, LOADER_BACKENDS
    return [(data_registry.FORMATS, data_registry.get_format, "data.dataset"),
            (METHODS, method_class, "grouping.method"),
            (AUGMENTATIONS, augmentation_class, "train.aggregator"),
            (LOADER_BACKENDS, pipelines.backend, "data.backend"),
            (BACKBONES, BACKBONES.load, "model.arch"),
            (trackers.TRACKERS, trackers.tracker_class, "train.logger"),
            (baselines.BASELINES, baselines.BASELINES.load, "compare --methods")]


def test_every_extension_table_is_one_registry_type():
    """Every extension point is a ``Plugins`` table over its package; each of its names is declared by
    a module of that package (none elsewhere, no hand-kept list)."""
    from fastdmtg.registry import Plugins
    for table, load, field in _tables():
        assert isinstance(table, Plugins) and load == table.load and table.field == field
        for name in table:
            decl = table[name]
            where = decl.__module__ if isinstance(decl, type) else None
            if where is not None:
                assert where.startswith(table.package + "."), (name, where)
        with pytest.raises(ValueError, match=rf"^{re.escape(field)}: unknown .* 'nope'; known: "
                                             rf"{re.escape(', '.join(table))}$"):
            load("nope")


BROKEN = "raise RuntimeError('half-written plugin')\n"


def test_a_broken_plugin_file_is_reported_by_name(plugin_file):
    from fastdmtg.registry import BACKBONES
    path = plugin_file(BACKBONES, "broken_arch", BROKEN)
    with pytest.raises(ValueError, match=rf"backbone plugin {re.escape(str(path))}: RuntimeError: half-written plugin"):
        list(BACKBONES)


def test_a_plugin_attribute_of_the_wrong_kind_is_an_error(plugin_file):
    from fastdmtg.registry import LOADER_BACKENDS
    path = plugin_file(LOADER_BACKENDS, "not_a_backend", "BACKEND = 'memory'\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: BACKEND is 'memory', not a backend declaration"):
        list(LOADER_BACKENDS)


def test_a_name_declared_twice_is_an_error(plugin_file):
    from fastdmtg.registry import LOADER_BACKENDS
    plugin_file(LOADER_BACKENDS, "second_memory", """
        from fastdmtg.pipelines.resident import MEMORY
        from fastdmtg.pipelines.source import LoaderBackend
        BACKEND = LoaderBackend("memory", MEMORY.build)
    """)
    with pytest.raises(ValueError, match="data.backend: backend name 'memory' declared twice"):
        list(LOADER_BACKENDS)


def test_a_table_read_during_its_plugins_import_is_refused(plugin_file):
    """A plugin module that reads its own table while it is imported (an import cycle through the
    first read) would leave itself — and any module after it — out of the table for good: refused."""
    from fastdmtg.registry import BACKBONES
    plugin_file(BACKBONES, "reads_table", """
        from fastdmtg.registry import BACKBONES
        NAMES = list(BACKBONES)
    """)
    with pytest.raises(ValueError, match="backbone table read while .*reads_table.py is being imported"):
        list(BACKBONES)


def test_task_kinds_are_one_list():
    """The kinds of your own tasks: the models' rule (generic heads) reads the tasks' list."""
    from fastdmtg import models
    from fastdmtg.tasks import generic
    assert models.GENERIC_KINDS is generic.TYPES


def test_no_compatibility_reexports():
    """train.py and bench.py export what they define, not names kept for old import paths."""
    from fastdmtg import bench, train
    for name in ("FUSED_STEM_AUTO", "build_optimizer", "build_step_module", "prepare_model", "resolve",
                 "step_mode"):
        assert not hasattr(train, name), name
    assert not {"write_taskonomy_raw", "synthetic_taskonomy", "synthetic_celeba", "count_flops"} & set(bench.__all__)
